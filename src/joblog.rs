//! What the driver prints for people: concise progress with timings, loud warnings.
//! prepare and run output lands in the job log; cleanup output lands in the runner's own log.
//! Everything goes to stderr so that it never mixes into a stage script's stdout stream.

use std::io::Write;
use std::time::Duration;

pub fn info(message: impl AsRef<str>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "[proxmox-runner] {}", message.as_ref());
}

pub fn warn(message: impl AsRef<str>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "\x1b[33;1m[proxmox-runner] WARNING: {}\x1b[0m",
        message.as_ref()
    );
}

pub fn error(message: impl AsRef<str>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "\x1b[31;1m[proxmox-runner] ERROR: {}\x1b[0m",
        message.as_ref()
    );
}

/// `1.2 s`, `0.35 s`, `14.8 s`.
pub fn secs(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs < 1.0 {
        format!("{secs:.2} s")
    } else {
        format!("{secs:.1} s")
    }
}

/// An age as people read it: `45 s`, `12 min`, `26.1 h`, `3.0 d`.
pub fn age(age: Duration) -> String {
    let secs = age.as_secs();
    if secs < 120 {
        format!("{secs} s")
    } else if secs < 2 * 3600 {
        format!("{} min", secs / 60)
    } else if secs < 3 * 86_400 {
        format!("{:.1} h", secs as f64 / 3600.0)
    } else {
        format!("{:.1} d", secs as f64 / 86_400.0)
    }
}

/// Seconds since the Unix epoch on this host's clock (0 if the clock is before 1970): the
/// unit of every time a marker records.
pub fn now_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |now| now.as_secs())
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_read_naturally() {
        assert_eq!(super::secs(std::time::Duration::from_millis(1234)), "1.2 s");
        assert_eq!(super::secs(std::time::Duration::from_millis(345)), "0.34 s");
    }
}
