//! Whether the API answers: reachable, its certificate trusted the way the settings say (and
//! when not, the certificate it presented, named for pinning), and the token taken.

use reqwest::Method;

use crate::check::tls::{CertificateFacts, Recording};
use crate::check::Finding;
use crate::config::{Settings, TlsTrust};
use crate::proxmox::{tls, ApiErrorKind, Client, Retry};

/// What the later checks need from the API.
pub struct Api {
    pub client: Client,
    /// PVE's major version, when `/version` said.
    pub major: Option<u32>,
    /// `user@realm!name`, as the privilege lines name it.
    pub token: String,
    pub user: String,
}

fn trust_words(trust: &TlsTrust) -> String {
    match trust {
        TlsTrust::SystemRoots => "by the system CA store".into(),
        TlsTrust::CaFile(path) => format!("by PROXMOX_TLS_CA_FILE {}", path.display()),
        TlsTrust::Fingerprint(_) => "by its pinned PROXMOX_TLS_FINGERPRINT".into(),
        TlsTrust::Insecure => "NOT VERIFIED (PROXMOX_TLS_INSECURE)".into(),
    }
}

/// The client the later checks use, when the API is reachable with a trusted certificate and
/// takes the token; and the findings that say so, or why not.
pub async fn connect(settings: &Settings) -> (Option<Api>, Vec<Finding>) {
    let mut out = Vec::new();
    let url = settings.api.endpoint.base_url();
    let token = format!("{}!{}", settings.api.user, settings.api.token_name);
    let client = tls::verifier(&settings.api.tls)
        .map(Recording::new)
        .and_then(|recorder| {
            let config = tls::config_with_verifier(recorder.clone())?;
            Ok((Client::with_tls_config(&settings.api, config)?, recorder))
        });
    let (client, recorder) = match client {
        Ok(built) => built,
        Err(err) => {
            out.push(Finding::fail(
                "api.tls",
                format!("API certificate trust: {err}"),
                "PROXMOX_TLS_CA_FILE (a copy of the cluster's /etc/pve/pve-root-ca.pem) or \
                 PROXMOX_TLS_FINGERPRINT",
            ));
            return (None, out);
        }
    };
    let answer = client
        .call::<serde_json::Value>(Method::GET, "/version", &[], &[], Retry::Never)
        .await;
    let seen = recorder.seen().map(|der| CertificateFacts::of(&der));
    let facts_text = |facts: &CertificateFacts| {
        format!(
            "subject {}, issuer {}, SHA-256 fingerprint {}",
            facts.subject, facts.issuer, facts.fingerprint
        )
    };
    let reachable = |out: &mut Vec<Finding>| {
        if settings.api.tls == TlsTrust::Insecure {
            out.push(
                Finding::fail(
                    "api.tls",
                    format!(
                        "API {url} reachable, but its certificate is NOT VERIFIED \
                         (PROXMOX_TLS_INSECURE); it presents {}",
                        seen.as_ref().map_or_else(|| "nothing".into(), facts_text)
                    ),
                    "pin the fingerprint above with PROXMOX_TLS_FINGERPRINT (after comparing \
                     it with the node's: Node → System → Certificates) and drop \
                     PROXMOX_TLS_INSECURE",
                )
                .advisory(),
            );
        } else {
            out.push(Finding::pass(
                "api.tls",
                format!(
                    "API {url} reachable, certificate trusted {}",
                    trust_words(&settings.api.tls)
                ),
            ));
        }
    };
    let api = match answer {
        Ok(version) => {
            reachable(&mut out);
            let text = version
                .get("version")
                .and_then(|v| v.as_str())
                .unwrap_or("unknown version")
                .to_string();
            let major = text.split('.').next().and_then(|major| major.parse().ok());
            out.push(Finding::pass(
                "api.token",
                format!("token {token} authenticates (Proxmox VE {text})"),
            ));
            Some(Api {
                client,
                major,
                token,
                user: settings.api.user.clone(),
            })
        }
        Err(err) if err.kind == ApiErrorKind::Tls => {
            let presented = seen.as_ref().map_or_else(
                || "no certificate reached the verifier".to_string(),
                |facts| format!("the API presents {}", facts_text(facts)),
            );
            let pin = seen.as_ref().map_or_else(String::new, |facts| {
                format!(" PROXMOX_TLS_FINGERPRINT={}", facts.fingerprint)
            });
            out.push(Finding::fail(
                "api.tls",
                format!(
                    "the API's certificate is not trusted {} ({}); {presented}",
                    trust_words(&settings.api.tls),
                    err.tls_reason()
                ),
                format!(
                    "compare that fingerprint with the node's (Node → System → Certificates, or \
                     `openssl x509 -in /etc/pve/local/pve-ssl.pem -noout -fingerprint -sha256`), \
                     then pin it:{pin}; or set PROXMOX_TLS_CA_FILE to a copy of the cluster's \
                     /etc/pve/pve-root-ca.pem"
                ),
            ));
            None
        }
        Err(err) if matches!(err.status(), Some(401)) => {
            reachable(&mut out);
            out.push(Finding::fail(
                "api.token",
                format!("the API refused the token {token}: {err}"),
                "check PROXMOX_USER, PROXMOX_TOKEN_NAME and PROXMOX_TOKEN_VALUE (the secret, \
                 not the id): pveum user token list <user>",
            ));
            None
        }
        Err(err) if err.status().is_some() => {
            reachable(&mut out);
            out.push(Finding::fail(
                "api.token",
                format!("GET /version with token {token} failed: {err}"),
                "PROXMOX_HOST must be a Proxmox VE API (port 8006); the message names the rest",
            ));
            None
        }
        Err(err) => {
            out.push(Finding::fail(
                "api.tls",
                format!("the API at {url} is not reachable: {err}"),
                "PROXMOX_HOST (host or host:port, default port 8006), the network and firewall \
                 between this host and the node, PROXMOX_HTTPS_PROXY",
            ));
            None
        }
    };
    (api, out)
}
