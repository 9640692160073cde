//! A stateful fake Proxmox VE API: real HTTPS on loopback, API-token auth, and PVE's own answer
//! shapes and wording (see `shared/reference/proxmox-api.md`). Long operations are simulated in
//! time: a clone, start or delete answers a UPID at once, and the task's effect lands once its
//! configured duration has passed (computed from `Instant`s on every request; nothing sleeps).
//!
//! What it simulates, in PVE's words: token auth (401 after `bad_token_delay`); `cluster/nextid`
//! (`?vmid=` → 400 `VM N already exists`); `cluster/resources`; clone the way qemu-server's
//! worker does it (linked/full rules; the POST answers a UPID before the worker has written
//! anything; after `clone_config_delay` a temporary config with only `lock: clone`, halfway the
//! full config with the inherited tags and the description, the lock goes, and joining the
//! pool is the last step; a taken id → 500 `config file already exists`, an id whose config is
//! not written yet → the worker's lock timeout; a failed clone removes the half-made VM);
//! pool-scoped ACLs (`token_pool`: 403 `Permission check failed (/vms/N, VM.Audit)` for every
//! VMID that is not a pool member, listings filtered, `nextid` open); the node's task list;
//! foreign locks with durations; lost and slow clone answers; config GET/PUT/POST
//! (tag and description checks, `delete=`, 500 `VM is locked (clone)`); resize; status/current;
//! start/stop/shutdown/delete tasks (a second racing delete waits and ends with "does not
//! exist"); task status/log only on the UPID's node; the agent (not running / not configured /
//! not yet booted, then interfaces `lo`, `eth0` with net0's MAC, `guest_ip6` first and
//! `guest_ip` after `guest_ip_delay`, `docker0`; files that appear only some time after the
//! agent; with [`FakeProxmox::own_guest_identities`] every booted VM its own address and
//! files, e.g. its own SSH host key); cloud-init: `sshkeys` stored URL-encoded as sent (not
//! encoded: 400 `invalid urlencoded string`; a line `ssh-keygen` cannot read: 500 `SSH public
//! key validation error`), applied at a VM's first start only when it has a cloud-init drive,
//! into its guest's authorized_keys before its agent first answers
//! ([`FakeProxmox::cloud_init_keys`]). Errors put the message into the reason phrase and close the connection. Bodies may
//! be form-urlencoded (`&` and `;` split fields) or JSON; booleans must be `1`/`0`.
//! `access/permissions` answers from ACLs set with [`FakeProxmox::set_acl`] (user and token,
//! privilege separation; only that endpoint reads them); `nodes/{node}/storage` lists `local`
//! (dir), `local-lvm` (lvmthin) and the shared `ceph-vm` (rbd), `cluster/resources` shows them
//! per node with `shared`; a clone with `target` needs every disk on shared storage (`can't clone
//! VM to node 'X' (VM uses local storage)`), builds the VM on the source node and moves its config
//! to the target as the task ends; a node marked offline shows so in `/nodes` and answers 595.
//! A second user, the co-tenant `mallory@pve!t` with `VM.Allocate` on its own pool, acts over
//! HTTP through [`FakeProxmox::co_tenant`] (clone into any free VMID, set name/tags/description,
//! start, `POST .../template`, `POST /nodes/N/qemu`); its privileges are checked like PVE's,
//! and the driver's faults and request records leave it out (see `co_tenant`).
//! Not simulated: privileges finer than "pool member or not" for other endpoints (inject other
//! 403s with [`Fault::HttpErrors`]), HA, snapshots, real guest-exec output.
//!
//! ```ignore
//! let fake = FakeProxmox::start(FakeConfig::default());
//! let mut hook = Hook::new(bin, &job_dir).arg("prepare");
//! for (name, value) in fake.settings_env() {
//!     hook = hook.host_env(name, value);
//! }
//! hook.run().assert_exit(0);
//! assert_eq!(fake.job_vms().len(), 1);
//! ```

mod access;
mod agent;
mod api;
mod co_tenant;
mod routes;
mod server;
mod state;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use access::{AclSubject, RUNNER_ROLE};
pub use co_tenant::{
    ApiError, CoTenant, CO_TENANT_POOL, CO_TENANT_ROLE, CO_TENANT_TOKEN_NAME, CO_TENANT_USER,
    TEMPLATE_USER_ROLE,
};
use state::State;

/// How the fake cluster looks and how long its simulated operations take.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// The node that holds the templates and answers the tasks.
    pub node: String,
    /// Further cluster members: listed in `/nodes` and `/cluster/resources`, hold no templates.
    pub other_nodes: Vec<String>,
    pub token_user: String,
    pub token_name: String,
    pub token_value: String,
    pub templates: Vec<Template>,
    /// Duration of a linked clone task; a full clone takes three times as long.
    pub clone_time: Duration,
    /// Duration of start, stop, shutdown, delete and resize tasks.
    pub task_time: Duration,
    /// From the end of the start task until the guest agent answers.
    pub boot_time: Duration,
    /// The address the agent reports on the interface that carries net0's MAC.
    pub guest_ip: IpAddr,
    /// What `agent/file-read` returns per path; others fail like a missing file does. By
    /// default the SSH host keys of a Debian guest ([`GUEST_HOST_KEYS`]).
    pub guest_files: BTreeMap<String, String>,
    /// Real PVE waits ~3 s before answering a bad token.
    pub bad_token_delay: Duration,
    /// pve-http-server >= 5.2.0 also puts `"message"` into error bodies; older ones do not.
    pub message_in_body: bool,
    /// From the clone request until the clone worker has taken its locks and written the new
    /// VM's temporary config (`lock: clone`, nothing else). Until then the VMID reads as free
    /// and missing; the full config (description included) appears halfway through the clone,
    /// and the VM joins its pool as the task's last step.
    pub clone_config_delay: Duration,
    /// `Some(pool)`: the token's ACLs sit on `/pool/<pool>` (plus storage and SDN), not on `/`:
    /// every request about a VMID that is not (yet, or any more) a member of that pool gets
    /// `403 Permission check failed (/vms/N, <privilege>)`, and listings show members only.
    /// The templates are members. `GET /cluster/nextid` stays open to everyone.
    pub token_pool: Option<String>,
    /// The resource pools that exist.
    pub pools: Vec<String>,
    /// A global IPv6 address the agent reports on net0's interface as soon as it is up.
    pub guest_ip6: Option<IpAddr>,
    /// How long after the agent came up `guest_ip` appears (DHCPv4 slower than SLAAC).
    pub guest_ip_delay: Duration,
    /// The API daemon's worker limit; `None`: every request is served at once.
    pub capacity: Option<ApiCapacity>,
}

/// pveproxy/pvedaemon serve a few requests at a time (3 workers each by default); the rest
/// queue. A guest-agent call made before the agent runs holds its worker until QEMU's agent
/// timeout.
#[derive(Debug, Clone, Copy)]
pub struct ApiCapacity {
    /// Requests served at the same time.
    pub workers: usize,
    /// How long each request holds its worker.
    pub service_time: Duration,
    /// How long an agent call on a VM whose agent is not up yet holds its worker before it
    /// fails.
    pub agent_timeout: Duration,
}

impl Default for FakeConfig {
    fn default() -> Self {
        let template = |vmid, name: &str| Template {
            vmid,
            name: name.to_string(),
            agent: true,
            tags: "template;ubuntu".to_string(),
            description: format!("{name} cloud image template"),
            linked_clone_ok: true,
        };
        FakeConfig {
            node: "pve1".to_string(),
            other_nodes: vec!["pve2".to_string()],
            token_user: "ci@pve".to_string(),
            token_name: "runner".to_string(),
            token_value: "fake-token-0f1e2d3c".to_string(),
            templates: vec![
                template(60900, "ubuntu-focal"),
                template(60910, "ubuntu-bionic"),
                template(60920, "debian-11"),
                template(60930, "debian-12"),
            ],
            clone_time: Duration::from_millis(200),
            task_time: Duration::from_millis(50),
            boot_time: Duration::from_millis(300),
            guest_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            guest_files: GUEST_HOST_KEYS
                .iter()
                .map(|(file, line)| (file.to_string(), format!("{line}\n")))
                .collect(),
            bad_token_delay: Duration::from_millis(20),
            message_in_body: false,
            clone_config_delay: Duration::from_millis(40),
            token_pool: None,
            pools: vec!["ci".to_string()],
            guest_ip6: None,
            guest_ip_delay: Duration::ZERO,
            capacity: None,
        }
    }
}

/// The public SSH host keys a Debian cloud image has after its first boot (openssh-server
/// generates these three types), by file: what the fake's guests serve through `file-read`
/// unless a test gives them others ([`FakeProxmox::set_host_keys`]) or none
/// ([`FakeProxmox::remove_host_keys`]). No SSH server holds their private halves.
pub const GUEST_HOST_KEYS: [(&str, &str); 3] = [
    (
        "/etc/ssh/ssh_host_ed25519_key.pub",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFy3LQU5z+tzioX6DlSKtoyk7bxgcfGFwbBGVswYu1zQ root@debian",
    ),
    (
        "/etc/ssh/ssh_host_ecdsa_key.pub",
        "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBNos/4Qq/27FJGb/hI11KKbJJRyof0znEN/xsW2R5K6LW8ZvQVutMRd71pED5qrPs9657fdXPlKhx9Ziubz+xuM= root@debian",
    ),
    (
        "/etc/ssh/ssh_host_rsa_key.pub",
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABgQDMn7tPK8ah0iQBibsd5qSthVtVDEBjarDWNiEhsroU2KgXSLhkSscMH7VMbn8bGnhVtW0Xc+xgr+WB4fQMrgQmlkls2Uh82FE7wdNa2g0EvMnBidPZDAMEwAGItzaf02FKU3rcm1LGKDYYYOhuvW89tcUoebrDrP57XTAJoij9PVshpP4ESZaZ2j7fzMtCEQ+MhNp8hs+ktkzIW4pfciJ6ViMR9F4PI4WuoShJe/yepRP6Jbd91LGdeuqljttggGsu7+gLnw5wOtDZNX9tLkQc1iPOMl9UX8NhduidoNdUjD6MNYUrnd5fviYbAuuVZIbJoKbb+H/4FbOREyM+Kkjt6Lw27016tk5dv1vx2sfBl5nLRW507H2CPtQm/+pSPjbXpXM8hCQOyKU1Tpx4YOpTm0MDPPVNeQ2bapCxOZs4VdIQKpBQ+qtdEBIcj0YzmkwqC6AeJc06CdR+j+LIq6YCAA9nRO7pS9hAcBiEOeVIyB3dFHM5wvX08Iod4cAJn48= root@debian",
    ),
];

/// The host key file a Debian guest keeps a public key line of this type in.
fn host_key_file(line: &str) -> Option<&'static str> {
    let kind = line.split_whitespace().next()?;
    let file = match kind {
        "ssh-ed25519" => GUEST_HOST_KEYS[0].0,
        _ if kind.starts_with("ecdsa-sha2-") => GUEST_HOST_KEYS[1].0,
        "ssh-rsa" => GUEST_HOST_KEYS[2].0,
        _ => return None,
    };
    Some(file)
}

/// One guest's own address and files: what a VM with host keys of its own shows through its
/// agent (see [`FakeProxmox::own_guest_identities`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestIdentity {
    /// Reported on net0's interface instead of `guest_ip`.
    pub ip: IpAddr,
    /// Read before `guest_files` (e.g. the VM's own `/etc/ssh/ssh_host_ed25519_key.pub`).
    pub files: BTreeMap<String, String>,
    /// The `ciuser`'s authorized_keys file (its sshd reads it at every login): what cloud-init
    /// applies at the VM's first boot is appended to it (see [`FakeProxmox::cloud_init_keys`]).
    pub authorized_keys: Option<PathBuf>,
}

/// Where spare identities go (see [`FakeProxmox::own_guest_identities`]); usable from another
/// thread.
#[derive(Clone)]
pub struct GuestIdentities {
    state: Arc<Mutex<State>>,
}

impl GuestIdentities {
    /// Back to shared identities; the event channel closes.
    pub fn close(&self) {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .identities = None;
    }

    /// A spare identity for the next VM whose agent answers.
    pub fn add(&self, identity: GuestIdentity) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(identities) = state.identities.as_mut() {
            identities.spares.push(identity);
        }
    }
}

/// What happens to the identities added with [`GuestIdentities::add`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEvent {
    /// A VM's agent took a spare identity (time to add another), or found none (its agent
    /// reads as not running until one is added).
    Taken,
    Wanted,
    /// The VM that had this identity was destroyed: it is nobody's now.
    Released(GuestIdentity),
}

/// A node's memory and status in `/cluster/resources?type=node`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLoad {
    pub max_mem: u64,
    /// Used by everything but the guests (whose memory is added).
    pub used_mem: u64,
    /// An offline node is listed as `offline`, and requests proxied to it fail with 595 (as
    /// [`FakeProxmox::set_node_online`]).
    pub online: bool,
}

impl NodeLoad {
    /// An online node of 64 GiB with `free_gib` GiB free (before its guests).
    pub fn free_gib(free_gib: u64) -> NodeLoad {
        NodeLoad {
            max_mem: 64 << 30,
            used_mem: (64 - free_gib) << 30,
            online: true,
        }
    }
}

impl Default for NodeLoad {
    fn default() -> Self {
        NodeLoad {
            max_mem: 64 << 30,
            used_mem: 4 << 30,
            online: true,
        }
    }
}

/// A template VM on the main node.
#[derive(Debug, Clone)]
pub struct Template {
    pub vmid: u32,
    pub name: String,
    /// Whether its config has `agent: 1` (clones inherit it).
    pub agent: bool,
    pub tags: String,
    pub description: String,
    /// Whether its storage supports linked clones.
    pub linked_clone_ok: bool,
}

/// A guest as the fake currently holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSnapshot {
    pub vmid: u32,
    pub node: String,
    pub name: String,
    /// `running` or `stopped`.
    pub status: String,
    pub template: bool,
    pub lock: Option<String>,
    pub tags: String,
    pub description: String,
    /// The VM's config keys as `GET .../config` shows them (cores, memory, net0, agent, ...).
    pub config: BTreeMap<String, String>,
    /// The VMID this guest was cloned from, for clones made through the API.
    pub cloned_from: Option<u32>,
    pub full_clone: Option<bool>,
    pub pool: Option<String>,
}

/// A guest put into the fake directly: foreign VMs, orphans, leftovers for cleanup and gc tests.
#[derive(Debug, Clone, Default)]
pub struct NewVm {
    pub vmid: u32,
    /// Empty means the main node.
    pub node: String,
    pub name: String,
    pub tags: String,
    pub description: String,
    pub template: bool,
    /// Running and booted (its agent answers at once).
    pub running: bool,
    pub lock: Option<String>,
    /// The resource pool it belongs to.
    pub pool: Option<String>,
    /// The storage of its disk (`scsi0`): `local-lvm` (thin LVM, local) when empty; `ceph-vm`
    /// is the fake's shared storage (RBD), which lets a template be cloned to another node.
    pub storage: String,
}

impl NewVm {
    /// A template VM named `name` on `node`, its disk on `local-lvm`: a copy of a template on a
    /// node with local storage.
    pub fn template(vmid: u32, node: &str, name: &str) -> NewVm {
        NewVm {
            vmid,
            node: node.to_string(),
            name: name.to_string(),
            template: true,
            ..Default::default()
        }
    }

    /// The same on the shared `ceph-vm`: it can be cloned to every node with `target`.
    pub fn shared_template(vmid: u32, node: &str, name: &str) -> NewVm {
        NewVm {
            storage: "ceph-vm".to_string(),
            ..NewVm::template(vmid, node, name)
        }
    }
}

/// One API request as the fake received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    /// The path as sent (still percent-encoded), including `/api2/json`.
    pub path: String,
    /// The raw query string, empty if none.
    pub query: String,
    /// Whether the request carried the right API token.
    pub authorized: bool,
    /// The raw request body (form-urlencoded or JSON), empty for GET and DELETE.
    pub body: String,
}

impl RecordedRequest {
    /// `GET /api2/json/nodes/pve1/qemu/2000001/status/current` → `GET nodes/qemu/status/current`.
    pub fn endpoint(&self) -> String {
        let path = self.path.trim_start_matches("/api2/json");
        let mut words: Vec<&str> = path
            .split('/')
            .filter(|part| !part.is_empty())
            .filter(|part| !part.chars().all(|c| c.is_ascii_digit()))
            .filter(|part| !part.starts_with("UPID"))
            .collect();
        if words.first() == Some(&"nodes") && words.len() > 1 {
            words.remove(1);
        }
        format!("{} {}", self.method, words.join("/"))
    }
}

/// Misbehaviour to inject; counted faults apply to the next `count` matching operations.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The next N clone tasks end with this exit status.
    CloneTaskFails { count: u32, message: String },
    /// The next N clone requests are answered at once with this status and message.
    CloneRequestFails {
        count: u32,
        status: u16,
        message: String,
    },
    /// The next N requests (whose path contains `path_contains`, if given) get this status.
    HttpErrors {
        count: u32,
        status: u16,
        message: String,
        path_contains: Option<String>,
    },
    /// The next N start tasks end with this exit status.
    StartTaskFails { count: u32, message: String },
    /// The agent of every VM cloned from now on never comes up.
    AgentNeverStarts,
    /// After each clone task ends, `lock: clone` stays this much longer.
    LockAfterClone { duration: Duration },
    /// Clone tasks started while `max` others run end with `message`.
    ConcurrentCloneLimit { max: usize, message: String },
    /// Deleting a locked VM is refused. This is the default behaviour; the variant documents it.
    DeleteFailsWhileLocked,
    /// The next N otherwise successful tasks end with `WARNINGS: 1`.
    TaskWarnings { count: u32 },
    /// The next N tasks of this type (`qmstop`, `qmdestroy`, ...) end with `message`, e.g. an
    /// unrelated `storage 'x' does not exist`.
    TaskFails {
        kind: String,
        count: u32,
        message: String,
    },
    /// Tasks of this type started before `until` end with `message` (e.g. a config lock
    /// another worker holds: `can't lock file '/var/lock/qemu-server/lock-N.conf' - got timeout`).
    TaskFailsUntil {
        kind: String,
        until: Instant,
        message: String,
    },
    /// The next N clone requests are carried out, but the connection drops before the answer
    /// (a proxy timeout, a reset): the client never learns the UPID.
    CloneAnswerLost { count: u32 },
    /// Every clone request is carried out at once, but answered only after `delay`.
    SlowCloneAnswer { delay: Duration },
    /// Every successful `method` request whose path contains `path_contains` is carried out at
    /// once and answered only after `delay` (a slow proxy): a client killed meanwhile never
    /// learns that its write landed.
    SlowAnswer {
        method: String,
        path_contains: String,
        delay: Duration,
    },
    /// The next N clone requests on `node` are answered (UPID and all), and then the node goes
    /// down: offline in the listings, 595 for every request proxied to it. Its tasks go on in
    /// the fake's time, so the VM is there once the node is back.
    NodeDownAfterCloneRequest { node: String, count: u32 },
}

/// A running fake Proxmox VE API. Dropping it shuts the server down.
pub struct FakeProxmox {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    tls: server::TlsMaterial,
    server: Option<server::ServerThread>,
}

impl FakeProxmox {
    /// Starts the server on `127.0.0.1:0` in its own thread with its own tokio runtime.
    pub fn start(config: FakeConfig) -> FakeProxmox {
        let tls = server::TlsMaterial::generate();
        let state = Arc::new(Mutex::new(State::new(config)));
        let server = server::ServerThread::spawn(state.clone(), &tls);
        FakeProxmox {
            state,
            addr: server.addr,
            tls,
            server: Some(server),
        }
    }

    /// `127.0.0.1:PORT`, the value for `PROXMOX_HOST`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `https://127.0.0.1:PORT/api2/json`.
    pub fn api_url(&self) -> String {
        format!("https://{}/api2/json", self.addr)
    }

    /// PEM of the CA that signed the server certificate (like `/etc/pve/pve-root-ca.pem`).
    pub fn ca_pem(&self) -> String {
        self.tls.ca_pem.clone()
    }

    /// Writes the CA as `pve-root-ca.pem` into `dir` and returns its path.
    pub fn write_ca_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("pve-root-ca.pem");
        if let Err(err) = std::fs::write(&path, &self.tls.ca_pem) {
            panic!("writing the fake CA to {}: {err}", path.display());
        }
        path
    }

    /// DER of the server (leaf) certificate.
    pub fn leaf_der(&self) -> Vec<u8> {
        self.tls.leaf_der.clone()
    }

    /// SHA-256 of the server certificate, `AA:BB:...` as the PVE UI shows it.
    pub fn fingerprint(&self) -> String {
        self.tls.fingerprint()
    }

    /// The settings a driver needs to reach this fake (trust by fingerprint).
    pub fn settings_env(&self) -> Vec<(String, String)> {
        let state = self.lock();
        let config = &state.config;
        [
            ("PROXMOX_HOST", self.host()),
            ("PROXMOX_USER", config.token_user.clone()),
            ("PROXMOX_TOKEN_NAME", config.token_name.clone()),
            ("PROXMOX_TOKEN_VALUE", config.token_value.clone()),
            ("PROXMOX_NODE", config.node.clone()),
            ("PROXMOX_TLS_FINGERPRINT", self.fingerprint()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
    }

    /// Every guest, templates included, ordered by VMID.
    pub fn vms(&self) -> Vec<VmSnapshot> {
        let mut state = self.lock();
        state.advance();
        state.vms.values().map(|vm| vm.snapshot()).collect()
    }

    /// Every guest that is not a template.
    pub fn job_vms(&self) -> Vec<VmSnapshot> {
        self.vms().into_iter().filter(|vm| !vm.template).collect()
    }

    pub fn vm(&self, vmid: u32) -> Option<VmSnapshot> {
        let mut state = self.lock();
        state.advance();
        state.vms.get(&vmid).map(|vm| vm.snapshot())
    }

    /// Puts a guest into the cluster directly (replacing one with the same VMID).
    pub fn add_vm(&self, vm: NewVm) {
        self.lock().add_vm(vm);
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// Requests so far grouped by endpoint, node names, VMIDs and UPIDs left out
    /// (`GET nodes/qemu/agent/network-get-interfaces`).
    pub fn requests_by_endpoint(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for request in self.lock().requests.iter() {
            *counts.entry(request.endpoint()).or_insert(0) += 1;
        }
        counts
    }

    pub fn request_count(&self) -> usize {
        self.lock().requests.len()
    }

    /// TCP connections accepted so far, including ones whose TLS handshake failed (a client
    /// that rejected the certificate) and ones that never sent a request.
    pub fn connection_count(&self) -> usize {
        self.lock().connections
    }

    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Removes every injected fault, counted or not.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Sets or clears a VM's lock by hand (e.g. `Some("backup")`); returns false if there is no
    /// such VM. A lock set this way stays until cleared.
    pub fn set_vm_lock(&self, vmid: u32, lock: Option<&str>) -> bool {
        let mut state = self.lock();
        state.advance();
        match state.vms.get_mut(&vmid) {
            Some(vm) => {
                vm.lock = lock.map(str::to_string);
                vm.lock_until = None;
                true
            }
            None => false,
        }
    }

    /// Locks a VM as a backup (`"backup"`) or a migration (`"migrate"`) would, for `duration`;
    /// false if there is no such VM.
    pub fn lock_vm_for(&self, vmid: u32, lock: &str, duration: Duration) -> bool {
        let mut state = self.lock();
        state.advance();
        match state.vms.get_mut(&vmid) {
            Some(vm) => {
                vm.lock = Some(lock.to_string());
                vm.lock_until = Some(Instant::now() + duration);
                true
            }
            None => false,
        }
    }

    /// `path` reads as missing (the agent's `failed to open file` error) until `after` has
    /// passed since the guest agent came up, then as `content`: host keys that cloud-init
    /// generates after networking is up.
    pub fn set_late_guest_file(&self, path: &str, content: &str, after: Duration) {
        self.lock()
            .late_guest_files
            .insert(path.to_string(), (content.to_string(), after));
    }

    /// The clone tasks that have not ended yet.
    pub fn running_clone_tasks(&self) -> usize {
        let mut state = self.lock();
        state.advance();
        state.running_clones()
    }

    /// Adds a VM to a pool (or removes it with `None`); false if there is no such VM.
    pub fn set_vm_pool(&self, vmid: u32, pool: Option<&str>) -> bool {
        let mut state = self.lock();
        state.advance();
        match state.vms.get_mut(&vmid) {
            Some(vm) => {
                vm.pool = pool.map(str::to_string);
                true
            }
            None => false,
        }
    }

    /// Moves a VM to another node at once, as a finished (live) migration leaves it: same VMID,
    /// config and state, now under the other node's directory.
    pub fn migrate_vm(&self, vmid: u32, node: &str) -> bool {
        let mut state = self.lock();
        state.advance();
        if !state.is_known_node(node) {
            return false;
        }
        match state.vms.get_mut(&vmid) {
            Some(vm) => {
                vm.node = node.to_string();
                true
            }
            None => false,
        }
    }

    /// From now on every VM gets an identity of its own ([`GuestIdentity`]: address, files such
    /// as its SSH host key) when its agent first answers, taken from the spares added with
    /// [`GuestIdentities::add`]; until one is there its agent reads as not running
    /// yet. The events tell the caller (who runs, say, an sshd per identity) when to add
    /// another and when one is free again. Identities are never given to a second VM.
    pub fn own_guest_identities(&self) -> (GuestIdentities, std::sync::mpsc::Receiver<GuestEvent>) {
        let (sender, receiver) = std::sync::mpsc::channel();
        self.lock().identities = Some(state::Identities {
            spares: Vec::new(),
            assigned: BTreeMap::new(),
            events: sender,
        });
        (
            GuestIdentities {
                state: Arc::clone(&self.state),
            },
            receiver,
        )
    }

    /// The VMIDs of the template VMs.
    pub fn templates(&self) -> Vec<u32> {
        self.lock()
            .vms
            .values()
            .filter(|vm| vm.config.get("template").is_some_and(|t| t == "1"))
            .map(|vm| vm.vmid)
            .collect()
    }

    /// Without per-VM identities, the one authorized_keys file every VM's cloud-init appends
    /// its `sshkeys` to at first boot (all VMs are the same sshd then).
    pub fn set_shared_authorized_keys(&self, path: &Path) {
        self.lock().shared_authorized_keys = Some(path.to_path_buf());
    }

    /// The keys cloud-init applied to VM `vmid` at its first boot (its `sshkeys` then, decoded):
    /// `None` before that boot, or when the VM has no cloud-init drive.
    pub fn cloud_init_keys(&self, vmid: u32) -> Option<Vec<String>> {
        self.lock()
            .vms
            .get(&vmid)
            .and_then(|vm| vm.cloud_init.as_ref())
            .map(|applied| applied.keys.clone())
    }

    /// The address a VM's agent reports: its own identity's, else `guest_ip`.
    pub fn guest_ip(&self, vmid: u32) -> IpAddr {
        let state = self.lock();
        state
            .identities
            .as_ref()
            .and_then(|identities| identities.assigned.get(&vmid))
            .map_or(state.config.guest_ip, |identity| identity.ip)
    }

    /// The guests' SSH host keys are these public key lines (each in its type's file), and no
    /// others: what a guest serving an SSH server's keys shows, so that pinning them works.
    #[track_caller]
    pub fn set_host_keys(&self, lines: &[String]) {
        self.remove_host_keys();
        for line in lines {
            let file = host_key_file(line).unwrap_or_else(|| panic!("not a host key: {line}"));
            self.set_guest_file(file, &format!("{line}\n"));
        }
    }

    /// The guests have no SSH host key files (yet): as a template cleaned for cloning before
    /// cloud-init regenerated them.
    pub fn remove_host_keys(&self) {
        let mut state = self.lock();
        for (file, _) in GUEST_HOST_KEYS {
            state.config.guest_files.remove(file);
        }
    }

    pub fn set_guest_file(&self, path: &str, content: &str) {
        self.lock()
            .config
            .guest_files
            .insert(path.to_string(), content.to_string());
    }

    /// The next `reads` reads of `path` return `stale` instead of its content, as when the
    /// agent answers before cloud-init has regenerated the template's SSH host keys.
    pub fn set_stale_guest_file(&self, path: &str, stale: &str, reads: u32) {
        self.lock()
            .stale_guest_files
            .insert(path.to_string(), (stale.to_string(), reads));
    }

    /// Sets a node's memory and status (see [`NodeLoad`]).
    pub fn set_node(&self, node: &str, load: NodeLoad) {
        let mut state = self.lock();
        state.node_loads.insert(node.to_string(), load);
        if load.online {
            state.offline_nodes.remove(node);
        } else {
            state.offline_nodes.insert(node.to_string());
        }
    }

    /// Replaces the ACL entry of `subject` on `path` (an empty list still overrides what `path`
    /// would inherit, as a role without privileges does in PVE).
    pub fn set_acl(&self, subject: AclSubject, path: &str, privileges: &[&str]) {
        let privileges = privileges.iter().map(|p| p.to_string()).collect();
        let mut state = self.lock();
        let acl = match subject {
            AclSubject::User => &mut state.acls.user,
            AclSubject::Token => &mut state.acls.token,
        };
        acl.insert(path.to_string(), privileges);
    }

    /// Whether the token is privilege-separated (PVE's default, and the fake's).
    pub fn set_privsep(&self, privsep: bool) {
        self.lock().acls.privsep = privsep;
    }

    /// Takes a node down (`false`) or brings it back.
    pub fn set_node_online(&self, node: &str, online: bool) {
        let mut state = self.lock();
        if online {
            state.offline_nodes.remove(node);
        } else {
            state.offline_nodes.insert(node.to_string());
        }
    }

    /// Applies to VMs started from now on.
    pub fn set_boot_time(&self, boot_time: Duration) {
        self.lock().config.boot_time = boot_time;
    }

    /// Applies to clones requested from now on.
    pub fn set_clone_time(&self, clone_time: Duration) {
        self.lock().config.clone_time = clone_time;
    }

    /// The highest number of clone tasks that were running at the same time.
    pub fn max_concurrent_clones(&self) -> usize {
        self.lock().max_concurrent_clones
    }

    /// The most requests that were in service at the same time (with [`ApiCapacity`], at most
    /// its `workers`) and the most that waited for a worker.
    pub fn max_concurrent_requests(&self) -> (usize, usize) {
        let state = self.lock();
        (state.max_in_service, state.max_queued)
    }

    /// Sum of the simulated durations of every task and boot served so far.
    pub fn simulated_time(&self) -> Duration {
        self.lock().simulated_time
    }

    /// Sets (`Some`) or deletes (`None`) one key of a VM's config by hand, as `qm set` would
    /// (`agent`, `net0`, ...); false if there is no such VM.
    pub fn set_vm_config(&self, vmid: u32, key: &str, value: Option<&str>) -> bool {
        let mut state = self.lock();
        let Some(vm) = state.vms.get_mut(&vmid) else {
            return false;
        };
        match value {
            Some(value) => vm.config.insert(key.to_string(), value.to_string()),
            None => vm.config.remove(key),
        };
        true
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the fake's state from the next assertion.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for FakeProxmox {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
    }
}

impl std::fmt::Debug for FakeProxmox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProxmox")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}
