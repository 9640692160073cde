//! `check`: the preflight. Runs against the live cluster with the driver's settings, read by
//! the same trust rule as the hooks (a fleet command: the host's settings file and
//! environment, no job), and prints one line per check, ✔ or ✘ with the fix, then a summary
//! (or all of it as JSON with `--format json`). The checks and their wording live in
//! [`crate::check`]; every ✘ has its row in the README's troubleshooting table. With
//! `PROXMOX_NODES`, the node and template checks cover every node placement may use
//! ([`crate::check::nodes`]), each template on each node's copy of it.
//!
//! Exit status: [`EXIT_READY`] when every required check passed, [`EXIT_NOT_READY`] when one
//! failed, [`EXIT_NOT_RUN`] when the check itself could not finish: interrupted, or its smoke
//! VM could not be removed.

use std::collections::BTreeMap;
use std::path::Path;

use reqwest::Method;

use crate::cancel::Cancel;
use crate::check::privileges::{self, Need, Privilege};
use crate::check::templates::{self, can_link};
use crate::check::tls::{CertificateFacts, Recording};
use crate::check::{nodes, smoke, Finding, Report};
use crate::cli::CheckFormat;
use crate::config::{
    AllowedTemplates, CloneMode, CopyDiscovery, NodeSet, Settings, TlsTrust, CONFIG_FILE_ENV,
};
use crate::error::{Error, Result};
use crate::joblog;
use crate::marker::Marker;
use crate::proxmox::types::ClusterVm;
use crate::proxmox::{tls, ApiError, ApiErrorKind, Client, Retry, VmConfig};
use crate::vm::placement::{self, Found};
use crate::vm::ssh_key::KeyPath;

pub const EXIT_READY: i32 = 0;
pub const EXIT_NOT_READY: i32 = 1;
pub const EXIT_NOT_RUN: i32 = 2;

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub smoke: bool,
    pub format: CheckFormat,
    /// Where the settings came from, for the first line.
    pub source: String,
    /// The settings file (`--config` or `GITLAB_PROXMOX_RUNNER_CONFIG`), whose mode is checked.
    pub config_file: Option<std::path::PathBuf>,
}

/// `settings file /etc/...` or `the process environment`.
pub fn settings_source(file: Option<&Path>) -> String {
    file.map(Path::to_path_buf)
        .or_else(|| std::env::var_os(CONFIG_FILE_ENV).map(Into::into))
        .map_or_else(
            || "the process environment".to_string(),
            |path| {
                format!(
                    "settings file {} and the process environment",
                    path.display()
                )
            },
        )
}

/// Prints every finding as it is made (text) or all at the end (JSON).
struct Output<'a> {
    report: Report,
    options: &'a Options,
}

impl Output<'_> {
    fn add(&mut self, finding: Finding) {
        if self.options.format == CheckFormat::Text {
            println!("{}", finding.text());
        }
        self.report.add(finding);
    }

    fn finish(self, exit_code: i32) -> i32 {
        match self.options.format {
            CheckFormat::Text => println!("{}", self.report.summary_line()),
            CheckFormat::Json => println!("{}", self.report.json(exit_code)),
        }
        exit_code
    }
}

pub async fn run(loaded: Result<Settings>, options: &Options, cancel: &Cancel) -> i32 {
    let mut out = Output {
        report: Report::default(),
        options,
    };
    let settings = match loaded {
        Ok(settings) => settings,
        Err(err) => {
            out.add(Finding::fail(
                "settings",
                format!("settings: {err}"),
                "the setting the message names (README, Settings); `check` reads the same \
                 settings file and environment as the hooks",
            ));
            return out.finish(EXIT_NOT_READY);
        }
    };
    let interrupted = tokio::select! {
        () = checks(&settings, &mut out) => None,
        reason = cancel.cancelled() => Some(reason),
    };
    if let Some(reason) = interrupted {
        out.add(Finding::fail(
            "interrupted",
            format!("check was interrupted ({reason}) before it finished"),
            "run it again",
        ));
        return out.finish(EXIT_NOT_RUN);
    }
    if options.smoke {
        if !out.report.all_required_passed() {
            out.add(Finding::skip(
                "smoke",
                "smoke test skipped: fix the ✘ lines above first",
            ));
        } else if let Some(exit) = smoke_test(&settings, &mut out, cancel).await {
            return out.finish(exit);
        }
    }
    let exit = if out.report.all_required_passed() {
        EXIT_READY
    } else {
        EXIT_NOT_READY
    };
    out.finish(exit)
}

async fn checks(settings: &Settings, out: &mut Output<'_>) {
    settings_findings(settings, out);
    file_mode_findings(settings, out);
    match api_findings(settings, out).await {
        Some(api) if settings.nodes == NodeSet::One => {
            node_finding(&api, settings, out).await;
            // One listing for the look-alike templates and the VMID range.
            let vms = api.client.cluster_vms().await;
            let needs = template_findings(&api, settings, vms.as_deref().ok(), out).await;
            privilege_findings(&api, settings, needs, out).await;
            vmid_range_finding(&api, settings, vms, out).await;
        }
        Some(api) => {
            // One read of each listing serves the node, template and VMID-range checks.
            let cluster = api.client.cluster_nodes().await;
            let vms = api.client.cluster_vms().await;
            let needs = match (cluster, &vms) {
                (Err(err), _) => {
                    out.add(Finding::fail(
                        "nodes",
                        format!("nodes: cannot list the cluster's nodes: {err}"),
                        "the message names it",
                    ));
                    out.add(Finding::skip(
                        "templates",
                        "templates: skipped (needs the node list)",
                    ));
                    TemplateNeeds::for_settings(settings)
                }
                (Ok(cluster), vms) => {
                    let survey = nodes::survey(&settings.nodes, &cluster);
                    for finding in survey.findings.iter().cloned() {
                        out.add(finding);
                    }
                    match vms {
                        Ok(vms) => {
                            node_template_findings(&api, settings, &survey.members, vms, out).await
                        }
                        Err(err) => {
                            out.add(Finding::fail(
                                "templates",
                                format!(
                                    "templates: cannot list the cluster's VMs to find each \
                                     node's copy: {err}"
                                ),
                                "the token's VM.Audit (see the privilege lines)",
                            ));
                            TemplateNeeds::for_settings(settings)
                        }
                    }
                }
            };
            privilege_findings(&api, settings, needs, out).await;
            vmid_range_finding(&api, settings, vms, out).await;
        }
        None => {
            for what in ["node", "templates", "privileges", "vmid_range"] {
                out.add(Finding::skip(
                    what,
                    format!("{what}: skipped (needs the API)"),
                ));
            }
        }
    }
    key_finding(settings, out);
    helper_finding(settings, out);
    out.add(crate::check::fleet::fleet_key_finding(settings));
}

fn settings_findings(settings: &Settings, out: &mut Output<'_>) {
    let clones = match settings.clone_mode {
        Some(CloneMode::Linked) => "linked clones",
        Some(CloneMode::Full) => "full clones",
        None => "linked clones of templates",
    };
    out.add(Finding::pass(
        "settings",
        format!(
            "settings: read from {} ({}, {} templates, VMIDs {}-{}, {clones})",
            out.options.source,
            nodes::describe(&settings.nodes, &settings.node),
            settings.templates.len(),
            settings.vmid_range.0,
            settings.vmid_range.1
        ),
    ));
    for warning in &settings.trust_warnings {
        out.add(
            Finding::fail(
                "settings.trust",
                format!("settings: {warning}"),
                "move the setting into the settings file (README, Security model)",
            )
            .advisory(),
        );
    }
    if settings.allowed_templates == AllowedTemplates::MapOnly
        && !settings.templates.contains_key(settings.template.trim())
    {
        out.add(Finding::fail(
            "settings.template",
            format!(
                "settings: the default template PROXMOX_TEMPLATE={:?} is not in \
                 PROXMOX_TEMPLATES ({})",
                settings.template,
                settings
                    .templates
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "set PROXMOX_TEMPLATE to a name in PROXMOX_TEMPLATES, or add it to the map",
        ));
    }
    if settings.template_copies == CopyDiscovery::ByName {
        out.add(
            Finding::fail(
                "settings.template_copies",
                "settings: PROXMOX_TEMPLATE_COPIES=by-name: on every node without a listed copy, \
                 any template VM named like a PROXMOX_TEMPLATES template is cloned for its jobs; \
                 on a cluster shared with other users, anyone with VM.Allocate can make one",
                "list every copy in PROXMOX_TEMPLATES (name=VMID@node|VMID@node...; the template \
                 lines below name them) and drop PROXMOX_TEMPLATE_COPIES",
            )
            .advisory(),
        );
    }
    let by_name: Vec<&str> = match &settings.allowed_templates {
        AllowedTemplates::MapOnly => Vec::new(),
        AllowedTemplates::AnyOnNode => vec!["*"],
        AllowedTemplates::Listed(list) => list
            .iter()
            .map(String::as_str)
            .filter(|item| item.parse::<u32>().is_err())
            .collect(),
    };
    if !by_name.is_empty() {
        out.add(
            Finding::fail(
                "settings.allowed_templates",
                format!(
                    "settings: PROXMOX_ALLOWED_TEMPLATES lets jobs ask for templates by VM name \
                     ({}): every template VM of that name counts, and on a cluster shared with \
                     other users anyone with VM.Allocate can make one",
                    by_name.join(", ")
                ),
                "map the templates jobs may use in PROXMOX_TEMPLATES by VMID, or allow VMIDs \
                 only in PROXMOX_ALLOWED_TEMPLATES",
            )
            .advisory(),
        );
    }
    if settings.storage.is_some() && settings.clone_mode != Some(CloneMode::Full) {
        out.add(
            Finding::fail(
                "settings.storage",
                "settings: PROXMOX_STORAGE is set, but linked clones always stay on the \
                 template's storage, so it is ignored",
                "drop it, or set PROXMOX_CLONE=full",
            )
            .advisory(),
        );
    }
}

/// The settings file and the SSH key file: readable by their owner only. Advisory: a file
/// others can read hands them the token or the key, but the hooks still work.
fn file_mode_findings(settings: &Settings, out: &mut Output<'_>) {
    let files =
        crate::config::file_modes::secret_files(out.options.config_file.as_deref(), settings);
    for file in files {
        let id = if file.what.contains("SSH key") {
            "ssh_key.file_mode"
        } else {
            "settings.file_mode"
        };
        let finding = match file.exposed() {
            None => Finding::pass(
                id,
                format!(
                    "{}: {} is readable by its owner only (mode {:04o})",
                    file.what,
                    file.path.display(),
                    file.mode
                ),
            ),
            Some(exposed) => Finding::fail(
                id,
                format!(
                    "{}: another local user can take the secrets it holds",
                    exposed.message()
                ),
                exposed.fix(),
            )
            .advisory(),
        };
        out.add(finding);
    }
}

/// What the later checks need from the API.
struct Api {
    client: Client,
    /// PVE's major version, when `/version` said.
    major: Option<u32>,
    token: String,
    user: String,
}

fn trust_words(trust: &TlsTrust) -> String {
    match trust {
        TlsTrust::SystemRoots => "by the system CA store".into(),
        TlsTrust::CaFile(path) => format!("by PROXMOX_TLS_CA_FILE {}", path.display()),
        TlsTrust::Fingerprint(_) => "by its pinned PROXMOX_TLS_FINGERPRINT".into(),
        TlsTrust::Insecure => "NOT VERIFIED (PROXMOX_TLS_INSECURE)".into(),
    }
}

async fn api_findings(settings: &Settings, out: &mut Output<'_>) -> Option<Api> {
    let url = settings.api.base_url();
    let token = format!("{}!{}", settings.api_user, settings.api_token_name);
    let client = tls::verifier(&settings.tls)
        .map(Recording::new)
        .and_then(|recorder| {
            let config = tls::config_with_verifier(recorder.clone())?;
            Ok((Client::with_tls_config(settings, config)?, recorder))
        });
    let (client, recorder) = match client {
        Ok(built) => built,
        Err(err) => {
            out.add(Finding::fail(
                "api.tls",
                format!("API certificate trust: {err}"),
                "PROXMOX_TLS_CA_FILE (a copy of the cluster's /etc/pve/pve-root-ca.pem) or \
                 PROXMOX_TLS_FINGERPRINT",
            ));
            return None;
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
    let reachable = |out: &mut Output<'_>| {
        if settings.tls == TlsTrust::Insecure {
            out.add(
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
            out.add(Finding::pass(
                "api.tls",
                format!(
                    "API {url} reachable, certificate trusted {}",
                    trust_words(&settings.tls)
                ),
            ));
        }
    };
    match answer {
        Ok(version) => {
            reachable(out);
            let text = version
                .get("version")
                .and_then(|v| v.as_str())
                .unwrap_or("unknown version")
                .to_string();
            let major = text.split('.').next().and_then(|major| major.parse().ok());
            out.add(Finding::pass(
                "api.token",
                format!("token {token} authenticates (Proxmox VE {text})"),
            ));
            Some(Api {
                client,
                major,
                token,
                user: settings.api_user.clone(),
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
            out.add(Finding::fail(
                "api.tls",
                format!(
                    "the API's certificate is not trusted {} ({}); {presented}",
                    trust_words(&settings.tls),
                    tls_reason(&err.message)
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
            reachable(out);
            out.add(Finding::fail(
                "api.token",
                format!("the API refused the token {token}: {err}"),
                "check PROXMOX_USER, PROXMOX_TOKEN_NAME and PROXMOX_TOKEN_VALUE (the secret, \
                 not the id): pveum user token list <user>",
            ));
            None
        }
        Err(err) if err.status().is_some() => {
            reachable(out);
            out.add(Finding::fail(
                "api.token",
                format!("GET /version with token {token} failed: {err}"),
                "PROXMOX_HOST must be a Proxmox VE API (port 8006); the message names the rest",
            ));
            None
        }
        Err(err) => {
            out.add(Finding::fail(
                "api.tls",
                format!("the API at {url} is not reachable: {err}"),
                "PROXMOX_HOST (host or host:port, default port 8006), the network and firewall \
                 between this host and the node, PROXMOX_HTTPS_PROXY",
            ));
            None
        }
    }
}

/// rustls's words, without the HTTP client's wrapping (`error sending request for url ...`).
fn tls_reason(message: &str) -> &str {
    ["invalid peer certificate", "the API's certificate has"]
        .iter()
        .find_map(|start| message.find(start))
        .map_or(message, |index| &message[index..])
}

async fn node_finding(api: &Api, settings: &Settings, out: &mut Output<'_>) {
    #[derive(serde::Deserialize)]
    struct Node {
        node: String,
        #[serde(default)]
        status: Option<String>,
    }
    let node = &settings.node;
    let nodes = api
        .client
        .call::<Vec<Node>>(Method::GET, "/nodes", &[], &[], Retry::Idempotent)
        .await;
    let finding = match nodes {
        Err(err) => Finding::fail(
            "node",
            format!("node {node}: cannot list the cluster's nodes: {err}"),
            "the message names it",
        ),
        Ok(nodes) => match nodes.iter().find(|n| &n.node == node) {
            None => Finding::fail(
                "node",
                format!(
                    "node {node} is not a member of this cluster (members: {})",
                    nodes
                        .iter()
                        .map(|n| n.node.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "PROXMOX_NODE must name a node as `pvecm nodes` lists it",
            ),
            Some(found) if found.status.as_deref() == Some("online") => {
                Finding::pass("node", format!("node {node} is online"))
            }
            Some(found) => Finding::fail(
                "node",
                format!(
                    "node {node} is offline (status {})",
                    found.status.as_deref().unwrap_or("unknown")
                ),
                "bring the node back (pvecm status on a cluster member) or set PROXMOX_NODE to \
                 an online node",
            ),
        },
    };
    out.add(finding);
}

/// What the templates need, for the privilege check: storages, bridges, and (with
/// `PROXMOX_NODES`) the other nodes' copies of the templates.
#[derive(Default)]
struct TemplateNeeds {
    storages: Vec<String>,
    bridges: Vec<String>,
    /// `(VMID, what for)` of copies that are not themselves `PROXMOX_TEMPLATES` entries.
    copies: Vec<(u32, String)>,
}

impl TemplateNeeds {
    fn for_settings(settings: &Settings) -> TemplateNeeds {
        let mut needs = TemplateNeeds::default();
        if let (Some(storage), Some(CloneMode::Full)) = (&settings.storage, settings.clone_mode) {
            needs.storages.push(storage.clone());
        }
        needs
    }
}

/// Storage id → storage type on `node`; empty when the token may not list them (the disks'
/// lines then say so).
async fn node_storages(api: &Api, node: &str) -> BTreeMap<String, String> {
    node_storage_list(api, node)
        .await
        .into_iter()
        .map(|storage| (storage.storage, storage.kind))
        .collect()
}

#[derive(serde::Deserialize)]
struct NodeStorage {
    storage: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, deserialize_with = "crate::proxmox::types::flexible_bool")]
    shared: bool,
}

async fn node_storage_list(api: &Api, node: &str) -> Vec<NodeStorage> {
    api.client
        .call::<Vec<NodeStorage>>(
            Method::GET,
            &format!("/nodes/{}/storage", crate::proxmox::client::segment(node)),
            &[],
            &[],
            Retry::Idempotent,
        )
        .await
        .unwrap_or_default()
}

/// One template VM as the driver would clone it.
struct TemplateVm<'a> {
    id: String,
    label: String,
    vmid: u32,
    node: &'a str,
    is_template: bool,
}

/// The per-template checks on one template VM: the template flag, the guest agent, net0, and
/// storage able to make the clones the settings ask for.
fn template_vm_finding(
    settings: &Settings,
    vm: TemplateVm<'_>,
    config: &VmConfig,
    storages: &BTreeMap<String, String>,
    needs: &mut TemplateNeeds,
) -> Finding {
    let TemplateVm {
        id,
        label,
        vmid,
        node,
        is_template,
    } = vm;
    let mut problems: Vec<String> = Vec::new();
    let mut fixes: Vec<String> = Vec::new();
    if !is_template {
        problems.push("it is not a template".into());
        fixes.push(format!("convert it (qm template {vmid}) or fix the map"));
    }
    if config.agent_enabled() != Some(true) {
        problems.push("its QEMU guest agent option is off".into());
        fixes.push(format!(
            "qm set {vmid} --agent enabled=1 (Options → QEMU Guest Agent), with \
             qemu-guest-agent installed in the guest"
        ));
    }
    let bridge = templates::net0_bridge(config);
    if config.get("net0").is_none() {
        problems.push("it has no net0".into());
        fixes.push(format!("qm set {vmid} --net0 virtio,bridge=vmbr0"));
    }
    if let Some(bridge) = &bridge {
        if !needs.bridges.contains(bridge) {
            needs.bridges.push(bridge.clone());
        }
    }
    let linked = match settings.clone_mode {
        Some(CloneMode::Full) => false,
        Some(CloneMode::Linked) => true,
        None => is_template,
    };
    let mut placed = Vec::new();
    for volume in templates::volumes(config) {
        if linked && !needs.storages.contains(&volume.storage) {
            needs.storages.push(volume.storage.clone());
        }
        let kind = storages.get(&volume.storage);
        let format = volume.format.as_deref();
        let described = format!(
            "{} ({}{})",
            volume.storage,
            kind.map_or("type unknown", String::as_str),
            format.map_or_else(String::new, |f| format!(", {f}"))
        );
        if !placed.contains(&described) {
            placed.push(described.clone());
        }
        if !linked {
            continue;
        }
        match kind.map(|kind| can_link(kind, format)) {
            Some(Some(true)) => {}
            Some(Some(false)) => {
                problems.push(format!(
                    "disk {} is on storage {described}, which cannot make linked clones",
                    volume.key
                ));
                fixes.push(
                    "move the template's disks to LVM-thin, ZFS, Ceph RBD or qcow2 on \
                     directory/NFS storage, or set PROXMOX_CLONE=full (and PROXMOX_STORAGE)"
                        .into(),
                );
            }
            Some(None) | None => {
                problems.push(format!(
                    "cannot tell whether storage {described} of disk {} makes linked clones \
                     (not listed for the token on {node})",
                    volume.key
                ));
                fixes.push(format!(
                    "give the token Datastore.Audit on /storage/{}, or set PROXMOX_CLONE=full",
                    volume.storage
                ));
            }
        }
    }
    // Which SSH key its VMs take, as provisioning decides it from the clone's (inherited)
    // config; a job's own key aside.
    let nonce = settings.fleet_key.is_some().then_some("0");
    let key_path = match crate::vm::ssh_key::choose(settings, &label, config, nonce) {
        Ok((KeyPath::Derived { .. }, _)) => "SSH: a per-VM key through cloud-init".to_string(),
        Ok((KeyPath::Static, Some(why))) => format!("SSH: the static key ({why})"),
        Ok((KeyPath::Static, None)) => "SSH: the static key".to_string(),
        Err(_) => {
            let why = crate::vm::ssh_key::cloud_init_accepts(config, &settings.ssh_user)
                .err()
                .unwrap_or_else(|| "no PROXMOX_FLEET_KEY".into());
            problems.push(format!(
                "its VMs would take the static SSH key ({why}), and VM_SSH_PRIVATE_KEY is not set"
            ));
            fixes.push(format!(
                "qm set {vmid} --ide2 <storage>:cloudinit --ciuser {} (with PROXMOX_FLEET_KEY \
                 set), or set VM_SSH_PRIVATE_KEY",
                settings.ssh_user
            ));
            String::new()
        }
    };
    fixes.dedup();
    if problems.is_empty() {
        Finding::pass(
            id,
            format!(
                "{label}: a template, guest agent on, net0 on {}, disks on {} for {} clones; \
                 {key_path}",
                bridge.as_deref().unwrap_or("(no bridge)"),
                if placed.is_empty() {
                    "no storage".to_string()
                } else {
                    placed.join(", ")
                },
                if linked { "linked" } else { "full" }
            ),
        )
    } else {
        Finding::fail(
            id,
            format!("{label}: {}", problems.join("; ")),
            fixes.join("; "),
        )
    }
}

async fn template_findings(
    api: &Api,
    settings: &Settings,
    vms: Option<&[ClusterVm]>,
    out: &mut Output<'_>,
) -> TemplateNeeds {
    let node = &settings.node;
    let mut needs = TemplateNeeds::for_settings(settings);
    let storages = node_storages(api, node).await;
    for (name, listed) in &settings.templates {
        let id = format!("template.{name}");
        // The copy listed for this node: pinned to it, or not pinned, in the order listed (as
        // prepare resolves it).
        let candidates = listed.candidates_on(node);
        if candidates.is_empty() {
            out.add(Finding::fail(
                id,
                format!(
                    "template {name}: PROXMOX_TEMPLATES lists {name}={listed}, no copy of it for \
                     node {node}"
                ),
                format!(
                    "list the template VM on {node} in PROXMOX_TEMPLATES ({name}=VMID@{node}|...), \
                     or set PROXMOX_NODE to a node with a copy"
                ),
            ));
            continue;
        }
        let mut chosen = None;
        let mut missing = Vec::new();
        for &vmid in &candidates {
            match api.client.vm_status(node, vmid).await {
                Ok(Some(status)) => {
                    chosen = Some((vmid, status));
                    break;
                }
                Ok(None) => missing.push(vmid),
                Err(err) => {
                    out.add(Finding::fail(
                        id.clone(),
                        format!("template {name} ({vmid}) on {node}: cannot read it: {err}"),
                        "the token's privileges on /vms/<vmid> (VM.Audit); see the privilege lines",
                    ));
                    missing.clear();
                    break;
                }
            }
        }
        let Some((vmid, status)) = chosen else {
            if let [vmid] = missing.as_slice() {
                let label = format!("template {name} ({vmid}) on {node}");
                out.add(Finding::fail(
                    id,
                    format!("{label}: PROXMOX_TEMPLATES maps {name} to VMID {vmid}, which does not exist on node {node}"),
                    "fix the map or PROXMOX_NODE, or create the template",
                ));
            } else if !missing.is_empty() {
                out.add(Finding::fail(
                    id,
                    format!(
                        "template {name}: PROXMOX_TEMPLATES lists {name}={listed}, and none of \
                         {} exists on node {node}",
                        missing
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    "fix the map or PROXMOX_NODE, or create the template",
                ));
            }
            continue;
        };
        if vmid != listed.first().vmid {
            needs
                .copies
                .push((vmid, format!("cloning template {name} on {node}")));
        }
        let label = format!("template {name} ({vmid}) on {node}");
        if let Some(vms) = vms {
            // Without placement only this node's templates could be mistaken for ours.
            let here: Vec<ClusterVm> = vms.iter().filter(|vm| vm.node == *node).cloned().collect();
            let vm_name = here
                .iter()
                .find(|vm| vm.vmid == u64::from(vmid))
                .and_then(|vm| vm.name.clone());
            let found = look_alike_findings(name, vm_name.as_deref(), &[vmid], Some(listed), &here);
            for finding in found {
                out.add(finding);
            }
        }
        let Some(config) = template_config(api, node, vmid, &id, &label, out).await else {
            continue;
        };
        let vm = TemplateVm {
            id,
            label,
            vmid,
            node,
            is_template: status.template,
        };
        out.add(template_vm_finding(
            settings, vm, &config, &storages, &mut needs,
        ));
    }
    needs
}

/// `61950@pve3|60900@pve1`: an entry value listing these copies, for fixes to copy from.
fn listing(copies: &BTreeMap<String, (u32, Option<u64>)>) -> String {
    copies
        .iter()
        .map(|(node, (vmid, _))| format!("{vmid}@{node}"))
        .collect::<Vec<_>>()
        .join("|")
}

/// Advisory lines for the template VMs among `vms` named like template `name`'s copies
/// (`vm_name`, or `name` itself) that are not used for it (not in `used`) and not listed: another
/// user's template made to look like ours, or a copy of ours the admin forgot to list.
fn look_alike_findings(
    name: &str,
    vm_name: Option<&str>,
    used: &[u32],
    listed: Option<&crate::config::TemplateCopies>,
    vms: &[ClusterVm],
) -> Vec<Finding> {
    let names = [Some(name), vm_name];
    let mut findings = Vec::new();
    for vm in vms {
        let Ok(vmid) = u32::try_from(vm.vmid) else {
            continue;
        };
        let is_qemu_template = vm.template && vm.kind.as_deref().is_none_or(|kind| kind == "qemu");
        let Some(vm_name) = vm.name.as_deref() else {
            continue;
        };
        if !is_qemu_template
            || !names.contains(&Some(vm_name))
            || used.contains(&vmid)
            || listed.is_some_and(|listed| listed.lists(vmid))
        {
            continue;
        }
        findings.push(
            Finding::fail(
                format!("template.{name}.look_alike.{vmid}"),
                format!(
                    "template VM {vmid} on {} is named {vm_name} but is not a listed copy of \
                     {name}: not used (another user's?)",
                    vm.node
                ),
                match listed {
                    Some(listed) => format!(
                        "nothing, if it is not one of yours (anyone with VM.Allocate can make a \
                         template of any name); if it is a copy of {name}, list it: \
                         PROXMOX_TEMPLATES {name}={listed}|{vmid}@{}",
                        vm.node
                    ),
                    None => format!(
                        "nothing, if it is not one of yours; map {name} in PROXMOX_TEMPLATES by \
                         VMID to say which template VMs are its copies"
                    ),
                },
            )
            .advisory(),
        );
    }
    findings
}

/// A template VM's config, or `None` with a failed line saying why it could not be read.
async fn template_config(
    api: &Api,
    node: &str,
    vmid: u32,
    id: &str,
    label: &str,
    out: &mut Output<'_>,
) -> Option<crate::proxmox::VmConfig> {
    match api.client.vm_config(node, vmid).await {
        Ok(Some(config)) => Some(config),
        Ok(None) => {
            out.add(Finding::fail(
                id,
                format!("{label}: it vanished while being checked"),
                "run check again",
            ));
            None
        }
        Err(err) => {
            out.add(Finding::fail(
                id,
                format!("{label}: cannot read its config: {err}"),
                "the token's privileges on /vms/<vmid> (VM.Audit); see the privilege lines",
            ));
            None
        }
    }
}

/// The template names a job may get without asking: the map's, and the default when it is not
/// in the map (only possible with `PROXMOX_ALLOWED_TEMPLATES`; without it, the settings line
/// already failed).
fn template_names(settings: &Settings) -> Vec<String> {
    let mut names: Vec<String> = settings.templates.keys().cloned().collect();
    let default = settings.template.trim();
    if !default.is_empty()
        && !settings.templates.contains_key(default)
        && settings.allowed_templates != AllowedTemplates::MapOnly
    {
        names.push(default.to_string());
    }
    names
}

/// With `PROXMOX_NODES`: the template VMs template `name` will be cloned from (node, VMID, and
/// why each counts), the listed copies left out (each a ✘: the map is wrong, or someone else's
/// VM took a listed VMID), the same-name templates it will not use, and the risk of copies
/// found by VM name on a shared cluster.
fn copies_findings(
    settings: &Settings,
    name: &str,
    resolved: &placement::Resolved,
    members: &[nodes::Member],
    vms: &[ClusterVm],
    out: &mut Output<'_>,
) {
    let listed = settings.templates.get(name);
    let mut by_name: BTreeMap<String, (u32, Option<u64>)> = BTreeMap::new();
    let used: Vec<String> = resolved
        .by_node
        .iter()
        .map(|(node, &(vmid, memory))| {
            let how = match (resolved.found, listed) {
                (_, Some(listed)) if listed.lists(vmid) => "listed",
                (Found::ListedAndByName, _) => {
                    by_name.insert(node.clone(), (vmid, memory));
                    "same VM name, PROXMOX_TEMPLATE_COPIES=by-name"
                }
                (Found::ByName, _) => "by VM name, PROXMOX_ALLOWED_TEMPLATES",
                _ => "by VMID, PROXMOX_ALLOWED_TEMPLATES",
            };
            format!("{vmid} on {node} ({how})")
        })
        .collect();
    out.add(Finding::pass(
        format!("template.{name}.copies"),
        format!("template {name}: clones are made from {}", used.join(", ")),
    ));
    for why in &resolved.refused {
        out.add(Finding::fail(
            format!("template.{name}.copies"),
            format!("template {name}: {why}"),
            "fix PROXMOX_TEMPLATES: list each copy as VMID@node where it is; if nobody of yours \
             moved or made that VM, find out who did (its clone or create task names the user)",
        ));
    }
    let vm_name = resolved.vm_name.as_deref().unwrap_or(name);
    if !by_name.is_empty() {
        let which: Vec<String> = by_name
            .iter()
            .map(|(node, (vmid, _))| format!("{vmid} on {node}"))
            .collect();
        out.add(
            Finding::fail(
                format!("template.{name}.by_name"),
                format!(
                    "template {name}: {} used only because named {vm_name} \
                     (PROXMOX_TEMPLATE_COPIES=by-name): on a cluster shared with other users, \
                     anyone with VM.Allocate can make a template of that name on a node without \
                     a listed copy and get jobs cloned from it",
                    which.join(", ")
                ),
                format!(
                    "list the copies instead: PROXMOX_TEMPLATES {name}={}, and set \
                     PROXMOX_TEMPLATE_COPIES=listed",
                    listing(&resolved.by_node)
                ),
            )
            .advisory(),
        );
    }
    if resolved.found == Found::ByName {
        out.add(
            Finding::fail(
                format!("template.{name}.by_name"),
                format!(
                    "template {name} is found by VM name (PROXMOX_ALLOWED_TEMPLATES), not by \
                     VMID: every template VM named {name} counts, on a cluster shared with other \
                     users anyone's"
                ),
                format!(
                    "map it by VMID: PROXMOX_TEMPLATES {name}={}",
                    listing(&resolved.by_node)
                ),
            )
            .advisory(),
        );
    }
    // Only templates on the nodes placement may use could be taken for ours.
    let in_scope: Vec<ClusterVm> = vms
        .iter()
        .filter(|vm| members.iter().any(|member| member.name == vm.node))
        .cloned()
        .collect();
    let used: Vec<u32> = resolved.by_node.values().map(|(vmid, _)| *vmid).collect();
    for finding in look_alike_findings(name, Some(vm_name), &used, listed, &in_scope) {
        out.add(finding);
    }
}

/// With `PROXMOX_NODES`: every template resolved on every online member the way placement
/// resolves it (its same-name copy there), and the per-template checks run on each copy.
async fn node_template_findings(
    api: &Api,
    settings: &Settings,
    members: &[nodes::Member],
    vms: &[ClusterVm],
    out: &mut Output<'_>,
) -> TemplateNeeds {
    let mut needs = TemplateNeeds::for_settings(settings);
    let mut storages: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut shared_storages: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mapped: Vec<u32> = settings
        .templates
        .values()
        .map(|listed| listed.first().vmid)
        .collect();
    for name in template_names(settings) {
        let resolved = match placement::template_copies(settings, &name, vms) {
            Ok(resolved) => resolved,
            Err(err) => {
                let why = match err {
                    Error::Settings(why) | Error::JobRequest(why) => why,
                    other => other.to_string(),
                };
                out.add(Finding::fail(
                    format!("template.{name}"),
                    format!("template {name}: {why}"),
                    "fix PROXMOX_TEMPLATES or PROXMOX_TEMPLATE, or create the template (and list \
                     the VMID of its copy on each node of PROXMOX_NODES: name=VMID@node|...)",
                ));
                continue;
            }
        };
        copies_findings(settings, &name, &resolved, members, vms, out);
        let copies = &resolved.by_node;
        let served: Vec<&str> = members
            .iter()
            .filter(|member| member.online && copies.contains_key(&member.name))
            .map(|member| member.name.as_str())
            .collect();
        if served.is_empty() {
            let elsewhere = copies
                .iter()
                .map(|(node, (vmid, _))| format!("{vmid} on {node}"))
                .collect::<Vec<_>>()
                .join(", ");
            out.add(Finding::fail(
                format!("template.{name}"),
                format!(
                    "template {name}: no online node of PROXMOX_NODES holds a copy of it, so its \
                     jobs cannot run (copies: {})",
                    if elsewhere.is_empty() {
                        "none"
                    } else {
                        &elsewhere
                    }
                ),
                "give an online node of PROXMOX_NODES a copy of the template and list its VMID in \
                 PROXMOX_TEMPLATES (name=VMID@node|...), or add a node that holds a listed copy \
                 to PROXMOX_NODES",
            ));
            continue;
        }
        let vm_name = resolved.vm_name.clone().unwrap_or_else(|| name.clone());
        // Offline members are skipped: their line already warns, and PVE cannot read a VM
        // config on a node that is down.
        let mut without_copy = Vec::new();
        // A copy with every drive on shared storage, which placement clones to the nodes
        // without one (with `target`).
        let mut shared_copy: Option<(u32, &str)> = None;
        for member in members.iter().filter(|member| member.online) {
            let node = member.name.as_str();
            let Some(&(vmid, _)) = copies.get(node) else {
                without_copy.push(node);
                continue;
            };
            if !mapped.contains(&vmid) && !needs.copies.iter().any(|(id, _)| *id == vmid) {
                needs
                    .copies
                    .push((vmid, format!("cloning template {name} on {node}")));
            }
            let id = format!("template.{name}.{node}");
            let label = format!("template {name} ({vmid}) on {node}");
            let Some(config) = template_config(api, node, vmid, &id, &label, out).await else {
                continue;
            };
            if !storages.contains_key(node) {
                let list = node_storage_list(api, node).await;
                shared_storages.insert(
                    node.to_string(),
                    list.iter()
                        .filter(|storage| storage.shared)
                        .map(|storage| storage.storage.clone())
                        .collect(),
                );
                storages.insert(
                    node.to_string(),
                    list.into_iter()
                        .map(|storage| (storage.storage, storage.kind))
                        .collect(),
                );
            }
            let drives = config.drive_storages();
            let shared_here = shared_storages.get(node);
            if shared_copy.is_none()
                && !drives.is_empty()
                && drives
                    .iter()
                    .all(|drive| shared_here.is_some_and(|shared| shared.contains(drive)))
            {
                shared_copy = Some((vmid, node));
            }
            let vm = TemplateVm {
                id,
                label,
                vmid,
                node,
                // Copies are found among the cluster's templates only.
                is_template: true,
            };
            out.add(template_vm_finding(
                settings,
                vm,
                &config,
                storages.get(node).unwrap_or(&BTreeMap::new()),
                &mut needs,
            ));
        }
        for node in without_copy {
            match shared_copy {
                Some((vmid, source)) => out.add(Finding::pass(
                    format!("template.{name}.{node}"),
                    format!(
                        "{node}: no copy of {name}; its jobs get clones of {vmid} on {source} \
                         (every drive on shared storage), made with target"
                    ),
                )),
                None => out.add(nodes::missing_copy(&name, &vm_name, node, &served)),
            }
        }
    }
    needs
}

async fn privilege_findings(
    api: &Api,
    settings: &Settings,
    templates: TemplateNeeds,
    out: &mut Output<'_>,
) {
    use privileges::*;
    let mut needs: Vec<Need> = Vec::new();
    for (name, listed) in &settings.templates {
        let vmid = listed.first().vmid;
        needs.push(Need {
            path: format!("/vms/{vmid}"),
            alternative_path: None,
            privileges: vec![VM_CLONE, VM_AUDIT],
            what_for: format!("cloning template {name}"),
        });
    }
    for (vmid, what_for) in &templates.copies {
        needs.push(Need {
            path: format!("/vms/{vmid}"),
            alternative_path: None,
            privileges: vec![VM_CLONE, VM_AUDIT],
            what_for: what_for.clone(),
        });
    }
    let new_vm = format!("/vms/{}", settings.vmid_range.0);
    let mut job = vec![
        VM_ALLOCATE,
        VM_AUDIT,
        VM_POWER,
        VM_CONFIG_OPTIONS,
        AGENT_AUDIT,
        AGENT_FILE_READ,
    ];
    if settings.vm_cores.is_some() {
        job.push(VM_CONFIG_CPU);
    }
    if settings.vm_memory_mb.is_some() {
        job.push(VM_CONFIG_MEMORY);
    }
    if settings.vm_disk_grow_gb.is_some() {
        job.push(VM_CONFIG_DISK);
    }
    needs.push(match &settings.pool {
        Some(pool) => Need {
            path: format!("/pool/{pool}"),
            alternative_path: Some(new_vm),
            privileges: job,
            what_for: "the job VMs: create, configure, start, guest agent, destroy".into(),
        },
        None => Need {
            path: new_vm,
            alternative_path: None,
            privileges: job,
            what_for: "the job VMs: create, configure, start, guest agent, destroy".into(),
        },
    });
    for storage in &templates.storages {
        needs.push(Need {
            path: format!("/storage/{storage}"),
            alternative_path: None,
            privileges: vec![DATASTORE_ALLOCATE, DATASTORE_AUDIT],
            what_for: "the clones' disks".into(),
        });
    }
    if api.major.is_none_or(|major| major >= 8) {
        for bridge in &templates.bridges {
            needs.push(Need {
                path: format!("/sdn/zones/localnetwork/{bridge}"),
                alternative_path: None,
                privileges: vec![SDN_USE],
                what_for: format!("the clones' NIC on bridge {bridge}"),
            });
        }
    }
    for need in &needs {
        out.add(privilege_finding(api, need).await);
    }
}

async fn privilege_finding(api: &Api, need: &Need) -> Finding {
    let id = format!("privileges{}", need.path);
    let token = &api.token;
    let held = match privileges::effective(&api.client, &need.path, None).await {
        Ok(held) => held,
        Err(err) => {
            return Finding::fail(
                id,
                format!(
                    "privileges on {}: cannot read the token's permissions: {err}",
                    need.path
                ),
                "the message names it (GET /access/permissions needs no privilege of its own)",
            )
        }
    };
    let alternative = match &need.alternative_path {
        Some(path) => privileges::effective(&api.client, path, None).await.ok(),
        None => None,
    };
    let missing = privileges::missing(need, &held, alternative.as_ref(), api.major);
    let names = |list: &[Privilege]| {
        list.iter()
            .map(Privilege::describe)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if missing.is_empty() {
        return Finding::pass(
            id,
            format!(
                "privileges of {token} on {} ({}): {}",
                need.path,
                need.what_for,
                names(&need.privileges)
            ),
        );
    }
    // Whether the user holds them: then only the token's own ACL is missing (privilege
    // separation). Reading another user's permissions needs Sys.Audit on /access; without
    // it, both ACLs are named.
    let user_has_them = match privileges::effective(&api.client, &need.path, Some(&api.user)).await
    {
        Ok(user) => Some(privileges::missing(need, &user, None, api.major).is_empty()),
        Err(_) => None,
    };
    let mut role_privs: Vec<&str> = missing
        .iter()
        .map(|p| {
            if api.major.is_some_and(|m| m < 9) {
                p.pve8
            } else {
                p.pve9
            }
        })
        .collect();
    role_privs.dedup();
    let role_privs = role_privs.join(" ");
    let (why, fix) = match user_has_them {
        Some(true) => (
            format!(
                "; its user {} has them, so the token's own ACL is missing (the token has \
                 privilege separation)",
                api.user
            ),
            format!(
                "grant the role to the token as well: pveum acl modify {} --tokens '{token}' \
                 --roles GitLabRunner (README, Proxmox checklist, step 3)",
                acl_path(&need.path)
            ),
        ),
        _ => (
            String::new(),
            format!(
                "add them to the role (pveum role modify GitLabRunner --append 1 --privs \
                 \"{role_privs}\") and make sure both ACLs cover {}: pveum acl modify {} --users \
                 {} --roles GitLabRunner; pveum acl modify {} --tokens '{token}' --roles \
                 GitLabRunner (README, Proxmox checklist, step 3)",
                need.path,
                acl_path(&need.path),
                api.user,
                acl_path(&need.path)
            ),
        ),
    };
    Finding::fail(
        id,
        format!(
            "privileges: {token} lacks {} on {} ({}){why}",
            names(&missing),
            need.path,
            need.what_for
        ),
        fix,
    )
}

/// Where to put the ACL: a new VM's id stands for `/vms` (or `/`).
fn acl_path(path: &str) -> &str {
    if path.starts_with("/vms/") {
        "/vms"
    } else {
        path
    }
}

async fn vmid_range_finding(
    api: &Api,
    settings: &Settings,
    vms: std::result::Result<Vec<ClusterVm>, ApiError>,
    out: &mut Output<'_>,
) {
    let (low, high) = settings.vmid_range;
    let id = "vmid_range";
    let vms = match vms {
        Ok(vms) => vms,
        Err(err) => {
            out.add(Finding::fail(
                id,
                format!("VMID range {low}-{high}: cannot list the cluster's guests: {err}"),
                "the token's VM.Audit (see the privilege lines)",
            ));
            return;
        }
    };
    let mut ours = 0;
    let mut foreign = Vec::new();
    for vm in &vms {
        let Ok(vmid) = u32::try_from(vm.vmid) else {
            continue;
        };
        if !(low..=high).contains(&vmid) {
            continue;
        }
        let is_qemu = vm.kind.as_deref().is_none_or(|kind| kind == "qemu");
        let marked = is_qemu
            && !vm.template
            && matches!(
                api.client.vm_config(&vm.node, vmid).await,
                Ok(Some(config)) if config.description().as_deref().and_then(Marker::find_in).is_some()
            );
        if marked {
            ours += 1;
        } else {
            foreign.push(format!(
                "{vmid} ({} on {})",
                vm.name.as_deref().unwrap_or("unnamed"),
                vm.node
            ));
        }
    }
    if foreign.is_empty() {
        out.add(Finding::pass(
            id,
            format!("VMID range {low}-{high} (PROXMOX_VMID_RANGE) holds no foreign VM ({ours} of this driver's)"),
        ));
    } else {
        out.add(Finding::fail(
            id,
            format!(
                "VMID range {low}-{high} (PROXMOX_VMID_RANGE) holds {} guest(s) that are not this \
                 driver's: {}",
                foreign.len(),
                foreign.join(", ")
            ),
            "keep the range free of other guests: move them out of it, or choose another \
             PROXMOX_VMID_RANGE",
        ));
    }
}

fn key_finding(settings: &Settings, out: &mut Output<'_>) {
    let finding = if settings.ssh_private_key.is_none() && settings.fleet_key.is_some() {
        Finding::pass(
            "ssh_key",
            "SSH key: VM_SSH_PRIVATE_KEY is not set; VMs of templates with cloud-init get keys \
             of their own, derived from PROXMOX_FLEET_KEY (templates without it cannot be used)",
        )
    } else if settings.ssh_private_key.is_none() {
        Finding::fail(
            "ssh_key",
            "SSH key: VM_SSH_PRIVATE_KEY is not set",
            "VM_SSH_PRIVATE_KEY in the settings file (the private key, or its path)",
        )
    } else {
        match crate::ssh::load_private_key(settings) {
            Ok(key) => Finding::pass(
                "ssh_key",
                format!(
                    "SSH key: {} {} (its public half must be in ~{}/.ssh/authorized_keys in \
                     the template)",
                    key.algorithm(),
                    key.fingerprint(),
                    settings.ssh_user
                ),
            ),
            Err(err) => Finding::fail(
                "ssh_key",
                format!("SSH key: {err}"),
                "the key file (the private half, in text form) and VM_SSH_KEY_PASSPHRASE",
            ),
        }
    };
    out.add(finding);
}

fn helper_finding(settings: &Settings, out: &mut Output<'_>) {
    use std::os::unix::fs::PermissionsExt;
    let configured = settings.runner_helper_path.as_deref();
    let finding = match crate::ssh::runner_helper_on_host(configured) {
        Some(path) => {
            let executable = std::fs::metadata(&path)
                .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
                .unwrap_or(false);
            if executable {
                Finding::pass(
                    "runner_helper",
                    format!(
                        "runner helper: {} (copied into VMs whose template lacks gitlab-runner)",
                        path.display()
                    ),
                )
            } else {
                Finding::fail(
                    "runner_helper",
                    format!(
                        "runner helper: RUNNER_HELPER_PATH {} is not an executable file",
                        path.display()
                    ),
                    "point RUNNER_HELPER_PATH at the gitlab-runner binary (linux-amd64), or \
                     unset it and install gitlab-runner in the template",
                )
            }
        }
        None => Finding::fail(
            "runner_helper",
            "runner helper: none on this host (RUNNER_HELPER_PATH is unset and no gitlab-runner \
             is on PATH): a template without gitlab-runner loses every job's artifacts and caches",
            "install gitlab-runner in the template or set RUNNER_HELPER_PATH",
        )
        .advisory(),
    };
    out.add(finding);
}

/// `Some(exit code)` when the run must end with [`EXIT_NOT_RUN`].
async fn smoke_test(settings: &Settings, out: &mut Output<'_>, cancel: &Cancel) -> Option<i32> {
    let client = match Client::new(settings) {
        Ok(client) => client,
        Err(err) => {
            out.add(Finding::fail(
                "smoke",
                format!("smoke test: {err}"),
                "the message names it",
            ));
            return None;
        }
    };
    let smoke = smoke::run(&client, settings, cancel).await;
    out.report.smoke_phases = smoke
        .phases
        .iter()
        .map(|(phase, took)| (phase.to_string(), took.as_secs_f64()))
        .collect();
    let phases = smoke
        .phases
        .iter()
        .map(|(phase, took)| format!("{phase} {}", joblog::secs(*took)))
        .collect::<Vec<_>>()
        .join(", ");
    match smoke.result {
        Ok(summary) => out.add(Finding::pass("smoke", format!("{summary}: {phases}"))),
        Err((step, _)) if smoke.interrupted.is_some() => out.add(Finding::fail(
            "smoke",
            format!(
                "smoke test interrupted ({}) while {step}; {}",
                smoke.interrupted.unwrap_or("cancelled"),
                if smoke.left_behind.is_some() {
                    "its VM could NOT be removed (see below)"
                } else {
                    "nothing of it is left on the cluster"
                }
            ),
            "run it again",
        )),
        Err((step, err)) => out.add(Finding::fail(
            "smoke",
            format!("smoke test failed while {step}: {err}"),
            "the Troubleshooting row for the message (the hooks report the same)",
        )),
    }
    if smoke.host_key_source == Some(crate::vm::HostKeySource::FirstUse) {
        out.add(
            Finding::fail(
                "smoke.host_key",
                "smoke test: the VM's SSH host key could not be read through the guest agent",
                "give the token VM.GuestAgent.FileRead (PVE 9) / VM.Monitor (PVE 8), and keep the \
                 host keys at /etc/ssh/ssh_host_*_key.pub in the template",
            )
            .advisory(),
        );
    }
    if let Some((vm, why)) = &smoke.left_behind {
        out.add(Finding::fail(
            "smoke.cleanup",
            format!("smoke test: could not remove {vm}: {why}"),
            format!(
                "remove it by hand (qm stop {0}; qm destroy {0} --purge on {1}), or let \
                 gitlab-proxmox-runner gc sweep it after an hour",
                vm.vmid, vm.node
            ),
        ));
        return Some(EXIT_NOT_RUN);
    }
    smoke.interrupted.map(|_| EXIT_NOT_RUN)
}
