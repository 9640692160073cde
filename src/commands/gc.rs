//! gc: destroy VMs this driver created whose jobs are gone (orphans after a runner crash, an OOM
//! kill or a host reboot, when cleanup_exec never ran). The rules are the sweep's
//! ([`crate::fleet::sweep`]); this is the command line's side of it.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::fleet::sweep::{self, Rules, Tally};
use crate::fleet::FleetContext;
use crate::joblog;

pub use crate::fleet::sweep::DEFAULT_MAX_AGE;

/// Parses `90m`, `4h`, `2d`, `45s`, `1h30m`, `1d12h` (a bare number is refused: which unit?).
pub fn parse_age(text: &str) -> Result<Duration> {
    let bad = || {
        Error::Settings(format!(
            "--max-age {text:?} is not an age like 90m, 4h, 2d or 1h30m (units: s, m, h, d)"
        ))
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    for ch in text.chars() {
        if ch.is_ascii_digit() {
            number.push(ch);
            continue;
        }
        let unit: u64 = match ch {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let value: u64 = number.parse().map_err(|_| bad())?;
        number.clear();
        total = value
            .checked_mul(unit)
            .and_then(|secs| total.checked_add(secs))
            .ok_or_else(bad)?;
    }
    if !number.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

pub async fn gc(
    context: &FleetContext,
    runner: Option<&str>,
    max_age: Option<&str>,
    dry_run: bool,
) -> Result<()> {
    let rules = rules(runner, max_age, dry_run)?;
    sweep::sweep(context, &rules, &mut Tally::default()).await
}

/// [`gc`], then its results written to `path` for node_exporter's textfile collector (also
/// when the sweep failed: `gitlab_proxmox_runner_gc_success 0`, with what it did count).
pub async fn gc_with_metrics_file(
    context: &FleetContext,
    runner: Option<&str>,
    max_age: Option<&str>,
    dry_run: bool,
    path: &std::path::Path,
) -> Result<()> {
    let rules = rules(runner, max_age, dry_run)?;
    let started = Instant::now();
    let mut tally = Tally::default();
    let result = sweep::sweep(context, &rules, &mut tally).await;
    let registry = tally.registry(dry_run, result.is_ok(), started.elapsed());
    match (result, crate::metrics::write_textfile(path, registry)) {
        (Err(err), Err(not_written)) => {
            joblog::warn(not_written.to_string());
            Err(err)
        }
        (result, written) => result.and(written),
    }
}

fn rules<'a>(runner: Option<&'a str>, max_age: Option<&str>, dry_run: bool) -> Result<Rules<'a>> {
    Ok(Rules {
        runner,
        max_age: max_age.map(parse_age).transpose()?,
        dry_run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_in_every_documented_form() {
        assert_eq!(parse_age("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_age("4h").unwrap(), Duration::from_secs(14_400));
        assert_eq!(parse_age("2d").unwrap(), Duration::from_secs(172_800));
        assert_eq!(parse_age(" 45s ").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_age("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_age("0s").unwrap(), Duration::ZERO);
        for bad in [
            "",
            "90",
            "h",
            "4x",
            "-1h",
            "1.5h",
            "4 h",
            "99999999999999999999d",
        ] {
            assert!(parse_age(bad).is_err(), "{bad:?}");
        }
    }
}
