//! Every answer transcribed in `fixtures/proxmox/exchanges/` is reproduced against the fake, which must
//! answer with the same status, the same reason phrase, the same field errors and the same body
//! shape (keys and JSON types). This keeps the fake honest to PVE's shapes.

use crate::common;

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use common::{Answer, Api};
use gpr_testkit::{FakeConfig, FakeProxmox, Fault, NewVm};
use reqwest::Method;
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../fixtures/proxmox/exchanges/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{path}: {err}"));
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{path}: {err}"))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Differences in keys and JSON types; every element of an array must look like one of the
/// recorded elements.
fn shape_diff(path: &str, recorded: &Value, actual: &Value) -> Vec<String> {
    match (recorded, actual) {
        (Value::Object(recorded), Value::Object(actual)) => {
            let mut diffs = Vec::new();
            for key in recorded.keys().filter(|key| !actual.contains_key(*key)) {
                diffs.push(format!("{path}.{key}: missing in the fake's answer"));
            }
            for key in actual.keys().filter(|key| !recorded.contains_key(*key)) {
                diffs.push(format!("{path}.{key}: not in the recorded answer"));
            }
            for (key, value) in recorded {
                if let Some(other) = actual.get(key) {
                    diffs.extend(shape_diff(&format!("{path}.{key}"), value, other));
                }
            }
            diffs
        }
        (Value::Array(recorded), Value::Array(actual)) if !recorded.is_empty() => actual
            .iter()
            .enumerate()
            .filter_map(|(index, element)| {
                let path = format!("{path}[{index}]");
                let attempts: Vec<Vec<String>> = recorded
                    .iter()
                    .map(|candidate| shape_diff(&path, candidate, element))
                    .collect();
                if attempts.iter().any(Vec::is_empty) {
                    None
                } else {
                    attempts.into_iter().min_by_key(Vec::len)
                }
            })
            .flatten()
            .collect(),
        _ if kind(recorded) != kind(actual) => vec![format!(
            "{path}: recorded {} but the fake sent {}",
            kind(recorded),
            kind(actual)
        )],
        _ => Vec::new(),
    }
}

/// VMIDs differ between the recording and the replay; the wording must not.
fn without_numbers(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('N') {
                out.push('N');
            }
        } else {
            out.push(c);
        }
    }
    out
}

static REPLAYED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

#[track_caller]
fn assert_like(answer: &Answer, name: &str) {
    REPLAYED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(name.to_string());
    let recorded = fixture(name);
    assert_eq!(
        answer.status.as_u16() as u64,
        recorded["status"].as_u64().expect("status"),
        "{name}: status ({})",
        answer.body
    );
    if answer.status.as_u16() >= 400 {
        assert_eq!(
            without_numbers(&answer.reason),
            without_numbers(recorded["reason"].as_str().expect("reason")),
            "{name}: reason phrase"
        );
        assert!(answer.connection_close, "{name}: connection must close");
        assert_eq!(
            answer.body.get("errors"),
            recorded["body"].get("errors"),
            "{name}: field errors"
        );
    }
    let diffs = shape_diff("body", &recorded["body"], &answer.body);
    assert!(
        diffs.is_empty(),
        "{name}: {diffs:#?}\nfake: {}",
        answer.body
    );
}

fn upid(answer: &Answer) -> String {
    answer.body["data"]
        .as_str()
        .unwrap_or_else(|| panic!("expected a UPID, got {}", answer.body))
        .to_string()
}

#[tokio::test]
async fn the_fake_answers_like_the_recorded_pve_answers() {
    let fake = FakeProxmox::start(FakeConfig {
        boot_time: Duration::ZERO,
        ..FakeConfig::default()
    });
    let api = Api::new(&fake);

    assert_like(&api.get("/version", &[]).await, "version");
    assert_like(&api.get("/cluster/nextid", &[]).await, "cluster-nextid");
    assert_like(
        &api.get("/cluster/nextid", &[("vmid", "150000")]).await,
        "cluster-nextid-free",
    );
    assert_like(
        &api.get("/cluster/nextid", &[("vmid", "60900")]).await,
        "cluster-nextid-taken",
    );

    let clone_path = "/nodes/pve1/qemu/60930/clone";
    assert_like(
        &api.post(clone_path, &[("newid", "100124"), ("storage", "local-lvm")])
            .await,
        "qemu-clone-storage-linked",
    );
    assert_like(
        &api.post(clone_path, &[("newid", "100124"), ("full", "true")])
            .await,
        "qemu-clone-full-true",
    );
    assert_like(
        &api.post(clone_path, &[("newid", "100124"), ("name", "ci_42")])
            .await,
        "qemu-clone-bad-name",
    );
    fake.add_vm(NewVm {
        vmid: 100,
        ..NewVm::default()
    });
    assert_like(
        &api.post(clone_path, &[("newid", "100")]).await,
        "qemu-clone-config-exists",
    );

    fake.set_clone_time(Duration::from_secs(3600));
    let clone = api
        .post(
            clone_path,
            &[("newid", "100123"), ("name", "ci-42-demo"), ("full", "0")],
        )
        .await;
    assert_like(&clone, "qemu-clone");
    let clone_upid = upid(&clone);
    assert_like(&api.task_status(&clone_upid).await, "task-status-running");
    let vm_path = "/nodes/pve1/qemu/100123";
    // The worker writes the full config (still locked) a moment after the answer.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !fake
        .vm(100123)
        .is_some_and(|vm| vm.config.contains_key("name"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the clone's config never appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_like(
        &api.get(&format!("{vm_path}/status/current"), &[]).await,
        "status-current-cloning",
    );
    assert_like(
        &api.get("/cluster/resources", &[("type", "vm")]).await,
        "cluster-resources-vm",
    );
    assert_like(
        &api.call(
            Method::PUT,
            &format!("{vm_path}/config"),
            &[("tags", "gitlab-proxmox-runner")],
        )
        .await,
        "qemu-config-put-locked",
    );
    let delete_query = [("purge", "1"), ("destroy-unreferenced-disks", "1")];
    let delete_locked = api.call(Method::DELETE, vm_path, &delete_query).await;
    assert_like(&delete_locked, "qemu-delete-locked");
    let status = api.wait_task(&upid(&delete_locked)).await;
    assert_eq!(status.body["data"]["exitstatus"], "VM is locked (clone)");
    let start_locked = api.post(&format!("{vm_path}/status/start"), &[]).await;
    assert_like(
        &api.wait_task(&upid(&start_locked)).await,
        "task-status-start-locked",
    );

    // A second clone, quick this time, to see the finished shapes.
    fake.set_clone_time(Duration::ZERO);
    let quick = api
        .post(clone_path, &[("newid", "100125"), ("name", "ci-43-demo")])
        .await;
    assert_like(&api.wait_task(&upid(&quick)).await, "task-status-ok");
    assert_like(&api.task_log(&upid(&quick)).await, "task-log");
    assert_like(
        &api.task_status_on("pve2", &upid(&quick)).await,
        "task-status-wrong-node",
    );

    let vm_path = "/nodes/pve1/qemu/100125";
    let config_path = format!("{vm_path}/config");
    let put = api
        .call(
            Method::PUT,
            &config_path,
            &[
                ("tags", "gitlab-proxmox-runner"),
                ("description", "gitlab-proxmox-runner: job=43"),
            ],
        )
        .await;
    assert_eq!(put.status.as_u16(), 200, "{}", put.body);
    assert_like(&api.get(&config_path, &[]).await, "qemu-config");
    assert_like(
        &api.call(Method::PUT, &config_path, &[("tags", "Bad Tag!")])
            .await,
        "qemu-config-bad-tag",
    );
    assert_like(
        &api.call(
            Method::PUT,
            &config_path,
            &[("sshkeys", "ssh-ed25519 AAAA...")],
        )
        .await,
        "qemu-config-sshkeys-not-encoded",
    );

    let agent = format!("{vm_path}/agent");
    assert_like(
        &api.post(&format!("{agent}/ping"), &[]).await,
        "agent-vm-not-running",
    );
    let start = api.post(&format!("{vm_path}/status/start"), &[]).await;
    assert_like(&start, "status-start");
    api.wait_task(&upid(&start)).await;
    assert_like(
        &api.get(&format!("{vm_path}/status/current"), &[]).await,
        "status-current-running",
    );
    assert_like(&api.post(&format!("{agent}/ping"), &[]).await, "agent-ping");
    assert_like(
        &api.get(&format!("{agent}/network-get-interfaces"), &[])
            .await,
        "agent-network-get-interfaces",
    );
    fake.set_guest_file(
        "/etc/ssh/ssh_host_ed25519_key.pub",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake root@ci-43\n",
    );
    assert_like(
        &api.get(
            &format!("{agent}/file-read"),
            &[("file", "/etc/ssh/ssh_host_ed25519_key.pub")],
        )
        .await,
        "agent-file-read",
    );
    assert_like(
        &api.get(&format!("{agent}/file-read"), &[("file", "/etc/nope")])
            .await,
        "agent-file-read-missing",
    );
    assert_like(
        &api.post(
            &format!("{agent}/exec"),
            &[
                ("command", "systemctl"),
                ("command", "is-active"),
                ("command", "ssh"),
            ],
        )
        .await,
        "agent-exec",
    );
    assert_like(
        &api.call(Method::DELETE, vm_path, &delete_query).await,
        "qemu-delete-running",
    );
    let stop = api.post(&format!("{vm_path}/status/stop"), &[]).await;
    api.wait_task(&upid(&stop)).await;
    let delete = api.call(Method::DELETE, vm_path, &delete_query).await;
    assert_like(&delete, "qemu-delete");
    assert_like(&api.wait_task(&upid(&delete)).await, "task-status-ok");
    assert_like(
        &api.get(&format!("{vm_path}/status/current"), &[]).await,
        "status-current-missing",
    );

    // An agent that never comes up, and one that is not configured at all.
    fake.inject(Fault::AgentNeverStarts);
    let silent = api.post(clone_path, &[("newid", "100126")]).await;
    api.wait_task(&upid(&silent)).await;
    let start = api.post("/nodes/pve1/qemu/100126/status/start", &[]).await;
    api.wait_task(&upid(&start)).await;
    assert_like(
        &api.get("/nodes/pve1/qemu/100126/agent/network-get-interfaces", &[])
            .await,
        "agent-not-running",
    );
    let unconfigured = api.post(clone_path, &[("newid", "100127")]).await;
    api.wait_task(&upid(&unconfigured)).await;
    let put = api
        .call(
            Method::PUT,
            "/nodes/pve1/qemu/100127/config",
            &[("delete", "agent")],
        )
        .await;
    assert_eq!(put.status.as_u16(), 200, "{}", put.body);
    let start = api.post("/nodes/pve1/qemu/100127/status/start", &[]).await;
    api.wait_task(&upid(&start)).await;
    assert_like(
        &api.get("/nodes/pve1/qemu/100127/agent/network-get-interfaces", &[])
            .await,
        "agent-not-configured",
    );

    // Task outcomes from faults.
    let lock_timeout =
        "can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout";
    fake.inject(Fault::CloneTaskFails {
        count: 1,
        message: lock_timeout.into(),
    });
    let failing = api.post(clone_path, &[("newid", "100128")]).await;
    let status = api.wait_task(&upid(&failing)).await;
    assert_like(&status, "task-status-error");
    assert_eq!(status.body["data"]["exitstatus"], lock_timeout);
    assert_like(&api.task_log(&upid(&failing)).await, "task-log-error");
    fake.inject(Fault::TaskWarnings { count: 1 });
    let warned = api.post(clone_path, &[("newid", "100129")]).await;
    let status = api.wait_task(&upid(&warned)).await;
    assert_like(&status, "task-status-warnings");
    assert_eq!(status.body["data"]["exitstatus"], "WARNINGS: 1");

    assert_like(&api.get("/nodes/pve1/foo", &[]).await, "not-implemented");
    fake.inject(Fault::HttpErrors {
        count: 1,
        status: 596,
        message: "Connection timed out".into(),
        path_contains: Some("/nodes/pve2/".into()),
    });
    assert_like(&api.get("/nodes/pve2/qemu", &[]).await, "proxy-unreachable");

    let mut stranger = Api::new(&fake);
    stranger.auth = "PVEAPIToken=ci@pve!runner=wrong".into();
    assert_like(&stranger.get("/version", &[]).await, "auth-bad-token");

    let directory = format!(
        "{}/../fixtures/proxmox/exchanges",
        env!("CARGO_MANIFEST_DIR")
    );
    let replayed = REPLAYED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let skipped: Vec<String> = std::fs::read_dir(&directory)
        .expect("fixtures directory")
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".json").map(str::to_string)
        })
        .filter(|name| name != "error-message-in-body" && !replayed.contains(name))
        .collect();
    assert!(skipped.is_empty(), "fixtures never replayed: {skipped:?}");
}

#[tokio::test]
async fn newer_pve_puts_the_message_into_the_body_too() {
    let fake = FakeProxmox::start(FakeConfig {
        message_in_body: true,
        ..FakeConfig::default()
    });
    fake.add_vm(NewVm {
        vmid: 100,
        ..NewVm::default()
    });
    let api = Api::new(&fake);
    let answer = api
        .post("/nodes/pve1/qemu/60930/clone", &[("newid", "100")])
        .await;
    assert_like(&answer, "error-message-in-body");
    assert_eq!(
        answer.body["message"],
        "unable to create VM 100: config file already exists\n"
    );
}
