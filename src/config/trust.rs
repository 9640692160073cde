//! The trust rule, in one place: which setting a job may choose, and what the driver does
//! with a `CUSTOM_ENV_` value of any other.
//!
//! An allow-list: only [`JOB_MAY_SET`] may ever come from a job. Everything else decides where
//! the API token is sent, what the driver may touch or read on the runner host, or how much of
//! the cluster a job gets, so it is the runner host's alone.
//!
//! Which `CUSTOM_ENV_` values count depends on the setup, detected per hook ([`Setup::detect`]):
//!
//! - **Host-configured** (the recommended setups): the driver got a settings file (`--config`
//!   or `GITLAB_PROXMOX_RUNNER_CONFIG`), or its own process environment sets at least one
//!   host-only setting to a non-blank value. Host-only settings are then **never** read from
//!   `CUSTOM_ENV_`; the names of ignored ones are reported once in the job log.
//! - **`[[runners]] environment`** (the older driver's setup: neither of the above). Host-only
//!   settings are read from `CUSTOM_ENV_`, because that is where the admin put them, but the
//!   rule fails closed: `$JOB_RESPONSE_FILE` must be present and parse, and a host-only name
//!   the job itself defines (among its `variables[].key`, or the keys of its `secrets`, which
//!   gitlab-runner resolves into variables of the same name) is refused as a build failure.
//!
//! In both setups, a setting that names a file the driver copies into the VM or serves
//! ([`Trust::HostFileOnly`]: `RUNNER_HELPER_PATH`) comes only from the file or the process
//! environment.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use super::sources::{is_set, Layers, Origin};
use crate::error::{Error, Result};
use crate::secret::Secret;

/// The only settings a job may choose.
pub const JOB_MAY_SET: [&str; 3] = [
    "PROXMOX_TEMPLATE",
    "VM_SSH_PRIVATE_KEY",
    "VM_SSH_KEY_PASSPHRASE",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// In [`JOB_MAY_SET`].
    JobMaySet,
    /// The runner host's: file, process environment, or (older setup only) `[[runners]]
    /// environment`.
    HostOnly,
    /// Names a file the driver copies or serves: file or process environment, in every setup.
    HostFileOnly,
    /// A fleet secret (`PROXMOX_FLEET_KEY`): the settings file only, which the admin keeps
    /// private; never a process environment (readable in /proc by the same user, inherited by
    /// every child) nor `CUSTOM_ENV_`.
    SettingsFileOnly,
}

#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub name: &'static str,
    pub trust: Trust,
    /// Scrubbed from the process environment at start-up.
    pub secret: bool,
}

const fn host(name: &'static str) -> Spec {
    Spec {
        name,
        trust: Trust::HostOnly,
        secret: false,
    }
}

pub const SPECS: &[Spec] = &[
    host("PROXMOX_HOST"),
    host("PROXMOX_USER"),
    host("PROXMOX_TOKEN_NAME"),
    Spec {
        name: "PROXMOX_TOKEN_VALUE",
        trust: Trust::HostOnly,
        secret: true,
    },
    host("PROXMOX_NODE"),
    host("PROXMOX_NODES"),
    host("PROXMOX_NODE_MAX_VMS"),
    host("PROXMOX_NODE_MEMORY_RESERVE_MB"),
    host("PROXMOX_TLS_CA_FILE"),
    host("PROXMOX_TLS_FINGERPRINT"),
    host("PROXMOX_TLS_INSECURE"),
    host("PROXMOX_HTTPS_PROXY"),
    host("PROXMOX_TEMPLATES"),
    // Which template VMs a job's VM may be cloned from: the runner host's alone.
    host("PROXMOX_TEMPLATE_COPIES"),
    Spec {
        name: "PROXMOX_TEMPLATE",
        trust: Trust::JobMaySet,
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
    host("PROXMOX_RUNNER_ID"),
    host("PROXMOX_MAX_JOB_TIMEOUT"),
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
        trust: Trust::JobMaySet,
        secret: true,
    },
    Spec {
        name: "VM_SSH_KEY_PASSPHRASE",
        trust: Trust::JobMaySet,
        secret: true,
    },
    host("VM_SSH_HOST_KEY_POLICY"),
    // How long a silent VM holds a job: the runner host's to trade off, never a job's.
    host("VM_SSH_KEEPALIVE_INTERVAL"),
    // The warm pool spends the cluster's memory and decides which VMs jobs get: fleet
    // settings, never a job's.
    host("WARM_POOL"),
    host("WARM_MAX_IDLE"),
    Spec {
        name: "RUNNER_HELPER_PATH",
        trust: Trust::HostFileOnly,
        secret: false,
    },
    Spec {
        name: "PROXMOX_FLEET_KEY",
        trust: Trust::SettingsFileOnly,
        secret: true,
    },
    // The fleet key before a rotation: running jobs derive their VMs' keys from it.
    Spec {
        name: "PROXMOX_FLEET_KEY_PREVIOUS",
        trust: Trust::SettingsFileOnly,
        secret: true,
    },
];

pub fn spec_for(key: &str) -> Option<&'static Spec> {
    SPECS
        .iter()
        .find(|spec| spec.name.eq_ignore_ascii_case(key))
}

/// Names whose values are secrets: scrubbed from the process environment at start-up.
pub fn secret_names() -> impl Iterator<Item = &'static str> {
    SPECS
        .iter()
        .filter(|spec| spec.secret)
        .map(|spec| spec.name)
}

/// How the runner host configured the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// A settings file, or host-only settings in the driver's own environment.
    HostConfigured,
    /// Everything through `[[runners]] environment` (the older driver's setup).
    RunnersEnvironment,
}

impl Setup {
    pub fn detect(layers: &Layers) -> Setup {
        let host_env = SPECS
            .iter()
            .filter(|spec| spec.trust != Trust::JobMaySet)
            .any(|spec| layers.process_env.get(spec.name).is_some_and(is_set));
        if layers.has_file || host_env {
            Setup::HostConfigured
        } else {
            Setup::RunnersEnvironment
        }
    }
}

/// The names of the variables a job defines: its `variables[].key` and its `secrets` keys.
/// Only names are kept: values may be secrets.
#[derive(Debug, Default, Clone)]
pub struct JobNames(HashSet<String>);

impl JobNames {
    pub fn parse(json: &[u8]) -> Result<JobNames> {
        #[derive(serde::Deserialize)]
        struct Variable {
            key: String,
        }
        #[derive(serde::Deserialize)]
        struct Response {
            // Not defaulted: a response without a variables list is not the runner's.
            variables: Vec<Variable>,
            #[serde(default)]
            secrets: Option<BTreeMap<String, serde::de::IgnoredAny>>,
        }
        let response: Response = serde_json::from_slice(json).map_err(|err| {
            Error::Settings(format!(
                "the job response file ($JOB_RESPONSE_FILE) is not the runner's job JSON \
                 (line {} column {}); without it the driver cannot tell the job's variables \
                 from [[runners]] environment, so it refuses to run",
                err.line(),
                err.column()
            ))
        })?;
        let mut names: HashSet<String> = response.variables.into_iter().map(|v| v.key).collect();
        names.extend(response.secrets.unwrap_or_default().into_keys());
        Ok(JobNames(names))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// The values to use, and what the rule did.
pub struct Decision {
    pub setup: Setup,
    pub values: BTreeMap<&'static str, (Secret, Origin)>,
    /// Host-only settings whose `CUSTOM_ENV_` value was not used (names only).
    pub ignored: Vec<&'static str>,
    /// Settings whose value the job may have chosen.
    pub job_chosen: BTreeSet<&'static str>,
}

/// Applies the rule. `job_response` as in [`super::Sources::job_response`].
pub fn decide(
    layers: Layers,
    job_response: Option<std::result::Result<&[u8], String>>,
) -> Result<Decision> {
    let setup = Setup::detect(&layers);
    let needs_job_names = setup == Setup::RunnersEnvironment
        && SPECS
            .iter()
            .any(|spec| spec.trust == Trust::HostOnly && layers.custom_env.contains_key(spec.name));
    let job_names = match (&job_response, needs_job_names) {
        (_, false) => job_response
            .as_ref()
            .and_then(|bytes| bytes.as_ref().ok())
            .and_then(|bytes| JobNames::parse(bytes).ok()),
        (None, true) => {
            return Err(Error::Settings(
                "$JOB_RESPONSE_FILE is not set, so the driver cannot tell the job's own \
                 variables from [[runners]] environment and refuses to read driver settings \
                 from CUSTOM_ENV_; gitlab-runner always sets it for custom executor hooks. \
                 Better: move the settings into the driver's config file (--config)"
                    .into(),
            ))
        }
        (Some(Err(message)), true) => return Err(Error::Settings(message.clone())),
        (Some(Ok(bytes)), true) => Some(JobNames::parse(bytes)?),
    };

    let mut values = BTreeMap::new();
    let mut ignored = Vec::new();
    let mut tainted = Vec::new();
    let mut job_chosen = BTreeSet::new();
    for (name, value) in layers.custom_env {
        let Some(spec) = spec_for(name) else { continue };
        let defined_by_job = job_names.as_ref().is_none_or(|names| names.contains(name));
        match (spec.trust, setup) {
            (Trust::JobMaySet, _) => {
                // In the host-configured setups nothing tells a [[runners]] environment entry
                // from the job's: count every CUSTOM_ENV_ value as the job's.
                if setup == Setup::HostConfigured || defined_by_job {
                    job_chosen.insert(name);
                }
            }
            (Trust::HostOnly, Setup::RunnersEnvironment) => {
                // Blank counts: a job's empty value would still replace the admin's.
                if defined_by_job {
                    tainted.push(name);
                }
            }
            (Trust::HostOnly, Setup::HostConfigured)
            | (Trust::HostFileOnly | Trust::SettingsFileOnly, _) => {
                if is_set(&value) {
                    ignored.push(name);
                }
                continue;
            }
        }
        values.insert(name, (value, Origin::CustomEnv));
    }
    if !tainted.is_empty() {
        let one = tainted.len() == 1;
        return Err(Error::JobRequest(format!(
            "this job defines {} as a CI/CD variable or secret, but {} decide{} where the \
             Proxmox API token is sent or what the driver may touch, so only the runner host \
             may set {}. Remove the variable (or secret) from the job (or its project/group), or \
             have the runner admin move the driver settings into its config file (--config)",
            tainted.join(", "),
            if one { "it" } else { "they" },
            if one { "s" } else { "" },
            if one { "it" } else { "them" },
        )));
    }
    for (name, value) in layers.process_env {
        if spec_for(name).is_some_and(|spec| spec.trust == Trust::SettingsFileOnly) {
            if is_set(&value) {
                return Err(Error::Settings(format!(
                    "{name} is set in the driver's environment; it is read from the settings \
                     file only (--config, mode 0600, owned by the runner's user): a process \
                     environment is readable by every process of that user and inherited by \
                     every child"
                )));
            }
            continue;
        }
        job_chosen.remove(name);
        values.insert(name, (value, Origin::ProcessEnv));
    }
    for (name, value) in layers.file {
        job_chosen.remove(name);
        values.insert(name, (value, Origin::File));
    }
    Ok(Decision {
        setup,
        values,
        ignored,
        job_chosen,
    })
}

/// The job-log line for ignored values, if any.
pub fn ignored_warning(decision: &Decision) -> Option<String> {
    if decision.ignored.is_empty() {
        return None;
    }
    let names: Vec<String> = decision
        .ignored
        .iter()
        .map(|name| format!("CUSTOM_ENV_{name}"))
        .collect();
    let why = match decision.setup {
        Setup::HostConfigured => {
            "this runner's driver settings come from its config file or environment, and only \
             they may set host-only settings"
        }
        Setup::RunnersEnvironment => {
            "a setting naming a file the driver copies into the VM may only come from the \
             driver's config file or the runner host's environment"
        }
    };
    Some(format!(
        "ignored {} (a CI/CD variable, secret or [[runners]] environment entry): {why}",
        names.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_allow_list_is_job_settable() {
        let job: Vec<&str> = SPECS
            .iter()
            .filter(|spec| spec.trust == Trust::JobMaySet)
            .map(|spec| spec.name)
            .collect();
        assert_eq!(job, JOB_MAY_SET);
    }

    #[test]
    fn job_names_include_secrets_and_need_a_variables_list() {
        let json = br#"{"id":1,"variables":[{"key":"A","value":"secret"}],
            "secrets":{"PROXMOX_HOST":{"vault":{"path":"x"},"file":true}}}"#;
        let names = JobNames::parse(json).unwrap();
        assert!(names.contains("A") && names.contains("PROXMOX_HOST"));
        assert!(JobNames::parse(b"not json").is_err());
        assert!(JobNames::parse(br#"{"id":1}"#).is_err());
        assert!(JobNames::parse(br#"{"variables":[],"secrets":null}"#).is_ok());
    }
}
