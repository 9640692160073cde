//! Driver settings: where they come from ([`sources`]), which of them a job may set
//! ([`trust`], the one rule), how their values parse ([`parse`]) and their checked form
//! ([`host`]).
//!
//! Every setting can come from three places, in this order of precedence:
//! 1. the driver's TOML file (`--config FILE` or `GITLAB_PROXMOX_RUNNER_CONFIG`),
//! 2. the driver process's own environment under the plain name (what a systemd unit exports),
//! 3. `CUSTOM_ENV_<NAME>` (what `[[runners]] environment` produces, kept for the older driver),
//!    subject to [`trust`]: shared with the job, whose variables, secrets and overrides of
//!    predefined variables reach the driver under the same names and win.

pub mod file_modes;
pub mod host;
pub mod parse;
pub mod sources;
pub mod trust;

use std::path::{Path, PathBuf};

pub use host::{
    AllowedTemplates, ApiSettings, CloneMode, CloneSettings, CopyDiscovery, HostKeyPolicy, NodeSet,
    PlacementSettings, Settings, SshKeySetting, SshSettings, TlsTrust, WarmSettings,
    DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_MAX_JOB_TIMEOUT, DEFAULT_TEMPLATES, DEFAULT_VMID_RANGE,
};
pub use parse::{
    parse_fingerprint, parse_template_map, ApiEndpoint, Cidr, ListedCopy, SshKey, TemplateCopies,
};
pub use sources::{Origin, Sources};
pub use trust::{secret_names, JobNames, Setup};

use crate::error::{Error, Result};

pub const CONFIG_FILE_ENV: &str = "GITLAB_PROXMOX_RUNNER_CONFIG";

/// The settings file the hooks read: `--config FILE`, else `$GITLAB_PROXMOX_RUNNER_CONFIG`.
pub fn config_file_path(config_file: Option<&Path>) -> Option<PathBuf> {
    config_file
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from))
}

impl Settings {
    /// The SSH key every VM the runner host clones accepts: prepare, the pool and config need it.
    pub fn require_ssh_key(&self) -> crate::error::Result<()> {
        if self.ssh.private_key.is_none() {
            return Err(crate::error::Error::Settings(
                "VM_SSH_PRIVATE_KEY is not set: the driver needs the private key (text or a path) \
                 that the template's VM_SSH_USER accepts; put it in the driver's config file or the \
                 runner host's environment"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Loads the settings the way every job hook does: the file named by `--config` or
    /// `GITLAB_PROXMOX_RUNNER_CONFIG`, the process environment, and `$JOB_RESPONSE_FILE`.
    pub fn load(config_file: Option<&Path>) -> Result<Settings> {
        let response = std::env::var_os("JOB_RESPONSE_FILE").map(|path| {
            std::fs::read(&path)
                .map(zeroize::Zeroizing::new)
                .map_err(|err| {
                    format!(
                        "cannot read the job response file {} ($JOB_RESPONSE_FILE): {err}",
                        Path::new(&path).display()
                    )
                })
        });
        Settings::load_with(
            config_file,
            response.as_ref().map(|read| match read {
                Ok(bytes) => Ok(bytes.as_slice()),
                Err(message) => Err(message.clone()),
            }),
        )
    }

    /// Loads the settings of a command outside any job (gc, pool, check): the settings file and
    /// the process environment; no job, so no `$JOB_RESPONSE_FILE`.
    pub fn load_for_fleet(config_file: Option<&Path>) -> Result<Settings> {
        Settings::load_with(config_file, None)
    }

    fn load_with(
        config_file: Option<&Path>,
        job_response: Option<std::result::Result<&[u8], String>>,
    ) -> Result<Settings> {
        let path = config_file_path(config_file);
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
        let env = |name: &str| std::env::var(name).ok();
        Settings::from_sources(Sources {
            file: text
                .as_ref()
                .zip(path.as_ref())
                .map(|(text, path)| (text.as_str(), path.as_path())),
            env: &env,
            job_response,
        })
    }

    pub fn from_sources(sources: Sources<'_>) -> Result<Settings> {
        let layers = sources::Layers::collect(&sources)?;
        let decision = trust::decide(layers, sources.job_response)?;
        Settings::from_decision(decision)
    }
}

/// Settings for unit tests: the host's required ones on `PROXMOX_NODE=pve1`, and
/// `extra` on top (an empty value removes the setting).
#[cfg(test)]
pub(crate) fn test_settings(extra: &[(&str, &str)]) -> Settings {
    let mut env: std::collections::BTreeMap<String, String> = [
        ("PROXMOX_HOST", "pve.example.test"),
        ("PROXMOX_USER", "ci@pve"),
        ("PROXMOX_TOKEN_NAME", "runner"),
        ("PROXMOX_TOKEN_VALUE", "secret"),
        ("PROXMOX_NODE", "pve1"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect();
    for (name, value) in extra {
        match value {
            &"" => env.remove(*name),
            value => env.insert(name.to_string(), value.to_string()),
        };
    }
    let lookup = |name: &str| env.get(name).cloned();
    Settings::from_sources(Sources {
        file: None,
        env: &lookup,
        job_response: None,
    })
    .expect("test settings")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    const HOST: [(&str, &str); 5] = [
        ("PROXMOX_HOST", "pve.example.test"),
        ("PROXMOX_USER", "ci@pve"),
        ("PROXMOX_TOKEN_NAME", "runner"),
        ("PROXMOX_TOKEN_VALUE", "s3cr3t-token"),
        ("PROXMOX_NODE", "pve1"),
    ];

    /// The recommended setup without a file: the driver settings in the process environment.
    fn base_env() -> HashMap<String, String> {
        HOST.into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The older setup: every driver setting as a `[[runners]] environment` entry.
    fn runners_env() -> HashMap<String, String> {
        HOST.into_iter()
            .map(|(k, v)| (format!("CUSTOM_ENV_{k}"), v.to_string()))
            .collect()
    }

    fn response(variables: &[&str], secrets: &[&str]) -> String {
        let variables: Vec<String> = variables
            .iter()
            .map(|key| format!(r#"{{"key":"{key}","value":"x","public":true,"masked":false}}"#))
            .collect();
        let secrets: Vec<String> = secrets
            .iter()
            .map(|key| format!(r#""{key}":{{"vault":{{"path":"p","field":"f"}},"file":true}}"#))
            .collect();
        format!(
            r#"{{"id":1,"variables":[{}],"secrets":{{{}}}}}"#,
            variables.join(","),
            secrets.join(",")
        )
    }

    fn load_with(
        env: &HashMap<String, String>,
        file: Option<&str>,
        job_response: Option<std::result::Result<&[u8], String>>,
    ) -> Result<Settings> {
        let lookup = |name: &str| env.get(name).cloned();
        Settings::from_sources(Sources {
            file: file.map(|text| (text, Path::new("/etc/test.toml"))),
            env: &lookup,
            job_response,
        })
    }

    fn load(
        env: &HashMap<String, String>,
        file: Option<&str>,
        job: Option<&[&str]>,
    ) -> Result<Settings> {
        let json = job.map(|names| response(names, &[]));
        load_with(env, file, json.as_ref().map(|text| Ok(text.as_bytes())))
    }

    #[test]
    fn defaults_match_the_older_driver() {
        let settings = load(&base_env(), None, Some(&[])).unwrap();
        assert_eq!(
            settings.api.endpoint.base_url(),
            "https://pve.example.test:8006/api2/json"
        );
        assert_eq!(
            settings.placement.templates["ubuntu-focal"].to_string(),
            "60900"
        );
        assert_eq!(
            settings.placement.templates["debian-12"].to_string(),
            "60930"
        );
        assert_eq!(settings.placement.template_copies, CopyDiscovery::Listed);
        assert_eq!(settings.template, "ubuntu-focal");
        assert_eq!(settings.ssh.user, "ci");
        assert_eq!(settings.ssh.port, 22);
        assert_eq!(settings.boot_timeout, Duration::from_secs(300));
        assert_eq!(settings.ssh.keepalive_interval, Duration::from_secs(3));
        assert_eq!(settings.api.tls, TlsTrust::SystemRoots);
        assert_eq!(settings.vmid_range, DEFAULT_VMID_RANGE);
        assert_eq!(settings.max_job_timeout, DEFAULT_MAX_JOB_TIMEOUT);
        assert_eq!(settings.api.proxy, None);
        assert!(parse::is_runner_id(&settings.runner_id));
        assert!(settings.trust_warnings.is_empty());
    }

    #[test]
    fn the_keepalive_interval_is_whole_seconds_from_1_to_30() {
        let mut env = base_env();
        env.insert("VM_SSH_KEEPALIVE_INTERVAL".into(), "1".into());
        let settings = load(&env, None, Some(&[])).unwrap();
        assert_eq!(settings.ssh.keepalive_interval, Duration::from_secs(1));
        for bad in ["0", "31", "0.5", "3s"] {
            env.insert("VM_SSH_KEEPALIVE_INTERVAL".into(), bad.into());
            let err = load(&env, None, Some(&[])).unwrap_err();
            assert!(
                err.to_string().contains("VM_SSH_KEEPALIVE_INTERVAL"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn file_beats_process_env() {
        let mut env = base_env();
        env.insert("PROXMOX_NODE".into(), "from-env".into());
        assert_eq!(load(&env, None, None).unwrap().placement.node, "from-env");
        let file = "PROXMOX_NODE = \"from-file\"\n";
        assert_eq!(
            load(&env, Some(file), None).unwrap().placement.node,
            "from-file"
        );
    }

    #[test]
    fn with_host_settings_no_host_only_value_is_read_from_custom_env() {
        // Changed rule: before, a CUSTOM_ENV_ value the job did not define was used here.
        let mut env = base_env();
        env.remove("PROXMOX_NODE");
        env.insert("CUSTOM_ENV_PROXMOX_NODE".into(), "from-custom".into());
        env.insert("CUSTOM_ENV_PROXMOX_POOL".into(), "someone-elses".into());
        let err = load(&env, None, Some(&[])).unwrap_err();
        assert!(
            err.to_string()
                .contains("CUSTOM_ENV_PROXMOX_NODE was ignored"),
            "{err}"
        );
        env.insert("PROXMOX_NODE".into(), "pve1".into());
        // Without a job response file too: in this setup the driver never needs it.
        let settings = load_with(&env, None, None).unwrap();
        assert_eq!(settings.clone.pool, None);
        assert_eq!(settings.trust_warnings.len(), 1);
        let warning = &settings.trust_warnings[0];
        assert!(
            warning.contains("CUSTOM_ENV_PROXMOX_NODE, CUSTOM_ENV_PROXMOX_POOL"),
            "{warning}"
        );
        assert!(!warning.contains("someone-elses"), "{warning}");
        // A file alone makes the setup host-configured.
        let file = HOST
            .iter()
            .map(|(k, v)| format!("{k} = \"{v}\"\n"))
            .collect::<String>();
        let settings = load_with(&runners_env_with_pool(), Some(&file), None).unwrap();
        assert_eq!(settings.clone.pool, None);
    }

    fn runners_env_with_pool() -> HashMap<String, String> {
        let mut env = runners_env();
        env.insert("CUSTOM_ENV_PROXMOX_POOL".into(), "ci".into());
        env
    }

    #[test]
    fn the_older_setup_reads_custom_env_but_refuses_what_the_job_defines() {
        let env = runners_env_with_pool();
        let settings = load(&env, None, Some(&["CI_JOB_ID"])).unwrap();
        assert_eq!(settings.placement.node, "pve1");
        assert_eq!(settings.clone.pool.as_deref(), Some("ci"));
        for (variables, secrets) in [(&["PROXMOX_POOL"][..], &[][..]), (&[], &["PROXMOX_POOL"])] {
            let json = response(variables, secrets);
            let err = load_with(&env, None, Some(Ok(json.as_bytes()))).unwrap_err();
            assert!(matches!(err, Error::JobRequest(_)), "{err}");
            assert!(err.to_string().contains("PROXMOX_POOL"), "{err}");
        }
        // A blank value the job defines would still replace the admin's.
        let mut blank = env.clone();
        blank.insert("CUSTOM_ENV_PROXMOX_POOL".into(), String::new());
        assert!(load(&blank, None, Some(&["PROXMOX_POOL"])).is_err());
    }

    #[test]
    fn the_older_setup_fails_closed_without_a_readable_job_response() {
        let env = runners_env();
        let missing = load_with(&env, None, None).unwrap_err();
        assert!(
            missing.to_string().contains("JOB_RESPONSE_FILE"),
            "{missing}"
        );
        let unreadable = load_with(&env, None, Some(Err("cannot read it".into()))).unwrap_err();
        assert!(unreadable.to_string().contains("cannot read it"));
        for bad in [&b"not json"[..], br#"{"id":1}"#] {
            let err = load_with(&env, None, Some(Ok(bad))).unwrap_err();
            assert!(err.to_string().contains("JOB_RESPONSE_FILE"), "{err}");
        }
    }

    #[test]
    fn a_file_the_driver_copies_never_comes_from_custom_env() {
        for mut env in [base_env(), runners_env()] {
            env.insert(
                "CUSTOM_ENV_RUNNER_HELPER_PATH".into(),
                "/etc/gitlab-runner/proxmox.toml".into(),
            );
            let settings = load(&env, None, Some(&[])).unwrap();
            assert_eq!(settings.ssh.runner_helper_path, None);
            assert!(settings.trust_warnings[0].contains("CUSTOM_ENV_RUNNER_HELPER_PATH"));
        }
        let mut env = base_env();
        env.insert("RUNNER_HELPER_PATH".into(), "/usr/bin/gitlab-runner".into());
        assert!(load(&env, None, None)
            .unwrap()
            .ssh
            .runner_helper_path
            .is_some());
    }

    #[test]
    fn a_job_variable_shadowed_by_the_host_is_harmless() {
        let mut env = base_env();
        env.insert("CUSTOM_ENV_PROXMOX_HOST".into(), "evil.example.test".into());
        let settings = load(&env, None, Some(&["PROXMOX_HOST"])).unwrap();
        assert_eq!(settings.api.endpoint.host, "pve.example.test");
    }

    #[test]
    fn the_job_may_pick_its_template_and_key_text_but_no_key_file() {
        let key = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----";
        for env in [base_env(), runners_env()] {
            let mut env = env;
            env.insert("CUSTOM_ENV_PROXMOX_TEMPLATE".into(), "debian-12".into());
            env.insert("CUSTOM_ENV_VM_SSH_PRIVATE_KEY".into(), key.into());
            let names = ["PROXMOX_TEMPLATE", "VM_SSH_PRIVATE_KEY"];
            let settings = load(&env, None, Some(&names)).unwrap();
            assert_eq!(settings.template, "debian-12");
            let ssh_key = settings.ssh.private_key.as_ref().unwrap();
            assert!(ssh_key.via_custom_env && matches!(ssh_key.key, SshKey::Text(_)));
            assert!(settings
                .trust_warnings
                .iter()
                .any(|w| w.contains("VM_SSH_PRIVATE_KEY came in")));

            env.insert(
                "CUSTOM_ENV_VM_SSH_PRIVATE_KEY".into(),
                "/etc/ssh/ssh_host_ed25519_key".into(),
            );
            let err = load(&env, None, Some(&names)).unwrap_err();
            assert!(matches!(err, Error::JobRequest(_)), "{err}");
        }
        // A key path from [[runners]] environment (not the job's) is the admin's.
        let mut env = runners_env();
        env.insert("CUSTOM_ENV_VM_SSH_PRIVATE_KEY".into(), "/etc/ci-key".into());
        let settings = load(&env, None, Some(&[])).unwrap();
        assert!(matches!(
            settings.ssh.private_key.unwrap().key,
            SshKey::File(_)
        ));
        // From the host's own environment, a path is fine.
        let mut env = base_env();
        env.insert("VM_SSH_PRIVATE_KEY".into(), "/etc/ci-key".into());
        let settings = load(&env, None, None).unwrap();
        let ssh_key = settings.ssh.private_key.unwrap();
        assert!(!ssh_key.via_custom_env && matches!(ssh_key.key, SshKey::File(_)));
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
        assert_eq!(settings.ssh.port, 2222);
        assert_eq!(settings.placement.templates.len(), 2);
        assert_eq!(settings.placement.templates["noble"].to_string(), "9001");

        // A list of copies, each a VMID or "VMID@node".
        let file = "PROXMOX_TEMPLATES = { ubuntu-focal = [60900, \"61900@pve2\"], plain = 9000 }\n\
                    PROXMOX_TEMPLATE_COPIES = \"by-name\"\n";
        let settings = load(&base_env(), Some(file), None).unwrap();
        assert_eq!(
            settings.placement.templates["ubuntu-focal"].list(),
            [
                ListedCopy {
                    vmid: 60900,
                    node: None
                },
                ListedCopy {
                    vmid: 61900,
                    node: Some("pve2".into())
                }
            ]
        );
        assert_eq!(settings.placement.templates["plain"].to_string(), "9000");
        assert_eq!(settings.placement.template_copies, CopyDiscovery::ByName);
    }

    #[test]
    fn same_name_copy_discovery_is_the_hosts_choice_alone() {
        let job_defines = Some(&["PROXMOX_TEMPLATE_COPIES"][..]);
        // Host-configured: a job's value is ignored.
        let mut env = base_env();
        env.insert(
            "CUSTOM_ENV_PROXMOX_TEMPLATE_COPIES".into(),
            "by-name".into(),
        );
        let settings = load(&env, None, job_defines).unwrap();
        assert_eq!(settings.placement.template_copies, CopyDiscovery::Listed);
        // [[runners]] environment: a job that defines a host-only name fails its build.
        let mut env = runners_env();
        env.insert(
            "CUSTOM_ENV_PROXMOX_TEMPLATE_COPIES".into(),
            "by-name".into(),
        );
        let err = load(&env, None, job_defines).unwrap_err();
        assert!(matches!(err, Error::JobRequest(_)), "{err}");
        assert!(err.to_string().contains("PROXMOX_TEMPLATE_COPIES"), "{err}");
        // From [[runners]] environment itself, it is the admin's.
        let settings = load(&env, None, Some(&[])).unwrap();
        assert_eq!(settings.placement.template_copies, CopyDiscovery::ByName);
        let mut env = base_env();
        env.insert("PROXMOX_TEMPLATE_COPIES".into(), "by-name".into());
        let settings = load(&env, None, None).unwrap();
        assert_eq!(settings.placement.template_copies, CopyDiscovery::ByName);
        env.insert("PROXMOX_TEMPLATE_COPIES".into(), "any".into());
        let err = load(&env, None, None).unwrap_err();
        assert!(err.to_string().contains("must be listed"), "{err}");
    }

    #[test]
    fn bad_fingerprints_runner_ids_and_proxies_are_refused() {
        for (name, value) in [
            ("PROXMOX_TLS_FINGERPRINT", "zz"),
            ("PROXMOX_RUNNER_ID", "two words"),
            ("PROXMOX_HTTPS_PROXY", "proxy:3128"),
            ("PROXMOX_MAX_JOB_TIMEOUT", "0"),
        ] {
            let mut env = base_env();
            env.insert(name.into(), value.into());
            assert!(load(&env, None, None).is_err(), "{name}={value}");
        }
        let mut env = base_env();
        env.insert("PROXMOX_RUNNER_ID".into(), "runner-7".into());
        env.insert("PROXMOX_HTTPS_PROXY".into(), "http://127.0.0.1:3128".into());
        let settings = load(&env, None, None).unwrap();
        assert_eq!(settings.runner_id, "runner-7");
        assert_eq!(settings.api.proxy.as_deref(), Some("http://127.0.0.1:3128"));
    }
}
