//! The HTTP side of the API: token auth, TLS trust, form-encoded bodies, `{"data": ...}`
//! envelopes, PVE's error wording and bounded retries of transient failures. Waiting for tasks
//! and guest state is the engine's ([`crate::vm::task`], on [`crate::poll`]).

use std::time::Duration;

use backon::BackoffBuilder;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::Method;
use serde::de::DeserializeOwned;

use super::error::{from_http_answer, ApiError, ApiErrorKind};
use super::types::{
    value_as_u64, AgentFileRead, AgentInterfaces, ClusterNode, ClusterStorage, ClusterVm,
    TaskStatus, Upid, VmConfig, VmStatus,
};
use crate::config::{ApiSettings, TlsTrust};
use crate::error::{Error, Result};
use crate::joblog;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Per request. Agent calls can take PVE's own qga timeout (~10 s) before they fail.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(45);

const MAX_RETRIES: usize = 4;

/// When a failed request may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reads, PUTs, stop, delete: repeat on any transient failure.
    Idempotent,
    /// Requests that create something (clone, start): repeat only when the API answered with a
    /// transient error or the request never left, never after a connection broke mid-request.
    UnlessSent,
    /// The caller handles every failure itself.
    Never,
}

impl Retry {
    /// Whether a request that failed with `err` may be sent again.
    pub fn allows(self, err: &ApiError) -> bool {
        err.is_transient()
            && match self {
                Retry::Idempotent => true,
                Retry::UnlessSent => err.kind != ApiErrorKind::Transport,
                Retry::Never => false,
            }
    }
}

/// What a clone request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneRequest {
    pub newid: u32,
    pub name: String,
    pub description: String,
    pub full: bool,
    pub storage: Option<String>,
    pub pool: Option<String>,
    /// Another node for the new VM (the template's disks must all be on shared storage).
    pub target: Option<String>,
}

impl CloneRequest {
    /// The form fields, booleans as 1/0 as PVE wants them.
    pub fn form(&self) -> Vec<(&'static str, String)> {
        let mut form = vec![
            ("newid", self.newid.to_string()),
            ("name", self.name.clone()),
            ("description", self.description.clone()),
            ("full", if self.full { "1" } else { "0" }.to_string()),
        ];
        if self.full {
            if let Some(storage) = &self.storage {
                form.push(("storage", storage.clone()));
            }
        }
        if let Some(pool) = &self.pool {
            form.push(("pool", pool.clone()));
        }
        if let Some(target) = &self.target {
            form.push(("target", target.clone()));
        }
        form
    }
}

pub struct Client {
    http: reqwest::Client,
    base_url: String,
    /// `PVEAPIToken=USER!NAME=VALUE`, marked sensitive so it never shows in debug output.
    authorization: HeaderValue,
}

/// A path segment, percent-encoded (UPIDs hold `:`, `!` and `@`).
pub fn segment(text: &str) -> String {
    utf8_percent_encode(text, NON_ALPHANUMERIC).to_string()
}

fn qemu(node: &str, vmid: u32) -> String {
    format!("/nodes/{}/qemu/{vmid}", segment(node))
}

impl Client {
    /// Builds the client; TLS trust problems (no CA store, unreadable CA file) surface here,
    /// before any request. Warns loudly in the log when TLS is not verified.
    pub fn new(api: &ApiSettings) -> Result<Client> {
        let tls = super::tls::client_config(&api.tls)?;
        Client::with_tls_config(api, tls)
    }

    /// [`Client::new`] with a TLS configuration of the caller's (the preflight's records the
    /// API's certificate).
    pub fn with_tls_config(api: &ApiSettings, tls: rustls::ClientConfig) -> Result<Client> {
        if api.tls == TlsTrust::Insecure {
            joblog::warn(
                "PROXMOX_TLS_INSECURE is set: the Proxmox API's certificate is NOT verified, so \
                 anyone on the network path can pose as the API and take its token. Set \
                 PROXMOX_TLS_FINGERPRINT or PROXMOX_TLS_CA_FILE instead.",
            );
        }
        // reqwest would follow HTTP(S)_PROXY/ALL_PROXY from the environment, sending the token
        // wherever they point: only PROXMOX_HTTPS_PROXY (host-only) may choose a proxy.
        let mut builder = reqwest::Client::builder().no_proxy();
        if let Some(proxy) = &api.proxy {
            let proxy = reqwest::Proxy::all(proxy.as_str()).map_err(|err| {
                Error::Settings(format!("PROXMOX_HTTPS_PROXY={proxy:?} is unusable: {err}"))
            })?;
            builder = builder.proxy(proxy);
        }
        let http = builder
            .tls_backend_preconfigured(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("gitlab-proxmox-runner/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| {
                Error::Infrastructure(format!("cannot set up the HTTP client: {err}"))
            })?;
        let token = zeroize::Zeroizing::new(format!(
            "PVEAPIToken={}!{}={}",
            api.user,
            api.token_name,
            api.token_value.expose()
        ));
        let mut authorization = HeaderValue::from_str(&token).map_err(|_| {
            Error::Settings(
                "PROXMOX_USER, PROXMOX_TOKEN_NAME or PROXMOX_TOKEN_VALUE holds characters that \
                 cannot go into an HTTP header"
                    .into(),
            )
        })?;
        authorization.set_sensitive(true);
        Ok(Client {
            http,
            base_url: api.endpoint.base_url(),
            authorization,
        })
    }

    /// Sends one request and returns its `data`, retrying transient failures with jittered
    /// exponential backoff (a few seconds in all).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        form: &[(&str, String)],
        retry: Retry,
    ) -> Result<T, ApiError> {
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(3))
            .with_max_times(MAX_RETRIES)
            .with_jitter()
            .build();
        let mut attempt = 1;
        loop {
            let err = match self.call_once(method.clone(), path, query, form).await {
                Ok(data) => {
                    return serde_json::from_value(data).map_err(|err| {
                        ApiError::new(
                            ApiErrorKind::Decode,
                            format!("unexpected answer from {method} {path}: {err}"),
                        )
                    })
                }
                Err(err) => err,
            };
            match delays.next() {
                Some(delay) if retry.allows(&err) => {
                    joblog::info(format!(
                        "{method} {path} failed ({err}); retrying in {} (attempt {}/{})",
                        joblog::secs(delay),
                        attempt + 1,
                        MAX_RETRIES + 1
                    ));
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                _ => return Err(err),
            }
        }
    }

    async fn call_once(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        form: &[(&str, String)],
    ) -> Result<serde_json::Value, ApiError> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base_url))
            .header(AUTHORIZATION, self.authorization.clone());
        if !query.is_empty() {
            request = request.query(query);
        }
        if !form.is_empty() {
            request = request.form(form);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(err) => {
                crate::metrics::api_answered(&method, None);
                return Err(transport_error(err));
            }
        };
        let status = response.status();
        crate::metrics::api_answered(&method, Some(status.as_u16()));
        let reason = response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|reason| String::from_utf8_lossy(reason.as_bytes()).into_owned());
        let body = response.bytes().await.map_err(transport_error)?;
        if !status.is_success() {
            return Err(from_http_answer(status.as_u16(), reason.as_deref(), &body));
        }
        #[derive(serde::Deserialize)]
        struct Envelope {
            #[serde(default)]
            data: serde_json::Value,
        }
        let envelope: Envelope = serde_json::from_slice(&body).map_err(|err| {
            ApiError::new(
                ApiErrorKind::Decode,
                format!(
                    "the API answered HTTP {status} with something that is not its JSON: {err}"
                ),
            )
        })?;
        Ok(envelope.data)
    }

    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ApiError> {
        self.call(Method::GET, path, query, &[], Retry::Idempotent)
            .await
    }

    async fn upid(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        form: &[(&str, String)],
        retry: Retry,
    ) -> Result<Upid, ApiError> {
        let data: serde_json::Value = self.call(method, path, query, form, retry).await?;
        data.as_str().and_then(Upid::parse).ok_or_else(|| {
            ApiError::new(
                ApiErrorKind::Decode,
                format!("expected a task id (UPID) from {path}, got {data}"),
            )
        })
    }

    /// `GET /cluster/nextid?vmid=N`: whether N is free. A taken id is a 400 naming it.
    pub async fn vmid_is_free(&self, vmid: u32) -> Result<bool, ApiError> {
        match self
            .get::<serde_json::Value>("/cluster/nextid", &[("vmid", vmid.to_string())])
            .await
        {
            Ok(data) => Ok(value_as_u64(&data).is_none_or(|id| id == u64::from(vmid))),
            Err(err) if err.status() == Some(400) && err.is_already_exists() => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// `None` when the VM does not exist.
    pub async fn vm_status(&self, node: &str, vmid: u32) -> Result<Option<VmStatus>, ApiError> {
        not_found_is_none(
            self.get(&format!("{}/status/current", qemu(node, vmid)), &[])
                .await,
        )
    }

    /// `None` when the VM does not exist.
    pub async fn vm_config(&self, node: &str, vmid: u32) -> Result<Option<VmConfig>, ApiError> {
        not_found_is_none(self.get(&format!("{}/config", qemu(node, vmid)), &[]).await)
    }

    /// Starts a clone; the caller decides what a failure means (taken id, transient, ...).
    pub async fn clone_vm(
        &self,
        node: &str,
        source: u32,
        request: &CloneRequest,
    ) -> Result<Upid, ApiError> {
        self.upid(
            Method::POST,
            &format!("{}/clone", qemu(node, source)),
            &[],
            &request.form(),
            Retry::Never,
        )
        .await
    }

    /// `PUT .../config` (synchronous).
    pub async fn set_config(
        &self,
        node: &str,
        vmid: u32,
        fields: &[(&str, String)],
    ) -> Result<(), ApiError> {
        let _: serde_json::Value = self
            .call(
                Method::PUT,
                &format!("{}/config", qemu(node, vmid)),
                &[],
                fields,
                Retry::Idempotent,
            )
            .await?;
        Ok(())
    }

    /// `PUT .../resize disk=<disk> size=+<N>G`: newer PVE answers a UPID, older nothing.
    pub async fn grow_disk(
        &self,
        node: &str,
        vmid: u32,
        disk: &str,
        grow_gb: u32,
    ) -> Result<Option<Upid>, ApiError> {
        let data: serde_json::Value = self
            .call(
                Method::PUT,
                &format!("{}/resize", qemu(node, vmid)),
                &[],
                &[("disk", disk.to_string()), ("size", format!("+{grow_gb}G"))],
                Retry::UnlessSent,
            )
            .await?;
        Ok(data.as_str().and_then(Upid::parse))
    }

    pub async fn start_vm(&self, node: &str, vmid: u32) -> Result<Upid, ApiError> {
        self.upid(
            Method::POST,
            &format!("{}/status/start", qemu(node, vmid)),
            &[],
            &[],
            Retry::UnlessSent,
        )
        .await
    }

    /// Hard stop (stopping a stopped VM is a successful task).
    pub async fn stop_vm(&self, node: &str, vmid: u32) -> Result<Upid, ApiError> {
        self.upid(
            Method::POST,
            &format!("{}/status/stop", qemu(node, vmid)),
            &[],
            &[],
            Retry::Idempotent,
        )
        .await
    }

    /// `DELETE ...?purge=1&destroy-unreferenced-disks=1` (parameters in the query: PVE
    /// ignores a DELETE body).
    pub async fn delete_vm(&self, node: &str, vmid: u32) -> Result<Upid, ApiError> {
        self.upid(
            Method::DELETE,
            &qemu(node, vmid),
            &[
                ("purge", "1".to_string()),
                ("destroy-unreferenced-disks", "1".to_string()),
            ],
            &[],
            Retry::Idempotent,
        )
        .await
    }

    /// Asks the node named in the UPID.
    pub async fn task_status(&self, upid: &Upid) -> Result<TaskStatus, ApiError> {
        self.get(
            &format!(
                "/nodes/{}/tasks/{}/status",
                segment(&upid.node),
                segment(&upid.raw)
            ),
            &[],
        )
        .await
    }

    pub async fn agent_interfaces(
        &self,
        node: &str,
        vmid: u32,
    ) -> Result<AgentInterfaces, ApiError> {
        self.call(
            Method::GET,
            &format!("{}/agent/network-get-interfaces", qemu(node, vmid)),
            &[],
            &[],
            Retry::Never,
        )
        .await
    }

    pub async fn agent_file_read(
        &self,
        node: &str,
        vmid: u32,
        file: &str,
    ) -> Result<AgentFileRead, ApiError> {
        // A missing file is an answer, not a hiccup: no retries.
        self.call(
            Method::GET,
            &format!("{}/agent/file-read", qemu(node, vmid)),
            &[("file", file.to_string())],
            &[],
            Retry::Never,
        )
        .await
    }

    /// `GET /cluster/resources?type=node`.
    pub async fn cluster_nodes(&self) -> Result<Vec<ClusterNode>, ApiError> {
        self.get("/cluster/resources", &[("type", "node".to_string())])
            .await
    }

    /// `GET /cluster/resources?type=vm`.
    pub async fn cluster_vms(&self) -> Result<Vec<ClusterVm>, ApiError> {
        self.get("/cluster/resources", &[("type", "vm".to_string())])
            .await
    }

    /// `GET /cluster/resources?type=storage`: every storage as each node sees it.
    pub async fn cluster_storages(&self) -> Result<Vec<ClusterStorage>, ApiError> {
        self.get("/cluster/resources", &[("type", "storage".to_string())])
            .await
    }
}

fn not_found_is_none<T>(result: Result<T, ApiError>) -> Result<Option<T>, ApiError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(err) if err.is_not_found() => Ok(None),
        Err(err) => Err(err),
    }
}

/// Classifies a failure below HTTP: TLS refusals are permanent, failures to connect are safe
/// to repeat, anything after the request left may or may not have reached the API.
fn transport_error(err: reqwest::Error) -> ApiError {
    let message = error_chain(&err);
    let kind = if find_rustls_error(&err).is_some() {
        ApiErrorKind::Tls
    } else if err.is_connect() {
        ApiErrorKind::Connect
    } else {
        ApiErrorKind::Transport
    };
    ApiError::new(kind, message)
}

fn find_rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = err.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    // io::Error::source() skips the error it wraps (and I/O errors get wrapped in I/O errors
    // on the way up through the TLS connector), so look inside each one explicitly.
    if let Some(inner) = err
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        let inner: &(dyn std::error::Error + 'static) = inner;
        if let Some(tls) = find_rustls_error(inner) {
            return Some(tls);
        }
    }
    err.source().and_then(find_rustls_error)
}

/// `outer: inner: innermost`, without repeating text a wrapper already shows.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut current = err.source();
    while let Some(inner) = current {
        let part = inner.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        current = inner.source();
    }
    if let Some(tls) = find_rustls_error(err) {
        let part = tls.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upids_are_encoded_as_one_path_segment() {
        assert_eq!(
            segment("UPID:pve1:0000C4C0:qmclone:60900:ci@pve!runner:"),
            "UPID%3Apve1%3A0000C4C0%3Aqmclone%3A60900%3Aci%40pve%21runner%3A"
        );
    }

    #[test]
    fn clone_forms_use_pve_booleans_and_drop_storage_for_linked_clones() {
        let mut request = CloneRequest {
            newid: 2000001,
            name: "ci-1-demo".into(),
            description: "a;b".into(),
            full: false,
            storage: Some("fast".into()),
            pool: Some("ci".into()),
            target: None,
        };
        let form = request.form();
        assert!(!form.iter().any(|(key, _)| *key == "target"));
        assert!(form.contains(&("full", "0".into())));
        assert!(!form.iter().any(|(key, _)| *key == "storage"));
        assert!(form.contains(&("pool", "ci".into())));
        request.full = true;
        let form = request.form();
        assert!(form.contains(&("full", "1".into())));
        assert!(form.contains(&("storage", "fast".into())));
        request.target = Some("pve2".into());
        assert!(request.form().contains(&("target", "pve2".into())));
    }

    #[test]
    fn only_transient_failures_are_repeated_and_creations_never_after_sending() {
        let reset = ApiError::new(ApiErrorKind::Transport, "connection reset by peer");
        let refused = ApiError::new(ApiErrorKind::Connect, "connection refused");
        let busy = from_http_answer(503, None, b"");
        let denied = from_http_answer(403, Some("Permission check failed"), b"");
        assert!(Retry::Idempotent.allows(&reset));
        assert!(Retry::Idempotent.allows(&busy));
        assert!(!Retry::Idempotent.allows(&denied));
        // A clone or start whose connection broke may have happened: not repeated blindly.
        assert!(!Retry::UnlessSent.allows(&reset));
        assert!(Retry::UnlessSent.allows(&refused));
        assert!(Retry::UnlessSent.allows(&busy));
        assert!(!Retry::Never.allows(&busy));
    }

    #[test]
    fn tls_errors_inside_io_errors_are_found() {
        let io = std::io::Error::other(rustls::Error::General("pin mismatch".into()));
        assert!(find_rustls_error(&io).is_some());
        let twice = std::io::Error::other(io);
        assert!(find_rustls_error(&twice).is_some());
        assert!(error_chain(&twice).contains("pin mismatch"));
        let plain = std::io::Error::other("reset");
        assert!(find_rustls_error(&plain).is_none());
    }
}
