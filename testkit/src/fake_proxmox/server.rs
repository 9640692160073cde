//! HTTPS plumbing: a throw-away CA and server certificate, the accept loop on its own thread and
//! runtime, and the translation between HTTP and the fake's [`routes`](super::routes).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

use super::api::{ApiRequest, Reply};
use super::co_tenant::{Caller, CoTenantAccount};
use super::routes;
use super::state::State;
use super::RecordedRequest;

pub(crate) struct TlsMaterial {
    pub ca_pem: String,
    /// The same CA as DER, for the co-tenant's client to trust.
    pub ca_der: Vec<u8>,
    pub leaf_der: Vec<u8>,
    leaf_key_der: Vec<u8>,
}

impl TlsMaterial {
    /// A CA like `pve-root-ca.pem` and a leaf for `127.0.0.1`/`localhost` signed by it.
    pub fn generate() -> TlsMaterial {
        let build = || -> Result<TlsMaterial, rcgen::Error> {
            let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(DnType::CommonName, "Fake Proxmox Virtual Environment");
            ca_params
                .distinguished_name
                .push(DnType::OrganizationName, "PVE Cluster Manager CA");
            ca_params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let ca_key = KeyPair::generate()?;
            let ca_cert = ca_params.self_signed(&ca_key)?;
            let issuer = Issuer::new(ca_params, ca_key);

            let mut leaf_params =
                CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
            leaf_params
                .distinguished_name
                .push(DnType::CommonName, "pve1.local");
            leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            leaf_params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            let leaf_key = KeyPair::generate()?;
            let leaf_cert = leaf_params.signed_by(&leaf_key, &issuer)?;
            Ok(TlsMaterial {
                ca_pem: ca_cert.pem(),
                ca_der: ca_cert.der().to_vec(),
                leaf_der: leaf_cert.der().to_vec(),
                leaf_key_der: leaf_key.serialize_der(),
            })
        };
        match build() {
            Ok(material) => material,
            Err(err) => panic!("generating the fake Proxmox certificates: {err}"),
        }
    }

    pub fn fingerprint(&self) -> String {
        Sha256::digest(&self.leaf_der)
            .iter()
            .map(|byte| format!("{byte:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    fn acceptor(&self) -> TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|builder| {
                builder.with_no_client_auth().with_single_cert(
                    vec![CertificateDer::from(self.leaf_der.clone())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key_der.clone())),
                )
            });
        match config {
            Ok(mut config) => {
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                TlsAcceptor::from(Arc::new(config))
            }
            Err(err) => panic!("configuring TLS for the fake Proxmox: {err}"),
        }
    }
}

pub(crate) struct ServerThread {
    pub addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl ServerThread {
    pub fn spawn(state: Arc<Mutex<State>>, tls: &TlsMaterial) -> ServerThread {
        let listener = match std::net::TcpListener::bind("127.0.0.1:0") {
            Ok(listener) => listener,
            Err(err) => panic!("binding the fake Proxmox to 127.0.0.1:0: {err}"),
        };
        let addr = match listener
            .local_addr()
            .and_then(|addr| listener.set_nonblocking(true).map(|()| addr))
        {
            Ok(addr) => addr,
            Err(err) => panic!("preparing the fake Proxmox listener: {err}"),
        };
        let acceptor = tls.acceptor();
        let (shutdown, shutdown_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("fake-proxmox-{}", addr.port()))
            .spawn(move || serve(listener, acceptor, state, shutdown_rx));
        let thread = match thread {
            Ok(thread) => thread,
            Err(err) => panic!("spawning the fake Proxmox thread: {err}"),
        };
        ServerThread {
            addr,
            shutdown,
            thread,
        }
    }

    pub fn shutdown(self) {
        let _ = self.shutdown.send(());
        let _ = self.thread.join();
    }
}

fn serve(
    listener: std::net::TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<Mutex<State>>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => panic!("building the fake Proxmox runtime: {err}"),
    };
    runtime.block_on(async move {
        let workers = lock(&state)
            .config
            .capacity
            .map(|capacity| Arc::new(tokio::sync::Semaphore::new(capacity.workers.max(1))));
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(err) => panic!("registering the fake Proxmox listener: {err}"),
        };
        loop {
            let stream = tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
            };
            lock(&state).connections += 1;
            let acceptor = acceptor.clone();
            let state = state.clone();
            let workers = workers.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request| {
                    let state = state.clone();
                    let workers = workers.clone();
                    // An error makes hyper drop the connection without an answer.
                    async move {
                        let response = match workers {
                            Some(workers) => served_by_a_worker(state, &workers, request).await,
                            None => handle(state, request).await,
                        };
                        response.ok_or(DroppedAnswer)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    // Dropping the runtime cancels the connections still open.
}

/// [`handle`] inside one of the API daemon's few workers (see `ApiCapacity`): queued until one
/// is free, held for the service time, and for an agent call on a guest whose agent is not up,
/// for QEMU's agent timeout.
async fn served_by_a_worker(
    state: Arc<Mutex<State>>,
    workers: &tokio::sync::Semaphore,
    request: Request<Incoming>,
) -> Option<Response<Full<Bytes>>> {
    let Some(capacity) = lock(&state).config.capacity else {
        return handle(state, request).await;
    };
    {
        let mut state = lock(&state);
        state.queued += 1;
        state.max_queued = state.max_queued.max(state.queued);
    }
    let permit = workers.acquire().await;
    {
        let mut state = lock(&state);
        state.queued -= 1;
        state.in_service += 1;
        state.max_in_service = state.max_in_service.max(state.in_service);
    }
    tokio::time::sleep(capacity.service_time).await;
    let is_agent_call = request.uri().path().contains("/agent/");
    let response = handle(state.clone(), request).await;
    if is_agent_call && response.as_ref().is_some_and(response_says_agent_not_up) {
        tokio::time::sleep(capacity.agent_timeout).await;
    }
    lock(&state).in_service -= 1;
    drop(permit);
    response
}

fn response_says_agent_not_up(response: &Response<Full<Bytes>>) -> bool {
    response
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .is_some_and(|reason| {
            String::from_utf8_lossy(reason.as_bytes()).contains("guest agent is not running")
        })
}

/// The answer is lost on purpose ([`Reply::Dropped`]).
#[derive(Debug)]
struct DroppedAnswer;

impl std::fmt::Display for DroppedAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the fake dropped the answer")
    }
}

impl std::error::Error for DroppedAnswer {}

/// `None`: drop the connection without answering.
async fn handle(
    state: Arc<Mutex<State>>,
    request: Request<Incoming>,
) -> Option<Response<Full<Bytes>>> {
    let (parts, body) = request.into_parts();
    let method = parts.method.as_str().to_string();
    let raw_path = parts.uri.path().to_string();
    let raw_query = parts.uri.query().unwrap_or("").to_string();

    let refusal = {
        let state = lock(&state);
        let config = &state.config;
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .map(str::trim);
        let mut caller = Caller::Runner;
        let refusal = match header.and_then(|value| value.strip_prefix("PVEAPIToken=")) {
            None => Some("No ticket"),
            Some(token) => {
                let expected_id = format!("{}!{}", config.token_user, config.token_name);
                match token.split_once('=') {
                    Some((id, value)) if id == expected_id && value == config.token_value => None,
                    Some((id, value)) if CoTenantAccount::accepts(id, value) => {
                        caller = Caller::CoTenant;
                        None
                    }
                    _ => Some("invalid token value!"),
                }
            }
        };
        (
            refusal,
            caller,
            config.bad_token_delay,
            config.message_in_body,
        )
    };
    let (refusal, caller, bad_token_delay, message_in_body) = refusal;
    let authorized = refusal.is_none();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let record = RecordedRequest {
        method: method.clone(),
        path: raw_path.clone(),
        query: raw_query.clone(),
        authorized,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    match caller {
        Caller::Runner => lock(&state).requests.push(record),
        Caller::CoTenant => lock(&state).co_tenant_requests.push(record),
    }

    if let Some(refusal) = refusal {
        // pve-http-server delays every 401 (by 3 s) against password guessing.
        tokio::time::sleep(bad_token_delay).await;
        return Some(render(
            Reply::Fail {
                status: 401,
                message: refusal.into(),
                errors: None,
            },
            message_in_body,
        ));
    }

    let is_json = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));

    let mut reply = match parse_request(caller, &method, &raw_path, &raw_query, &body, is_json) {
        Ok(Some(api)) => routes::dispatch(&mut lock(&state), &api),
        Ok(None) => Reply::Fail {
            status: 404,
            message: "Not Found".into(),
            errors: None,
        },
        Err(reply) => reply,
    };
    loop {
        match reply {
            Reply::Dropped => return None,
            Reply::Delayed(delay, inner) => {
                tokio::time::sleep(delay).await;
                reply = *inner;
            }
            other => return Some(render(other, message_in_body)),
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `Ok(None)`: not under `/api2/json`.
fn parse_request(
    caller: Caller,
    method: &str,
    raw_path: &str,
    raw_query: &str,
    body: &[u8],
    is_json: bool,
) -> Result<Option<ApiRequest>, Reply> {
    let Some(rest) = raw_path.strip_prefix("/api2/json") else {
        return Ok(None);
    };
    let segments: Vec<String> = rest
        .split('/')
        .filter(|segment| !segment.is_empty())
        .map(|segment| {
            percent_encoding::percent_decode_str(segment)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let mut params = parse_form(raw_query.as_bytes());
    if matches!(method, "POST" | "PUT") {
        if is_json && !body.is_empty() {
            params.extend(parse_json_body(body)?);
        } else {
            params.extend(parse_form(body));
        }
    }
    Ok(Some(ApiRequest {
        caller,
        method: method.to_string(),
        path: format!("/{}", segments.join("/")),
        segments,
        params,
    }))
}

/// pve-http-server's decoder splits on `&` and on `;`.
fn parse_form(raw: &[u8]) -> Vec<(String, String)> {
    let normalized: Vec<u8> = raw
        .iter()
        .map(|&byte| if byte == b';' { b'&' } else { byte })
        .collect();
    form_urlencoded::parse(&normalized)
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect()
}

fn parse_json_body(body: &[u8]) -> Result<Vec<(String, String)>, Reply> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|err| Reply::Fail {
        status: 400,
        message: format!("failed to parse JSON body - {err}"),
        errors: None,
    })?;
    let serde_json::Value::Object(map) = value else {
        return Err(Reply::Fail {
            status: 400,
            message: "JSON body must be an object".into(),
            errors: None,
        });
    };
    let mut params = Vec::new();
    for (key, value) in map {
        let values = match value {
            serde_json::Value::Array(items) => items,
            other => vec![other],
        };
        for value in values {
            let text = match value {
                serde_json::Value::String(text) => text,
                serde_json::Value::Bool(flag) => if flag { "1" } else { "0" }.to_string(),
                serde_json::Value::Null => continue,
                other => other.to_string(),
            };
            params.push((key.clone(), text));
        }
    }
    Ok(params)
}

fn render(reply: Reply, message_in_body: bool) -> Response<Full<Bytes>> {
    let (status, reason, body) = match reply {
        Reply::Dropped | Reply::Delayed(..) => (
            500,
            Some("internal error in the fake: unrendered reply".to_string()),
            serde_json::json!({ "data": null }),
        ),
        Reply::Data(data) => (200, None, serde_json::json!({ "data": data })),
        Reply::DataWith(data, extra) => {
            let mut body = serde_json::json!({ "data": data });
            if let Some(object) = body.as_object_mut() {
                object.extend(extra);
            }
            (200, None, body)
        }
        Reply::Fail {
            status,
            message,
            errors,
        } => {
            let mut body = serde_json::Map::new();
            body.insert("data".into(), serde_json::Value::Null);
            let reason = if errors.is_some() {
                "Parameter verification failed.".to_string()
            } else {
                message.clone()
            };
            if let Some(errors) = errors {
                let errors: serde_json::Map<String, serde_json::Value> = errors
                    .into_iter()
                    .map(|(key, text)| (key, serde_json::Value::String(format!("{text}\n"))))
                    .collect();
                body.insert("errors".into(), serde_json::Value::Object(errors));
            }
            if message_in_body {
                body.insert(
                    "message".into(),
                    serde_json::Value::String(format!("{reason}\n")),
                );
            }
            (status, Some(reason), serde_json::Value::Object(body))
        }
    };
    let bytes = Bytes::from(body.to_string());
    let mut response = Response::new(Full::new(bytes));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    headers.insert(
        hyper::header::SERVER,
        HeaderValue::from_static("pve-api-daemon/3.0"),
    );
    if let Some(reason) = reason {
        // pve-http-server closes the connection after every error.
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        let phrase: String = reason
            .trim_end()
            .chars()
            .map(|c| {
                if c.is_control() || !c.is_ascii() {
                    ' '
                } else {
                    c
                }
            })
            .collect();
        if let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(phrase) {
            response.extensions_mut().insert(phrase);
        }
    }
    response
}
