//! gc: destroy VMs this driver created whose jobs are gone (orphans after a runner crash, an OOM
//! kill or a host reboot, when cleanup_exec never ran). The rules are the sweep's
//! ([`crate::fleet::sweep`]); this is the command line's side of it.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::fleet::sweep::{self, Rules, Tally};
use crate::fleet::FleetContext;
use crate::joblog;

pub use crate::fleet::sweep::DEFAULT_MAX_AGE;

/// Parses an age the way humantime does: `90m`, `4h`, `2d`, `45s`, `1h30m`, `1d12h`, and also
/// `1h 30min`, `1.5h`, `2 days`, `1w`. A bare number is refused (which unit?).
pub fn parse_age(text: &str) -> Result<Duration> {
    humantime::parse_duration(text).map_err(|why| {
        Error::Settings(format!(
            "--max-age {text:?} is not an age like 90m, 4h, 2d or 1h30m: {why}"
        ))
    })
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
        assert_eq!(parse_age("1d12h").unwrap(), Duration::from_secs(129_600));
        for bad in ["", "90", "h", "4x", "-1h", "99999999999999999999d"] {
            assert!(parse_age(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ages_also_parse_in_humantimes_longer_forms() {
        for (text, secs) in [
            ("1h 30m", 5400),
            ("4 h", 14_400),
            ("1.5h", 5400),
            ("90min", 5400),
            ("2 days", 172_800),
            ("1w", 604_800),
            ("25hours", 90_000),
        ] {
            assert_eq!(
                parse_age(text).unwrap(),
                Duration::from_secs(secs),
                "{text}"
            );
        }
    }

    #[test]
    fn a_refused_age_says_what_is_wrong_with_it() {
        for (text, why) in [
            ("90", "time unit needed, for example 90sec"),
            ("4x", "unknown time unit \"x\""),
            ("-1h", "expected number at 0"),
            ("", "value was empty"),
        ] {
            let message = parse_age(text).unwrap_err().to_string();
            assert!(message.contains("is not an age like 90m"), "{message}");
            assert!(message.contains(why), "{message}");
        }
    }
}
