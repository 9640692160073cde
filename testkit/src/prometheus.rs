//! A real Prometheus server (Debian's `prometheus` package, `/usr/bin/prometheus`) for the
//! metrics tests: started on a loopback port with its own configuration and storage in a
//! temporary directory, scraping the given loopback targets every second, and asked through
//! its HTTP API (`/api/v1/query`). Never the packaged service.
//!
//! A machine without it skips such tests loudly; `GPR_REQUIRE_PROMETHEUS=1` (CI) makes that a
//! failure.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

pub const REQUIRE_ENV: &str = "GPR_REQUIRE_PROMETHEUS";
const PROMETHEUS: &str = "/usr/bin/prometheus";
/// Debian's package ships it beside the server: it lints the text format.
pub const PROMTOOL: &str = "/usr/bin/promtool";

/// Why a Prometheus cannot run here, if it cannot.
pub fn unavailable_reason() -> Option<String> {
    (!Path::new(PROMETHEUS).exists()).then(|| {
        format!(
            "{PROMETHEUS} is not installed (apt-get install --no-install-recommends prometheus)"
        )
    })
}

/// Reports a test that cannot run here: a loud SKIPPED line, or a failure under
/// `GPR_REQUIRE_PROMETHEUS=1`.
#[track_caller]
pub fn skip(test: &str, reason: &str) {
    if std::env::var(REQUIRE_ENV).is_ok_and(|value| value == "1") {
        panic!("{test}: {REQUIRE_ENV}=1 but the test cannot run: {reason}");
    }
    eprintln!("\n*** SKIPPED: {test}: {reason} (set {REQUIRE_ENV}=1 to make this a failure) ***\n");
}

/// A running Prometheus; dropping it kills it.
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// A Prometheus scraping `targets` (`127.0.0.1:PORT`, `/metrics`) every second, ready to
    /// answer queries; `None` (skipped, loudly) without the package.
    #[track_caller]
    pub fn start_or_skip(test: &str, targets: &[SocketAddr]) -> Option<Prometheus> {
        if let Some(reason) = unavailable_reason() {
            skip(test, &reason);
            return None;
        }
        Some(Prometheus::start(targets))
    }

    #[track_caller]
    pub fn start(targets: &[SocketAddr]) -> Prometheus {
        for target in targets {
            assert!(target.ip().is_loopback(), "scrape loopback only: {target}");
        }
        let dir = tempfile::Builder::new()
            .prefix("gpr-prometheus-")
            .tempdir()
            .expect("temp dir");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: gitlab-proxmox-runner-pool\n    \
                 static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .expect("write prometheus.yml");
        let log = dir.path().join("prometheus.log");
        let mut last = String::new();
        // A port taken between choosing it and Prometheus binding it: try another.
        for _ in 0..5 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, crate::unused_port()));
            let mut child = Command::new(PROMETHEUS)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("prometheus log"))
                .spawn()
                .expect("start prometheus");
            let ready = poll(Duration::from_secs(60), || {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(Err(format!("exited with {status}")));
                }
                match http_get(addr, "/-/ready") {
                    Ok((200, _)) => Some(Ok(())),
                    _ => None,
                }
            });
            match ready {
                Some(Ok(())) => {
                    return Prometheus {
                        child,
                        addr,
                        log,
                        _dir: dir,
                    }
                }
                outcome => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = format!(
                        "{}: {}",
                        outcome.map_or_else(|| "not ready in 60 s".into(), |r| r.unwrap_err()),
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        }
        panic!("prometheus did not start: {last}");
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it logged (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The instant query `expr` as Prometheus answers it: each series' labels (as JSON) and
    /// value.
    #[track_caller]
    pub fn query(&self, expr: &str) -> Vec<(serde_json::Value, f64)> {
        let path = format!(
            "/api/v1/query?query={}",
            utf8_percent_encode(expr, NON_ALPHANUMERIC)
        );
        let (status, body) = http_get(self.addr, &path).expect("ask prometheus");
        assert_eq!(status, 200, "{expr}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("prometheus's JSON");
        assert_eq!(answer["status"], "success", "{expr}: {body}");
        answer["data"]["result"]
            .as_array()
            .expect("a vector result")
            .iter()
            .map(|series| {
                let value = series["value"][1]
                    .as_str()
                    .and_then(|value| value.parse().ok())
                    .expect("a sample value");
                (series["metric"].clone(), value)
            })
            .collect()
    }

    /// The one value of `expr`, if it has exactly one series.
    #[track_caller]
    pub fn value(&self, expr: &str) -> Option<f64> {
        match self.query(expr).as_slice() {
            [(_, value)] => Some(*value),
            _ => None,
        }
    }

    /// The health of every scrape target as Prometheus last saw it (`up`, `down`, `unknown`).
    pub fn target_health(&self) -> Vec<String> {
        let (_, body) = http_get(self.addr, "/api/v1/targets").unwrap_or_default();
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        answer["data"]["activeTargets"]
            .as_array()
            .map(|targets| {
                targets
                    .iter()
                    .map(|target| {
                        format!(
                            "{} {} {}",
                            target["scrapeUrl"].as_str().unwrap_or("?"),
                            target["health"].as_str().unwrap_or("?"),
                            target["lastError"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn poll<T>(limit: Duration, condition: impl FnMut() -> Option<T>) -> Option<T> {
    crate::poll(limit, crate::wait::POLL, condition)
}

/// `GET path` on a loopback HTTP server: its status and body (HTTP/1.0, so the server closes
/// the connection after the answer).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    assert!(addr.ip().is_loopback(), "loopback only: {addr}");
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {head:?}")))?;
    Ok((status, body.to_string()))
}
