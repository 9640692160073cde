//! What went wrong talking to the Proxmox API, in the API's own words, and whether trying again
//! can help.
//!
//! PVE reports most failures as HTTP 500 with the text in the status line's reason phrase
//! (`500 unable to create VM 101: config file already exists`); only pve-http-server >= 5.2
//! also puts `"message"` in the body. Parameter errors are 400 with an `errors` map.
//!
//! Every match on PVE's (and rustls's, and qemu-guest-agent's) wording lives in this file:
//! callers ask one of the `is_*` questions, or [`ApiError::tls_reason`], never the message text.

use std::collections::BTreeMap;
use std::fmt;

/// How a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiErrorKind {
    /// The API answered with an HTTP error status.
    Http(u16),
    /// No connection could be made: the request never reached the API.
    Connect,
    /// The connection broke or timed out after the request may have been sent.
    Transport,
    /// The API's TLS certificate was not accepted.
    Tls,
    /// The API answered 2xx with something we could not read.
    Decode,
    /// A task (UPID) ended with an error.
    Task,
    /// We stopped waiting (a task, a lock) at our own deadline.
    Timeout,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ApiErrorKind,
    /// The API's message (reason phrase, body `message`, task exit status, ...).
    pub message: String,
    /// Per-parameter errors of a 400 answer.
    pub fields: BTreeMap<String, String>,
}

impl ApiError {
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
            fields: BTreeMap::new(),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self.kind {
            ApiErrorKind::Http(status) => Some(status),
            _ => None,
        }
    }

    /// The whole text, field errors included, lower-cased for matching.
    fn haystack(&self) -> String {
        let mut text = self.message.to_ascii_lowercase();
        for (field, error) in &self.fields {
            text.push(' ');
            text.push_str(&field.to_ascii_lowercase());
            text.push_str(": ");
            text.push_str(&error.to_ascii_lowercase());
        }
        text
    }

    /// `Configuration file 'nodes/<node>/qemu-server/<vmid>.conf' does not exist`: PVE's only
    /// words for a missing VM. Other "does not exist" texts (`storage 'x' does not exist`, a
    /// missing pool or disk) are failures of an existing VM's operation, not its absence.
    pub fn is_not_found(&self) -> bool {
        let text = self.message.to_ascii_lowercase();
        text.split("configuration file 'nodes/")
            .skip(1)
            .any(|rest| {
                rest.split_once('\'').is_some_and(|(path, after)| {
                    path.contains("/qemu-server/")
                        && path.ends_with(".conf")
                        && after.trim_start().starts_with("does not exist")
                })
            })
    }

    /// The VMID is taken: `VM N already exists`, `config file already exists`.
    pub fn is_already_exists(&self) -> bool {
        self.haystack().contains("already exists")
    }

    /// `can't lock file '/var/lock/qemu-server/lock-N.conf' - got timeout`: someone else holds
    /// that VMID's config lock, typically a racing clone into the same id.
    pub fn is_vmid_lock_timeout(&self) -> bool {
        let text = self.haystack();
        text.contains("/var/lock/qemu-server/lock-") && text.contains("timeout")
    }

    /// Any `can't lock file ... got timeout` (storage locks under parallel clones included),
    /// and the cluster filesystem's `cfs-lock 'storage-x' error: got lock request timeout`.
    pub fn is_lock_timeout(&self) -> bool {
        let text = self.haystack();
        (text.contains("can't lock file")
            || text.contains("cannot lock")
            || text.contains("cfs-lock")
            || text.contains("lock request"))
            && text.contains("timeout")
    }

    /// The VMID `vmid` itself is contested: it exists already, or its own `lock-<vmid>.conf`
    /// timed out (a racing clone into the same id). A lock timeout on another file (the
    /// template's config, a storage) is load, not a clash: a new VMID does not help, a pause does.
    pub fn is_clash_on(&self, vmid: u32) -> bool {
        self.is_already_exists()
            || (self.is_vmid_lock_timeout()
                && self.haystack().contains(&format!("/lock-{vmid}.conf")))
    }

    /// A config write whose `digest` no longer matches. QEMU configs (`update_vm_api`) say
    /// `checksum mismatch (file change by other user?)` (older qemu-server spelled it
    /// `missmatch`); PVE's other configs say `detected modified configuration - file changed by
    /// other user? Try again.` Either way someone else changed the VM since it was read.
    pub fn is_config_modified(&self) -> bool {
        let text = self.haystack();
        text.contains("by other user")
            || text.contains("detected modified configuration")
            || text.contains("checksum mismatch")
            || text.contains("checksum missmatch")
    }

    /// `VM is locked (clone)` and similar: wait for the lock to clear, then try again.
    pub fn is_vm_locked(&self) -> bool {
        self.haystack().contains("is locked")
    }

    /// The request clashed with another job over the same VMID: pick another id.
    pub fn is_vmid_clash(&self) -> bool {
        self.is_already_exists() || self.is_vmid_lock_timeout()
    }

    /// `VM 7 is running - destroy failed`: the VM was started again behind our back.
    pub fn is_vm_running(&self) -> bool {
        self.message.contains("is running")
    }

    /// `VM 7 already running`: a start that found the VM up.
    pub fn is_already_running(&self) -> bool {
        self.message.contains("already running")
    }

    /// `No QEMU guest agent configured`: the VM's config lacks `agent: 1`.
    pub fn is_agent_not_configured(&self) -> bool {
        self.message.contains("No QEMU guest agent configured")
    }

    /// The guest agent is not answering yet: the VM is booting (`QEMU guest agent is not
    /// running`, `VM N is not running`, a `qga ... got timeout`).
    pub fn is_agent_not_ready(&self) -> bool {
        let text = self.message.to_ascii_lowercase();
        text.contains("guest agent is not running")
            || text.contains("is not running")
            || text.contains("got timeout")
            || text.contains("qga")
    }

    /// The guest agent could not open the file asked for because it is not there:
    /// qemu-guest-agent's `failed to open file '<path>' (mode: 'r'): No such file or directory`
    /// (its guest-file-open), which PVE's `agent/file-read` passes on.
    pub fn is_agent_missing_file(&self) -> bool {
        let text = self.haystack();
        text.contains("failed to open file") && text.contains("no such file or directory")
    }

    /// What the TLS layer refused, in rustls's words (`invalid peer certificate:
    /// UnknownIssuer`) or the pin verifier's ([`super::tls::PIN_MISMATCH`]), without the HTTP
    /// client's wrapping (`error sending request for url (...): client error (Connect): `) or
    /// rustls's `unexpected error: `; the whole message when neither is there.
    pub fn tls_reason(&self) -> &str {
        ["invalid peer certificate", super::tls::PIN_MISMATCH]
            .iter()
            .find_map(|start| self.message.find(start))
            .map_or(&self.message, |index| &self.message[index..])
    }

    /// 401/403, or PVE's `Permission check failed` in a 500 or a task.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self.status(), Some(401 | 403))
            || self.haystack().contains("permission check failed")
    }

    /// Whether an identical request may succeed later: connection trouble, 5xx answers
    /// (595/596 = the proxied-to node is unreachable), lock timeouts. TLS failures, 4xx answers
    /// and task errors other than lock timeouts are permanent, and so are 500s whose text says
    /// what is wrong with the request (missing VM, taken id, missing agent, ...).
    pub fn is_transient(&self) -> bool {
        match self.kind {
            ApiErrorKind::Connect | ApiErrorKind::Transport => true,
            ApiErrorKind::Tls | ApiErrorKind::Decode | ApiErrorKind::Timeout => false,
            ApiErrorKind::Task => self.is_lock_timeout(),
            ApiErrorKind::Http(status) => match status {
                408 | 429 => true,
                500 => self.is_lock_timeout() || !self.has_definite_500_cause(),
                501 => false,
                502..=599 => true,
                _ => false,
            },
        }
    }

    /// The node the request was for is down or cut off: pveproxy could not reach it (595 `No
    /// route to host`, 596 `Connection timed out`), or it lost quorum (`cluster not ready - no
    /// quorum?`). Another node may well do.
    pub fn is_node_failure(&self) -> bool {
        if matches!(self.kind, ApiErrorKind::Http(595 | 596)) {
            return true;
        }
        let text = self.haystack();
        text.contains("no quorum") || text.contains("cluster not ready")
    }

    /// A 500 whose text names a definite cause that repeating the request will not change.
    fn has_definite_500_cause(&self) -> bool {
        let text = self.haystack();
        const DEFINITE: &[&str] = &[
            "does not exist",
            "already exists",
            "no qemu guest agent configured",
            "not allowed",
            "permission",
            "not supported",
            "invalid",
            "is running",
            "is locked",
            "not running",
            "uses local storage",
            "no such",
            "failed to open file",
            "unable to parse",
            // A stale digest stays stale.
            "by other user",
        ];
        DEFINITE.iter().any(|needle| text.contains(needle))
    }

    /// A hint for the operator, by status.
    pub fn hint(&self) -> Option<&'static str> {
        match self.kind {
            ApiErrorKind::Http(401) => Some(
                "check PROXMOX_USER, PROXMOX_TOKEN_NAME and PROXMOX_TOKEN_VALUE (the token may \
                 be deleted or expired)",
            ),
            ApiErrorKind::Http(403) => {
                Some("the API token lacks a permission: grant it to the token (or disable privilege separation)")
            }
            ApiErrorKind::Http(595) | ApiErrorKind::Http(596) => {
                Some("the Proxmox node the request was forwarded to is unreachable from the API host")
            }
            ApiErrorKind::Connect => Some("check PROXMOX_HOST and that the API is reachable from this runner host"),
            ApiErrorKind::Tls => Some(
                "check PROXMOX_TLS_CA_FILE or PROXMOX_TLS_FINGERPRINT against the API's certificate",
            ),
            _ => None,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ApiErrorKind::Http(status) => write!(f, "HTTP {status}: {}", self.message)?,
            _ => f.write_str(&self.message)?,
        }
        if !self.fields.is_empty() {
            let fields: Vec<String> = self
                .fields
                .iter()
                .map(|(field, error)| format!("{field}: {error}"))
                .collect();
            write!(f, " ({})", fields.join("; "))?;
        }
        if let Some(hint) = self.hint() {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

/// Builds the error for an HTTP error answer: the body's `message`, else the status line's
/// reason phrase, else the canonical reason; the `errors` map goes into `fields`.
pub fn from_http_answer(status: u16, reason: Option<&str>, body: &[u8]) -> ApiError {
    #[derive(serde::Deserialize, Default)]
    struct Body {
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        errors: Option<BTreeMap<String, serde_json::Value>>,
    }
    let parsed: Body = serde_json::from_slice(body).unwrap_or_default();
    let fields: BTreeMap<String, String> = parsed
        .errors
        .unwrap_or_default()
        .into_iter()
        .map(|(field, value)| {
            let text = match value {
                serde_json::Value::String(text) => text,
                other => other.to_string(),
            };
            (field, text.trim().to_string())
        })
        .collect();
    let clean = |text: &str| text.trim().to_string();
    let message = parsed
        .message
        .as_deref()
        .map(clean)
        .filter(|text| !text.is_empty())
        .or_else(|| reason.map(clean).filter(|text| !text.is_empty()))
        .or_else(|| {
            reqwest::StatusCode::from_u16(status)
                .ok()
                .and_then(|code| code.canonical_reason())
                .map(String::from)
        })
        .unwrap_or_else(|| "no error text".to_string());
    ApiError {
        kind: ApiErrorKind::Http(status),
        message,
        fields,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_message_wins_over_the_reason_phrase() {
        let err = from_http_answer(
            500,
            Some("unable to create VM 101: config file already exists"),
            br#"{"data":null,"message":"unable to create VM 101: config file already exists\n"}"#,
        );
        assert_eq!(
            err.message,
            "unable to create VM 101: config file already exists"
        );
        assert!(err.is_already_exists() && err.is_vmid_clash() && !err.is_transient());
    }

    #[test]
    fn an_unreachable_or_quorumless_node_is_a_node_failure() {
        let unreachable = from_http_answer(595, Some("No route to host"), b"");
        let timed_out = from_http_answer(596, Some("Connection timed out"), b"");
        let no_quorum = from_http_answer(500, Some("cluster not ready - no quorum?"), b"");
        let locked = from_http_answer(500, Some("VM is locked (clone)"), b"");
        let busy = from_http_answer(503, Some("Service Unavailable"), b"");
        assert!(unreachable.is_node_failure() && timed_out.is_node_failure());
        assert!(no_quorum.is_node_failure());
        assert!(!locked.is_node_failure() && !busy.is_node_failure());
    }

    #[test]
    fn older_nodes_only_have_the_reason_phrase() {
        let err = from_http_answer(
            500,
            Some("Configuration file 'nodes/pve1/qemu-server/105.conf' does not exist"),
            br#"{"data":null}"#,
        );
        assert!(err.is_not_found(), "{err}");
        assert!(!err.is_transient());
    }

    #[test]
    fn only_a_missing_vm_config_means_the_vm_is_gone() {
        let task = |text: &str| ApiError::new(ApiErrorKind::Task, text);
        assert!(
            task("Configuration file 'nodes/pve2/qemu-server/2000123.conf' does not exist")
                .is_not_found()
        );
        for other in [
            "storage 'fast' does not exist",
            "pool 'ci' does not exist",
            "volume 'local-lvm:vm-2000123-disk-0' does not exist",
            "Configuration file 'nodes/pve1/lxc/2000123.conf' does not exist",
            "no such VM ('2000123')",
        ] {
            assert!(!task(other).is_not_found(), "{other}");
        }
        assert!(!from_http_answer(404, Some("Not Found"), b"").is_not_found());
    }

    #[test]
    fn parameter_errors_keep_every_field() {
        let err = from_http_answer(
            400,
            Some("Parameter verification failed."),
            br#"{"data":null,"errors":{"vmid":"VM 2000001 already exists","full":"type check ('boolean') failed - got 'true'"}}"#,
        );
        let text = err.to_string();
        assert!(
            text.starts_with("HTTP 400: Parameter verification failed."),
            "{text}"
        );
        assert!(text.contains("vmid: VM 2000001 already exists"), "{text}");
        assert!(text.contains("full: type check"), "{text}");
        assert!(err.is_already_exists());
        assert!(!err.is_transient());
    }

    #[test]
    fn the_canonical_reason_is_the_last_resort() {
        let err = from_http_answer(503, None, b"not json");
        assert_eq!(err.message, "Service Unavailable");
        assert!(err.is_transient());
    }

    #[test]
    fn transient_and_permanent_are_told_apart() {
        let http = |status, text: &str| from_http_answer(status, Some(text), b"");
        // Transient: lock timeouts, unknown 500s, proxy errors, node unreachable.
        assert!(http(
            500,
            "can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout"
        )
        .is_transient());
        assert!(http(500, "Internal Server Error").is_transient());
        assert!(http(502, "Bad Gateway").is_transient());
        assert!(http(595, "Connection refused").is_transient());
        assert!(http(596, "Connection timed out").is_transient());
        assert!(ApiError::new(ApiErrorKind::Connect, "connection refused").is_transient());
        assert!(ApiError::new(ApiErrorKind::Transport, "connection reset").is_transient());
        assert!(ApiError::new(
            ApiErrorKind::Task,
            "can't lock file '/var/lock/qemu-server/lock-7.conf' - got timeout"
        )
        .is_transient());
        // Permanent: auth, permissions, parameters, definite causes, TLS, other task errors.
        assert!(!http(401, "authentication failure").is_transient());
        assert!(!http(403, "Permission check failed (/vms/100, VM.Clone)").is_transient());
        assert!(!http(500, "No QEMU guest agent configured").is_transient());
        assert!(!http(500, "VM 7 is running - destroy failed").is_transient());
        assert!(!ApiError::new(ApiErrorKind::Tls, "bad certificate").is_transient());
        assert!(!ApiError::new(ApiErrorKind::Task, "storage 'x' does not exist").is_transient());
    }

    #[test]
    fn a_racing_clone_into_the_same_id_is_a_clash() {
        let err = ApiError::new(
            ApiErrorKind::Task,
            "can't lock file '/var/lock/qemu-server/lock-2000001.conf' - got timeout",
        );
        assert!(err.is_vmid_clash());
        let storage = ApiError::new(
            ApiErrorKind::Task,
            "can't lock file '/var/lock/pve-manager/pve-storage-local' - got timeout",
        );
        assert!(!storage.is_vmid_clash() && storage.is_lock_timeout());
        assert!(err.is_clash_on(2000001));
        assert!(!err.is_clash_on(2000002));
    }

    #[test]
    fn lock_timeouts_of_the_template_or_the_cluster_filesystem_are_load_not_clashes() {
        let template = ApiError::new(
            ApiErrorKind::Task,
            "clone failed: can't lock file '/var/lock/qemu-server/lock-60900.conf' - got timeout",
        );
        assert!(!template.is_clash_on(2000001));
        assert!(template.is_transient());
        let cfs = ApiError::new(
            ApiErrorKind::Task,
            "clone failed: cfs-lock 'storage-local-lvm' error: got lock request timeout",
        );
        assert!(cfs.is_lock_timeout() && cfs.is_transient());
        assert!(!cfs.is_clash_on(2000001));
        let taken = from_http_answer(
            500,
            Some("unable to create VM 2000001: config file already exists"),
            b"",
        );
        assert!(taken.is_clash_on(2000001));
    }

    #[test]
    fn agent_boot_errors_are_retryable() {
        let http = |text: &str| from_http_answer(500, Some(text), b"");
        assert!(http("QEMU guest agent is not running").is_agent_not_ready());
        assert!(http("VM 2000123 is not running").is_agent_not_ready());
        assert!(
            http("VM 2000123 qga command 'guest-network-get-interfaces' failed - got timeout")
                .is_agent_not_ready()
        );
        assert!(!http("No QEMU guest agent configured").is_agent_not_ready());
    }

    #[test]
    fn causes_are_told_apart_without_reading_the_text() {
        let http = |status, text: &str| from_http_answer(status, Some(text), b"");
        let missing = http(
            500,
            "Configuration file 'nodes/pve1/qemu-server/7.conf' does not exist",
        );
        assert!(missing.is_not_found() && !missing.is_transient());
        let taken = http(500, "unable to create VM 7: config file already exists");
        assert!(taken.is_already_exists() && !taken.is_not_found());
        let locked = http(500, "VM is locked (clone)");
        assert!(locked.is_vm_locked() && !locked.is_already_exists());
        let denied = http(403, "Permission check failed (/vms/100, VM.Clone)");
        assert!(denied.is_permission_denied() && !denied.is_transient());
        let no_agent = http(500, "No QEMU guest agent configured");
        assert!(no_agent.is_agent_not_configured() && !no_agent.is_agent_not_ready());
        let booting = http(500, "QEMU guest agent is not running");
        assert!(booting.is_agent_not_ready() && !booting.is_agent_not_configured());
        assert!(http(503, "Service Unavailable").is_transient());
        let bad_request = http(400, "Parameter verification failed.");
        assert!(!bad_request.is_transient() && !bad_request.is_not_found());
        assert!(http(500, "VM 7 is running - destroy failed").is_vm_running());
        assert!(http(500, "VM 7 already running").is_already_running());
    }

    #[test]
    fn a_missing_file_is_told_from_other_agent_failures() {
        // PVE passes qemu-guest-agent's error on in the reason phrase and the body.
        let missing = from_http_answer(
            500,
            Some(
                "Agent error: failed to open file '/etc/ssh/ssh_host_ed25519_key.pub' (mode: \
                 'r'): No such file or directory",
            ),
            b"",
        );
        assert!(missing.is_agent_missing_file());
        for other in [
            "Agent error: failed to open file '/etc/ssh/ssh_host_rsa_key.pub' (mode: 'r'): \
             Permission denied",
            "QEMU guest agent is not running",
            "No QEMU guest agent configured",
        ] {
            let err = from_http_answer(500, Some(other), b"");
            assert!(!err.is_agent_missing_file(), "{other}");
        }
    }

    #[test]
    fn the_tls_reason_is_rustlss_words_without_the_http_clients() {
        // The texts as rustls renders them, wrapped the way reqwest and hyper do.
        let unknown_issuer =
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer).to_string();
        let wrapped = ApiError::new(
            ApiErrorKind::Tls,
            format!(
                "error sending request for url (https://pve1:8006/api2/json/version): client \
                 error (Connect): {unknown_issuer}"
            ),
        );
        assert!(unknown_issuer.starts_with("invalid peer certificate"));
        assert_eq!(wrapped.tls_reason(), unknown_issuer);
        let pin = rustls::Error::General(format!(
            "{} AA:BB, not the pinned PROXMOX_TLS_FINGERPRINT CC:DD",
            super::super::tls::PIN_MISMATCH
        ))
        .to_string();
        let pinned = ApiError::new(
            ApiErrorKind::Tls,
            format!("error sending request for url (https://pve1:8006/api2/json/version): {pin}"),
        );
        assert_eq!(
            pinned.tls_reason(),
            "the API's certificate has SHA-256 fingerprint AA:BB, not the pinned \
             PROXMOX_TLS_FINGERPRINT CC:DD"
        );
        let other = ApiError::new(ApiErrorKind::Tls, "handshake failure");
        assert_eq!(other.tls_reason(), "handshake failure");
    }

    #[test]
    fn hints_name_what_to_check() {
        let err = from_http_answer(401, Some("authentication failure"), b"");
        assert!(err.to_string().contains("PROXMOX_TOKEN_VALUE"));
        assert!(ApiError::new(ApiErrorKind::Tls, "x")
            .to_string()
            .contains("PROXMOX_TLS_FINGERPRINT"));
    }
}
