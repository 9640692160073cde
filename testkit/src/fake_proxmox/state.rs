//! The fake cluster's state and its time simulation. Tasks carry their end `Instant`; every
//! request first calls [`State::advance`], which applies the effects of the tasks that have ended
//! since, in the order they ended.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::co_tenant::{Caller, CoTenantAccount, CO_TENANT_POOL};
use super::{FakeConfig, Fault, NewVm, RecordedRequest, VmSnapshot};

pub(crate) const MAX_DESCRIPTION: usize = 8192;

pub(crate) struct State {
    pub config: FakeConfig,
    pub vms: BTreeMap<u32, Vm>,
    pub tasks: Vec<Task>,
    pub requests: Vec<RecordedRequest>,
    /// TCP connections accepted, TLS handshake or not.
    pub connections: usize,
    pub faults: Vec<Fault>,
    pub max_concurrent_clones: usize,
    /// Requests being served / waiting for a worker now, and the most seen.
    /// Nodes whose memory or status a test set ([`super::FakeProxmox::set_node`]).
    pub node_loads: BTreeMap<String, super::NodeLoad>,
    pub in_service: usize,
    pub queued: usize,
    pub max_in_service: usize,
    pub max_queued: usize,
    pub simulated_time: Duration,
    /// Guest files that read as an older content for their next N reads (host keys that
    /// cloud-init has not regenerated yet).
    pub stale_guest_files: BTreeMap<String, (String, u32)>,
    /// ACLs for `GET /access/permissions`.
    pub acls: super::access::Acls,
    /// Nodes that are down: `offline` in `/nodes`, 595 for requests proxied to them.
    pub offline_nodes: std::collections::BTreeSet<String>,
    /// Guest files that exist only from this long after the guest agent came up (host keys
    /// that cloud-init writes after networking is up).
    pub late_guest_files: BTreeMap<String, (String, Duration)>,
    /// Clones whose worker has not written the new VM's config yet: the VMID is free as far
    /// as `nextid` and every read can tell.
    pub pending_clones: Vec<PendingClone>,
    /// Who sent the request being served (set by `routes::dispatch` for its duration): tasks
    /// carry that user in their UPID, listings and faults depend on it.
    pub caller: Caller,
    /// The second user of the cluster, `mallory@pve!t` (see `co_tenant`).
    pub co_tenant: CoTenantAccount,
    /// The co-tenant's requests, kept out of `requests` (the driver's footprint).
    pub co_tenant_requests: Vec<RecordedRequest>,
    /// Per-VM identities, when a test asked for them.
    pub identities: Option<Identities>,
    /// See `FakeProxmox::set_shared_authorized_keys`.
    pub shared_authorized_keys: Option<std::path::PathBuf>,
    next_pid: u32,
    next_exec_pid: u32,
}

/// Spare and assigned guest identities (see `FakeProxmox::own_guest_identities`).
pub(crate) struct Identities {
    pub spares: Vec<super::GuestIdentity>,
    pub assigned: BTreeMap<u32, super::GuestIdentity>,
    pub events: std::sync::mpsc::Sender<super::GuestEvent>,
}

/// A VM's identity as its agent shows it.
pub(crate) enum Identity {
    /// No per-VM identities: the fake's `guest_ip` and `guest_files`.
    Shared,
    Own(super::GuestIdentity),
    /// Per-VM identities, but no spare yet.
    Waiting,
}

pub(crate) struct Vm {
    pub vmid: u32,
    pub node: String,
    pub running: bool,
    pub lock: Option<String>,
    /// When set, the lock clears at this instant (clone lock outliving its task).
    pub lock_until: Option<Instant>,
    pub config: BTreeMap<String, String>,
    pub cloned_from: Option<u32>,
    pub full_clone: Option<bool>,
    pub pool: Option<String>,
    pub started_at: Option<Instant>,
    /// When the guest agent starts answering; `None` while stopped.
    pub agent_ready_at: Option<Instant>,
    pub agent_never: bool,
    /// A destroy task is running on it.
    pub destroying: bool,
    /// Set while a clone worker is still building this VM.
    pub clone: Option<CloneProgress>,
    /// Set at the first start of a VM with a cloud-init drive: what cloud-init applies in the
    /// guest then. Later starts change nothing (cloud-init's per-instance modules ran already).
    pub cloud_init: Option<CloudInitRun>,
    /// Whether it was ever started.
    pub booted_once: bool,
}

/// What cloud-init did at a VM's first boot.
#[derive(Debug, Clone)]
pub(crate) struct CloudInitRun {
    /// `sshkeys` at that start, decoded: installed for `ciuser`.
    pub keys: Vec<String>,
    /// Written to the guest's authorized_keys file (once its identity is known).
    pub written: bool,
}

/// Whether a config has a cloud-init drive (`ide2: local-lvm:vm-N-cloudinit,media=cdrom`).
pub(crate) fn has_cloud_init_drive(config: &BTreeMap<String, String>) -> bool {
    config.iter().any(|(key, value)| {
        ["ide", "sata", "scsi", "virtio"]
            .iter()
            .any(|bus| key.starts_with(bus))
            && value.split(',').next().is_some_and(|volume| {
                volume.ends_with("cloudinit") || volume.contains("-cloudinit")
            })
    })
}

/// `sshkeys` as PVE stores it (URL-encoded lines) → the key lines.
pub(crate) fn decode_sshkeys(value: &str) -> Vec<String> {
    let mut bytes = Vec::new();
    let raw = value.as_bytes();
    let mut at = 0;
    while at < raw.len() {
        if raw[at] == b'%' && at + 3 <= raw.len() {
            let hex = std::str::from_utf8(&raw[at + 1..at + 3]).unwrap_or("");
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
                bytes.push(byte);
                at += 3;
                continue;
            }
        }
        bytes.push(raw[at]);
        at += 1;
    }
    String::from_utf8_lossy(&bytes)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// A clone worker's progress on the VM it creates, as qemu-server's `clone_vm` does it: a
/// temporary config holding only `lock: clone`, then the full config (still locked) once the
/// first disk is cloned, then the lock goes, and joining the pool is the last step (the task's
/// end).
pub(crate) struct CloneProgress {
    /// `None` once written (or never, for a task that fails).
    pub full_config: Option<BTreeMap<String, String>>,
    pub full_at: Instant,
    pub unlock_at: Instant,
    pub unlocked: bool,
    pub pool: Option<String>,
    /// The clone task building it: only that task's failure removes it.
    pub upid: String,
    /// A clone with `target`: the worker moves the config to this node as its last step.
    pub target: Option<String>,
}

/// A clone whose worker has been forked but has not written the temporary config yet.
pub(crate) struct PendingClone {
    pub vmid: u32,
    pub upid: String,
    pub config_at: Instant,
    pub vm: Vm,
}

impl Vm {
    pub fn name(&self) -> String {
        self.config
            .get("name")
            .cloned()
            .unwrap_or_else(|| format!("VM {}", self.vmid))
    }

    pub fn is_template(&self) -> bool {
        self.config.get("template").is_some_and(|v| v == "1")
    }

    pub fn status(&self) -> &'static str {
        if self.running {
            "running"
        } else {
            "stopped"
        }
    }

    pub fn agent_enabled(&self) -> bool {
        // The agent option is a property string: `1`, `enabled=1,fstrim_cloned_disks=1`, ...
        self.config.get("agent").is_some_and(|value| {
            let first = value.split(',').next().unwrap_or("");
            matches!(first, "1" | "enabled=1" | "on" | "yes" | "true")
        })
    }

    /// The MAC of net0 (`virtio=BC:24:11:..,bridge=vmbr0`), as configured.
    pub fn net0_mac(&self) -> Option<String> {
        let net0 = self.config.get("net0")?;
        let model = net0.split(',').next()?;
        model.split_once('=').map(|(_, mac)| mac.to_string())
    }

    pub fn uptime(&self, now: Instant) -> u64 {
        self.started_at
            .map(|at| now.saturating_duration_since(at).as_secs())
            .unwrap_or(0)
    }

    pub fn snapshot(&self) -> VmSnapshot {
        VmSnapshot {
            vmid: self.vmid,
            node: self.node.clone(),
            name: self.name(),
            status: self.status().to_string(),
            template: self.is_template(),
            lock: self.lock.clone(),
            tags: self.config.get("tags").cloned().unwrap_or_default(),
            description: self.config.get("description").cloned().unwrap_or_default(),
            config: self.config.clone(),
            cloned_from: self.cloned_from,
            full_clone: self.full_clone,
            pool: self.pool.clone(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Event {
    ConfigWritten(usize),
    FullConfig(u32),
    Unlocked(u32),
    LockExpired(u32),
    TaskEnded(usize),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Effect {
    None,
    CloneDone {
        vmid: u32,
        ok: bool,
    },
    Started {
        vmid: u32,
        boot_time: Duration,
    },
    Stopped {
        vmid: u32,
    },
    Destroyed {
        vmid: u32,
    },
    /// `qmcreate`: the worker has written the config; `lock: create` goes.
    Created {
        vmid: u32,
    },
    /// `qmtemplate`: `template: 1`, the disks renamed to base volumes.
    Templated {
        vmid: u32,
    },
}

pub(crate) struct Task {
    pub upid: String,
    pub node: String,
    pub pid: u32,
    pub pstart: u32,
    pub starttime: u64,
    pub kind: &'static str,
    pub id: String,
    pub user: String,
    pub ends: Instant,
    /// `OK`, `WARNINGS: N` or the error text.
    pub exitstatus: String,
    pub effect: Effect,
    pub done: bool,
    pub log: Vec<String>,
}

impl Task {
    pub fn running(&self) -> bool {
        !self.done
    }
}

/// What a task will do, decided when it is requested.
pub(crate) struct TaskSpec {
    pub node: String,
    pub kind: &'static str,
    pub id: String,
    pub duration: Duration,
    /// `None` means success (which `TaskWarnings` may turn into `WARNINGS: 1`).
    pub error: Option<String>,
    pub effect: Effect,
    pub log: Vec<String>,
}

impl State {
    pub fn new(config: FakeConfig) -> State {
        let mut state = State {
            vms: BTreeMap::new(),
            tasks: Vec::new(),
            requests: Vec::new(),
            connections: 0,
            faults: Vec::new(),
            max_concurrent_clones: 0,
            node_loads: BTreeMap::new(),
            in_service: 0,
            queued: 0,
            max_in_service: 0,
            max_queued: 0,
            simulated_time: Duration::ZERO,
            stale_guest_files: BTreeMap::new(),
            acls: super::access::Acls::default(),
            offline_nodes: std::collections::BTreeSet::new(),
            late_guest_files: BTreeMap::new(),
            pending_clones: Vec::new(),
            caller: Caller::Runner,
            co_tenant: CoTenantAccount::new(config.templates.iter().map(|t| t.vmid)),
            co_tenant_requests: Vec::new(),
            identities: None,
            shared_authorized_keys: None,
            next_pid: 0x0002_1a40 + rand::random::<u16>() as u32,
            next_exec_pid: 1000,
            config,
        };
        // With pool-scoped ACLs the templates must be pool members, or the token could not
        // clone them.
        let template_pool = state.config.token_pool.clone();
        for template in state.config.templates.clone() {
            let mut config = base_config(&template.name);
            config.insert("template".into(), "1".into());
            if !template.agent {
                config.remove("agent");
            }
            if !template.tags.is_empty() {
                config.insert("tags".into(), template.tags.clone());
            }
            if !template.description.is_empty() {
                config.insert("description".into(), template.description.clone());
            }
            let storage = if template.linked_clone_ok {
                "local-lvm"
            } else {
                "local"
            };
            let disk = if template.linked_clone_ok {
                format!("{storage}:base-{}-disk-0,size=20G", template.vmid)
            } else {
                format!("{storage}:{0}/vm-{0}-disk-0.raw,size=20G", template.vmid)
            };
            config.insert("scsi0".into(), disk);
            config.insert(
                "ide2".into(),
                format!("{storage}:vm-{}-cloudinit,media=cdrom", template.vmid),
            );
            let node = state.config.node.clone();
            state.vms.insert(
                template.vmid,
                Vm {
                    vmid: template.vmid,
                    node,
                    running: false,
                    lock: None,
                    lock_until: None,
                    config,
                    cloned_from: None,
                    full_clone: None,
                    pool: template_pool.clone(),
                    started_at: None,
                    agent_ready_at: None,
                    agent_never: false,
                    destroying: false,
                    cloud_init: None,
                    booted_once: false,
                    clone: None,
                },
            );
        }
        state
    }

    pub fn add_vm(&mut self, new: NewVm) {
        let node = if new.node.is_empty() {
            self.config.node.clone()
        } else {
            new.node
        };
        let name = if new.name.is_empty() {
            format!("vm{}", new.vmid)
        } else {
            new.name
        };
        let mut config = base_config(&name);
        // Converting a VM to a template renames its disks to base volumes (linked-clonable).
        let volume = if new.template { "base" } else { "vm" };
        let storage = if new.storage.is_empty() {
            "local-lvm"
        } else {
            new.storage.as_str()
        };
        config.insert(
            "scsi0".into(),
            format!("{storage}:{volume}-{}-disk-0,size=20G", new.vmid),
        );
        if !new.tags.is_empty() {
            config.insert("tags".into(), new.tags);
        }
        if !new.description.is_empty() {
            config.insert("description".into(), new.description);
        }
        if new.template {
            config.insert("template".into(), "1".into());
        }
        let now = Instant::now();
        self.vms.insert(
            new.vmid,
            Vm {
                vmid: new.vmid,
                node,
                running: new.running,
                lock: new.lock,
                lock_until: None,
                config,
                cloned_from: None,
                full_clone: None,
                pool: new.pool,
                started_at: new.running.then_some(now),
                agent_ready_at: new.running.then_some(now),
                agent_never: false,
                destroying: false,
                cloud_init: None,
                booted_once: new.running,
                clone: None,
            },
        );
    }

    pub fn is_known_node(&self, node: &str) -> bool {
        node == self.config.node || self.config.other_nodes.iter().any(|n| n == node)
    }

    pub fn nodes(&self) -> Vec<String> {
        let mut nodes = vec![self.config.node.clone()];
        nodes.extend(self.config.other_nodes.iter().cloned());
        nodes
    }

    /// A node's load as `/cluster/resources` reports it: its base memory use plus what its
    /// running guests use (their configured memory).
    pub fn node_load(&self, node: &str) -> super::NodeLoad {
        let mut load = self.node_loads.get(node).copied().unwrap_or_default();
        load.online = !self.offline_nodes.contains(node);
        load.used_mem += self
            .vms
            .values()
            .filter(|vm| vm.node == node && vm.running)
            .map(|vm| {
                vm.config
                    .get("memory")
                    .and_then(|memory| memory.parse::<u64>().ok())
                    .unwrap_or(512)
                    * 1024
                    * 1024
            })
            .sum::<u64>();
        load
    }

    pub fn token_user(&self) -> String {
        format!("{}!{}", self.config.token_user, self.config.token_name)
    }

    /// The token id of the request being served, as its tasks' UPIDs name it.
    pub fn caller_user(&self) -> String {
        match self.caller {
            Caller::Runner => self.token_user(),
            Caller::CoTenant => CoTenantAccount::token_id(),
        }
    }

    /// Whether the caller may see this VM in listings: the driver's token as
    /// [`State::token_sees`] says, the co-tenant where it has `VM.Audit`.
    pub fn caller_sees(&self, vm: &Vm) -> bool {
        match self.caller {
            Caller::Runner => self.token_sees(vm),
            Caller::CoTenant => self
                .co_tenant
                .on_vm(vm.vmid, vm.pool.as_deref())
                .contains("VM.Audit"),
        }
    }

    /// The injected faults that apply to the request being served: all of them for the
    /// driver, none for the co-tenant (faults are aimed at the driver).
    pub fn faults_for_caller(&self) -> &[Fault] {
        match self.caller {
            Caller::Runner => &self.faults,
            Caller::CoTenant => &[],
        }
    }

    /// Whether a resource pool of that name exists (the configured ones and the co-tenant's).
    pub fn pool_exists(&self, pool: &str) -> bool {
        pool == CO_TENANT_POOL || self.config.pools.iter().any(|known| known == pool)
    }

    /// Applies everything that has happened since the last call, event by event in the order
    /// the events happened.
    pub fn advance(&mut self) {
        let now = Instant::now();
        while let Some(event) = self.next_event(now) {
            self.apply(event, now);
        }
    }

    /// The earliest event due by `now`.
    fn next_event(&self, now: Instant) -> Option<Event> {
        let mut best: Option<(Instant, Event)> = None;
        let mut consider = |at: Instant, event: Event| {
            if at <= now && best.as_ref().is_none_or(|(best_at, _)| at < *best_at) {
                best = Some((at, event));
            }
        };
        for (index, pending) in self.pending_clones.iter().enumerate() {
            consider(pending.config_at, Event::ConfigWritten(index));
        }
        for vm in self.vms.values() {
            if let Some(progress) = &vm.clone {
                if progress.full_config.is_some() {
                    consider(progress.full_at, Event::FullConfig(vm.vmid));
                }
                if !progress.unlocked {
                    consider(progress.unlock_at, Event::Unlocked(vm.vmid));
                }
            }
            if let Some(until) = vm.lock_until {
                consider(until, Event::LockExpired(vm.vmid));
            }
        }
        for (index, task) in self.tasks.iter().enumerate() {
            if !task.done {
                consider(task.ends, Event::TaskEnded(index));
            }
        }
        best.map(|(_, event)| event)
    }

    fn apply(&mut self, event: Event, now: Instant) {
        match event {
            Event::ConfigWritten(index) => {
                let pending = self.pending_clones.remove(index);
                // The worker holds the VMID's config lock, so nothing else can be there.
                self.vms.entry(pending.vmid).or_insert(pending.vm);
            }
            Event::FullConfig(vmid) => {
                if let Some(vm) = self.vms.get_mut(&vmid) {
                    if let Some(config) = vm.clone.as_mut().and_then(|p| p.full_config.take()) {
                        vm.config = config;
                    }
                }
            }
            Event::Unlocked(vmid) => {
                if let Some(vm) = self.vms.get_mut(&vmid) {
                    if let Some(progress) = vm.clone.as_mut() {
                        progress.unlocked = true;
                    }
                    if vm.lock.as_deref() == Some("clone") {
                        vm.lock = None;
                    }
                }
            }
            Event::LockExpired(vmid) => {
                if let Some(vm) = self.vms.get_mut(&vmid) {
                    vm.lock = None;
                    vm.lock_until = None;
                }
            }
            Event::TaskEnded(index) => self.end_task(index, now),
        }
    }

    fn end_task(&mut self, index: usize, _now: Instant) {
        let ok = !is_task_error(&self.tasks[index].exitstatus);
        self.tasks[index].done = true;
        match self.tasks[index].effect {
            Effect::None => {}
            Effect::CloneDone { vmid, .. } if !ok => {
                // qemu-server unlinks the half-made config as the last thing before it dies.
                let upid = self.tasks[index].upid.clone();
                self.pending_clones.retain(|pending| pending.upid != upid);
                let built_by_this_task = self.vms.get(&vmid).is_some_and(|vm| {
                    vm.clone
                        .as_ref()
                        .is_some_and(|progress| progress.upid == upid)
                });
                if built_by_this_task {
                    self.vms.remove(&vmid);
                }
            }
            Effect::CloneDone { vmid, .. } => {
                let upid = self.tasks[index].upid.clone();
                if let Some(vm) = self.vms.get_mut(&vmid) {
                    let ours = vm.clone.as_ref().is_some_and(|p| p.upid == upid);
                    let taken = if ours { vm.clone.take() } else { None };
                    if let Some(progress) = taken {
                        if let Some(config) = progress.full_config {
                            vm.config = config;
                        }
                        if let Some(target) = progress.target {
                            vm.node = target;
                        }
                        // Joining the pool is the worker's last step.
                        vm.pool = progress.pool;
                        if !progress.unlocked {
                            // A lock that outlives the task (`Fault::LockAfterClone`).
                            vm.lock_until = Some(progress.unlock_at);
                        }
                    }
                }
            }
            Effect::Started { vmid, boot_time } if ok => {
                let ends = self.tasks[index].ends;
                if let Some(vm) = self.vms.get_mut(&vmid) {
                    vm.running = true;
                    vm.started_at = Some(ends);
                    vm.agent_ready_at = Some(ends + boot_time);
                    if !vm.booted_once && has_cloud_init_drive(&vm.config) {
                        vm.cloud_init = Some(CloudInitRun {
                            keys: vm
                                .config
                                .get("sshkeys")
                                .map(|value| decode_sshkeys(value))
                                .unwrap_or_default(),
                            written: false,
                        });
                    }
                    vm.booted_once = true;
                }
            }
            Effect::Stopped { vmid } if ok => {
                if let Some(vm) = self.vms.get_mut(&vmid) {
                    vm.running = false;
                    vm.started_at = None;
                    vm.agent_ready_at = None;
                }
            }
            Effect::Destroyed { vmid } => {
                if ok {
                    self.vms.remove(&vmid);
                    self.release_identity(vmid);
                } else if let Some(vm) = self.vms.get_mut(&vmid) {
                    vm.destroying = false;
                }
            }
            Effect::Created { vmid } => {
                if ok {
                    if let Some(vm) = self.vms.get_mut(&vmid) {
                        if vm.lock.as_deref() == Some("create") {
                            vm.lock = None;
                        }
                    }
                } else {
                    // qemu-server unlinks the config of a VM whose creation failed.
                    self.vms.remove(&vmid);
                }
            }
            Effect::Templated { vmid } if ok => {
                if let Some(vm) = self.vms.get_mut(&vmid) {
                    vm.config.insert("template".into(), "1".into());
                    // template_create renames every disk to a base volume, which linked clones
                    // then build on (`vm-N-disk-0` -> `base-N-disk-0`).
                    let own = format!("vm-{vmid}-disk");
                    let base = format!("base-{vmid}-disk");
                    for value in vm.config.values_mut() {
                        if value.contains(&own) && !value.contains("media=cdrom") {
                            *value = value.replace(&own, &base);
                        }
                    }
                }
            }
            Effect::Started { .. } | Effect::Stopped { .. } | Effect::Templated { .. } => {}
        }
    }

    /// The identity VM `vmid`'s agent shows, taking a spare the first time. The keys cloud-init
    /// applied at first boot are in the guest's authorized_keys before its agent first answers
    /// (so before anyone can have learned its address).
    pub fn identity_of(&mut self, vmid: u32) -> Identity {
        let identity = self.resolve_identity(vmid);
        let file = match &identity {
            Identity::Shared => self.shared_authorized_keys.clone(),
            Identity::Own(own) => own.authorized_keys.clone(),
            Identity::Waiting => return identity,
        };
        if let Some(vm) = self.vms.get_mut(&vmid) {
            if let Some(run) = vm.cloud_init.as_mut().filter(|run| !run.written) {
                run.written = true;
                if let Some(file) = file {
                    append_keys(&file, &run.keys);
                }
            }
        }
        identity
    }

    fn resolve_identity(&mut self, vmid: u32) -> Identity {
        let Some(identities) = self.identities.as_mut() else {
            return Identity::Shared;
        };
        if let Some(identity) = identities.assigned.get(&vmid) {
            return Identity::Own(identity.clone());
        }
        if identities.spares.is_empty() {
            let _ = identities.events.send(super::GuestEvent::Wanted);
            return Identity::Waiting;
        }
        let identity = identities.spares.remove(0);
        identities.assigned.insert(vmid, identity.clone());
        let _ = identities.events.send(super::GuestEvent::Taken);
        Identity::Own(identity)
    }

    fn release_identity(&mut self, vmid: u32) {
        if let Some(identities) = self.identities.as_mut() {
            if let Some(identity) = identities.assigned.remove(&vmid) {
                let _ = identities
                    .events
                    .send(super::GuestEvent::Released(identity));
            }
        }
    }

    /// Whether the API token may see this VM: always with an ACL on `/`, only for pool
    /// members with pool-scoped ACLs.
    pub fn token_sees(&self, vm: &Vm) -> bool {
        match &self.config.token_pool {
            None => true,
            Some(pool) => vm.pool.as_deref() == Some(pool.as_str()),
        }
    }

    /// Creates a task on the main node and returns its UPID.
    pub fn spawn_task(&mut self, spec: TaskSpec) -> String {
        let now = Instant::now();
        let node = spec.node;
        let pid = self.next_pid;
        self.next_pid += 1 + rand::random::<u8>() as u32 % 7;
        let pstart = 0x0100_0000 + (pid.wrapping_mul(2654435761) % 0x00ff_ffff);
        let starttime = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let user = self.caller_user();
        let upid = format!(
            "UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{}:{}:{user}:",
            spec.kind, spec.id
        );
        let kind = spec.kind;
        let injected = self
            .take_counted(|f| matches!(f, Fault::TaskFails { kind: k, .. } if k == kind))
            .and_then(|fault| match fault {
                Fault::TaskFails { message, .. } => Some(message),
                _ => None,
            })
            .or_else(|| {
                self.faults_for_caller()
                    .iter()
                    .find_map(|fault| match fault {
                        Fault::TaskFailsUntil {
                            kind: k,
                            until,
                            message,
                        } if k == kind && *until > now => Some(message.clone()),
                        _ => None,
                    })
            });
        let exitstatus = match spec.error.or(injected) {
            Some(error) => error,
            None => match self.take_counted(|f| matches!(f, Fault::TaskWarnings { .. })) {
                Some(_) => "WARNINGS: 1".to_string(),
                None => "OK".to_string(),
            },
        };
        let mut log = spec.log;
        if exitstatus.starts_with("WARNINGS") {
            log.push("WARN: simulated warning from the fake Proxmox".into());
        }
        log.push(if is_task_error(&exitstatus) {
            format!("TASK ERROR: {exitstatus}")
        } else if exitstatus == "OK" {
            "TASK OK".to_string()
        } else {
            format!("TASK {exitstatus}")
        });
        self.simulated_time += spec.duration;
        self.tasks.push(Task {
            upid: upid.clone(),
            node,
            pid,
            pstart,
            starttime,
            kind: spec.kind,
            id: spec.id,
            user,
            ends: now + spec.duration,
            exitstatus,
            effect: spec.effect,
            done: false,
            log,
        });
        upid
    }

    pub fn running_clones(&self) -> usize {
        self.tasks
            .iter()
            .filter(|t| t.kind == "qmclone" && t.running())
            .count()
    }

    /// Running clone tasks that will succeed (the ones holding storage locks).
    pub fn running_good_clones(&self) -> usize {
        self.tasks
            .iter()
            .filter(|t| t.kind == "qmclone" && t.running() && !is_task_error(&t.exitstatus))
            .count()
    }

    /// Consumes one use of the first counted fault matching `select`; returns a copy of it.
    /// None for the co-tenant's requests: faults are aimed at the driver.
    pub fn take_counted(&mut self, select: impl Fn(&Fault) -> bool) -> Option<Fault> {
        if self.caller == Caller::CoTenant {
            return None;
        }
        let index = self
            .faults
            .iter()
            .position(|fault| select(fault) && counted_remaining(fault) > 0)?;
        let taken = self.faults[index].clone();
        if let Some(count) = counted_mut(&mut self.faults[index]) {
            *count -= 1;
            if *count == 0 {
                self.faults.remove(index);
            }
        }
        Some(taken)
    }

    pub fn has_fault(&self, select: impl Fn(&Fault) -> bool) -> bool {
        self.faults_for_caller().iter().any(select)
    }

    pub fn next_exec_pid(&mut self) -> u32 {
        self.next_exec_pid += 1;
        self.next_exec_pid
    }

    pub fn find_task(&self, upid: &str) -> Option<&Task> {
        self.tasks.iter().find(|t| t.upid == upid)
    }
}

fn counted_remaining(fault: &Fault) -> u32 {
    match fault {
        Fault::CloneTaskFails { count, .. }
        | Fault::CloneRequestFails { count, .. }
        | Fault::HttpErrors { count, .. }
        | Fault::StartTaskFails { count, .. }
        | Fault::TaskWarnings { count }
        | Fault::TaskFails { count, .. }
        | Fault::CloneAnswerLost { count }
        | Fault::NodeDownAfterCloneRequest { count, .. } => *count,
        _ => 0,
    }
}

fn counted_mut(fault: &mut Fault) -> Option<&mut u32> {
    match fault {
        Fault::CloneTaskFails { count, .. }
        | Fault::CloneRequestFails { count, .. }
        | Fault::HttpErrors { count, .. }
        | Fault::StartTaskFails { count, .. }
        | Fault::TaskWarnings { count }
        | Fault::TaskFails { count, .. }
        | Fault::CloneAnswerLost { count }
        | Fault::NodeDownAfterCloneRequest { count, .. } => Some(count),
        _ => None,
    }
}

pub(crate) fn is_task_error(exitstatus: &str) -> bool {
    exitstatus != "OK" && !exitstatus.starts_with("WARNINGS: ")
}

/// A random MAC from Proxmox's own OUI range, as PVE generates for new NICs.
pub(crate) fn random_mac() -> String {
    let bytes: [u8; 3] = rand::random();
    format!(
        "BC:24:11:{:02X}:{:02X}:{:02X}",
        bytes[0], bytes[1], bytes[2]
    )
}

fn base_config(name: &str) -> BTreeMap<String, String> {
    let entries = [
        ("name", name.to_string()),
        ("cores", "2".to_string()),
        ("sockets", "1".to_string()),
        ("memory", "2048".to_string()),
        ("agent", "1".to_string()),
        ("ostype", "l26".to_string()),
        ("scsihw", "virtio-scsi-single".to_string()),
        ("boot", "order=scsi0;ide2;net0".to_string()),
        ("net0", format!("virtio={},bridge=vmbr0", random_mac())),
        ("ipconfig0", "ip=dhcp".to_string()),
        ("ciuser", "ci".to_string()),
        ("serial0", "socket".to_string()),
        ("vga", "serial0".to_string()),
        (
            "smbios1",
            format!("uuid={}", pseudo_uuid(rand::random::<u128>())),
        ),
        ("vmgenid", pseudo_uuid(rand::random::<u128>())),
    ];
    entries
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect()
}

pub(crate) fn pseudo_uuid(bits: u128) -> String {
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// cloud-init's `ssh_authorized_keys`: appended to the user's file, which sshd reads at every
/// login.
fn append_keys(file: &std::path::Path, keys: &[String]) {
    use std::io::Write;
    let opened = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(file);
    match opened {
        Ok(mut out) => {
            for key in keys {
                let _ = writeln!(out, "{key}");
            }
        }
        Err(err) => eprintln!("fake cloud-init: cannot write {}: {err}", file.display()),
    }
}
