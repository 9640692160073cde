//! Prometheus metrics: what the fleet commands show an operator's Prometheus.
//!
//! - One process-wide registry ([`register`] adds to it, [`encode`] renders it): the API
//!   client counts every request it sends there, whatever the command ([`api_answered`], called
//!   once, in [`crate::proxmox::Client`]); the pool service adds its own families
//!   ([`crate::pool::metrics`]) and serves the whole registry at `/metrics`
//!   (`pool --metrics-listen`, [`serve`]).
//! - gc is short-lived: `gc --metrics-file` writes its sweep's results for node_exporter's
//!   textfile collector ([`write_textfile`]), atomically.
//!
//! Every name starts with `gitlab_proxmox_runner_` and names its unit; every label value is a
//! host-set name (a template name from `WARM_POOL`, a node of the cluster) or one word of a
//! fixed set, never a VMID, a job id or a project path, so the number of series is bounded.
//! The encoding is the Prometheus text format (version 0.0.4) of `prometheus-client`, the
//! Prometheus project's Rust client.

use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::cancel::Cancel;
use crate::error::{Error, Result};

/// The prefix of every metric name.
pub const PREFIX: &str = "gitlab_proxmox_runner";
/// The `Content-Type` of what [`encode`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A gauge holding a float (seconds, a timestamp).
pub type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    method: &'static str,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiErrorLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// The registry and the families every command shares.
pub struct Metrics {
    registry: std::sync::Mutex<Registry>,
    api_requests: Family<ApiLabels, Counter>,
    api_errors: Family<ApiErrorLabels, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix(PREFIX);
    let api_requests = Family::<ApiLabels, Counter>::default();
    registry.register(
        "api_requests",
        "Proxmox API requests sent (each retry is one), by method and the answer's status class \
         (transport: no HTTP answer)",
        api_requests.clone(),
    );
    let api_errors = Family::<ApiErrorLabels, Counter>::default();
    registry.register(
        "api_errors",
        "Proxmox API requests that failed, by HTTP status (transport: no HTTP answer)",
        api_errors.clone(),
    );
    register_build_info(&mut registry);
    Metrics {
        registry: std::sync::Mutex::new(registry),
        api_requests,
        api_errors,
    }
});

/// `gitlab_proxmox_runner_build_info{version="0.1.0"} 1`.
fn register_build_info(registry: &mut Registry) {
    let build_info = Family::<VersionLabels, Gauge>::default();
    build_info
        .get_or_create(&VersionLabels {
            version: crate::DRIVER_VERSION,
        })
        .set(1);
    registry.register("build_info", "The driver's version (always 1)", build_info);
}

/// Adds families to the process-wide registry (the pool service's, once at its start).
pub fn register(add: impl FnOnce(&mut Registry)) {
    let mut registry = METRICS
        .registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    add(&mut registry);
}

/// The process-wide registry in the Prometheus text format.
pub fn encode() -> String {
    let registry = METRICS
        .registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    encode_registry(&registry)
}

fn encode_registry(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, registry);
    text
}

/// The API client's one call per request sent: `status` is the HTTP status of the answer,
/// `None` when none came (connect, TLS, timeout).
pub fn api_answered(method: &reqwest::Method, status: Option<u16>) {
    let method = match *method {
        reqwest::Method::GET => "GET",
        reqwest::Method::POST => "POST",
        reqwest::Method::PUT => "PUT",
        reqwest::Method::DELETE => "DELETE",
        _ => "other",
    };
    let status_class = match status {
        None => "transport",
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => "other",
    };
    METRICS
        .api_requests
        .get_or_create(&ApiLabels {
            method,
            status_class,
        })
        .inc();
    if !matches!(status, Some(200..=399)) {
        METRICS
            .api_errors
            .get_or_create(&ApiErrorLabels {
                status: status_label(status),
            })
            .inc();
    }
}

/// An HTTP status as a label value from a fixed set (the codes PVE answers with, and a word
/// for the rest), so that a misbehaving proxy cannot make up series.
fn status_label(status: Option<u16>) -> &'static str {
    const KNOWN: [&str; 17] = [
        "400", "401", "403", "404", "405", "408", "409", "429", "500", "501", "502", "503", "504",
        "595", "596", "597", "599",
    ];
    match status {
        None => "transport",
        Some(code) => KNOWN
            .iter()
            .find(|known| known.parse() == Ok(code))
            .copied()
            .unwrap_or(match code {
                400..=499 => "4xx_other",
                500..=599 => "5xx_other",
                _ => "other",
            }),
    }
}

/// Serves [`encode`] at `GET /metrics` on `listener` until `cancel` fires; every other path
/// answers 404. Plain HTTP/1.1: put it on loopback, or behind what guards your scrapes.
pub async fn serve(listener: tokio::net::TcpListener, cancel: Cancel) {
    use hyper::server::conn::http1;
    use hyper_util::rt::{TokioIo, TokioTimer};
    /// Scrapes at once; more connections wait in the listen queue.
    const MAX_CONNECTIONS: usize = 16;
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            permit = std::sync::Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = cancel.cancelled() => return,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    crate::joblog::warn(format!("metrics: accepting a connection failed: {err}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = cancel.cancelled() => return,
        };
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer));
            tokio::select! {
                _ = connection => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
}

async fn answer(
    request: Request<hyper::body::Incoming>,
) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&hyper::Method::GET | &hyper::Method::HEAD, "/metrics") => {
            (StatusCode::OK, CONTENT_TYPE, encode())
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET /metrics\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "gitlab-proxmox-runner serves its metrics at /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    Ok(response)
}

/// Writes `registry` (with the build info added) to `path` in the text format node_exporter's
/// textfile collector reads: into a temporary file in the same directory, then renamed over
/// `path`, so that a scrape never sees half a file. The file is world-readable (0644): metrics
/// carry no secret, and node_exporter usually runs as its own user.
pub fn write_textfile(path: &Path, mut registry: Registry) -> Result<()> {
    use std::io::Write as _;
    register_build_info(&mut registry);
    let text = encode_registry(&registry);
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let shown = path.display();
    let mut file = tempfile::Builder::new()
        .prefix(".gitlab-proxmox-runner-metrics.")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|err| {
            Error::io(
                format!("--metrics-file: creating a file in {}", dir.display()),
                err,
            )
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.as_file().sync_all())
        .map_err(|err| Error::io(format!("--metrics-file: writing {shown}"), err))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(|err| Error::io(format!("--metrics-file: writing {shown}"), err))?;
    }
    file.persist(path)
        .map_err(|err| Error::io(format!("--metrics-file: renaming onto {shown}"), err.error))?;
    Ok(())
}

/// A registry of its own, with the prefix, for [`write_textfile`].
pub fn textfile_registry() -> Registry {
    Registry::with_prefix(PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_answers_are_counted_by_class_and_errors_by_a_bounded_status() {
        api_answered(&reqwest::Method::GET, Some(200));
        api_answered(&reqwest::Method::PUT, Some(403));
        api_answered(&reqwest::Method::POST, Some(596));
        api_answered(&reqwest::Method::GET, None);
        api_answered(&reqwest::Method::GET, Some(588));
        let text = encode();
        for line in [
            "# TYPE gitlab_proxmox_runner_api_requests_total counter",
            "gitlab_proxmox_runner_api_requests_total{method=\"PUT\",status_class=\"4xx\"} ",
            "gitlab_proxmox_runner_api_requests_total{method=\"GET\",status_class=\"transport\"} ",
            "gitlab_proxmox_runner_api_errors_total{status=\"403\"} ",
            "gitlab_proxmox_runner_api_errors_total{status=\"596\"} ",
            "gitlab_proxmox_runner_api_errors_total{status=\"5xx_other\"} ",
            "gitlab_proxmox_runner_api_errors_total{status=\"transport\"} ",
            "gitlab_proxmox_runner_build_info{version=\"",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(!text.contains("status=\"200\""), "{text}");
        assert!(!text.contains("status=\"588\""), "{text}");
    }

    #[test]
    fn the_textfile_replaces_the_old_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gc.prom");
        std::fs::write(&path, "old\n").unwrap();
        let mut registry = textfile_registry();
        let gauge = FloatGauge::default();
        gauge.set(1.5);
        registry.register("gc_duration_seconds", "How long", gauge);
        write_textfile(&path, registry).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("gitlab_proxmox_runner_gc_duration_seconds 1.5\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE gitlab_proxmox_runner_gc_duration_seconds gauge\n"));
        assert!(!text.contains("old"));
        // Nothing else is left in the directory.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("gc.prom")]);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }
}
