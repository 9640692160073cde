//! From a template to a started VM of ours: a free VMID, the clone (retried into fresh VMIDs
//! on clashes and load), tags, cores, memory and disk, start. Every milestone goes to the
//! caller's [`Sink`] before the engine goes on, so that the caller can always find (and remove)
//! what was created.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;

use super::placement::Strategy;
use super::ssh_key::{self, KeyPath};
use super::template::Template;
use super::{clone_slots, task, teardown, Milestone, Sink, SinkLog, VmRef};
use crate::config::{CloneMode, Settings};
use crate::error::{Error, Result};
use crate::joblog;
use crate::marker::{ClaimReport, Marker};
use crate::proxmox::{ApiError, ApiErrorKind, Client, CloneRequest};

/// Random VMIDs checked with `nextid?vmid=` per allocation before giving up.
const MAX_VMID_PICKS: usize = 32;
/// Clone attempts (each into a fresh VMID) before giving up. With the pauses between them
/// (jittered, doubling up to `MAX_CLONE_PAUSE`) that rides out a few minutes of clone storms.
const MAX_CLONE_ATTEMPTS: usize = 12;
const MAX_CLONE_PAUSE: Duration = Duration::from_secs(20);
/// A full clone of a large disk can take this long.
const CLONE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// start and resize tasks.
const TASK_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Removing the half-made VM a failed clone task left.
const LEFTOVER_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// What to create: a VM named `name` on `node`, carrying `marker`, cloned from `template` (on
/// the template's node; with `target` when `node` is another one).
#[derive(Debug, Clone, Copy)]
pub struct Order<'a> {
    pub template: &'a Template,
    pub node: &'a str,
    pub mode: CloneMode,
    pub name: &'a str,
    pub marker: &'a Marker,
    /// A job VM cloned after its prepare looked for a warm VM: what it found, written (sealed
    /// for this VM) on the second line of the description for the pool's metrics.
    pub claim: Option<&'a ClaimReport>,
    /// `Some(nonce)`: the VM gets its own SSH key (derived from the fleet key, its VMID and this
    /// driver-made nonce) when its template's cloud-init would install it; `None`: it keeps
    /// the static key (a job's own key, or no fleet key).
    pub key_nonce: Option<&'a str>,
}

/// A started VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    pub vm: VmRef,
    /// net0's MAC (new for the clone): which guest interface is the VM's.
    pub net0_mac: Option<String>,
    /// The SSH key it accepts.
    pub key: KeyPath,
}

enum CloneAttempt {
    Done,
    /// The VMID turned out to be taken: try another at once.
    Clash(String),
    /// Worth another try after a pause.
    Transient(ApiError),
}

/// Clones, configures and starts a VM for `order`. Reports `Allocated` before every clone
/// request; on failure the VM named by the last `Allocated` (not `Released`) may exist.
pub async fn provision(
    client: &Client,
    settings: &Settings,
    order: &Order<'_>,
    sink: &mut dyn Sink,
) -> Result<Provisioned> {
    let mut run = Provisioning {
        client,
        settings,
        order,
        node: order.node,
        tried_vmids: HashSet::new(),
        sent_at: None,
    };
    sink.step("cloning the template");
    let vmid = run.clone_into_new_vm(sink).await?;
    let vm = VmRef {
        node: run.node.to_string(),
        vmid,
    };
    sink.step("configuring the VM");
    let (net0_mac, key) = run.configure(&vm, sink).await?;
    sink.step("starting the VM");
    run.start(vmid, sink).await?;
    Ok(Provisioned { vm, net0_mac, key })
}

struct Provisioning<'a> {
    client: &'a Client,
    settings: &'a Settings,
    order: &'a Order<'a>,
    node: &'a str,
    tried_vmids: HashSet<u32>,
    /// When the current clone request left (Unix seconds).
    sent_at: Option<u64>,
}

impl Provisioning<'_> {
    /// A random VMID in the range that `nextid?vmid=` says is free.
    async fn pick_free_vmid(&mut self) -> Result<u32> {
        let (low, high) = self.settings.vmid_range;
        let size = (high - low) as usize + 1;
        let candidates: Vec<u32> = {
            let mut rng = rand::rng();
            let amount = size.min(MAX_VMID_PICKS * 2);
            rand::seq::index::sample(&mut rng, size, amount)
                .into_iter()
                .map(|index| low + index as u32)
                .filter(|vmid| !self.tried_vmids.contains(vmid))
                .take(MAX_VMID_PICKS)
                .collect()
        };
        for vmid in candidates {
            self.tried_vmids.insert(vmid);
            let free =
                self.client.vmid_is_free(vmid).await.map_err(|err| {
                    Error::api(format!("checking whether VMID {vmid} is free"), err)
                })?;
            if free {
                return Ok(vmid);
            }
        }
        Err(Error::Infrastructure(format!(
            "no free VMID found in PROXMOX_VMID_RANGE {low}-{high} after {} tries; widen the \
             range or remove stale VMs (gitlab-proxmox-runner gc)",
            self.tried_vmids.len()
        )))
    }

    async fn clone_into_new_vm(&mut self, sink: &mut dyn Sink) -> Result<u32> {
        let started = Instant::now();
        let template = self.order.template;
        let full = self.order.mode == CloneMode::Full;
        let mode = if full { "full" } else { "linked" };
        let mut pauses = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(MAX_CLONE_PAUSE)
            .with_max_times(MAX_CLONE_ATTEMPTS)
            .with_jitter()
            .build();
        if !full && self.settings.clone.storage.is_some() {
            sink.warn(
                "PROXMOX_STORAGE applies to full clones only; ignored for this linked clone \
                 (set PROXMOX_CLONE=full to use it)",
            );
        }
        let mut last_problem = String::new();
        for _ in 0..MAX_CLONE_ATTEMPTS {
            // Held from the VMID check until the clone task ends; released before any pause.
            let slot = clone_slots::acquire(self.settings, &SinkLog(sink)).await?;
            let vmid = self.pick_free_vmid().await?;
            // Recorded before the clone request: whatever happens next, the caller can find it.
            sink.reached(Milestone::Allocated(&VmRef {
                node: self.node.to_string(),
                vmid,
            }))?;
            self.sent_at = Some(crate::joblog::now_epoch());
            let attempt = self.try_clone(vmid, full, sink).await?;
            drop(slot);
            match attempt {
                CloneAttempt::Done => {
                    sink.reached(Milestone::Cloned)?;
                    sink.timing("clone", started.elapsed());
                    sink.info(&format!(
                        "cloned template {} → VM {vmid} ({mode}) in {}",
                        template.label,
                        joblog::secs(started.elapsed())
                    ));
                    return Ok(vmid);
                }
                CloneAttempt::Clash(reason) => {
                    sink.info(&format!(
                        "VMID {vmid} was taken meanwhile ({reason}); trying another"
                    ));
                    last_problem = reason;
                }
                CloneAttempt::Transient(err) => {
                    let pause = pauses.next().unwrap_or(Duration::from_secs(1));
                    sink.info(&format!(
                        "clone into VM {vmid} failed ({err}); trying again with another VMID in {}",
                        joblog::secs(pause)
                    ));
                    last_problem = err.to_string();
                    tokio::time::sleep(pause).await;
                }
            }
            // Nothing of ours is left at that VMID (try_clone made sure): forget it.
            sink.reached(Milestone::Released)?;
        }
        Err(Error::Proxmox {
            context: format!(
                "cloning template {} on node {} for node {}",
                template.label, template.node, self.node
            ),
            message: format!(
                "gave up after {MAX_CLONE_ATTEMPTS} attempts; the last one failed with: \
                 {last_problem}"
            ),
        })
    }

    async fn try_clone(&self, vmid: u32, full: bool, sink: &mut dyn Sink) -> Result<CloneAttempt> {
        let template = self.order.template;
        let node = self.node;
        let context = || {
            format!(
                "cloning template {} into VM {vmid} on node {node}",
                template.label
            )
        };
        let request = CloneRequest {
            newid: vmid,
            name: self.order.name.to_string(),
            description: self.clone_description(vmid),
            full,
            storage: self.settings.clone.storage.clone(),
            pool: self.settings.clone.pool.clone(),
            target: (node != template.node).then(|| node.to_string()),
        };
        let upid = match self
            .client
            .clone_vm(&template.node, template.vmid, &request)
            .await
        {
            Ok(upid) => upid,
            Err(err) if err.is_clash_on(vmid) => return Ok(CloneAttempt::Clash(err.message)),
            // The template is locked for a moment (a backup, another job's clone start).
            Err(err) if err.is_vm_locked() => return Ok(CloneAttempt::Transient(err)),
            // With other nodes to go to, waiting for this one is slower than moving on.
            Err(err) if err.is_node_failure() && Strategy::of(self.settings).may_fail_over() => {
                return Err(Error::api(context(), err))
            }
            Err(err) if err.kind == ApiErrorKind::Transport => {
                // The request may have reached PVE, whose worker writes the VM a moment later:
                // once no clone that could be ours runs, a VM with our marker is ours.
                return if self.adopt_if_ours(vmid, sink).await? {
                    Ok(CloneAttempt::Done)
                } else {
                    Ok(CloneAttempt::Transient(err))
                };
            }
            Err(err) if err.is_transient() => return Ok(CloneAttempt::Transient(err)),
            Err(err) => return Err(Error::api(context(), err)),
        };
        sink.reached(Milestone::CloneStarted(&upid))?;
        match task::finish(
            self.client,
            &upid,
            Instant::now() + CLONE_TIMEOUT,
            &SinkLog(sink),
        )
        .await
        {
            Ok(()) => {
                // PVE may hold `lock: clone` a moment after the task ends; config and start
                // would be refused until it clears.
                teardown::wait_unlocked(
                    self.client,
                    node,
                    vmid,
                    Instant::now() + TASK_TIMEOUT,
                    &SinkLog(sink),
                )
                .await?;
                Ok(CloneAttempt::Done)
            }
            Err(err) if err.kind == ApiErrorKind::Task => {
                // The task failed, and PVE removed what it had made. Make sure, unless the VMID
                // belongs to another job's clone in flight (our worker never got its lock).
                if !err.is_clash_on(vmid) {
                    self.remove_leftover(vmid, sink).await?;
                }
                if err.is_clash_on(vmid) {
                    Ok(CloneAttempt::Clash(err.message))
                } else if err.is_transient() {
                    Ok(CloneAttempt::Transient(err))
                } else {
                    Err(Error::api(context(), err))
                }
            }
            // Lost track of the task (timeout, API gone): the caller's rollback takes it from
            // here.
            Err(err) => Err(Error::api(context(), err)),
        }
    }

    async fn adopt_if_ours(&self, vmid: u32, sink: &mut dyn Sink) -> Result<bool> {
        let node = self.node;
        let trace = super::clone_watch::CloneTrace {
            vm: VmRef {
                node: node.to_string(),
                vmid,
            },
            template: Some(self.order.template.vmid),
            template_node: Some(self.order.template.node.clone()),
            sent_at: self.sent_at,
            upid: None,
        };
        super::clone_watch::wait_clone_settled(
            self.client,
            &trace,
            Instant::now() + CLONE_TIMEOUT,
            &SinkLog(sink),
        )
        .await?;
        let unlocked = teardown::wait_unlocked(
            self.client,
            node,
            vmid,
            Instant::now() + CLONE_TIMEOUT,
            &SinkLog(sink),
        )
        .await?;
        if !unlocked {
            return Ok(false);
        }
        let config = self
            .client
            .vm_config(node, vmid)
            .await
            .map_err(|err| Error::api(format!("reading VM {vmid} on node {node}"), err))?;
        let marker = config
            .and_then(|config| config.description())
            .and_then(|description| Marker::find_in(&description));
        let ours = self.order.marker;
        Ok(marker.is_some_and(|found| found.version == ours.version && found.nonce == ours.nonce))
    }

    /// The description the clone carries: the order's marker, sealed for this VM when it is a
    /// warm VM's (the pool counts and recycles only warm VMs whose MAC verifies, its own
    /// warm-ups in flight included).
    fn clone_description(&self, vmid: u32) -> String {
        let marker = self.order.marker;
        match (&marker.warm, &self.settings.fleet_key) {
            (Some(_), Some(key)) => {
                let mut sealed = marker.clone();
                let vm = VmRef {
                    node: self.node.to_string(),
                    vmid,
                };
                sealed.seal(key, &vm, &[]);
                sealed.description()
            }
            (None, key) => match (self.order.claim, key) {
                (Some(report), Some(key)) => {
                    let mut report = report.clone();
                    let vm = VmRef {
                        node: self.node.to_string(),
                        vmid,
                    };
                    report.seal(key, &vm, marker);
                    marker.description_with_report(&report)
                }
                _ => marker.description(),
            },
            _ => marker.description(),
        }
    }

    async fn remove_leftover(&self, vmid: u32, sink: &mut dyn Sink) -> Result<()> {
        let deadline = Instant::now() + LEFTOVER_TIMEOUT;
        teardown::destroy_owned_vm(
            self.client,
            self.node,
            vmid,
            self.order.marker,
            deadline,
            &SinkLog(sink),
        )
        .await?;
        Ok(())
    }

    /// Tags, cores, memory, the VM's own SSH key (before its first start: cloud-init applies
    /// `sshkeys` at first boot only) and disk; returns net0's MAC (new for the clone) and the
    /// key the VM will accept.
    async fn configure(
        &self,
        vm: &VmRef,
        sink: &mut dyn Sink,
    ) -> Result<(Option<String>, KeyPath)> {
        let started = Instant::now();
        let settings = self.settings;
        let template = self.order.template;
        let (node, vmid) = (self.node, vm.vmid);
        let context = || format!("configuring VM {vmid} on node {node}");
        let read_config = || async {
            self.client
                .vm_config(node, vmid)
                .await
                .map_err(|err| Error::api(context(), err))?
                .ok_or_else(|| Error::proxmox(context(), "the VM vanished right after its clone"))
        };
        // Read first: the clone's own config (inherited from the template) says whether its
        // cloud-init would install a key, and setting the key goes with the other fields.
        let mut config = read_config().await?;
        // Overwrites the tags inherited from the template.
        let mut fields = vec![("tags", crate::VM_TAG.to_string())];
        if let Some(cores) = settings.clone.cores {
            fields.push(("cores", cores.to_string()));
        }
        if let Some(memory) = settings.clone.memory_mb {
            fields.push(("memory", memory.to_string()));
        }
        let key = self.key_path(vm, &config, sink);
        if let KeyPath::Derived { nonce, fleet } = &key {
            // Replaces what the template's cloud-init carried (the static key, if it did).
            let derived = ssh_key::derive(settings, vm, nonce, fleet.as_deref())?;
            fields.push(("sshkeys", derived.sshkeys_value()));
        }
        self.client
            .set_config(node, vmid, &fields)
            .await
            .map_err(|err| Error::api(context(), err))?;
        if let Some(grow) = settings.clone.disk_grow_gb.filter(|grow| *grow > 0) {
            let disk = config.boot_disk().ok_or_else(|| {
                Error::Settings(format!(
                    "VM_DISK_GROW_GB is set, but VM {vmid} (from template {}) has no boot disk to grow",
                    template.label
                ))
            })?;
            let grown = async {
                if let Some(upid) = self.client.grow_disk(node, vmid, &disk, grow).await? {
                    task::finish(
                        self.client,
                        &upid,
                        Instant::now() + TASK_TIMEOUT,
                        &SinkLog(sink),
                    )
                    .await?;
                }
                Ok::<(), ApiError>(())
            };
            grown
                .await
                .map_err(|err| Error::api(format!("growing disk {disk} of VM {vmid}"), err))?;
            config = read_config().await?;
        }
        if config.agent_enabled() != Some(true) {
            return Err(Error::Settings(format!(
                "template {} has no QEMU guest agent configured, so the driver cannot learn the \
                 VM's address: run `qm set {} --agent enabled=1` and install qemu-guest-agent \
                 in the template",
                template.label, template.vmid
            )));
        }
        sink.timing("configure", started.elapsed());
        Ok((config.net0_mac(), key))
    }

    /// The derived key when the order asks for one and the clone's cloud-init would install
    /// it; else the static key.
    fn key_path(&self, vm: &VmRef, config: &crate::proxmox::VmConfig, sink: &dyn Sink) -> KeyPath {
        let template = &self.order.template.label;
        let chosen = ssh_key::choose(self.settings, template, config, self.order.key_nonce);
        // No key would open it: said here, where the reason is known; connecting fails later
        // (prepare refuses such a template before it clones, the engine's other callers
        // may have no use for SSH).
        let (path, why_static) = chosen.unwrap_or_else(|err| {
            sink.warn(&err.to_string());
            (KeyPath::Static, None)
        });
        match (&path, why_static) {
            (KeyPath::Derived { .. }, _) => sink.info(&format!(
                "VM {}: a per-VM SSH key through cloud-init (template {template})",
                vm.vmid
            )),
            (KeyPath::Static, Some(why)) => sink.info(&format!(
                "VM {}: the static key VM_SSH_PRIVATE_KEY (template {template}: {why})",
                vm.vmid
            )),
            (KeyPath::Static, None) => {}
        }
        path
    }

    async fn start(&self, vmid: u32, sink: &mut dyn Sink) -> Result<()> {
        let started = Instant::now();
        let node = self.node;
        let result = match self.client.start_vm(node, vmid).await {
            Ok(upid) => {
                task::finish(
                    self.client,
                    &upid,
                    Instant::now() + TASK_TIMEOUT,
                    &SinkLog(sink),
                )
                .await
            }
            Err(err) => Err(err),
        };
        match result {
            Ok(()) => {}
            Err(err) if err.is_already_running() => {}
            Err(err) => {
                return Err(Error::api(
                    format!("starting VM {vmid} on node {node}"),
                    err,
                ))
            }
        }
        sink.reached(Milestone::Started)?;
        sink.timing("start", started.elapsed());
        sink.info(&format!(
            "started VM {vmid} in {}",
            joblog::secs(started.elapsed())
        ));
        Ok(())
    }
}
