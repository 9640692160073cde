//! The files in `examples/` are what admins copy: they must stay valid for the driver.

use std::path::Path;

use gitlab_proxmox_runner::settings::{Settings, Sources, TlsTrust};

fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

#[test]
fn the_example_driver_settings_file_loads() {
    let text = example("driver.toml");
    let no_env = |_: &str| None;
    let settings = Settings::from_sources(Sources {
        file: Some((&text, Path::new("examples/driver.toml"))),
        env: &no_env,
        job_response: None,
    })
    .expect("examples/driver.toml is accepted by the driver");
    assert_eq!(settings.node, "pve1");
    assert_eq!(settings.templates["debian-12"].to_string(), "60930");
    assert_eq!(settings.template, "debian-12");
    assert!(matches!(settings.tls, TlsTrust::CaFile(_)));
    assert!(settings.ssh_private_key.is_some());
}

#[test]
fn the_example_runner_config_uses_the_driver_in_both_setups() {
    let config: toml::Table = toml::from_str(&example("config.toml")).expect("valid TOML");
    let runners = config["runners"].as_array().expect("[[runners]]");
    assert_eq!(runners.len(), 2);
    let secure = runners[0]["custom"].as_table().expect("[runners.custom]");
    for hook in ["config", "prepare", "run", "cleanup"] {
        let args = secure[&format!("{hook}_args")].as_array().expect("args");
        assert_eq!(args[0].as_str(), Some("--config"));
        assert_eq!(args.last().and_then(|a| a.as_str()), Some(hook));
    }
    assert!(runners[0].get("environment").is_none());
    let compat = runners[1]["custom"].as_table().expect("[runners.custom]");
    assert!(compat["run_exec"]
        .as_str()
        .is_some_and(|exec| exec.ends_with("/vm_run_exec")));
}

#[test]
fn the_example_pipeline_picks_a_template_and_keeps_artifacts() {
    let text = example(".gitlab-ci.yml");
    assert!(text.contains("PROXMOX_TEMPLATE:"));
    assert!(text.contains("artifacts:"));
}
