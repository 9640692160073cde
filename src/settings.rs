//! Driver settings: where they come from, which of them a job may set, and their parsed form.
//!
//! Every setting can come from three places, in this order of precedence:
//! 1. the driver's TOML file (`--config FILE` or `GITLAB_PROXMOX_RUNNER_CONFIG`),
//! 2. the driver process's own environment under the plain name (what a systemd unit exports),
//! 3. `CUSTOM_ENV_<NAME>` (what `[[runners]] environment` produces, kept for the older driver).
//!
//! Layer 3 is shared with the job: gitlab-runner passes the job's own variables under the same
//! `CUSTOM_ENV_` names and the job's value wins. A setting that decides where the API token is
//! sent, or what the driver may touch, is therefore refused when its value comes from layer 3
//! and the job's own variables (`$JOB_RESPONSE_FILE`) define it.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::secret::Secret;

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    File,
    ProcessEnv,
    CustomEnv,
}

#[derive(Debug, Clone, Copy)]
struct Spec {
    name: &'static str,
    /// A job may set it (GitLab CI variables reach us as `CUSTOM_ENV_`).
    job_may_set: bool,
    secret: bool,
}

const fn host(name: &'static str) -> Spec {
    Spec {
        name,
        job_may_set: false,
        secret: false,
    }
}

const SPECS: &[Spec] = &[
    host("PROXMOX_HOST"),
    host("PROXMOX_USER"),
    host("PROXMOX_TOKEN_NAME"),
    Spec {
        name: "PROXMOX_TOKEN_VALUE",
        job_may_set: false,
        secret: true,
    },
    host("PROXMOX_NODE"),
    host("PROXMOX_TLS_CA_FILE"),
    host("PROXMOX_TLS_FINGERPRINT"),
    host("PROXMOX_TLS_INSECURE"),
    host("PROXMOX_TEMPLATES"),
    Spec {
        name: "PROXMOX_TEMPLATE",
        job_may_set: true,
        secret: false,
    },
    host("PROXMOX_DEFAULT_TEMPLATE"),
    host("PROXMOX_ALLOWED_TEMPLATES"),
    host("PROXMOX_VMID_RANGE"),
    host("PROXMOX_CLONE"),
    host("PROXMOX_STORAGE"),
    host("PROXMOX_POOL"),
    host("PROXMOX_MAX_CONCURRENT_CLONES"),
    host("PROXMOX_CLONE_LOCK_DIR"),
    host("VM_CORES"),
    host("VM_MEMORY_MB"),
    host("VM_DISK_GROW_GB"),
    host("VM_BOOT_TIMEOUT"),
    host("VM_CLEANUP_TIMEOUT"),
    host("VM_NETWORK_CIDRS"),
    host("VM_SSH_USER"),
    host("VM_SSH_PORT"),
    Spec {
        name: "VM_SSH_PRIVATE_KEY",
        job_may_set: true,
        secret: true,
    },
    Spec {
        name: "VM_SSH_KEY_PASSPHRASE",
        job_may_set: true,
        secret: true,
    },
    host("VM_SSH_HOST_KEY_POLICY"),
    host("RUNNER_HELPER_PATH"),
];

/// Names whose values are secrets: scrubbed from the process environment at start-up.
pub fn secret_names() -> impl Iterator<Item = &'static str> {
    SPECS
        .iter()
        .filter(|spec| spec.secret)
        .map(|spec| spec.name)
}

pub const CONFIG_FILE_ENV: &str = "GITLAB_PROXMOX_RUNNER_CONFIG";
pub const DEFAULT_TEMPLATES: &str =
    "ubuntu-focal=60900,ubuntu-bionic=60910,debian-11=60920,debian-12=60930";
/// Above PVE's default `next-id` upper bound (1000000), so PVE's own id allocation for
/// hand-made VMs never lands in it.
pub const DEFAULT_VMID_RANGE: (u32, u32) = (2_000_000, 2_999_999);

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// Pin the key read through the guest agent; if the agent cannot read it, pin the key seen
    /// on the first connection in prepare (with a warning).
    AgentThenFirstUse,
    /// Only a key read through the guest agent is accepted.
    Strict,
}

/// An IP network such as `192.0.2.0/24` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((addr, prefix)) => (addr.parse::<IpAddr>().ok()?, prefix.parse::<u8>().ok()?),
            None => {
                let addr = text.trim().parse::<IpAddr>().ok()?;
                (addr, if addr.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, prefix: u8, width: u8) -> u128 {
            if prefix == 0 {
                0
            } else {
                bits >> (width - prefix)
            }
        }
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net) as u128, self.prefix, 32)
                    == masked(u32::from(ip) as u128, self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), self.prefix, 128)
                    == masked(u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

/// The Proxmox API endpoint, normalised to `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiEndpoint {
    pub host: String,
    pub port: u16,
}

impl ApiEndpoint {
    pub fn parse(text: &str) -> Option<ApiEndpoint> {
        let text = text.trim().trim_end_matches('/');
        let rest = match text.split_once("://") {
            Some(("https", rest)) => rest,
            Some(_) => return None,
            None => text,
        };
        let rest = rest.strip_suffix("/api2/json").unwrap_or(rest);
        if rest.is_empty() || rest.contains('/') || rest.contains('@') {
            return None;
        }
        // `[v6]:port`, `[v6]`, bare v6, `host:port`, `host`.
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (addr, after) = bracketed.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(port) => port.parse().ok()?,
                None if after.is_empty() => 8006,
                None => return None,
            };
            (addr.to_string(), port)
        } else if rest.matches(':').count() > 1 {
            (rest.to_string(), 8006)
        } else if let Some((host, port)) = rest.split_once(':') {
            (host.to_string(), port.parse().ok()?)
        } else {
            (rest.to_string(), 8006)
        };
        if host.is_empty() || port == 0 {
            return None;
        }
        Some(ApiEndpoint { host, port })
    }

    /// `https://host:port/api2/json`, with IPv6 literals bracketed.
    pub fn base_url(&self) -> String {
        if self.host.contains(':') {
            format!("https://[{}]:{}/api2/json", self.host, self.port)
        } else {
            format!("https://{}:{}/api2/json", self.host, self.port)
        }
    }
}

/// All settings, parsed and checked. Secrets stay in [`Secret`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub api: ApiEndpoint,
    pub api_user: String,
    pub api_token_name: String,
    pub api_token_value: Secret,
    pub node: String,
    pub tls: TlsTrust,
    pub templates: BTreeMap<String, u32>,
    /// The template the job asked for (or the default), not yet resolved to a VMID.
    pub template: String,
    pub allowed_templates: AllowedTemplates,
    pub vmid_range: (u32, u32),
    /// `None`: linked when the source is a template.
    pub clone_mode: Option<CloneMode>,
    pub storage: Option<String>,
    pub pool: Option<String>,
    /// Cap on clones in flight from this runner host (0 = no cap).
    pub max_concurrent_clones: u32,
    pub clone_lock_dir: Option<PathBuf>,
    pub vm_cores: Option<u32>,
    pub vm_memory_mb: Option<u32>,
    pub vm_disk_grow_gb: Option<u32>,
    pub boot_timeout: Duration,
    /// How long cleanup may take (waits for locks included) before it leaves the VM to gc;
    /// keep it below the runner's `cleanup_exec_timeout`.
    pub cleanup_timeout: Duration,
    /// Empty: any global unicast address.
    pub network_cidrs: Vec<Cidr>,
    pub ssh_user: String,
    pub ssh_port: u16,
    /// Key text or a path to a key file.
    pub ssh_private_key: Option<Secret>,
    pub ssh_private_key_origin: Option<Origin>,
    /// The job's own variables chose the key: it may be key text, never a path on this host.
    pub ssh_private_key_from_job: bool,
    pub ssh_key_passphrase: Option<Secret>,
    pub host_key_policy: HostKeyPolicy,
    /// `None`: `gitlab-runner` on the host's PATH.
    pub runner_helper_path: Option<PathBuf>,
}

/// What `Settings::from_sources` reads from.
pub struct Sources<'a> {
    /// The TOML file's text and its path (for messages).
    pub file: Option<(&'a str, &'a Path)>,
    /// The process environment.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Variable names the job itself defines (from `$JOB_RESPONSE_FILE`); `None` when the
    /// runner gave us no job response file.
    pub job_variable_names: Option<&'a HashSet<String>>,
}

struct Raw {
    values: BTreeMap<&'static str, (Secret, Origin)>,
}

impl Raw {
    fn get(&self, name: &str) -> Option<&str> {
        self.values
            .get(name)
            .map(|(value, _)| value.expose().trim())
            .filter(|value| !value.is_empty())
    }

    fn take_secret(&mut self, name: &str) -> Option<(Secret, Origin)> {
        self.values
            .remove(name)
            .filter(|(value, _)| !value.expose().trim().is_empty())
    }

    fn required(&self, name: &str) -> Result<&str> {
        self.get(name).ok_or_else(|| {
            Error::Settings(format!(
                "{name} is not set; set it in the driver's config file (--config) or the runner \
                 host's environment"
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

fn parse_bool(name: &str, text: &str) -> Result<bool> {
    match text.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(Error::Settings(format!(
            "{name}={text:?} is not a boolean (use true or false)"
        ))),
    }
}

/// Parses `name=vmid,name=vmid`.
pub fn parse_template_map(text: &str) -> Result<BTreeMap<String, u32>> {
    let mut map = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let parsed = entry
            .split_once('=')
            .and_then(|(name, id)| Some((name.trim(), id.trim().parse::<u32>().ok()?)))
            .filter(|(name, id)| !name.is_empty() && (100..=999_999_999).contains(id));
        let (name, id) = parsed.ok_or_else(|| {
            Error::Settings(format!(
                "PROXMOX_TEMPLATES entry {entry:?} is not of the form name=vmid (vmid 100..999999999)"
            ))
        })?;
        map.insert(name.to_string(), id);
    }
    if map.is_empty() {
        return Err(Error::Settings("PROXMOX_TEMPLATES is empty".into()));
    }
    Ok(map)
}

/// Parses a certificate fingerprint as PVE shows it (`AA:BB:...`), colons optional.
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let hex: String = text
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn parse_vmid_range(text: &str) -> Result<(u32, u32)> {
    let bad = || {
        Error::Settings(format!(
            "PROXMOX_VMID_RANGE={text:?} is not a range like 2000000-2999999 within 100..999999999"
        ))
    };
    let (low, high) = text.split_once('-').ok_or_else(bad)?;
    let low: u32 = low.trim().parse().map_err(|_| bad())?;
    let high: u32 = high.trim().parse().map_err(|_| bad())?;
    if low < 100 || high > 999_999_999 || low > high {
        return Err(bad());
    }
    Ok((low, high))
}

fn toml_value_to_string(name: &str, value: toml::Value) -> Result<String> {
    match value {
        toml::Value::String(text) => Ok(text),
        toml::Value::Integer(number) => Ok(number.to_string()),
        toml::Value::Boolean(flag) => Ok(flag.to_string()),
        toml::Value::Array(items) => items
            .into_iter()
            .map(|item| toml_value_to_string(name, item))
            .collect::<Result<Vec<_>>>()
            .map(|items| items.join(",")),
        toml::Value::Table(table) => Ok(table
            .into_iter()
            .map(|(key, value)| Ok(format!("{key}={}", toml_value_to_string(name, value)?)))
            .collect::<Result<Vec<_>>>()?
            .join(",")),
        _ => Err(Error::Settings(format!(
            "{name} in the config file must be a string, number, boolean, list or table"
        ))),
    }
}

fn spec_for(key: &str) -> Option<&'static Spec> {
    SPECS
        .iter()
        .find(|spec| spec.name.eq_ignore_ascii_case(key))
}

impl Settings {
    /// Loads the settings the way every hook does: the file named by `--config` or
    /// `GITLAB_PROXMOX_RUNNER_CONFIG`, the process environment, and `$JOB_RESPONSE_FILE`.
    pub fn load(config_file: Option<&Path>) -> Result<Settings> {
        let env_path = std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from);
        let path = config_file.map(Path::to_path_buf).or(env_path);
        let text = match &path {
            Some(path) => Some(zeroize::Zeroizing::new(
                std::fs::read_to_string(path).map_err(|err| {
                    Error::Settings(format!(
                        "cannot read the driver config file {}: {err}",
                        path.display()
                    ))
                })?,
            )),
            None => None,
        };
        let job_names = read_job_variable_names()?;
        let env = |name: &str| std::env::var(name).ok();
        Settings::from_sources(Sources {
            file: text
                .as_ref()
                .zip(path.as_ref())
                .map(|(t, p)| (t.as_str(), p.as_path())),
            env: &env,
            job_variable_names: job_names.as_ref(),
        })
    }

    pub fn from_sources(sources: Sources<'_>) -> Result<Settings> {
        let mut raw = Raw {
            values: BTreeMap::new(),
        };
        // Lowest precedence first, so later layers overwrite.
        for spec in SPECS {
            if let Some(value) = (sources.env)(&format!("CUSTOM_ENV_{}", spec.name)) {
                raw.values
                    .insert(spec.name, (Secret::new(value), Origin::CustomEnv));
            }
        }
        for spec in SPECS {
            if let Some(value) = (sources.env)(spec.name) {
                raw.values
                    .insert(spec.name, (Secret::new(value), Origin::ProcessEnv));
            }
        }
        if let Some((text, path)) = sources.file {
            let table: toml::Table = toml::from_str(text).map_err(|err| {
                // The parser's message can quote the offending line, which may hold a secret.
                let line = err
                    .span()
                    .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
                Error::Settings(format!(
                    "the driver config file {} is not valid TOML{}",
                    path.display(),
                    line.map(|l| format!(" (near line {l})"))
                        .unwrap_or_default()
                ))
            })?;
            for (key, value) in table {
                let spec = spec_for(&key).ok_or_else(|| {
                    Error::Settings(format!(
                        "unknown setting {key:?} in {}; known settings: {}",
                        path.display(),
                        SPECS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                    ))
                })?;
                let value = toml_value_to_string(spec.name, value)?;
                raw.values
                    .insert(spec.name, (Secret::new(value), Origin::File));
            }
        }

        // The trust rule: a host-only setting whose value the job could have chosen.
        let tainted: Vec<&str> = SPECS
            .iter()
            .filter(|spec| !spec.job_may_set)
            .filter(|spec| matches!(raw.values.get(spec.name), Some((_, Origin::CustomEnv))))
            .filter(|spec| match sources.job_variable_names {
                Some(names) => names.contains(spec.name),
                None => false,
            })
            .map(|spec| spec.name)
            .collect();
        if !tainted.is_empty() {
            return Err(Error::JobRequest(format!(
                "this job defines {} as a CI/CD variable, but {} decide{} where the Proxmox API \
                 token is sent or what the driver may touch, so only the runner host may set {}. \
                 Remove the variable from the job (or its project/group), or have the runner admin \
                 move the driver settings into its config file (--config)",
                tainted.join(", "),
                if tainted.len() == 1 { "it" } else { "they" },
                if tainted.len() == 1 { "s" } else { "" },
                if tainted.len() == 1 { "it" } else { "them" },
            )));
        }

        let api = raw.required("PROXMOX_HOST").and_then(|text| {
            ApiEndpoint::parse(text).ok_or_else(|| {
                Error::Settings(format!(
                    "PROXMOX_HOST={text:?} is not host, host:port or https://host:port"
                ))
            })
        })?;
        let api_user = raw.required("PROXMOX_USER")?.to_string();
        if !api_user.contains('@') {
            return Err(Error::Settings(format!(
                "PROXMOX_USER={api_user:?} must include the realm, e.g. ci@pve or root@pam"
            )));
        }
        let api_token_name = raw.required("PROXMOX_TOKEN_NAME")?.to_string();
        let (api_token_value, _) = raw.take_secret("PROXMOX_TOKEN_VALUE").ok_or_else(|| {
            Error::Settings(
                "PROXMOX_TOKEN_VALUE is not set; put the API token secret in the driver's config \
                 file or the runner host's environment"
                    .into(),
            )
        })?;
        let node = raw.required("PROXMOX_NODE")?.to_string();

        let insecure = raw
            .get("PROXMOX_TLS_INSECURE")
            .map(|text| parse_bool("PROXMOX_TLS_INSECURE", text))
            .transpose()?
            .unwrap_or(false);
        let ca_file = raw.get("PROXMOX_TLS_CA_FILE").map(PathBuf::from);
        let fingerprint = raw
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
        let tls = match (ca_file, fingerprint, insecure) {
            (Some(_), Some(_), _) => {
                return Err(Error::Settings(
                    "set only one of PROXMOX_TLS_CA_FILE and PROXMOX_TLS_FINGERPRINT".into(),
                ))
            }
            (Some(path), None, _) => TlsTrust::CaFile(path),
            (None, Some(fp), _) => TlsTrust::Fingerprint(fp),
            (None, None, true) => TlsTrust::Insecure,
            (None, None, false) => TlsTrust::SystemRoots,
        };

        let templates =
            parse_template_map(raw.get("PROXMOX_TEMPLATES").unwrap_or(DEFAULT_TEMPLATES))?;
        let template = raw
            .get("PROXMOX_TEMPLATE")
            .or(raw.get("PROXMOX_DEFAULT_TEMPLATE"))
            .unwrap_or("ubuntu-focal")
            .to_string();
        let allowed_templates = match raw.get("PROXMOX_ALLOWED_TEMPLATES") {
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
        let vmid_range = raw
            .get("PROXMOX_VMID_RANGE")
            .map(parse_vmid_range)
            .transpose()?
            .unwrap_or(DEFAULT_VMID_RANGE);
        let clone_mode = match raw
            .get("PROXMOX_CLONE")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => None,
            Some("linked") => Some(CloneMode::Linked),
            Some("full") => Some(CloneMode::Full),
            Some(other) => {
                return Err(Error::Settings(format!(
                    "PROXMOX_CLONE={other:?} must be linked or full"
                )))
            }
        };
        let boot_timeout =
            Duration::from_secs(raw.number::<u64>("VM_BOOT_TIMEOUT")?.unwrap_or(300));
        if boot_timeout.is_zero() {
            return Err(Error::Settings(
                "VM_BOOT_TIMEOUT must be at least 1 second".into(),
            ));
        }
        let cleanup_timeout =
            Duration::from_secs(raw.number::<u64>("VM_CLEANUP_TIMEOUT")?.unwrap_or(420));
        if cleanup_timeout.is_zero() {
            return Err(Error::Settings(
                "VM_CLEANUP_TIMEOUT must be at least 1 second".into(),
            ));
        }
        let network_cidrs = raw
            .get("VM_NETWORK_CIDRS")
            .map(|text| {
                text.split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(|item| {
                        Cidr::parse(item).ok_or_else(|| {
                            Error::Settings(format!(
                                "VM_NETWORK_CIDRS entry {item:?} is not an address or network \
                                 like 192.0.2.0/24"
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?
            .unwrap_or_default();
        let ssh_port = raw.number::<u16>("VM_SSH_PORT")?.unwrap_or(22);
        if ssh_port == 0 {
            return Err(Error::Settings("VM_SSH_PORT must not be 0".into()));
        }
        let host_key_policy = match raw
            .get("VM_SSH_HOST_KEY_POLICY")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("agent-then-first-use") | Some("default") => {
                HostKeyPolicy::AgentThenFirstUse
            }
            Some("strict") => HostKeyPolicy::Strict,
            Some(other) => {
                return Err(Error::Settings(format!(
                    "VM_SSH_HOST_KEY_POLICY={other:?} must be strict or agent-then-first-use"
                )))
            }
        };
        let ssh_private_key = raw.take_secret("VM_SSH_PRIVATE_KEY");
        let ssh_key_passphrase = raw.take_secret("VM_SSH_KEY_PASSPHRASE").map(|(s, _)| s);

        Ok(Settings {
            api,
            api_user,
            api_token_name,
            api_token_value,
            node,
            tls,
            templates,
            template,
            allowed_templates,
            vmid_range,
            clone_mode,
            storage: raw.get("PROXMOX_STORAGE").map(String::from),
            pool: raw.get("PROXMOX_POOL").map(String::from),
            max_concurrent_clones: raw.number("PROXMOX_MAX_CONCURRENT_CLONES")?.unwrap_or(0),
            clone_lock_dir: raw.get("PROXMOX_CLONE_LOCK_DIR").map(PathBuf::from),
            vm_cores: raw.number("VM_CORES")?,
            vm_memory_mb: raw.number("VM_MEMORY_MB")?,
            vm_disk_grow_gb: raw.number("VM_DISK_GROW_GB")?,
            boot_timeout,
            cleanup_timeout,
            network_cidrs,
            ssh_user: raw.get("VM_SSH_USER").unwrap_or("ci").to_string(),
            ssh_port,
            ssh_private_key_origin: ssh_private_key.as_ref().map(|(_, origin)| *origin),
            ssh_private_key_from_job: matches!(ssh_private_key, Some((_, Origin::CustomEnv)))
                && sources
                    .job_variable_names
                    .is_none_or(|names| names.contains("VM_SSH_PRIVATE_KEY")),
            ssh_private_key: ssh_private_key.map(|(secret, _)| secret),
            ssh_key_passphrase,
            host_key_policy,
            runner_helper_path: raw.get("RUNNER_HELPER_PATH").map(PathBuf::from),
        })
    }
}

/// The names of the variables the job itself defines, from `$JOB_RESPONSE_FILE`.
/// Only names are kept: values may be secrets.
pub fn read_job_variable_names() -> Result<Option<HashSet<String>>> {
    let Some(path) = std::env::var_os("JOB_RESPONSE_FILE") else {
        return Ok(None);
    };
    let text = zeroize::Zeroizing::new(std::fs::read(&path).map_err(|err| {
        Error::Settings(format!(
            "cannot read the job response file {} ($JOB_RESPONSE_FILE): {err}",
            Path::new(&path).display()
        ))
    })?);
    parse_job_variable_names(&text).map(Some)
}

pub fn parse_job_variable_names(json: &[u8]) -> Result<HashSet<String>> {
    #[derive(serde::Deserialize)]
    struct Variable {
        key: String,
    }
    #[derive(serde::Deserialize)]
    struct Response {
        #[serde(default)]
        variables: Vec<Variable>,
    }
    let response: Response = serde_json::from_slice(json).map_err(|err| {
        Error::Settings(format!(
            "the job response file ($JOB_RESPONSE_FILE) is not the runner's JSON: line {} column {}",
            err.line(),
            err.column()
        ))
    })?;
    Ok(response.variables.into_iter().map(|v| v.key).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn base_env() -> HashMap<String, String> {
        [
            ("PROXMOX_HOST", "pve.example.test"),
            ("PROXMOX_USER", "ci@pve"),
            ("PROXMOX_TOKEN_NAME", "runner"),
            ("PROXMOX_TOKEN_VALUE", "s3cr3t-token"),
            ("PROXMOX_NODE", "pve1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn load(
        env: &HashMap<String, String>,
        file: Option<&str>,
        job: Option<&[&str]>,
    ) -> Result<Settings> {
        let names: Option<HashSet<String>> =
            job.map(|names| names.iter().map(|n| n.to_string()).collect());
        let lookup = |name: &str| env.get(name).cloned();
        Settings::from_sources(Sources {
            file: file.map(|text| (text, Path::new("/etc/test.toml"))),
            env: &lookup,
            job_variable_names: names.as_ref(),
        })
    }

    #[test]
    fn defaults_match_the_older_driver() {
        let settings = load(&base_env(), None, Some(&[])).unwrap();
        assert_eq!(
            settings.api.base_url(),
            "https://pve.example.test:8006/api2/json"
        );
        assert_eq!(settings.templates["ubuntu-focal"], 60900);
        assert_eq!(settings.templates["debian-12"], 60930);
        assert_eq!(settings.template, "ubuntu-focal");
        assert_eq!(settings.ssh_user, "ci");
        assert_eq!(settings.ssh_port, 22);
        assert_eq!(settings.boot_timeout, Duration::from_secs(300));
        assert_eq!(settings.tls, TlsTrust::SystemRoots);
        assert_eq!(settings.vmid_range, DEFAULT_VMID_RANGE);
    }

    #[test]
    fn file_beats_process_env_beats_custom_env() {
        let mut env = base_env();
        env.remove("PROXMOX_NODE");
        env.insert("CUSTOM_ENV_PROXMOX_NODE".into(), "from-custom".into());
        assert_eq!(load(&env, None, Some(&[])).unwrap().node, "from-custom");
        env.insert("PROXMOX_NODE".into(), "from-env".into());
        assert_eq!(load(&env, None, Some(&[])).unwrap().node, "from-env");
        let file = "PROXMOX_NODE = \"from-file\"\n";
        assert_eq!(load(&env, Some(file), Some(&[])).unwrap().node, "from-file");
    }

    #[test]
    fn a_job_that_sets_a_host_only_setting_is_refused_by_name() {
        let mut env = base_env();
        env.remove("PROXMOX_HOST");
        env.insert("CUSTOM_ENV_PROXMOX_HOST".into(), "evil.example.test".into());
        let err = load(&env, None, Some(&["PROXMOX_HOST", "CI_JOB_ID"])).unwrap_err();
        assert!(matches!(err, Error::JobRequest(_)));
        assert!(err.to_string().contains("PROXMOX_HOST"), "{err}");
        // From [[runners]] environment only (not in the job's variables): accepted.
        assert!(load(&env, None, Some(&["CI_JOB_ID"])).is_ok());
    }

    #[test]
    fn a_job_variable_shadowed_by_the_host_is_harmless() {
        let mut env = base_env();
        env.insert("CUSTOM_ENV_PROXMOX_HOST".into(), "evil.example.test".into());
        let settings = load(&env, None, Some(&["PROXMOX_HOST"])).unwrap();
        assert_eq!(settings.api.host, "pve.example.test");
    }

    #[test]
    fn the_job_may_pick_its_template_and_key() {
        let mut env = base_env();
        env.insert("CUSTOM_ENV_PROXMOX_TEMPLATE".into(), "debian-12".into());
        env.insert("CUSTOM_ENV_VM_SSH_PRIVATE_KEY".into(), "KEY".into());
        let settings = load(
            &env,
            None,
            Some(&["PROXMOX_TEMPLATE", "VM_SSH_PRIVATE_KEY"]),
        )
        .unwrap();
        assert_eq!(settings.template, "debian-12");
        assert_eq!(settings.ssh_private_key_origin, Some(Origin::CustomEnv));
    }

    #[test]
    fn unknown_file_keys_and_bad_toml_are_reported_without_echoing_values() {
        let err = load(&base_env(), Some("PROXMOX_HOTS = \"x\"\n"), None).unwrap_err();
        assert!(err.to_string().contains("PROXMOX_HOTS"));
        let err = load(
            &base_env(),
            Some("VM_SSH_PRIVATE_KEY = \"-----BEGIN OPENSSH PRIVATE KEY\n"),
            None,
        )
        .unwrap_err();
        assert!(!err.to_string().contains("BEGIN"), "{err}");
    }

    #[test]
    fn file_accepts_lowercase_keys_numbers_and_tables() {
        let file = "vm_ssh_port = 2222\nPROXMOX_TEMPLATES = { alpine = 9000, noble = 9001 }\n";
        let settings = load(&base_env(), Some(file), None).unwrap();
        assert_eq!(settings.ssh_port, 2222);
        assert_eq!(settings.templates.len(), 2);
        assert_eq!(settings.templates["noble"], 9001);
    }

    #[test]
    fn endpoints_parse_in_every_documented_form() {
        let cases = [
            ("pve", "https://pve:8006/api2/json"),
            ("pve:8443", "https://pve:8443/api2/json"),
            ("https://pve:8443/", "https://pve:8443/api2/json"),
            ("https://pve:8443/api2/json", "https://pve:8443/api2/json"),
            ("[::1]:8006", "https://[::1]:8006/api2/json"),
            ("::1", "https://[::1]:8006/api2/json"),
        ];
        for (input, url) in cases {
            assert_eq!(
                ApiEndpoint::parse(input).unwrap().base_url(),
                url,
                "{input}"
            );
        }
        assert!(ApiEndpoint::parse("http://pve").is_none());
        assert!(ApiEndpoint::parse("pve:notaport").is_none());
    }

    #[test]
    fn tls_fingerprints_parse_as_pve_shows_them() {
        let fp = "AB:".repeat(31) + "CD";
        assert_eq!(parse_fingerprint(&fp).unwrap()[31], 0xCD);
        assert!(parse_fingerprint("AB:CD").is_none());
        let mut env = base_env();
        env.insert("PROXMOX_TLS_FINGERPRINT".into(), "zz".into());
        assert!(load(&env, None, None).is_err());
    }

    #[test]
    fn cidrs_match_addresses() {
        let net = Cidr::parse("192.0.2.0/24").unwrap();
        assert!(net.contains("192.0.2.77".parse().unwrap()));
        assert!(!net.contains("192.0.3.1".parse().unwrap()));
        assert!(!net.contains("2001:db8::1".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("198.51.100.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
    }

    #[test]
    fn job_variable_names_come_from_the_runner_json() {
        let json = br#"{"id":1,"variables":[{"key":"A","value":"secret","public":false,"masked":true,"file":false,"raw":false},{"key":"PROXMOX_HOST","value":"x"}]}"#;
        let names = parse_job_variable_names(json).unwrap();
        assert!(names.contains("A") && names.contains("PROXMOX_HOST"));
        assert!(parse_job_variable_names(b"not json").is_err());
    }

    #[test]
    fn template_map_rejects_garbage() {
        assert!(parse_template_map("a=1").is_err());
        assert!(parse_template_map("a").is_err());
        assert_eq!(parse_template_map("a=100, b=200").unwrap().len(), 2);
    }
}
