//! The files in `examples/` are what admins copy: they must stay valid for the driver.

use std::path::Path;

use gitlab_proxmox_runner::config::{Settings, Sources, TlsTrust};

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
    assert_eq!(settings.placement.node, "pve1");
    assert_eq!(
        settings.placement.templates["debian-12"].to_string(),
        "60930"
    );
    assert_eq!(settings.template, "debian-12");
    assert!(matches!(settings.api.tls, TlsTrust::CaFile(_)));
    assert!(settings.ssh.private_key.is_some());
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

/// `promtool ARGS` in `dir`, or a loud skip without the prometheus package.
fn promtool(test: &str, dir: &Path, args: &[&str]) {
    if let Some(reason) = gpr_testkit::prometheus::unavailable_reason() {
        gpr_testkit::prometheus::skip(test, &reason);
        return;
    }
    let out = std::process::Command::new(gpr_testkit::prometheus::PROMTOOL)
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_example_prometheus_files_are_valid_and_in_the_readme() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    for name in ["prometheus.yml", "gitlab-proxmox-runner-alerts.yml"] {
        assert!(
            readme.contains(&example(name)),
            "README.md shows examples/{name} as it is"
        );
    }
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    // The scrape config, and through it the rule file it names.
    promtool(
        "the_example_prometheus_files_are_valid_and_in_the_readme",
        &examples,
        &["check", "config", "prometheus.yml"],
    );
}

#[test]
fn the_example_alerts_fire_when_they_should_and_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let rules = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join("gitlab-proxmox-runner-alerts.yml");
    // Series in Prometheus's unit-test notation: one sample a minute. From minute 1 no warm VM
    // is ready and every minute from minute 2 on a job clones cold; an ssh warm-up failure
    // every minute; a gc that succeeded once, at minute 0, then never ran again.
    let tests = format!(
        r#"rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'gitlab_proxmox_runner_pool_warm_vms{{template="debian-12",node="pve1",state="ready",instance="a"}}'
        values: '2 0x200'
      - series: 'gitlab_proxmox_runner_pool_warm_vms{{template="debian-12",node="pve1",state="ready",instance="b"}}'
        values: '2 0x200'
      - series: 'gitlab_proxmox_runner_pool_target_vms{{template="debian-12",instance="a"}}'
        values: '2x200'
      - series: 'gitlab_proxmox_runner_prepare_claims_total{{template="debian-12",outcome="none",instance="a"}}'
        values: '0 0 1+1x200'
      - series: 'gitlab_proxmox_runner_pool_warmups_failed_total{{template="debian-12",reason="ssh",instance="a"}}'
        values: '0+1x200'
      - series: 'gitlab_proxmox_runner_gc_success{{instance="gc1"}}'
        values: '1x200'
      - series: 'gitlab_proxmox_runner_gc_last_run_timestamp_seconds{{instance="gc1"}}'
        values: '0x200'
    alert_rule_test:
      - eval_time: 8m
        alertname: GitlabProxmoxRunnerNoWarmVm
        exp_alerts: []
      - eval_time: 15m
        alertname: GitlabProxmoxRunnerNoWarmVm
        exp_alerts:
          - exp_labels: {{severity: warning, template: debian-12}}
            exp_annotations:
              summary: "No warm VM of debian-12 for 10 minutes while jobs run"
              description: "Jobs clone cold. See `gitlab-proxmox-runner pool status` and the pool service's log."
      - eval_time: 2m
        alertname: GitlabProxmoxRunnerWarmupsFailing
        exp_alerts: []
      - eval_time: 20m
        alertname: GitlabProxmoxRunnerWarmupsFailing
        exp_alerts:
          - exp_labels: {{severity: warning, template: debian-12, reason: ssh}}
            exp_annotations:
              summary: "Warm-ups of debian-12 fail (ssh)"
              description: "journalctl -u gitlab-proxmox-runner-pool says why ('warming a VM from ... failed: ...')."
      - eval_time: 60m
        alertname: GitlabProxmoxRunnerGcFailing
        exp_alerts: []
      - eval_time: 190m
        alertname: GitlabProxmoxRunnerGcFailing
        exp_alerts:
          - exp_labels: {{severity: warning, instance: gc1}}
            exp_annotations:
              summary: "gitlab-proxmox-runner gc on gc1 fails or does not run"
"#,
        rules = rules.display()
    );
    std::fs::write(dir.path().join("alerts_test.yml"), tests).unwrap();
    promtool(
        "the_example_alerts_fire_when_they_should_and_not_before",
        dir.path(),
        &["test", "rules", "alerts_test.yml"],
    );
}
