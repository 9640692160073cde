//! The fake Proxmox itself: TLS, auth, and the shapes and wording clients rely on.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{pem_to_der, Api};
use gpr_testkit::{poll_async, FakeConfig, FakeProxmox, Fault, NewVm};
use reqwest::{Method, StatusCode};
use serde_json::Value;

#[tokio::test]
async fn clone_start_agent_delete_lifecycle() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let api = Api::new(&fake);

    let answer = api
        .post(
            "/nodes/pve1/qemu/60930/clone",
            &[("newid", "100123"), ("name", "ci-42-demo"), ("full", "0")],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let upid = answer.body["data"].as_str().expect("UPID").to_string();
    let fields: Vec<&str> = upid.split(':').collect();
    assert_eq!(fields.len(), 9, "{upid}");
    assert_eq!(
        (fields[0], fields[1], fields[5], fields[6], fields[7]),
        ("UPID", "pve1", "qmclone", "60930", "ci@pve!runner")
    );

    // A clone that takes an hour shows its lock (no race with a short clone task).
    fake.set_clone_time(Duration::from_secs(3600));
    let slow = api
        .post("/nodes/pve1/qemu/60930/clone", &[("newid", "100122")])
        .await;
    assert_eq!(slow.status, StatusCode::OK, "{}", slow.body);
    // Like qemu-server's worker, the fake writes the config only after the answer...
    assert!(
        fake.vm(100122).is_none(),
        "the worker has not written the config yet"
    );
    let free = api.get("/cluster/nextid", &[("vmid", "100122")]).await;
    assert_eq!(free.body["data"], "100122", "nextid sees no config yet");
    // ... first a temporary one holding just the clone lock.
    let during = common::wait_for_vm(&fake, 100122);
    assert_eq!(during.lock.as_deref(), Some("clone"));
    let start_while_locked = api.post("/nodes/pve1/qemu/100122/status/start", &[]).await;
    let status = api
        .wait_task_data(start_while_locked.body["data"].as_str().expect("UPID"))
        .await;
    assert_eq!(status["exitstatus"], "VM is locked (clone)");

    let status = api.wait_task_data(&upid).await;
    assert_eq!(status["exitstatus"], "OK");
    assert_eq!(status["type"], "qmclone");

    let vm = fake.vm(100123).expect("clone");
    let template = fake.vm(60930).expect("template");
    assert_eq!(vm.lock, None);
    assert_eq!(vm.tags, template.tags);
    assert_eq!(vm.cloned_from, Some(60930));
    assert_eq!(vm.full_clone, Some(false));
    assert_ne!(
        vm.config["net0"], template.config["net0"],
        "clones get a new MAC"
    );
    assert!(vm.config["net0"].starts_with("virtio=BC:24:11:"));

    let config = api.get("/nodes/pve1/qemu/100123/config", &[]).await;
    assert_eq!(config.body["data"]["name"], "ci-42-demo");
    assert_eq!(config.body["data"]["memory"], "2048");

    let agent = api.post("/nodes/pve1/qemu/100123/agent/ping", &[]).await;
    assert_eq!(agent.status.as_u16(), 500);
    assert_eq!(agent.reason, "VM 100123 is not running");
    assert!(agent.connection_close);

    let start = api.post("/nodes/pve1/qemu/100123/status/start", &[]).await;
    let status = api
        .wait_task_data(start.body["data"].as_str().expect("UPID"))
        .await;
    assert_eq!(status["exitstatus"], "OK");

    let interfaces = poll_async(
        Duration::from_secs(20),
        Duration::from_millis(20),
        || async {
            let answer = api
                .get("/nodes/pve1/qemu/100123/agent/network-get-interfaces", &[])
                .await;
            if answer.status == StatusCode::OK {
                return Some(answer.body["data"]["result"].clone());
            }
            assert_eq!(answer.reason, "QEMU guest agent is not running");
            None
        },
    )
    .await
    .expect("agent never came up");
    let mac = vm.config["net0"]
        .trim_start_matches("virtio=")
        .split(',')
        .next()
        .expect("mac")
        .to_ascii_lowercase();
    let eth0 = interfaces
        .as_array()
        .expect("interfaces")
        .iter()
        .find(|iface| iface["hardware-address"] == mac.as_str())
        .expect("an interface with net0's MAC");
    assert_eq!(eth0["ip-addresses"][0]["ip-address"], "127.0.0.1");

    let delete_running = api
        .call(Method::DELETE, "/nodes/pve1/qemu/100123", &[("purge", "1")])
        .await;
    assert_eq!(delete_running.status.as_u16(), 500);
    assert_eq!(
        delete_running.reason,
        "VM 100123 is running - destroy failed"
    );

    let stop = api.post("/nodes/pve1/qemu/100123/status/stop", &[]).await;
    api.wait_task_data(stop.body["data"].as_str().expect("UPID"))
        .await;
    let delete = api
        .call(
            Method::DELETE,
            "/nodes/pve1/qemu/100123",
            &[("purge", "1"), ("destroy-unreferenced-disks", "1")],
        )
        .await;
    let status = api
        .wait_task_data(delete.body["data"].as_str().expect("UPID"))
        .await;
    assert_eq!(status["exitstatus"], "OK");
    assert_eq!(
        fake.job_vms().iter().map(|vm| vm.vmid).collect::<Vec<_>>(),
        [100122]
    );

    let gone = api.get("/nodes/pve1/qemu/100123/status/current", &[]).await;
    assert_eq!(gone.status.as_u16(), 500);
    assert_eq!(
        gone.reason,
        "Configuration file 'nodes/pve1/qemu-server/100123.conf' does not exist"
    );
}

#[tokio::test]
async fn wrong_token_gets_401_and_is_recorded() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let mut api = Api::new(&fake);
    api.auth = "PVEAPIToken=ci@pve!runner=wrong".into();
    let answer = api.get("/version", &[]).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.reason, "invalid token value!");
    api.auth = "PVEAPIToken=ci@pve!other=fake-token-0f1e2d3c".into();
    let other_token = api.get("/version", &[]).await;
    assert_eq!(other_token.status, StatusCode::UNAUTHORIZED);
    api.auth = String::new();
    let no_token = api.get("/version", &[]).await;
    assert_eq!(no_token.status, StatusCode::UNAUTHORIZED);
    assert_eq!(no_token.reason, "No ticket");
    let requests = fake.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|request| !request.authorized));
    assert_eq!(requests[0].path, "/api2/json/version");

    let api = Api::new(&fake);
    assert_eq!(api.get("/version", &[]).await.status, StatusCode::OK);
    assert!(fake.requests()[3].authorized);
}

#[tokio::test]
async fn nextid_and_parameter_errors_have_pve_shapes() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.add_vm(NewVm {
        vmid: 100,
        name: "hand-made".into(),
        ..NewVm::default()
    });
    let api = Api::new(&fake);

    let next = api.get("/cluster/nextid", &[]).await;
    assert_eq!(next.body["data"], "101");
    let free = api.get("/cluster/nextid", &[("vmid", "150000")]).await;
    assert_eq!(free.body["data"], "150000");
    let taken = api.get("/cluster/nextid", &[("vmid", "60900")]).await;
    assert_eq!(taken.status, StatusCode::BAD_REQUEST);
    assert_eq!(taken.reason, "Parameter verification failed.");
    assert_eq!(taken.body["errors"]["vmid"], "VM 60900 already exists\n");
    assert_eq!(taken.body["data"], Value::Null);
    assert!(taken.connection_close);

    let boolean = api
        .post(
            "/nodes/pve1/qemu/60900/clone",
            &[("newid", "150001"), ("full", "true")],
        )
        .await;
    assert_eq!(boolean.status, StatusCode::BAD_REQUEST);
    assert!(boolean.body["errors"]["full"]
        .as_str()
        .is_some_and(|text| text.contains("boolean")));

    let storage = api
        .post(
            "/nodes/pve1/qemu/60900/clone",
            &[("newid", "150001"), ("storage", "local-lvm")],
        )
        .await;
    // qemu-server dies here (not a schema error): 500 with the text as reason phrase.
    assert_eq!(storage.status.as_u16(), 500);
    assert_eq!(
        storage.reason,
        "parameter 'storage' not allowed for linked clones"
    );
    let full_with_storage = api
        .post(
            "/nodes/pve1/qemu/60900/clone",
            &[("newid", "150002"), ("full", "1"), ("storage", "fast")],
        )
        .await;
    assert_eq!(full_with_storage.status, StatusCode::OK);
    let recorded = fake.requests();
    let clone_request = recorded.last().expect("the clone request");
    assert_eq!(clone_request.method, "POST");
    assert_eq!(clone_request.body, "newid=150002&full=1&storage=fast");
    assert_eq!(
        Some(common::wait_for_vm(&fake, 150002)).and_then(|vm| vm.full_clone),
        Some(true),
        "a full clone may name its storage"
    );

    let existing = api
        .post("/nodes/pve1/qemu/60900/clone", &[("newid", "100")])
        .await;
    assert_eq!(existing.status.as_u16(), 500);
    assert_eq!(
        existing.reason,
        "unable to create VM 100: config file already exists"
    );

    let skiplock = api
        .call(Method::DELETE, "/nodes/pve1/qemu/100", &[("skiplock", "1")])
        .await;
    assert_eq!(skiplock.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        skiplock.body["errors"]["skiplock"],
        "Only root may use this option.\n"
    );
    let start_missing = api.post("/nodes/pve1/qemu/100999/status/start", &[]).await;
    let status = api
        .wait_task_data(start_missing.body["data"].as_str().expect("UPID"))
        .await;
    assert_eq!(
        status["exitstatus"],
        "Configuration file 'nodes/pve1/qemu-server/100999.conf' does not exist"
    );

    let unknown = api.get("/nodes/pve1/foo", &[]).await;
    assert_eq!(unknown.status.as_u16(), 501);
    assert_eq!(
        unknown.reason,
        "Method 'GET /nodes/pve1/foo' not implemented"
    );

    assert!(fake
        .job_vms()
        .iter()
        .all(|vm| [100, 150002].contains(&vm.vmid)));
}

#[tokio::test]
async fn faults_fail_the_next_clone_task_and_polling_another_node_is_refused() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let api = Api::new(&fake);
    let lock_timeout =
        "can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout";
    fake.inject(Fault::CloneTaskFails {
        count: 1,
        message: lock_timeout.into(),
    });
    let answer = api
        .post("/nodes/pve1/qemu/60900/clone", &[("newid", "100200")])
        .await;
    let upid = answer.body["data"].as_str().expect("UPID").to_string();

    let encoded = percent_encoding::utf8_percent_encode(&upid, percent_encoding::NON_ALPHANUMERIC);
    let elsewhere = api
        .get(&format!("/nodes/pve2/tasks/{encoded}/status"), &[])
        .await;
    assert_eq!(elsewhere.status, StatusCode::BAD_REQUEST);

    let status = api.wait_task_data(&upid).await;
    assert_eq!(status["exitstatus"], lock_timeout);
    assert!(fake.vm(100200).is_none(), "a failed clone leaves no VM");

    let log = api
        .get(
            &format!("/nodes/pve1/tasks/{encoded}/log"),
            &[("start", "0")],
        )
        .await;
    let lines = log.body["data"].as_array().expect("log lines");
    assert_eq!(
        lines.last().expect("a last line")["t"],
        format!("TASK ERROR: {lock_timeout}")
    );

    fake.inject(Fault::HttpErrors {
        count: 1,
        status: 596,
        message: "Connection timed out".into(),
        path_contains: Some("nextid".into()),
    });
    let burst = api.get("/cluster/nextid", &[]).await;
    assert_eq!(burst.status.as_u16(), 596);
    let after = api.get("/cluster/nextid", &[]).await;
    assert_eq!(after.status, StatusCode::OK);

    let answer = api
        .post("/nodes/pve1/qemu/60900/clone", &[("newid", "100201")])
        .await;
    let status = api
        .wait_task_data(answer.body["data"].as_str().expect("UPID"))
        .await;
    assert_eq!(status["exitstatus"], "OK");
    assert!(fake.max_concurrent_clones() >= 1);
}

#[tokio::test]
async fn fingerprint_is_the_served_certificate() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(pem_to_der(
            &fake.ca_pem(),
        )))
        .expect("CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(fake.host())
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    let tls = connector
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the CA");
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .expect("a server certificate")
        .clone();
    use sha2::Digest;
    let digest: Vec<String> = sha2::Sha256::digest(leaf.as_ref())
        .iter()
        .map(|byte| format!("{byte:02X}"))
        .collect();
    assert_eq!(fake.fingerprint(), digest.join(":"));
    assert_eq!(fake.leaf_der(), leaf.as_ref());
    assert_eq!(fake.connection_count(), 1);
    assert_eq!(fake.request_count(), 0, "a handshake alone is no request");
}

#[tokio::test]
async fn clone_faults_locks_and_concurrency_limits() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let api = Api::new(&fake);
    let clone = "/nodes/pve1/qemu/60900/clone";

    fake.inject(Fault::CloneRequestFails {
        count: 1,
        status: 500,
        message: "unable to create VM 100300: config file already exists".into(),
    });
    let refused = api.post(clone, &[("newid", "100300")]).await;
    assert_eq!(refused.status.as_u16(), 500);
    assert_eq!(
        refused.reason,
        "unable to create VM 100300: config file already exists"
    );
    assert!(fake.vm(100300).is_none());

    // Two clones may run at once; the third fails like a storage lock timeout.
    let limit_message =
        "can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout";
    fake.inject(Fault::ConcurrentCloneLimit {
        max: 2,
        message: limit_message.into(),
    });
    fake.set_clone_time(Duration::from_secs(3600));
    let first = api.post(clone, &[("newid", "100301")]).await;
    let second = api.post(clone, &[("newid", "100302")]).await;
    let third = api.post(clone, &[("newid", "100303")]).await;
    for answer in [&first, &second, &third] {
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    let status = api
        .wait_task_data(third.body["data"].as_str().expect("UPID"))
        .await;
    assert_eq!(status["exitstatus"], limit_message);
    assert_eq!(fake.max_concurrent_clones(), 3);
    assert_eq!(
        Some(common::wait_for_vm(&fake, 100301))
            .and_then(|vm| vm.lock)
            .as_deref(),
        Some("clone")
    );

    // The lock outlives the clone task by the configured time.
    fake.clear_faults();
    fake.set_clone_time(Duration::ZERO);
    fake.inject(Fault::LockAfterClone {
        duration: Duration::from_secs(3600),
    });
    let locked = api.post(clone, &[("newid", "100304")]).await;
    let status = api
        .wait_task_data(locked.body["data"].as_str().expect("UPID"))
        .await;
    assert_eq!(status["exitstatus"], "OK");
    let current = api.get("/nodes/pve1/qemu/100304/status/current", &[]).await;
    assert_eq!(current.body["data"]["lock"], "clone");
    let delete = api
        .call(Method::DELETE, "/nodes/pve1/qemu/100304", &[("purge", "1")])
        .await;
    let status = api
        .wait_task_data(delete.body["data"].as_str().expect("UPID"))
        .await;
    assert_eq!(status["exitstatus"], "VM is locked (clone)");
    assert!(fake.vm(100304).is_some());
    assert!(fake.set_vm_lock(100304, None));

    fake.inject(Fault::StartTaskFails {
        count: 1,
        message: "start failed: QEMU exited with code 1".into(),
    });
    let start = api.post("/nodes/pve1/qemu/100304/status/start", &[]).await;
    let status = api
        .wait_task_data(start.body["data"].as_str().expect("UPID"))
        .await;
    assert_eq!(
        status["exitstatus"],
        "start failed: QEMU exited with code 1"
    );
    assert_eq!(fake.vm(100304).expect("vm").status, "stopped");
    let start = api.post("/nodes/pve1/qemu/100304/status/start", &[]).await;
    let status = api
        .wait_task_data(start.body["data"].as_str().expect("UPID"))
        .await;
    assert_eq!(status["exitstatus"], "OK");
    assert_eq!(fake.vm(100304).expect("vm").status, "running");
    assert!(fake.simulated_time() > Duration::ZERO);
}

#[tokio::test]
async fn two_racing_deletes_end_with_one_deletion_and_a_missing_config() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.add_vm(NewVm {
        vmid: 100400,
        node: "pve2".into(),
        name: "orphan".into(),
        tags: "gitlab-proxmox-runner".into(),
        ..NewVm::default()
    });
    let api = Api::new(&fake);
    let path = "/nodes/pve2/qemu/100400";
    let first = api.call(Method::DELETE, path, &[("purge", "1")]).await;
    let second = api.call(Method::DELETE, path, &[("purge", "1")]).await;
    let first_upid = first.body["data"].as_str().expect("UPID").to_string();
    assert!(first_upid.starts_with("UPID:pve2:"), "{first_upid}");
    let first = api.wait_task_data(&first_upid).await;
    assert_eq!(first["exitstatus"], "OK");
    let gone = "Configuration file 'nodes/pve2/qemu-server/100400.conf' does not exist";
    // Either the second request came while the first task ran (its own task waits for the
    // lock, then finds no config) or after it (refused at once): both say "does not exist".
    match second.body["data"].as_str() {
        Some(upid) => assert_eq!(api.wait_task_data(upid).await["exitstatus"], gone),
        None => assert_eq!(second.reason, gone),
    }
    assert!(fake.vm(100400).is_none());
    let on_wrong_node = api.get("/nodes/pve1/qemu/100400/status/current", &[]).await;
    assert_eq!(on_wrong_node.status.as_u16(), 500);
}

#[tokio::test]
async fn agent_errors_follow_pves_order() {
    let fake = FakeProxmox::start(FakeConfig {
        boot_time: Duration::ZERO,
        ..FakeConfig::default()
    });
    let api = Api::new(&fake);
    for (vmid, change) in [("100500", ("delete", "agent")), ("100501", ("agent", "0"))] {
        let clone = api
            .post("/nodes/pve1/qemu/60900/clone", &[("newid", vmid)])
            .await;
        api.wait_task_data(clone.body["data"].as_str().expect("UPID"))
            .await;
        let put = api
            .call(
                Method::PUT,
                &format!("/nodes/pve1/qemu/{vmid}/config"),
                &[change],
            )
            .await;
        assert_eq!(put.status, StatusCode::OK, "{}", put.body);
    }
    let ping = |vmid: &'static str| {
        let api = &api;
        async move {
            api.post(&format!("/nodes/pve1/qemu/{vmid}/agent/ping"), &[])
                .await
                .reason
        }
    };
    // No agent key at all: permanent, whether the VM runs or not.
    assert_eq!(ping("100500").await, "No QEMU guest agent configured");
    assert_eq!(ping("100501").await, "VM 100501 is not running");
    let start = api.post("/nodes/pve1/qemu/100501/status/start", &[]).await;
    api.wait_task_data(start.body["data"].as_str().expect("UPID"))
        .await;
    // `agent: 0` means no QGA device: the ping simply never answers.
    assert_eq!(ping("100501").await, "QEMU guest agent is not running");

    // A guest still booting answers the same until boot_time has passed.
    fake.set_boot_time(Duration::from_secs(3600));
    let clone = api
        .post("/nodes/pve1/qemu/60900/clone", &[("newid", "100502")])
        .await;
    api.wait_task_data(clone.body["data"].as_str().expect("UPID"))
        .await;
    let start = api.post("/nodes/pve1/qemu/100502/status/start", &[]).await;
    api.wait_task_data(start.body["data"].as_str().expect("UPID"))
        .await;
    assert_eq!(ping("100502").await, "QEMU guest agent is not running");
}

#[tokio::test]
async fn linked_clones_only_from_templates_and_full_by_default_otherwise() {
    let fake = FakeProxmox::start(FakeConfig {
        clone_time: Duration::ZERO,
        ..FakeConfig::default()
    });
    fake.add_vm(NewVm {
        vmid: 9000,
        name: "custom-template".into(),
        template: true,
        ..NewVm::default()
    });
    fake.add_vm(NewVm {
        vmid: 9001,
        name: "plain-vm".into(),
        ..NewVm::default()
    });
    let api = Api::new(&fake);

    let linked = api
        .post("/nodes/pve1/qemu/9000/clone", &[("newid", "100600")])
        .await;
    assert_eq!(linked.status, StatusCode::OK, "{}", linked.body);
    let refused = api
        .post(
            "/nodes/pve1/qemu/9001/clone",
            &[("newid", "100601"), ("full", "0")],
        )
        .await;
    assert_eq!(refused.status.as_u16(), 500);
    assert_eq!(
        refused.reason,
        "Linked clone feature is not supported for 'local-lvm:vm-9001-disk-0' (scsi0)"
    );
    let copied = api
        .post("/nodes/pve1/qemu/9001/clone", &[("newid", "100602")])
        .await;
    assert_eq!(copied.status, StatusCode::OK, "{}", copied.body);
    for upid in [&linked, &copied] {
        let status = api
            .wait_task_data(upid.body["data"].as_str().expect("UPID"))
            .await;
        assert_eq!(status["exitstatus"], "OK");
    }
    assert_eq!(fake.vm(100600).and_then(|vm| vm.full_clone), Some(false));
    assert_eq!(fake.vm(100602).and_then(|vm| vm.full_clone), Some(true));
    assert!(fake.vm(100601).is_none());
    let elsewhere = api
        .post(
            "/nodes/pve1/qemu/9000/clone",
            &[("newid", "100603"), ("target", "pve2")],
        )
        .await;
    assert_eq!(
        elsewhere.reason,
        "can't clone VM to node 'pve2' (VM uses local storage)"
    );
}

#[tokio::test]
async fn bodies_may_be_forms_split_on_semicolons_or_json() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.add_vm(NewVm {
        vmid: 100700,
        ..NewVm::default()
    });
    let api = Api::new(&fake);
    let path = "/nodes/pve1/qemu/100700/config";
    let form = api
        .raw(
            Method::PUT,
            path,
            "application/x-www-form-urlencoded",
            "cores=3;memory=1024&tags=a%3Bb",
        )
        .await;
    assert_eq!(form.status, StatusCode::OK, "{}", form.body);
    let config = fake.vm(100700).expect("vm").config;
    assert_eq!(
        (config["cores"].as_str(), config["memory"].as_str()),
        ("3", "1024")
    );
    assert_eq!(config["tags"], "a;b");

    let json = api
        .raw(
            Method::PUT,
            path,
            "application/json",
            r#"{"cores": 4, "description": "from json", "delete": "ciuser"}"#,
        )
        .await;
    assert_eq!(json.status, StatusCode::OK, "{}", json.body);
    let config = fake.vm(100700).expect("vm").config;
    assert_eq!(config["cores"], "4");
    assert_eq!(config["description"], "from json");
    assert!(!config.contains_key("ciuser"));

    let bad_tag = api
        .raw(
            Method::PUT,
            path,
            "application/x-www-form-urlencoded",
            "tags=Upper",
        )
        .await;
    assert_eq!(bad_tag.status, StatusCode::BAD_REQUEST);
    let long = "x".repeat(8193);
    let too_long = api
        .call(Method::PUT, path, &[("description", long.as_str())])
        .await;
    assert_eq!(too_long.status, StatusCode::BAD_REQUEST);
    assert!(too_long.body["errors"]["description"].is_string());
}

#[tokio::test]
async fn config_writes_with_a_stale_digest_are_refused_like_pve() {
    let fake = FakeProxmox::start(FakeConfig::default());
    fake.add_vm(NewVm {
        vmid: 100710,
        description: "warm".into(),
        ..NewVm::default()
    });
    let api = Api::new(&fake);
    let path = "/nodes/pve1/qemu/100710/config";
    let read = api.get(path, &[]).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
    let digest = read.body["data"]["digest"]
        .as_str()
        .expect("config carries a digest")
        .to_string();
    assert_eq!(digest.len(), 40, "{digest}");

    // Two writers read the same digest: the first wins, the second is refused.
    let first = api
        .call(
            Method::PUT,
            path,
            &[("description", "claimed by a"), ("digest", &digest)],
        )
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let second = api
        .call(
            Method::PUT,
            path,
            &[("description", "claimed by b"), ("digest", &digest)],
        )
        .await;
    assert_eq!(second.status.as_u16(), 500, "{}", second.body);
    assert_eq!(
        second.reason, "checksum mismatch (file change by other user?)",
        "{}",
        second.body
    );
    assert_eq!(fake.vm(100710).expect("vm").description, "claimed by a");

    // The new digest works, and a write without one is unconditional.
    let fresh = api.get(path, &[]).await.body["data"]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    assert_ne!(fresh, digest);
    let third = api
        .call(
            Method::PUT,
            path,
            &[("description", "claimed by c"), ("digest", &fresh)],
        )
        .await;
    assert_eq!(third.status, StatusCode::OK, "{}", third.body);
    let blind = api
        .call(Method::PUT, path, &[("description", "blind")])
        .await;
    assert_eq!(blind.status, StatusCode::OK, "{}", blind.body);
}

/// Polls `probe` (an API read) until `done` holds for its answer.
async fn poll_until<F, Fut>(what: &str, mut probe: F, done: impl Fn(&common::Answer) -> bool)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = common::Answer>,
{
    let last = std::cell::RefCell::new(None);
    let held = poll_async(Duration::from_secs(10), Duration::from_millis(10), || {
        let (answer, done, last) = (probe(), &done, &last);
        async move {
            let answer = answer.await;
            let holds = done(&answer);
            *last.borrow_mut() = Some(answer);
            holds.then_some(())
        }
    })
    .await;
    if held.is_none() {
        let answer = last.into_inner().expect("probed at least once");
        panic!(
            "{what}: last answer {} {} {}",
            answer.status, answer.reason, answer.body
        );
    }
}

#[tokio::test]
async fn a_pool_scoped_token_sees_pool_members_only_and_403s_everything_else() {
    let fake = FakeProxmox::start(FakeConfig {
        token_pool: Some("ci".into()),
        clone_time: Duration::from_millis(400),
        ..FakeConfig::default()
    });
    fake.add_vm(NewVm {
        vmid: 100800,
        name: "someone-elses".into(),
        ..NewVm::default()
    });
    let api = Api::new(&fake);
    let denied = "Permission check failed (/vms/100800, VM.Audit)";
    for path in [
        "/nodes/pve1/qemu/100800/status/current",
        "/nodes/pve1/qemu/100801/status/current",
        "/nodes/pve1/qemu/100800/config",
    ] {
        let answer = api.get(path, &[]).await;
        assert_eq!(answer.status.as_u16(), 403, "{path}");
        assert!(
            answer
                .reason
                .starts_with("Permission check failed (/vms/10080"),
            "{path}: {}",
            answer.reason
        );
    }
    assert_eq!(
        api.get("/nodes/pve1/qemu/100800/status/current", &[])
            .await
            .reason,
        denied
    );
    // Existence stays knowable: nextid is open to every user.
    let taken = api.get("/cluster/nextid", &[("vmid", "100800")]).await;
    assert_eq!(taken.status.as_u16(), 400);
    let free = api.get("/cluster/nextid", &[("vmid", "100801")]).await;
    assert_eq!(free.body["data"], "100801");
    // Listings show the pool's members (the templates) only.
    let listed = api.get("/cluster/resources", &[("type", "vm")]).await;
    let ids: Vec<u64> = listed.body["data"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|vm| vm["vmid"].as_u64())
        .collect();
    assert_eq!(ids, vec![60900, 60910, 60920, 60930]);
    // A clone needs VM.Allocate on the new id or on the pool it names.
    let clone = "/nodes/pve1/qemu/60900/clone";
    let no_pool = api.post(clone, &[("newid", "100802")]).await;
    assert_eq!(no_pool.status.as_u16(), 403);
    assert_eq!(
        no_pool.reason,
        "Permission check failed (/vms/100802, VM.Allocate)"
    );
    let other_pool = api
        .post(clone, &[("newid", "100802"), ("pool", "prod")])
        .await;
    assert_eq!(other_pool.status.as_u16(), 400, "{}", other_pool.body);
    let started = api
        .post(clone, &[("newid", "100802"), ("pool", "ci")])
        .await;
    let upid = started.body["data"].as_str().expect("UPID").to_string();
    // The VM joins the pool only as the clone's last step: until then it is a 403 too.
    let during = api.get("/nodes/pve1/qemu/100802/status/current", &[]).await;
    assert_eq!(during.status.as_u16(), 403);
    common::wait_for_vm(&fake, 100802);
    let locked = api.get("/nodes/pve1/qemu/100802/config", &[]).await;
    assert_eq!(locked.status.as_u16(), 403, "not a member while cloning");
    assert_eq!(api.wait_task_data(&upid).await["exitstatus"], "OK");
    let member = api.get("/nodes/pve1/qemu/100802/status/current", &[]).await;
    assert_eq!(member.status, StatusCode::OK, "{}", member.body);
    assert_eq!(
        fake.vm(100802).and_then(|vm| vm.pool).as_deref(),
        Some("ci")
    );
    // Gone again after a delete: 403, not "does not exist".
    let delete = api
        .call(Method::DELETE, "/nodes/pve1/qemu/100802", &[("purge", "1")])
        .await;
    let upid = delete.body["data"].as_str().expect("UPID").to_string();
    assert_eq!(api.wait_task_data(&upid).await["exitstatus"], "OK");
    let gone = api.get("/nodes/pve1/qemu/100802/status/current", &[]).await;
    assert_eq!(gone.status.as_u16(), 403);
    // The token still reads its own tasks, and lists them.
    let tasks = api
        .get(
            "/nodes/pve1/tasks",
            &[("typefilter", "qmclone"), ("source", "all")],
        )
        .await;
    assert_eq!(tasks.body["data"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn clones_appear_late_answers_get_lost_and_locks_expire() {
    let fake = FakeProxmox::start(FakeConfig {
        clone_time: Duration::from_millis(600),
        clone_config_delay: Duration::from_millis(100),
        ..FakeConfig::default()
    });
    let api = Api::new(&fake);
    let clone = "/nodes/pve1/qemu/60900/clone";
    // The answer is lost, but the worker was forked: the VM appears anyway.
    fake.inject(Fault::CloneAnswerLost { count: 1 });
    let lost = common::client(&fake)
        .post(format!("{}{clone}", fake.api_url()))
        .header("Authorization", &api.auth)
        // A full clone: its temporary config stays until the first disk is copied.
        .form(&[("newid", "100900"), ("description", "mine"), ("full", "1")])
        .send()
        .await;
    assert!(lost.is_err(), "the connection drops without an answer");
    let active = api
        .get(
            "/nodes/pve1/tasks",
            &[
                ("source", "active"),
                ("typefilter", "qmclone"),
                ("vmid", "60900"),
            ],
        )
        .await;
    let running = active.body["data"].as_array().expect("tasks").clone();
    assert_eq!(running.len(), 1, "{}", active.body);
    assert!(running[0].get("endtime").is_none());
    // First the temporary config (lock only), later the full one (still locked), then no lock.
    let temporary = common::wait_for_vm(&fake, 100900);
    assert_eq!(temporary.lock.as_deref(), Some("clone"));
    assert_eq!(temporary.description, "");
    assert!(!temporary.config.contains_key("name"));
    // A second clone into the same id now fails at once; before the config existed it would
    // have failed in its worker on the VMID's lock.
    let taken = api.post(clone, &[("newid", "100900")]).await;
    assert_eq!(
        taken.reason,
        "unable to create VM 100900: config file already exists"
    );
    let upid = running[0]["upid"].as_str().expect("UPID").to_string();
    assert_eq!(api.wait_task_data(&upid).await["exitstatus"], "OK");
    let done = fake.vm(100900).expect("the clone");
    assert_eq!((done.lock, done.description.as_str()), (None, "mine"));

    // A backup holds the VM for a while, then lets go.
    assert!(fake.lock_vm_for(100900, "backup", Duration::from_millis(300)));
    let status = api.get("/nodes/pve1/qemu/100900/status/current", &[]).await;
    assert_eq!(status.body["data"]["lock"], "backup");
    poll_until(
        "the backup lock clears",
        || api.get("/nodes/pve1/qemu/100900/status/current", &[]),
        |answer| answer.body["data"].get("lock").is_none(),
    )
    .await;

    // A delete that fails for a reason that is not the VM.
    fake.inject(Fault::TaskFails {
        kind: "qmdestroy".into(),
        count: 1,
        message: "storage 'fast' does not exist".into(),
    });
    let delete = api
        .call(Method::DELETE, "/nodes/pve1/qemu/100900", &[("purge", "1")])
        .await;
    let upid = delete.body["data"].as_str().expect("UPID").to_string();
    assert_eq!(
        api.wait_task_data(&upid).await["exitstatus"],
        "storage 'fast' does not exist"
    );
    assert!(fake.vm(100900).is_some(), "the VM is still there");
}

#[tokio::test]
async fn the_agent_reports_ipv6_first_and_host_keys_late() {
    let fake = FakeProxmox::start(FakeConfig {
        boot_time: Duration::ZERO,
        clone_time: Duration::ZERO,
        guest_ip6: Some("2001:db8::10".parse().expect("IPv6")),
        guest_ip_delay: Duration::from_millis(400),
        ..FakeConfig::default()
    });
    let key = "/etc/ssh/ssh_host_ed25519_key.pub";
    fake.set_late_guest_file(key, "ssh-ed25519 AAAAlate", Duration::from_millis(400));
    let api = Api::new(&fake);
    let clone = api
        .post("/nodes/pve1/qemu/60900/clone", &[("newid", "101000")])
        .await;
    api.wait_task_data(clone.body["data"].as_str().expect("UPID"))
        .await;
    let start = api.post("/nodes/pve1/qemu/101000/status/start", &[]).await;
    api.wait_task_data(start.body["data"].as_str().expect("UPID"))
        .await;
    let interfaces = "/nodes/pve1/qemu/101000/agent/network-get-interfaces";
    let eth0 = |answer: &common::Answer| -> Vec<String> {
        answer.body["data"]["result"][1]["ip-addresses"]
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(|a| a["ip-address"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let early = api.get(interfaces, &[]).await;
    assert_eq!(eth0(&early)[0], "2001:db8::10", "{}", early.body);
    assert!(!eth0(&early).contains(&"127.0.0.1".to_string()));
    let read = api
        .get("/nodes/pve1/qemu/101000/agent/file-read", &[("file", key)])
        .await;
    assert_eq!(
        read.reason,
        format!("Agent error: failed to open file '{key}' (mode: 'r'): No such file or directory")
    );
    poll_until(
        "IPv4 appears",
        || api.get(interfaces, &[]),
        |answer| eth0(answer).contains(&"127.0.0.1".to_string()),
    )
    .await;
    let file_query = [("file", key)];
    poll_until(
        "the host key appears",
        || api.get("/nodes/pve1/qemu/101000/agent/file-read", &file_query),
        |answer| answer.body["data"]["content"] == "ssh-ed25519 AAAAlate",
    )
    .await;
}

/// Like a Debian guest after its first boot, every guest has an SSH host key of each type
/// openssh-server generates (`type base64 root@host`); a test gives them an SSH server's keys
/// instead (only those), or none at all (a template cleaned before cloud-init ran).
#[tokio::test]
async fn guests_serve_debian_host_keys_unless_a_test_gives_others_or_none() {
    let fake = FakeProxmox::start(FakeConfig {
        boot_time: Duration::ZERO,
        clone_time: Duration::ZERO,
        ..FakeConfig::default()
    });
    let api = Api::new(&fake);
    let clone = api
        .post("/nodes/pve1/qemu/60900/clone", &[("newid", "101001")])
        .await;
    api.wait_task_data(clone.body["data"].as_str().expect("UPID"))
        .await;
    let start = api.post("/nodes/pve1/qemu/101001/status/start", &[]).await;
    api.wait_task_data(start.body["data"].as_str().expect("UPID"))
        .await;
    let read = "/nodes/pve1/qemu/101001/agent/file-read";
    let files = [
        ("/etc/ssh/ssh_host_ed25519_key.pub", "ssh-ed25519 "),
        ("/etc/ssh/ssh_host_ecdsa_key.pub", "ecdsa-sha2-nistp256 "),
        ("/etc/ssh/ssh_host_rsa_key.pub", "ssh-rsa "),
    ];
    let missing = |file: &str| {
        format!("Agent error: failed to open file '{file}' (mode: 'r'): No such file or directory")
    };
    for (file, kind) in files {
        let answer = api.get(read, &[("file", file)]).await;
        assert_eq!(answer.status, StatusCode::OK, "{file}: {}", answer.body);
        let content = answer.body["data"]["content"].as_str().unwrap_or_default();
        assert!(
            content.starts_with(kind) && content.ends_with(" root@debian\n"),
            "{file}: {content:?}"
        );
    }

    let other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBR3Ga8n2rvHWEDn/r+5LnZxm3PLqJ0tYEnFzXo5fA4t";
    fake.set_host_keys(&[other.to_string()]);
    let answer = api.get(read, &[("file", files[0].0)]).await;
    assert_eq!(answer.body["data"]["content"], format!("{other}\n"));
    for (file, _) in &files[1..] {
        let answer = api.get(read, &[("file", *file)]).await;
        assert_eq!(answer.reason, missing(file), "only the given keys");
    }

    fake.remove_host_keys();
    for (file, _) in files {
        let answer = api.get(read, &[("file", file)]).await;
        assert_eq!(answer.reason, missing(file));
    }
}

/// The co-tenant `mallory@pve!t` acts over HTTP with its own token: it clones our template
/// into a VMID of its choice, names, tags and starts the clone, converts VMs of its own to
/// templates and creates VMs, all with PVE's answers; its ACL (its pool, `VM.Clone` on the
/// shared templates) is enforced, and the driver's faults and request records leave it out.
#[tokio::test]
async fn a_co_tenant_makes_look_alikes_over_http_within_its_own_acl() {
    let fake = FakeProxmox::start(FakeConfig {
        other_nodes: vec!["pve2".into(), "pve3".into()],
        ..FakeConfig::default()
    });
    let mallory = fake.co_tenant();
    assert_eq!(mallory.token_id(), "mallory@pve!t");
    // A fault meant for the driver: the co-tenant's clone neither triggers nor consumes it.
    fake.inject(Fault::CloneTaskFails {
        count: 1,
        message: "driver-only fault".into(),
    });

    // A VM inside the driver's VMID range, named, tagged and described like one of its jobs.
    mallory
        .clone_vm("pve1", 60900, 2_000_123, "ci-job-42")
        .expect("clone of the shared template");
    mallory
        .set_config(
            "pve1",
            2_000_123,
            &[("tags", "gitlab-ci;ci-runner"), ("description", "job 42")],
        )
        .expect("config of its own VM");
    mallory.start("pve1", 2_000_123).expect("start");
    let vm = fake.vm(2_000_123).expect("the co-tenant's VM");
    assert_eq!(
        (vm.name.as_str(), vm.tags.as_str(), vm.description.as_str()),
        ("ci-job-42", "gitlab-ci;ci-runner", "job 42")
    );
    assert_eq!(
        (vm.status.as_str(), vm.pool.as_deref()),
        ("running", Some("tenant"))
    );

    // Converting to a template: refused while running, then a task, then refused again.
    let running = mallory
        .make_template("pve1", 2_000_123)
        .expect_err("running");
    assert_eq!(
        (running.status, running.message.as_str()),
        (500, "you can't convert a VM to template if VM is running")
    );
    mallory.stop("pve1", 2_000_123).expect("stop");
    let upid = mallory
        .call("POST", "/nodes/pve1/qemu/2000123/template", &[])
        .expect("template request");
    let upid = upid.as_str().expect("the template endpoint answers a UPID");
    let fields: Vec<&str> = upid.split(':').collect();
    assert_eq!(
        (fields[1], fields[5], fields[6], fields[7]),
        ("pve1", "qmtemplate", "2000123", "mallory@pve!t")
    );
    mallory.wait_task(upid).expect("qmtemplate task");
    let template = fake.vm(2_000_123).expect("now a template");
    assert!(template.template);
    assert!(
        template.config["scsi0"].contains("base-2000123-disk-0"),
        "{}",
        template.config["scsi0"]
    );
    let again = mallory.make_template("pve1", 2_000_123).expect_err("twice");
    assert_eq!(again.message, "you can't convert a template to a template");
    // Its own template is linked-clonable like ours.
    mallory
        .clone_vm("pve1", 2_000_123, 2_000_124, "from-mallorys-template")
        .expect("linked clone of its own template");
    assert_eq!(fake.vm(2_000_124).expect("clone").full_clone, Some(false));

    // A template from scratch on a node where the driver has nothing, named like ours.
    mallory
        .create_template("pve3", 61950, "ubuntu-focal")
        .expect("a look-alike template on pve3");
    let look_alike = fake.vm(61950).expect("look-alike");
    assert_eq!(
        (
            look_alike.node.as_str(),
            look_alike.name.as_str(),
            look_alike.template
        ),
        ("pve3", "ubuntu-focal", true)
    );
    let taken = mallory
        .create_vm("pve2", 61950, &[("name", "dup")])
        .expect_err("taken VMID");
    assert_eq!(
        (taken.status, taken.message.as_str()),
        (
            500,
            "unable to create VM 61950 - VM 61950 already exists on node 'pve3'"
        )
    );

    // Its ACL: the shared templates are clone-only, our VMs are not its own.
    let ours = mallory
        .set_config("pve1", 60900, &[("name", "hijacked")])
        .expect_err("not its template");
    assert_eq!(
        (ours.status, ours.message.as_str()),
        (
            403,
            "Permission check failed (/vms/60900, VM.Config.Options)"
        )
    );
    let no_pool = mallory
        .call(
            "POST",
            "/nodes/pve1/qemu/60900/clone",
            &[("newid", "2000125")],
        )
        .expect_err("no pool named");
    assert_eq!(
        no_pool.message,
        "Permission check failed (/vms/2000125, VM.Allocate)"
    );

    // The driver's fault is still pending and hits the driver's next clone; the driver's
    // request log holds none of the co-tenant's requests.
    let api = Api::new(&fake);
    let answer = api
        .post("/nodes/pve1/qemu/60900/clone", &[("newid", "2000126")])
        .await;
    let status = api
        .wait_task_data(answer.body["data"].as_str().expect("UPID"))
        .await;
    assert_eq!(status["exitstatus"], "driver-only fault");
    assert_eq!(
        fake.requests().len(),
        fake.requests().iter().filter(|r| r.authorized).count()
    );
    assert!(fake
        .requests()
        .iter()
        .all(|request| !request.path.contains("2000123")));
    assert!(fake.co_tenant_requests().len() >= 10);
    // The driver (ACL on /) sees the co-tenant's VMs; the co-tenant sees its own and the
    // templates it may clone, not the driver's VM.
    let listed = mallory
        .call("GET", "/cluster/resources", &[("type", "vm")])
        .expect("listing");
    let ids: Vec<u64> = listed
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|vm| vm["vmid"].as_u64())
        .collect();
    assert!(ids.contains(&61950) && ids.contains(&60900), "{ids:?}");
    assert!(!ids.contains(&2_000_126), "{ids:?}");
}

/// Polls the agent of `vmid` until it answers (the guest booted).
async fn wait_agent(api: &Api, vmid: u32) {
    let path = format!("/nodes/pve1/qemu/{vmid}/agent/ping");
    poll_until(
        "the guest agent",
        || api.post(&path, &[]),
        |answer| answer.status == StatusCode::OK,
    )
    .await;
}

#[tokio::test]
async fn cloud_init_applies_sshkeys_at_first_boot_only() {
    let fake = FakeProxmox::start(FakeConfig::default());
    let api = Api::new(&fake);
    let authorized = tempfile::NamedTempFile::new().unwrap();
    fake.set_shared_authorized_keys(authorized.path());
    let key_a =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBEfbnX1MejAxciSpoiwDMBlkBWNtQ3lpuuxrdyRYQuv a@x";
    let key_b =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBR0kE836j7jBOdQ7xiWrexmR55yycgxUfaq52KvyuVt b@x";
    for (newid, cloud_init) in [(100130u32, true), (100131, false)] {
        let clone = api
            .post(
                "/nodes/pve1/qemu/60930/clone",
                &[("newid", &newid.to_string())],
            )
            .await;
        api.wait_task_data(clone.body["data"].as_str().expect("UPID"))
            .await;
        let path = format!("/nodes/pve1/qemu/{newid}/config");
        let mut fields = vec![("sshkeys", gpr_testkit::lab::encode_sshkeys(key_a))];
        if !cloud_init {
            fields.push(("delete", "ide2".to_string()));
        }
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let set = api.call(Method::PUT, &path, &fields).await;
        assert_eq!(set.status, StatusCode::OK, "{}", set.body);
        // Stored and shown as sent: URL-encoded.
        let shown = api.get(&path, &[]).await;
        assert_eq!(
            shown.body["data"]["sshkeys"],
            gpr_testkit::lab::encode_sshkeys(key_a)
        );
        assert!(fake.cloud_init_keys(newid).is_none(), "not booted yet");
        let start = api
            .post(&format!("/nodes/pve1/qemu/{newid}/status/start"), &[])
            .await;
        api.wait_task_data(start.body["data"].as_str().expect("UPID"))
            .await;
        wait_agent(&api, newid).await;
    }
    assert_eq!(fake.cloud_init_keys(100130), Some(vec![key_a.to_string()]));
    assert_eq!(fake.cloud_init_keys(100131), None, "no cloud-init drive");
    let written = std::fs::read_to_string(authorized.path()).unwrap();
    assert_eq!(
        written,
        format!("{key_a}\n"),
        "written once, for the one drive"
    );

    // A change after the first boot: the guest never sees it.
    let stop = api.post("/nodes/pve1/qemu/100130/status/stop", &[]).await;
    api.wait_task_data(stop.body["data"].as_str().expect("UPID"))
        .await;
    let encoded_b = gpr_testkit::lab::encode_sshkeys(key_b);
    let set = api
        .call(
            Method::PUT,
            "/nodes/pve1/qemu/100130/config",
            &[("sshkeys", encoded_b.as_str())],
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.body);
    let start = api.post("/nodes/pve1/qemu/100130/status/start", &[]).await;
    api.wait_task_data(start.body["data"].as_str().expect("UPID"))
        .await;
    wait_agent(&api, 100130).await;
    assert_eq!(fake.cloud_init_keys(100130), Some(vec![key_a.to_string()]));
    let written = std::fs::read_to_string(authorized.path()).unwrap();
    assert!(!written.contains("AAAAIBR0kE8"), "{written}");

    // Like update_vm_api: a line ssh-keygen cannot read is refused, the config unchanged.
    let garbage = gpr_testkit::lab::encode_sshkeys("not a key");
    let refused = api
        .call(
            Method::PUT,
            "/nodes/pve1/qemu/100130/config",
            &[("sshkeys", garbage.as_str())],
        )
        .await;
    assert_eq!(refused.status.as_u16(), 500, "{}", refused.body);
    assert_eq!(refused.reason, "SSH public key validation error");
    assert_eq!(
        fake.vm(100130).unwrap().config["sshkeys"],
        encoded_b,
        "unchanged"
    );
}
