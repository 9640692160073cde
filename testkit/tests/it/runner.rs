//! The gitlab-runner emulation, checked against a small bash driver whose every call is
//! recorded: if the harness drifts from the runner's protocol, these fail.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gpr_testkit::runner::{HookKind, JobOutcome, RunnerJob};

const FAKE_DRIVER: &str = r#"#!/usr/bin/env bash
# A custom executor driver in a few lines; the "VM" is this machine.
calls="$FAKE_CALLS"
echo "$1 tmpdir=$TMPDIR pwd=$PWD from_config=${FROM_CONFIG-unset} x=${CUSTOM_ENV_X-unset} response=$(test -f "$JOB_RESPONSE_FILE" && echo yes) state=$(test -f "$TMPDIR/state" && echo yes || echo no)" >> "$calls"
case "$1" in
  config)
    echo "config says hello on stderr" >&2
    if [ -n "$FAKE_BAD_JSON" ]; then echo '{not json'; exit 0; fi
    printf '{"driver":{"name":"fake","version":"0.0"},"builds_dir":"%s","cache_dir":"/cache","job_env":{"FROM_CONFIG":"yes"}}' "$FAKE_BUILDS"
    ;;
  prepare)
    n=$(grep -c '^prepare' "$calls")
    echo "attempt $n" > "$TMPDIR/state"
    if [ "$n" -le "${FAKE_PREPARE_FAILS:-0}" ]; then
      echo "prepare attempt $n fails" >&2
      exit "${FAKE_PREPARE_EXIT:-$SYSTEM_FAILURE_EXIT_CODE}"
    fi
    echo "prepare attempt $n ok"
    ;;
  run)
    echo "stage $3" >> "$calls"
    bash "$2"
    rc=$?
    if [ $rc -ne 0 ]; then echo $rc > "$BUILD_EXIT_CODE_FILE"; exit "$BUILD_FAILURE_EXIT_CODE"; fi
    ;;
  cleanup)
    echo "cleanup output"
    exit "${FAKE_CLEANUP_EXIT:-0}"
    ;;
esac
"#;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let driver = dir.path().join("driver");
        std::fs::write(&driver, FAKE_DRIVER).unwrap();
        std::fs::set_permissions(&driver, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(dir.path().join("builds")).unwrap();
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn job(&self) -> RunnerJob {
        RunnerJob::new(self.path("driver"))
            .host_env("FAKE_CALLS", self.path("calls").to_str().unwrap())
            .host_env("FAKE_BUILDS", self.path("builds").to_str().unwrap())
            .retry_interval(Duration::ZERO)
            .hook_timeout(Duration::from_secs(60))
            .graceful_kill_timeout(Duration::from_secs(10))
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("calls"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split(' ')
        .find_map(|part| part.strip_prefix(&format!("{name}=")))
        .unwrap_or("")
}

#[test]
fn a_successful_job_runs_the_hooks_in_the_runners_order_and_environment() {
    let fx = Fixture::new();
    let report = fx
        .job()
        .runner_env("X", "from-runner")
        .job_var("X", "from-job")
        .job_var("GREETING", "hello from the job")
        .script("build_script", "echo \"$GREETING in $PWD\"")
        .script("build_script", "echo \"token=$CI_JOB_TOKEN\"")
        .script("after_script", "echo after")
        .script("upload_artifacts_on_success", "echo uploading")
        .script("upload_artifacts_on_failure", "echo never")
        .run();
    report.assert_success();
    assert_eq!(
        report.stages_run(),
        [
            "prepare_script",
            "get_sources",
            "build_script",
            "after_script",
            "upload_artifacts_on_success"
        ]
    );
    let calls = fx.calls();
    let hooks: Vec<&str> = calls
        .iter()
        .filter(|l| !l.starts_with("stage"))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        hooks,
        ["config", "prepare", "run", "run", "run", "run", "run", "cleanup"]
    );
    for line in calls.iter().filter(|l| !l.starts_with("stage")) {
        assert_eq!(field(line, "tmpdir"), field(line, "pwd"), "{line}");
        assert_eq!(field(line, "x"), "from-job", "{line}");
        assert_eq!(field(line, "response"), "yes", "{line}");
        let expected = if line.starts_with("config") {
            "unset"
        } else {
            "yes"
        };
        assert_eq!(field(line, "from_config"), expected, "{line}");
    }
    let builds = fx.path("builds");
    assert!(report.log.contains(&format!(
        "hello from the job in {}/group/demo",
        builds.display()
    )));
    assert!(report.log.contains("$ echo \"$GREETING in $PWD\""));
    assert!(report.log.contains("Running on "), "{}", report.log);
    assert!(report.log.contains("config says hello on stderr"));
    assert!(report.log.contains("prepare attempt 1 ok"));
    assert!(!report.log.contains("cleanup output"));
    assert!(report.cleanup_log.contains("cleanup output"));
    // The runner deletes the job directory after cleanup.
    assert!(!Path::new(field(&calls[0], "tmpdir")).exists());
    // The job token is masked in the job log.
    assert!(report.log.contains("token=[MASKED]"), "{}", report.log);
    assert!(!report.log.contains("glcbt-job-token"));
}

#[test]
fn a_failing_script_is_a_script_failure_with_the_scripts_exit_code() {
    let fx = Fixture::new();
    let report = fx
        .job()
        .script("build_script", "echo before; exit 3")
        .script("build_script", "echo never-reached")
        .script("after_script", "echo after-ran")
        .script("upload_artifacts_on_success", "echo never")
        .script("upload_artifacts_on_failure", "echo uploading-on-failure")
        .run();
    report.assert_outcome(&JobOutcome::ScriptFailure { exit_code: 3 });
    assert!(!report.log.contains("never-reached"));
    assert!(report.log.contains("after-ran"));
    assert!(report.log.contains("uploading-on-failure"));
    assert!(report.log.contains("ERROR: Job failed: exit code 3"));
    assert_eq!(report.exit_codes(&HookKind::Cleanup), [Some(0)]);
}

#[test]
fn prepare_is_retried_in_a_fresh_directory_with_cleanup_after_every_failure() {
    let fx = Fixture::new();
    let report = fx
        .job()
        .host_env("FAKE_PREPARE_FAILS", "2")
        .script("build_script", "true")
        .run();
    report.assert_success();
    assert_eq!(report.attempts, 3);
    assert_eq!(
        report.exit_codes(&HookKind::Prepare),
        [Some(2), Some(2), Some(0)]
    );
    assert_eq!(report.exit_codes(&HookKind::Cleanup).len(), 3);
    let calls = fx.calls();
    let dirs: Vec<&str> = calls
        .iter()
        .filter(|l| l.starts_with("prepare"))
        .map(|l| field(l, "tmpdir"))
        .collect();
    assert_eq!(dirs.len(), 3);
    assert!(dirs[0] != dirs[1] && dirs[1] != dirs[2] && dirs[0] != dirs[2]);
    // Each failed attempt's cleanup ran in that attempt's directory, before the next config.
    let order: Vec<&str> = calls.iter().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(
        &order[..7],
        ["config", "prepare", "cleanup", "config", "prepare", "cleanup", "config"]
    );
}

#[test]
fn three_failed_preparations_are_a_system_failure() {
    let fx = Fixture::new();
    let report = fx
        .job()
        .host_env("FAKE_PREPARE_FAILS", "9")
        .script("build_script", "true")
        .run();
    assert!(matches!(report.outcome, JobOutcome::SystemFailure { .. }));
    assert_eq!(report.attempts, 3);
    assert_eq!(report.exit_codes(&HookKind::Cleanup).len(), 3);
    assert!(report.stages_run().is_empty());
}

#[test]
fn a_build_failure_in_prepare_is_not_retried_but_still_cleaned_up() {
    let fx = Fixture::new();
    let report = fx
        .job()
        .host_env("FAKE_PREPARE_FAILS", "9")
        .host_env("FAKE_PREPARE_EXIT", "1")
        .script("build_script", "true")
        .run();
    report.assert_outcome(&JobOutcome::ScriptFailure { exit_code: 1 });
    assert_eq!(report.attempts, 1);
    assert_eq!(report.exit_codes(&HookKind::Cleanup).len(), 1);
}

#[test]
fn invalid_config_json_is_a_retried_system_failure() {
    let fx = Fixture::new();
    let report = fx
        .job()
        .host_env("FAKE_BAD_JSON", "1")
        .script("build_script", "true")
        .run();
    assert!(
        matches!(&report.outcome, JobOutcome::SystemFailure { reason } if reason.contains("JSON")),
        "{:?}",
        report.outcome
    );
    assert_eq!(report.attempts, 3);
    assert!(report.exit_codes(&HookKind::Prepare).is_empty());
}

#[test]
fn cancel_stops_the_whole_process_group_then_runs_after_script_and_cleanup() {
    let fx = Fixture::new();
    let pid_file = fx.path("sleeper.pid");
    let job = fx
        .job()
        .script(
            "build_script",
            format!(
                "sleep 600 & echo $! > {}; echo started-$((6 * 7)); wait",
                pid_file.display()
            ),
        )
        .script("after_script", "echo after-cancel")
        .start();
    assert!(job
        .control()
        .wait_for_log("started-42", Duration::from_secs(30)));
    let sleeper: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    job.cancel();
    let report = job.wait();
    report.assert_outcome(&JobOutcome::Canceled);
    let build = report
        .calls
        .iter()
        .find(|c| {
            c.kind
                == HookKind::Run {
                    stage: "build_script".into(),
                }
        })
        .unwrap();
    assert!(build.terminated);
    assert!(report.log.contains("after-cancel"));
    assert_eq!(report.exit_codes(&HookKind::Cleanup).len(), 1);
    // The background sleep was in the hook's process group: SIGTERM reached it.
    let alive = std::path::Path::new(&format!("/proc/{sleeper}")).exists()
        && !std::fs::read_to_string(format!("/proc/{sleeper}/stat"))
            .unwrap_or_default()
            .contains(") Z ");
    assert!(!alive, "the script's child {sleeper} survived the cancel");
}

#[test]
fn every_attempts_directory_is_removed_after_its_cleanup_even_a_failed_one() {
    let fx = Fixture::new();
    let report = fx
        .job()
        .host_env("FAKE_PREPARE_FAILS", "1")
        .host_env("FAKE_CLEANUP_EXIT", "2")
        .script("build_script", "true")
        .run();
    report.assert_success();
    assert_eq!(report.exit_codes(&HookKind::Cleanup), [Some(2), Some(2)]);
    assert_eq!(report.job_dirs.len(), 2);
    for dir in &report.job_dirs {
        assert!(!dir.exists(), "{} outlived its cleanup", dir.display());
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert!(name.starts_with("custom-executor"), "{name}");
    }
    // What the first attempt left in its $TMPDIR (a driver's job state) never reaches the
    // second attempt, although the first cleanup failed.
    let calls = fx.calls();
    let prepares: Vec<&String> = calls.iter().filter(|l| l.starts_with("prepare")).collect();
    assert_eq!(prepares.len(), 2);
    assert!(
        prepares.iter().all(|l| field(l, "state") == "no"),
        "{calls:?}"
    );
    let cleanups: Vec<&String> = calls.iter().filter(|l| l.starts_with("cleanup")).collect();
    assert!(
        cleanups.iter().all(|l| field(l, "state") == "yes"),
        "{calls:?}"
    );
}

/// `secrets:` and predefined-variable overrides reach a hook as gitlab-runner passes them.
#[test]
fn secrets_and_overrides_arrive_as_the_runner_passes_them() {
    use gpr_testkit::hook::{Hook, JobSecret, JobVariable};
    let dir = tempfile::tempdir().unwrap();
    let hook = Hook::new("/usr/bin/env", dir.path())
        .runner_env("FROM_RUNNER", "runner")
        .job_var("CI_PROJECT_PATH", "group/demo")
        .job_override(JobVariable::new("CI_PROJECT_PATH", "group/evil"))
        .job_var("SHADOWED", "variable")
        .secret(JobSecret::new("SHADOWED", "from-vault"))
        .secret(JobSecret {
            file: false,
            ..JobSecret::new("PLAIN_SECRET", "s3cr3t")
        });
    let out = hook.run();
    out.assert_exit(0);
    let env: Vec<&str> = out.stdout.lines().collect();
    // The job's override and its resolved secrets win, as the later entries.
    assert!(
        env.contains(&"CUSTOM_ENV_CI_PROJECT_PATH=group/evil"),
        "{env:?}"
    );
    assert!(env.contains(&"CUSTOM_ENV_SHADOWED=from-vault"), "{env:?}");
    assert!(env.contains(&"CUSTOM_ENV_PLAIN_SECRET=s3cr3t"), "{env:?}");
    let response: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("response.json")).unwrap())
            .unwrap();
    let keys: Vec<&str> = response["variables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["key"].as_str().unwrap())
        .collect();
    // Both CI_PROJECT_PATH entries, the job's last; secrets are not variables.
    assert_eq!(keys.iter().filter(|k| **k == "CI_PROJECT_PATH").count(), 2);
    assert_eq!(
        response["variables"].as_array().unwrap().last().unwrap()["value"],
        "group/evil"
    );
    assert!(!keys.contains(&"PLAIN_SECRET"), "{keys:?}");
    assert_eq!(response["secrets"]["SHADOWED"]["file"], true);
    assert_eq!(response["secrets"]["PLAIN_SECRET"]["file"], false);
    assert!(
        response["secrets"]["SHADOWED"].get("value").is_none(),
        "values never in the file"
    );

    let missing = Hook::new("/usr/bin/env", dir.path())
        .without_job_response_file()
        .run();
    assert!(
        !missing.stdout.contains("JOB_RESPONSE_FILE="),
        "{}",
        missing.stdout
    );
}
