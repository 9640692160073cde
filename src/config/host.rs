//! The parsed settings: what the hooks, the API client and the SSH client use. Built from the
//! values the trust rule let through ([`super::trust::Decision`]); where a value came from is
//! decided there, and only its consequences are kept here (e.g. [`SshKey`]'s variant).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::parse::{
    classify_private_key, default_runner_id, is_runner_id, parse_bool, parse_fingerprint,
    parse_proxy_url, parse_template_map, parse_vmid_range, ApiEndpoint, Cidr, SshKey,
    TemplateCopies,
};
use super::sources::Origin;
use super::trust::{self, Decision};
use crate::error::{Error, Result};
use crate::fleet_key::FleetKey;
use crate::secret::Secret;

pub const DEFAULT_TEMPLATES: &str =
    "ubuntu-focal=60900,ubuntu-bionic=60910,debian-11=60920,debian-12=60930";
/// Above PVE's default `next-id` upper bound (1000000), so PVE's own id allocation for
/// hand-made VMs never lands in it.
pub const DEFAULT_VMID_RANGE: (u32, u32) = (2_000_000, 2_999_999);
/// The longest job a VM's recorded deadline allows for unless the host says otherwise: GitLab's
/// largest usual `maximum_timeout`.
pub const DEFAULT_MAX_JOB_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// How the driver trusts the Proxmox API's TLS certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsTrust {
    /// The runner host's CA store (there is none on a distroless host).
    SystemRoots,
    /// A PEM file holding the CA (e.g. the cluster's `/etc/pve/pve-root-ca.pem`).
    CaFile(PathBuf),
    /// The SHA-256 fingerprint of the API's leaf certificate, as the PVE UI shows it.
    Fingerprint([u8; 32]),
    /// No verification at all (loudly warned about in the job log).
    Insecure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMode {
    Linked,
    Full,
}

/// Which templates a job may ask for beyond the named map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedTemplates {
    /// Only the names in `PROXMOX_TEMPLATES` (the default).
    MapOnly,
    /// Any template VM on the node, by VMID or name (`*`).
    AnyOnNode,
    /// The map plus these VMIDs or VM names.
    Listed(Vec<String>),
}

/// `PROXMOX_TEMPLATE_COPIES`: which template VMs count as the copies of a `PROXMOX_TEMPLATES`
/// name on the nodes of `PROXMOX_NODES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyDiscovery {
    /// `listed` (the default): only the VMIDs the entry lists. A node without a listed copy gets
    /// no jobs of that name (unless a listed copy on shared storage is cloned there with
    /// `target`).
    Listed,
    /// `by-name`: the listed copies, and on every node without one, a template VM with the same
    /// VM name as the first listed copy. On a cluster shared with other users that is anyone's
    /// template of that name: any user with `VM.Allocate` can make one.
    ByName,
}

/// The nodes prepare may place a job's VM on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeSet {
    /// `PROXMOX_NODE` only (no `PROXMOX_NODES`): no placement, no extra API requests.
    One,
    /// `PROXMOX_NODES=pve1,pve2,...`.
    Listed(Vec<String>),
    /// `PROXMOX_NODES=*`: every online node of the cluster.
    Every,
}

impl NodeSet {
    /// Whether a VM may go to `node` (with `One`, placement is not asked).
    pub fn allows(&self, node: &str) -> bool {
        match self {
            NodeSet::Listed(listed) => listed.iter().any(|listed| listed == node),
            NodeSet::Every | NodeSet::One => true,
        }
    }
}

/// `PROXMOX_NODES`: a comma- or space-separated list of node names, or `*`.
pub fn parse_node_set(text: &str) -> Result<NodeSet> {
    let text = text.trim();
    if text == "*" {
        return Ok(NodeSet::Every);
    }
    let nodes: Vec<String> = text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .collect();
    let valid = |name: &String| {
        name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    match nodes.iter().find(|name| !valid(name)) {
        Some(bad) => Err(Error::Settings(format!(
            "PROXMOX_NODES: {bad:?} is not a node name; list node names separated by commas, \
             or `*` for every online node"
        ))),
        None if nodes.is_empty() => Err(Error::Settings(
            "PROXMOX_NODES is empty; list node names separated by commas, or `*`".into(),
        )),
        None => Ok(NodeSet::Listed(nodes)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// Pin the key read through the guest agent; if the agent cannot read it, pin the key seen
    /// on the first connection in prepare (with a warning).
    AgentThenFirstUse,
    /// Only a key read through the guest agent is accepted.
    Strict,
}

/// `VM_SSH_PRIVATE_KEY` as the trust rule left it: a job's value is always [`SshKey::Text`].
#[derive(Debug, Clone)]
pub struct SshKeySetting {
    pub key: SshKey,
    /// It came in through `CUSTOM_ENV_`, so gitlab-runner also exports it into every stage
    /// script it writes into the VM.
    pub via_custom_env: bool,
    /// The job chose the key or its passphrase (a CI/CD variable, a secret, an override): a
    /// key that does not parse is then the job's fault, and the job never claims a warm VM
    /// (warm VMs were made for the host's key).
    pub from_job: bool,
}

/// All settings, parsed and checked, grouped by who reads them: the API client takes only
/// [`ApiSettings`], the SSH client only [`SshSettings`]. Secrets stay in [`Secret`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub api: ApiSettings,
    pub placement: PlacementSettings,
    pub clone: CloneSettings,
    pub ssh: SshSettings,
    pub warm: WarmSettings,
    /// The template the job asked for (or the default), not yet resolved to a VMID.
    pub template: String,
    pub vmid_range: (u32, u32),
    /// `PROXMOX_RUNNER_ID`: who created a VM, in its ownership marker (`gc --runner`).
    pub runner_id: String,
    /// `PROXMOX_MAX_JOB_TIMEOUT`: caps the job timeout a VM's recorded deadline allows for.
    pub max_job_timeout: Duration,
    pub boot_timeout: Duration,
    /// How long cleanup may take (waits for locks included) before it leaves the VM to gc;
    /// keep it below the runner's `cleanup_exec_timeout`.
    pub cleanup_timeout: Duration,
    /// Empty: any address but loopback, link-local, multicast, unspecified and broadcast
    /// (private ranges included; see `proxmox::address`).
    pub network_cidrs: Vec<Cidr>,
    /// `PROXMOX_FLEET_KEY` (settings file only): proves warm VMs ours (`crate::fleet_key`).
    pub fleet_key: Option<FleetKey>,
    /// `PROXMOX_FLEET_KEY_PREVIOUS` (settings file only): the fleet key before a rotation, for
    /// the per-VM SSH keys of VMs made before it (`crate::vm::ssh_key`).
    pub fleet_key_previous: Option<FleetKey>,
    /// Lines for the job log about what the trust rule did (names only, never values).
    pub trust_warnings: Vec<String>,
}

/// What the API client reads: where the API is, who we are there, whom to trust.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub endpoint: ApiEndpoint,
    pub user: String,
    pub token_name: String,
    pub token_value: Secret,
    /// `PROXMOX_HTTPS_PROXY`: the only proxy the API client ever uses (the environment's
    /// `HTTPS_PROXY` and friends are ignored).
    pub proxy: Option<String>,
    pub tls: TlsTrust,
}

/// Where VMs may go and which template VMs a name means (`crate::vm::placement`).
#[derive(Debug, Clone)]
pub struct PlacementSettings {
    /// `PROXMOX_NODE`, or with `PROXMOX_NODES` and no `PROXMOX_NODE` the first listed node
    /// (empty for `*`): the node of commands that work on one node.
    pub node: String,
    pub nodes: NodeSet,
    /// `PROXMOX_NODE_MAX_VMS`: at most this many of our VMs per node.
    pub max_vms_per_node: Option<u32>,
    /// `PROXMOX_NODE_MEMORY_RESERVE_MB`: memory a node keeps free of our VMs.
    pub node_memory_reserve_mb: u64,
    /// `PROXMOX_TEMPLATES`: template name → the template VMs that are its copies.
    pub templates: BTreeMap<String, TemplateCopies>,
    /// `PROXMOX_TEMPLATE_COPIES`: whether same-name templates count as copies too.
    pub template_copies: CopyDiscovery,
    pub allowed_templates: AllowedTemplates,
}

/// How a VM is cloned and sized (`crate::vm::provision`).
#[derive(Debug, Clone)]
pub struct CloneSettings {
    /// `None`: linked when the source is a template.
    pub mode: Option<CloneMode>,
    pub storage: Option<String>,
    /// `PROXMOX_POOL`: the PVE resource pool clones join.
    pub pool: Option<String>,
    /// Cap on clones in flight from this runner host (0 = no cap).
    pub max_concurrent: u32,
    pub lock_dir: Option<PathBuf>,
    pub cores: Option<u32>,
    pub memory_mb: Option<u32>,
    pub disk_grow_gb: Option<u32>,
}

/// What the SSH client reads (`crate::ssh`).
#[derive(Debug, Clone)]
pub struct SshSettings {
    pub user: String,
    pub port: u16,
    pub private_key: Option<SshKeySetting>,
    pub key_passphrase: Option<Secret>,
    /// The job chose `VM_SSH_KEY_PASSPHRASE`: a key it does not decrypt is the job's fault.
    pub key_passphrase_from_job: bool,
    pub host_key_policy: HostKeyPolicy,
    /// `VM_SSH_KEEPALIVE_INTERVAL`: SSH keepalives this often; a VM silent for six intervals
    /// is lost (`crate::ssh::set_keepalive_interval`).
    pub keepalive_interval: Duration,
    /// `None`: `gitlab-runner` on the host's PATH.
    pub runner_helper_path: Option<PathBuf>,
}

/// The warm pool (`crate::pool`).
#[derive(Debug, Clone)]
pub struct WarmSettings {
    /// `WARM_POOL = { name = N }`: warm VMs the pool service keeps per template name.
    pub pool: BTreeMap<String, u32>,
    /// `WARM_MAX_IDLE` (seconds): a warm VM nobody claimed is recycled after this long.
    pub max_idle: Duration,
}

/// `VM_SSH_KEEPALIVE_INTERVAL` unset: a keepalive every 3 s, six unanswered (18 s of silence)
/// declare a VM lost (`crate::ssh`, which explains the figure).
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);

/// A warm VM idles at most this long before the pool recycles it: fresh enough that its
/// packages and DHCP lease are today's.
pub const DEFAULT_WARM_MAX_IDLE: Duration = Duration::from_secs(3600);

/// `name=N,name=N` (the file's `WARM_POOL = { name = N }` table reads as that).
pub fn parse_warm_pool(text: &str) -> Result<BTreeMap<String, u32>> {
    let mut pool = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let parsed = entry
            .split_once('=')
            .and_then(|(name, count)| Some((name.trim(), count.trim().parse::<u32>().ok()?)))
            .filter(|(name, count)| !name.is_empty() && *count <= 1000);
        let (name, count) = parsed.ok_or_else(|| {
            Error::Settings(format!(
                "WARM_POOL entry {entry:?} is not of the form template-name = count (0..1000)"
            ))
        })?;
        pool.insert(name.to_string(), count);
    }
    Ok(pool)
}

struct Values {
    decision: Decision,
}

impl Values {
    fn get(&self, name: &str) -> Option<&str> {
        self.decision
            .values
            .get(name)
            .map(|(value, _)| value.expose().trim())
            .filter(|value| !value.is_empty())
    }

    fn take_secret(&mut self, name: &str) -> Option<(Secret, Origin)> {
        self.decision
            .values
            .remove(name)
            .filter(|(value, _)| !value.expose().trim().is_empty())
    }

    fn required(&self, name: &str) -> Result<&str> {
        self.get(name).ok_or_else(|| {
            let ignored = if self.decision.ignored.contains(&name) {
                format!(
                    " (CUSTOM_ENV_{name} was ignored: with a config file or driver settings in \
                     the runner host's environment, no setting comes from [[runners]] \
                     environment or the job)"
                )
            } else {
                String::new()
            };
            Error::Settings(format!(
                "{name} is not set{ignored}; set it in the driver's config file (--config) or \
                 the runner host's environment"
            ))
        })
    }

    fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>> {
        self.get(name)
            .map(|text| {
                text.parse::<T>().map_err(|_| {
                    Error::Settings(format!("{name}={text:?} is not a valid whole number"))
                })
            })
            .transpose()
    }
}

impl Settings {
    pub fn from_decision(decision: Decision) -> Result<Settings> {
        let mut trust_warnings: Vec<String> =
            trust::ignored_warning(&decision).into_iter().collect();
        let mut raw = Values { decision };
        // Read in this order, so that of several bad settings the same one is reported first.
        let api = raw.api()?;
        let (nodes, node) = raw.nodes()?;
        let tls = raw.tls()?;
        let templates = raw.templates()?;
        let vmid_range = raw
            .get("PROXMOX_VMID_RANGE")
            .map(parse_vmid_range)
            .transpose()?
            .unwrap_or(DEFAULT_VMID_RANGE);
        let clone_mode = raw.clone_mode()?;
        let runner_id = raw.runner_id()?;
        let max_job_timeout = raw.seconds("PROXMOX_MAX_JOB_TIMEOUT", DEFAULT_MAX_JOB_TIMEOUT)?;
        let boot_timeout = raw.seconds("VM_BOOT_TIMEOUT", Duration::from_secs(300))?;
        let ssh_keepalive_interval = raw.ssh_keepalive_interval()?;
        let cleanup_timeout = raw.seconds("VM_CLEANUP_TIMEOUT", Duration::from_secs(420))?;
        let network_cidrs = raw.network_cidrs()?;
        let ssh_port = raw.number::<u16>("VM_SSH_PORT")?.unwrap_or(22);
        if ssh_port == 0 {
            return Err(Error::Settings("VM_SSH_PORT must not be 0".into()));
        }
        let host_key_policy = raw.host_key_policy()?;
        let ssh_private_key = raw.ssh_private_key(&mut trust_warnings)?;
        let ssh_key_passphrase = raw.take_secret("VM_SSH_KEY_PASSPHRASE").map(|(s, _)| s);
        let ssh_key_passphrase_from_job = ssh_key_passphrase.is_some()
            && raw.decision.job_chosen.contains("VM_SSH_KEY_PASSPHRASE");
        let (warm_pool, warm_max_idle, fleet_key) = raw.warm_pool()?;
        let fleet_key_previous = raw.fleet_key_previous()?;

        Ok(Settings {
            api: ApiSettings {
                endpoint: api.endpoint,
                user: api.user,
                token_name: api.token_name,
                token_value: api.token_value,
                proxy: api.proxy,
                tls,
            },
            placement: PlacementSettings {
                node,
                nodes,
                max_vms_per_node: raw.number("PROXMOX_NODE_MAX_VMS")?,
                node_memory_reserve_mb: raw.number("PROXMOX_NODE_MEMORY_RESERVE_MB")?.unwrap_or(0),
                templates: templates.map,
                template_copies: templates.copies,
                allowed_templates: templates.allowed,
            },
            clone: CloneSettings {
                mode: clone_mode,
                storage: raw.get("PROXMOX_STORAGE").map(String::from),
                pool: raw.get("PROXMOX_POOL").map(String::from),
                max_concurrent: raw.number("PROXMOX_MAX_CONCURRENT_CLONES")?.unwrap_or(0),
                lock_dir: raw.get("PROXMOX_CLONE_LOCK_DIR").map(PathBuf::from),
                cores: raw.number("VM_CORES")?,
                memory_mb: raw.number("VM_MEMORY_MB")?,
                disk_grow_gb: raw.number("VM_DISK_GROW_GB")?,
            },
            ssh: SshSettings {
                user: raw.get("VM_SSH_USER").unwrap_or("ci").to_string(),
                port: ssh_port,
                private_key: ssh_private_key,
                key_passphrase: ssh_key_passphrase,
                key_passphrase_from_job: ssh_key_passphrase_from_job,
                host_key_policy,
                keepalive_interval: ssh_keepalive_interval,
                runner_helper_path: raw.get("RUNNER_HELPER_PATH").map(PathBuf::from),
            },
            warm: WarmSettings {
                pool: warm_pool,
                max_idle: warm_max_idle,
            },
            template: templates.default,
            vmid_range,
            runner_id,
            max_job_timeout,
            boot_timeout,
            cleanup_timeout,
            network_cidrs,
            fleet_key,
            fleet_key_previous,
            trust_warnings,
        })
    }
}

/// Where the API is and who the driver is there.
struct ApiAccess {
    endpoint: ApiEndpoint,
    user: String,
    token_name: String,
    token_value: Secret,
    proxy: Option<String>,
}

/// Which templates jobs get, and which they may ask for.
struct TemplateChoice {
    map: BTreeMap<String, TemplateCopies>,
    copies: CopyDiscovery,
    default: String,
    allowed: AllowedTemplates,
}

/// The settings by concern, for [`Settings::from_decision`].
impl Values {
    fn api(&mut self) -> Result<ApiAccess> {
        let endpoint = self.required("PROXMOX_HOST").and_then(|text| {
            ApiEndpoint::parse(text).ok_or_else(|| {
                Error::Settings(format!(
                    "PROXMOX_HOST={text:?} is not host, host:port or https://host:port"
                ))
            })
        })?;
        let user = self.required("PROXMOX_USER")?.to_string();
        if !user.contains('@') {
            return Err(Error::Settings(format!(
                "PROXMOX_USER={user:?} must include the realm, e.g. ci@pve or root@pam"
            )));
        }
        let token_name = self.required("PROXMOX_TOKEN_NAME")?.to_string();
        let (token_value, _) = self.take_secret("PROXMOX_TOKEN_VALUE").ok_or_else(|| {
            Error::Settings(
                "PROXMOX_TOKEN_VALUE is not set; put the API token secret in the driver's config \
                 file or the runner host's environment"
                    .into(),
            )
        })?;
        let proxy = self
            .get("PROXMOX_HTTPS_PROXY")
            .map(parse_proxy_url)
            .transpose()?;
        Ok(ApiAccess {
            endpoint,
            user,
            token_name,
            token_value,
            proxy,
        })
    }

    /// `PROXMOX_NODES`, and the node a VM goes to without placement (`PROXMOX_NODE`, else the
    /// first listed node; none for `*`).
    fn nodes(&self) -> Result<(NodeSet, String)> {
        let nodes = match self.get("PROXMOX_NODES") {
            Some(text) => parse_node_set(text)?,
            None => NodeSet::One,
        };
        let node = match (&nodes, self.get("PROXMOX_NODE")) {
            (_, Some(node)) => node.trim().to_string(),
            (NodeSet::Listed(listed), None) => listed[0].clone(),
            (NodeSet::Every, None) => String::new(),
            (NodeSet::One, None) => self.required("PROXMOX_NODE")?.to_string(),
        };
        Ok((nodes, node))
    }

    fn tls(&self) -> Result<TlsTrust> {
        let insecure = self
            .get("PROXMOX_TLS_INSECURE")
            .map(|text| parse_bool("PROXMOX_TLS_INSECURE", text))
            .transpose()?
            .unwrap_or(false);
        let ca_file = self.get("PROXMOX_TLS_CA_FILE").map(PathBuf::from);
        let fingerprint = self
            .get("PROXMOX_TLS_FINGERPRINT")
            .map(|text| {
                parse_fingerprint(text).ok_or_else(|| {
                    Error::Settings(format!(
                        "PROXMOX_TLS_FINGERPRINT={text:?} is not a SHA-256 fingerprint \
                         (32 bytes as hex, AA:BB:... as the PVE UI shows it)"
                    ))
                })
            })
            .transpose()?;
        Ok(match (ca_file, fingerprint, insecure) {
            (Some(_), Some(_), _) => {
                return Err(Error::Settings(
                    "set only one of PROXMOX_TLS_CA_FILE and PROXMOX_TLS_FINGERPRINT".into(),
                ))
            }
            (Some(path), None, _) => TlsTrust::CaFile(path),
            (None, Some(fp), _) => TlsTrust::Fingerprint(fp),
            (None, None, true) => TlsTrust::Insecure,
            (None, None, false) => TlsTrust::SystemRoots,
        })
    }

    fn templates(&self) -> Result<TemplateChoice> {
        let map = parse_template_map(self.get("PROXMOX_TEMPLATES").unwrap_or(DEFAULT_TEMPLATES))?;
        let copies = match self
            .get("PROXMOX_TEMPLATE_COPIES")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("listed") => CopyDiscovery::Listed,
            Some("by-name") => CopyDiscovery::ByName,
            Some(other) => {
                return Err(Error::Settings(format!(
                    "PROXMOX_TEMPLATE_COPIES={other:?} must be listed (only the VMIDs \
                     PROXMOX_TEMPLATES lists are a template's copies) or by-name (also \
                     same-name templates on nodes without a listed copy)"
                )))
            }
        };
        let default = self
            .get("PROXMOX_TEMPLATE")
            .or(self.get("PROXMOX_DEFAULT_TEMPLATE"))
            .unwrap_or("ubuntu-focal")
            .to_string();
        let allowed = match self.get("PROXMOX_ALLOWED_TEMPLATES") {
            None => AllowedTemplates::MapOnly,
            Some("*") => AllowedTemplates::AnyOnNode,
            Some(list) => AllowedTemplates::Listed(
                list.split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(String::from)
                    .collect(),
            ),
        };
        Ok(TemplateChoice {
            map,
            copies,
            default,
            allowed,
        })
    }

    fn clone_mode(&self) -> Result<Option<CloneMode>> {
        match self
            .get("PROXMOX_CLONE")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => Ok(None),
            Some("linked") => Ok(Some(CloneMode::Linked)),
            Some("full") => Ok(Some(CloneMode::Full)),
            Some(other) => Err(Error::Settings(format!(
                "PROXMOX_CLONE={other:?} must be linked or full"
            ))),
        }
    }

    fn runner_id(&self) -> Result<String> {
        match self.get("PROXMOX_RUNNER_ID") {
            Some(id) if is_runner_id(id) => Ok(id.to_string()),
            Some(id) => Err(Error::Settings(format!(
                "PROXMOX_RUNNER_ID={id:?} must be 1 to 64 letters, digits, '.', '_' or '-'"
            ))),
            None => Ok(default_runner_id()),
        }
    }

    /// A whole number of seconds, at least one: a zero timeout would fail every job at once.
    fn seconds(&self, name: &str, default: Duration) -> Result<Duration> {
        match self.number::<u64>(name)? {
            Some(0) => Err(Error::Settings(format!("{name} must be at least 1 second"))),
            Some(secs) => Ok(Duration::from_secs(secs)),
            None => Ok(default),
        }
    }

    fn ssh_keepalive_interval(&self) -> Result<Duration> {
        match self.number::<u64>("VM_SSH_KEEPALIVE_INTERVAL")? {
            None => Ok(DEFAULT_KEEPALIVE_INTERVAL),
            Some(secs @ 1..=30) => Ok(Duration::from_secs(secs)),
            Some(secs) => Err(Error::Settings(format!(
                "VM_SSH_KEEPALIVE_INTERVAL={secs} must be 1 to 30 seconds"
            ))),
        }
    }

    fn network_cidrs(&self) -> Result<Vec<Cidr>> {
        let Some(text) = self.get("VM_NETWORK_CIDRS") else {
            return Ok(Vec::new());
        };
        text.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                Cidr::parse(item).ok_or_else(|| {
                    Error::Settings(format!(
                        "VM_NETWORK_CIDRS entry {item:?} is not an address or network like \
                         192.0.2.0/24"
                    ))
                })
            })
            .collect()
    }

    fn host_key_policy(&self) -> Result<HostKeyPolicy> {
        match self
            .get("VM_SSH_HOST_KEY_POLICY")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("agent-then-first-use") | Some("default") => {
                Ok(HostKeyPolicy::AgentThenFirstUse)
            }
            Some("strict") => Ok(HostKeyPolicy::Strict),
            Some(other) => Err(Error::Settings(format!(
                "VM_SSH_HOST_KEY_POLICY={other:?} must be strict or agent-then-first-use"
            ))),
        }
    }

    /// The key, and a warning in `trust_warnings` when it came through `CUSTOM_ENV_`.
    fn ssh_private_key(
        &mut self,
        trust_warnings: &mut Vec<String>,
    ) -> Result<Option<SshKeySetting>> {
        let from_job = self.decision.job_chosen.contains("VM_SSH_PRIVATE_KEY");
        let Some((value, origin)) = self.take_secret("VM_SSH_PRIVATE_KEY") else {
            return Ok(None);
        };
        let key = match classify_private_key(value) {
            // A job must not make the driver open files on the runner host.
            Ok(SshKey::File(_)) if from_job => {
                return Err(Error::JobRequest(
                    "VM_SSH_PRIVATE_KEY from the job's CI/CD variables must hold the key text \
                     itself (-----BEGIN ...), not a path: only the runner host's own settings \
                     may name a key file"
                        .into(),
                ))
            }
            Err(Error::Settings(message)) if from_job => return Err(Error::JobRequest(message)),
            other => other?,
        };
        let via_custom_env = origin == Origin::CustomEnv;
        if via_custom_env {
            trust_warnings.push(
                "VM_SSH_PRIVATE_KEY came in through CUSTOM_ENV_ (a CI/CD variable or [[runners]] \
                 environment): gitlab-runner exports it into every stage script it writes into \
                 the VM, so every job can read it. Put the key in the driver's config file or \
                 the runner host's environment instead."
                    .into(),
            );
        }
        Ok(Some(SshKeySetting {
            key,
            via_custom_env,
            from_job,
        }))
    }

    /// `WARM_POOL`, `WARM_MAX_IDLE` and the fleet key the pool cannot do without.
    fn warm_pool(&mut self) -> Result<(BTreeMap<String, u32>, Duration, Option<FleetKey>)> {
        let warm_pool = match self.get("WARM_POOL") {
            Some(text) => parse_warm_pool(text)?,
            None => BTreeMap::new(),
        };
        let max_idle = self.seconds("WARM_MAX_IDLE", DEFAULT_WARM_MAX_IDLE)?;
        let fleet_key = self
            .take_secret("PROXMOX_FLEET_KEY")
            .map(|(text, _)| FleetKey::parse(text.expose()))
            .transpose()?;
        if fleet_key.is_none() && warm_pool.values().any(|count| *count > 0) {
            return Err(Error::Settings(
                "WARM_POOL needs PROXMOX_FLEET_KEY in the settings file: any user of the \
                 cluster who may create VMs can make one that looks like a warm VM of ours \
                 (VMID in our range, our tag, a copied marker), and only a MAC made with a \
                 secret of the runner hosts tells ours apart. Make one with \
                 `gitlab-proxmox-runner fleet-key` and put the same value in the settings file \
                 of every runner host and pool service of the fleet"
                    .into(),
            ));
        }
        Ok((warm_pool, max_idle, fleet_key))
    }

    /// The fleet key before a rotation: what running jobs derive their VMs' SSH keys from.
    fn fleet_key_previous(&mut self) -> Result<Option<FleetKey>> {
        self.take_secret("PROXMOX_FLEET_KEY_PREVIOUS")
            .map(|(text, _)| {
                FleetKey::parse(text.expose()).map_err(|err| {
                    Error::Settings(
                        err.to_string()
                            .replace("PROXMOX_FLEET_KEY ", "PROXMOX_FLEET_KEY_PREVIOUS "),
                    )
                })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_sets_are_lists_or_a_star() {
        assert_eq!(parse_node_set("*").unwrap(), NodeSet::Every);
        assert_eq!(
            parse_node_set("pve1, pve2 pve3").unwrap(),
            NodeSet::Listed(vec!["pve1".into(), "pve2".into(), "pve3".into()])
        );
        assert!(parse_node_set(" , ").is_err());
        assert!(parse_node_set("pve1,../etc").is_err());
    }
}
