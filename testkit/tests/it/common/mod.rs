//! A minimal PVE API client for the fake's own tests: trusts the fake's CA through a ring
//! rustls config and exposes the reason phrase and the connection header.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use gpr_testkit::FakeProxmox;
use reqwest::{Client, Method, StatusCode};
use serde_json::Value;

pub fn client(fake: &FakeProxmox) -> Client {
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::CertificateDer::from(pem_to_der(&fake.ca_pem()));
    roots.add(ca).expect("CA certificate parses");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .expect("reqwest client")
}

pub fn pem_to_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    decode_base64(&body)
}

fn decode_base64(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut buffer, mut bits) = (0u32, 0);
    for byte in text.bytes().filter(|b| *b != b'=') {
        let value = ALPHABET.iter().position(|c| *c == byte).expect("base64") as u32;
        buffer = (buffer << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    out
}

pub struct Api {
    client: Client,
    base: String,
    pub auth: String,
}

pub struct Answer {
    pub status: StatusCode,
    pub reason: String,
    pub body: Value,
    pub connection_close: bool,
}

impl Answer {
    async fn read(response: reqwest::Response) -> Answer {
        let status = response.status();
        let reason = response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|reason| String::from_utf8_lossy(reason.as_bytes()).into_owned())
            .unwrap_or_default();
        let connection_close = response
            .headers()
            .get("connection")
            .is_some_and(|value| value == "close");
        let body = response.json().await.expect("JSON body");
        Answer {
            status,
            reason,
            body,
            connection_close,
        }
    }
}

impl Api {
    pub fn new(fake: &FakeProxmox) -> Api {
        let env: std::collections::BTreeMap<_, _> = fake.settings_env().into_iter().collect();
        Api {
            client: client(fake),
            base: format!("https://{}/api2/json", fake.host()),
            auth: format!(
                "PVEAPIToken={}!{}={}",
                env["PROXMOX_USER"], env["PROXMOX_TOKEN_NAME"], env["PROXMOX_TOKEN_VALUE"]
            ),
        }
    }

    pub async fn call(&self, method: Method, path: &str, form: &[(&str, &str)]) -> Answer {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .client
            .request(method.clone(), url)
            .header("Authorization", &self.auth);
        request = if method == Method::GET || method == Method::DELETE {
            request.query(form)
        } else {
            request.form(form)
        };
        let response = request.send().await.expect("request reaches the fake");
        Answer::read(response).await
    }

    /// Sends `body` as is, with the given content type.
    pub async fn raw(&self, method: Method, path: &str, content_type: &str, body: &str) -> Answer {
        let response = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("Authorization", &self.auth)
            .header("Content-Type", content_type)
            .body(body.to_string())
            .send()
            .await
            .expect("request reaches the fake");
        Answer::read(response).await
    }

    pub async fn get(&self, path: &str, query: &[(&str, &str)]) -> Answer {
        self.call(Method::GET, path, query).await
    }

    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> Answer {
        self.call(Method::POST, path, form).await
    }

    pub async fn task_status_on(&self, node: &str, upid: &str) -> Answer {
        let encoded =
            percent_encoding::utf8_percent_encode(upid, percent_encoding::NON_ALPHANUMERIC);
        self.get(&format!("/nodes/{node}/tasks/{encoded}/status"), &[])
            .await
    }

    /// Polls the node named in the UPID.
    pub async fn task_status(&self, upid: &str) -> Answer {
        let node = upid.split(':').nth(1).expect("node in UPID");
        self.task_status_on(node, upid).await
    }

    pub async fn task_log(&self, upid: &str) -> Answer {
        let node = upid.split(':').nth(1).expect("node in UPID");
        let encoded =
            percent_encoding::utf8_percent_encode(upid, percent_encoding::NON_ALPHANUMERIC);
        self.get(
            &format!("/nodes/{node}/tasks/{encoded}/log"),
            &[("start", "0"), ("limit", "50")],
        )
        .await
    }

    /// The final task status answer, once `status` is `stopped`.
    pub async fn wait_task(&self, upid: &str) -> Answer {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let answer = self.task_status(upid).await;
            assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
            if answer.body["data"]["status"] == "stopped" {
                return answer;
            }
            assert!(Instant::now() < deadline, "task {upid} never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_task_data(&self, upid: &str) -> Value {
        self.wait_task(upid).await.body["data"].clone()
    }
}

/// Polls until the clone worker has written VM `vmid`'s config (the fake, like PVE, creates it
/// a moment after the clone request returned).
pub fn wait_for_vm(fake: &FakeProxmox, vmid: u32) -> gpr_testkit::VmSnapshot {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(vm) = fake.vm(vmid) {
            return vm;
        }
        assert!(Instant::now() < deadline, "VM {vmid} never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
}
