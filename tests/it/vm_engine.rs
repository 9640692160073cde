//! The engine (`gitlab_proxmox_runner::vm`) driven directly, with no hook, no job directory and
//! no job state: the seam a warm-pool service or a preflight check uses. The caller's sink sees
//! every milestone, in order, and sees `Allocated` before the clone request exists.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use gitlab_proxmox_runner::config::{Settings, Sources};
use gitlab_proxmox_runner::job::JobInfo;
use gitlab_proxmox_runner::marker::Marker;
use gitlab_proxmox_runner::proxmox::Client;
use gitlab_proxmox_runner::vm::provision::{self, Order};
use gitlab_proxmox_runner::vm::teardown::{self, Teardown};
use gitlab_proxmox_runner::vm::{template, Log, Milestone, Sink};
use gitlab_proxmox_runner::Result;
use gpr_testkit::{FakeConfig, FakeProxmox};

/// A sink that keeps everything in memory, the way a service with its own log would.
struct Recorder<'a> {
    fake: &'a FakeProxmox,
    lines: Mutex<Vec<String>>,
    milestones: Vec<String>,
    steps: Vec<&'static str>,
    timings: Vec<&'static str>,
}

impl Log for Recorder<'_> {
    fn info(&self, message: &str) {
        self.lines.lock().unwrap().push(message.to_string());
    }

    fn warn(&self, message: &str) {
        self.lines
            .lock()
            .unwrap()
            .push(format!("WARNING {message}"));
    }
}

impl Sink for Recorder<'_> {
    fn step(&mut self, step: &'static str) {
        self.steps.push(step);
    }

    fn timing(&mut self, phase: &'static str, _took: Duration) {
        self.timings.push(phase);
    }

    fn reached(&mut self, milestone: Milestone<'_>) -> Result<()> {
        let text = match milestone {
            Milestone::Allocated(vm) => {
                // Recorded before the clone request: the caller can always find the VM.
                assert!(
                    self.fake.vm(vm.vmid).is_none(),
                    "VM {} existed before the engine reported it allocated",
                    vm.vmid
                );
                format!("allocated {vm}")
            }
            Milestone::CloneStarted(_) => "clone started".to_string(),
            Milestone::Claiming(vm) => format!("claiming {vm}"),
            Milestone::Released => "released".to_string(),
            Milestone::Cloned => "cloned".to_string(),
            Milestone::Started => "started".to_string(),
            Milestone::Ready(ready) => format!("ready {}", ready.ip),
        };
        self.milestones.push(text);
        Ok(())
    }
}

fn settings_for(fake: &FakeProxmox) -> Settings {
    let env = fake.settings_env();
    let lookup = |name: &str| {
        env.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    Settings::from_sources(Sources {
        file: None,
        env: &lookup,
        job_response: None,
    })
    .expect("the fake's settings parse")
}

#[tokio::test]
async fn the_engine_provisions_and_tears_down_without_any_job() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let settings = settings_for(&fake);
    let client = Client::new(&settings.api).unwrap();
    let marker = Marker::new(&JobInfo::default());

    let template = template::resolve(&client, &settings, "pve1", "ubuntu-focal")
        .await
        .unwrap();
    assert_eq!((template.vmid, template.node.as_str()), (60900, "pve1"));
    let mode = template::clone_mode(&settings, &template).unwrap();
    let order = Order {
        template: &template,
        node: &template.node,
        mode,
        name: "warm-ubuntu-focal",
        marker: &marker,
        claim: None,
        key_nonce: None,
    };
    let mut sink = Recorder {
        fake: &fake,
        lines: Mutex::new(Vec::new()),
        milestones: Vec::new(),
        steps: Vec::new(),
        timings: Vec::new(),
    };
    let started = provision::provision(&client, &settings, &order, &mut sink)
        .await
        .unwrap();

    let vmid = started.vm.vmid;
    assert_eq!(
        sink.milestones,
        vec![
            format!("allocated VM {vmid} on pve1"),
            "clone started".to_string(),
            "cloned".to_string(),
            "started".to_string()
        ]
    );
    assert_eq!(
        sink.steps,
        vec![
            "cloning the template",
            "configuring the VM",
            "starting the VM"
        ]
    );
    assert_eq!(sink.timings, vec!["clone", "configure", "start"]);
    let vm = fake.vm(vmid).expect("the VM exists");
    assert_eq!(vm.status, "running");
    assert_eq!(vm.name, "warm-ubuntu-focal");
    assert_eq!(Marker::find_in(&vm.description), Some(marker.clone()));
    assert!(started.net0_mac.is_some());
    let lines = sink.lines.lock().unwrap().join("\n");
    assert!(lines.contains(&format!("→ VM {vmid} (linked)")), "{lines}");

    let deadline = Instant::now() + Duration::from_secs(60);
    let outcome = teardown::destroy_owned_vm(&client, "pve1", vmid, &marker, deadline, &sink)
        .await
        .unwrap();
    assert_eq!(outcome, Teardown::Destroyed);
    assert!(fake.job_vms().is_empty(), "{:?}", fake.job_vms());
}
