//! prepare_exec: resolve the template, pick a free VMID, record the job state, clone, configure,
//! start, wait for the guest agent's address and for SSH, install the runner helper. On any
//! failure (or SIGTERM) destroy what was created, exactly as cleanup would, and fail with the
//! right exit code.

use std::cell::Cell;
use std::collections::HashSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;

use crate::clone_slots;
use crate::commands::Context;
use crate::error::{Error, Result};
use crate::job::JobInfo;
use crate::joblog;
use crate::marker::Marker;
use crate::proxmox::address::{choose_address, preferred_address, IPV4_GRACE};
use crate::proxmox::{ApiError, ApiErrorKind, Client, CloneRequest};
use crate::settings::{AllowedTemplates, CloneMode, HostKeyPolicy, Settings};
use crate::ssh::{self, HostKeyCheck, Target};
use crate::state::{JobState, Phase};
use crate::teardown::{self, Teardown};

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
/// Removing what a failed prepare created (waits for a clone lock included).
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// The same after SIGTERM: gitlab-runner sends SIGKILL `graceful_kill_timeout` later (the
/// README recommends 30 s). What rollback cannot finish in time stays in the job state for
/// cleanup, which the runner runs next.
const CANCELLED_ROLLBACK_TIMEOUT: Duration = Duration::from_secs(20);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How long SSH is tried at an IPv6 address before the agent is asked for IPv4 again.
const IPV6_CONNECT_SLICE: Duration = Duration::from_secs(10);
/// The least time the runner helper install gets, even when the boot used up VM_BOOT_TIMEOUT.
const MIN_HELPER_INSTALL_TIME: Duration = Duration::from_secs(60);
/// Times prepare re-reads the host keys through the agent after a mismatch.
const MAX_HOST_KEY_REREADS: u32 = 3;
/// The guest's SSH host keys, in order of preference.
const HOST_KEY_FILES: [&str; 3] = [
    "/etc/ssh/ssh_host_ed25519_key.pub",
    "/etc/ssh/ssh_host_ecdsa_key.pub",
    "/etc/ssh/ssh_host_rsa_key.pub",
];

pub async fn prepare(context: &Context) -> Result<()> {
    let settings = &context.settings;
    for warning in &settings.trust_warnings {
        joblog::warn(warning);
    }
    super::config::require_ssh_key(settings)?;
    let client = Client::new(settings)?;
    remove_earlier_attempt(&client, context).await?;

    let step = Cell::new("starting");
    let mut run = Provisioning {
        context,
        client: &client,
        marker: Marker::for_job(&context.job, &settings.runner_id, settings.max_job_timeout),
        vm_name: vm_name(&context.job),
        state: None,
        timings: Vec::new(),
        tried_vmids: HashSet::new(),
    };
    let result = tokio::select! {
        result = run.provision(&step) => result,
        reason = context.cancel.cancelled() => Err(Error::Cancelled(format!(
            "prepare was cancelled ({reason}) while {}", step.get()
        ))),
    };
    if let Err(err) = result {
        if let Some(state) = run.state.take() {
            joblog::info(format!(
                "prepare failed while {}; removing VM {} on {}",
                step.get(),
                state.vmid,
                state.node
            ));
            rollback(&client, context, &state, &run.marker).await;
        }
        return Err(err);
    }
    Ok(())
}

/// gitlab-runner retries a failed prepare in the same job directory, running cleanup in
/// between; if that cleanup could not finish, the earlier attempt's VM is still named by the
/// state. Remove it before the state is overwritten, or nothing would ever find it again.
async fn remove_earlier_attempt(client: &Client, context: &Context) -> Result<()> {
    let Some(earlier) = JobState::load(&context.job_dir)? else {
        return Ok(());
    };
    joblog::info(format!(
        "an earlier prepare attempt of this job left VM {} on {}; removing it first",
        earlier.vmid, earlier.node
    ));
    match Marker::parse_line(&earlier.marker) {
        Some(marker) => {
            let deadline = Instant::now() + ROLLBACK_TIMEOUT;
            let outcome = teardown::destroy_job_vm(client, &earlier, &marker, deadline).await?;
            if let Teardown::NotOurs(reason) = outcome {
                joblog::warn(format!(
                    "VM {} on {} is not the one the earlier attempt created ({reason}); left it \
                     alone",
                    earlier.vmid, earlier.node
                ));
            }
        }
        None => joblog::warn(format!(
            "the earlier attempt's job state has a damaged ownership marker, so VM {} on {} \
             cannot be proven to be this job's; left for gitlab-proxmox-runner gc",
            earlier.vmid, earlier.node
        )),
    }
    JobState::remove(&context.job_dir)
}

/// Destroys what prepare created, with cleanup's logic. Never fails: if it cannot finish, the
/// job state stays for cleanup (which the runner runs after every failed prepare).
async fn rollback(client: &Client, context: &Context, state: &JobState, marker: &Marker) {
    let budget = if context.cancel.is_cancelled() {
        CANCELLED_ROLLBACK_TIMEOUT
    } else {
        ROLLBACK_TIMEOUT
    };
    let deadline = Instant::now() + budget;
    match teardown::destroy_job_vm(client, state, marker, deadline).await {
        Ok(outcome) => {
            if let Teardown::NotOurs(reason) = outcome {
                joblog::warn(format!(
                    "VM {} on {} is not the VM this job created ({reason}); left it alone",
                    state.vmid, state.node
                ));
            }
            if let Err(err) = JobState::remove(&context.job_dir) {
                joblog::warn(err.to_string());
            }
        }
        Err(err) => joblog::warn(format!(
            "could not remove VM {} on {} after the failure ({err}); cleanup will try again",
            state.vmid, state.node
        )),
    }
}

struct ResolvedTemplate {
    vmid: u32,
    /// `ubuntu-focal (60900)`.
    label: String,
    is_template: bool,
}

enum CloneAttempt {
    Done,
    /// The VMID turned out to be taken: try another at once.
    Clash(String),
    /// Worth another try after a pause.
    Transient(ApiError),
}

struct Provisioning<'a> {
    context: &'a Context,
    client: &'a Client,
    marker: Marker,
    vm_name: String,
    /// Set (and saved) before the clone request; `None` until then.
    state: Option<JobState>,
    timings: Vec<(&'static str, Duration)>,
    tried_vmids: HashSet<u32>,
}

impl Provisioning<'_> {
    fn settings(&self) -> &Settings {
        &self.context.settings
    }

    fn node(&self) -> &str {
        &self.context.settings.node
    }

    fn vmid(&self) -> u32 {
        self.state.as_ref().map_or(0, |state| state.vmid)
    }

    fn save_state(&self) -> Result<()> {
        match &self.state {
            Some(state) => state.save(&self.context.job_dir),
            None => Ok(()),
        }
    }

    fn set_phase(&mut self, phase: Phase) -> Result<()> {
        if let Some(state) = &mut self.state {
            state.phase = phase;
        }
        self.save_state()
    }

    async fn provision(&mut self, step: &Cell<&'static str>) -> Result<()> {
        let total = Instant::now();

        step.set("resolving the template");
        let started = Instant::now();
        let template = self.resolve_template().await?;
        let full = self.clone_mode(&template)? == CloneMode::Full;
        self.timings.push(("template", started.elapsed()));

        step.set("cloning the template");
        self.clone_into_new_vm(&template, full).await?;

        step.set("configuring the VM");
        let net0_mac = self.configure(&template).await?;

        step.set("starting the VM");
        self.start().await?;

        let deadline = Instant::now() + self.settings().boot_timeout;
        step.set("waiting for the guest agent and the VM's address");
        let ip = self.wait_for_address(net0_mac.as_deref(), deadline).await?;

        step.set("waiting for SSH");
        self.connect_ssh(ip, net0_mac.as_deref(), deadline).await?;

        let phases: Vec<String> = self
            .timings
            .iter()
            .map(|(name, took)| format!("{name} {}", joblog::secs(*took)))
            .collect();
        joblog::info(format!(
            "VM {} ({}) ready at {}:{} in {}: {}",
            self.vmid(),
            self.vm_name,
            ip,
            self.settings().ssh_port,
            joblog::secs(total.elapsed()),
            phases.join(", ")
        ));
        Ok(())
    }

    /// The template the job asked for, checked against what the admin allows.
    async fn resolve_template(&self) -> Result<ResolvedTemplate> {
        let settings = self.settings();
        let node = self.node();
        let wanted = settings.template.trim();
        let not_allowed = |why: String| {
            Error::JobRequest(format!(
                "{why}; allowed templates: {}. Set PROXMOX_TEMPLATE to one of them",
                allowed_templates_text(settings)
            ))
        };
        if let Some(&vmid) = settings.templates.get(wanted) {
            let status = self.client.vm_status(node, vmid).await.map_err(|err| {
                Error::proxmox(format!("reading template {wanted} (VMID {vmid})"), err)
            })?;
            let Some(status) = status else {
                return Err(Error::Settings(format!(
                    "PROXMOX_TEMPLATES maps {wanted} to VMID {vmid}, which does not exist on \
                     node {node}; fix the map or create the template"
                )));
            };
            // Only real templates, as for any other path: a map entry that names a running VM
            // (another job's included) would hand a job a full clone of that VM's disks.
            if !status.template {
                return Err(Error::Settings(format!(
                    "PROXMOX_TEMPLATES maps {wanted} to VMID {vmid}, which is not a template on \
                     node {node}; convert it (qm template {vmid}) or fix the map"
                )));
            }
            return Ok(ResolvedTemplate {
                vmid,
                label: format!("{wanted} ({vmid})"),
                is_template: true,
            });
        }
        let permitted = match &settings.allowed_templates {
            AllowedTemplates::MapOnly => false,
            AllowedTemplates::AnyOnNode => true,
            AllowedTemplates::Listed(list) => list.iter().any(|item| item == wanted),
        };
        if !permitted || wanted.is_empty() {
            return Err(not_allowed(format!("template {wanted:?} is not allowed")));
        }
        let vmid = match wanted.parse::<u32>() {
            Ok(vmid) => vmid,
            Err(_) => {
                let vms = self.client.cluster_vms().await.map_err(|err| {
                    Error::proxmox("listing the cluster's VMs to find the template", err)
                })?;
                // Container templates are listed too; only QEMU templates can be cloned here.
                let found = vms.iter().find(|vm| {
                    vm.template
                        && vm.node == node
                        && vm.name.as_deref() == Some(wanted)
                        && vm.kind.as_deref().is_none_or(|kind| kind == "qemu")
                });
                match found.and_then(|vm| u32::try_from(vm.vmid).ok()) {
                    Some(vmid) => vmid,
                    None => {
                        return Err(not_allowed(format!(
                            "there is no template VM named {wanted:?} on node {node}"
                        )))
                    }
                }
            }
        };
        let status = self.client.vm_status(node, vmid).await.map_err(|err| {
            Error::proxmox(format!("reading template {wanted} (VMID {vmid})"), err)
        })?;
        // Only real templates: a job must not clone an arbitrary VM (another job's included).
        match status {
            Some(status) if status.template => Ok(ResolvedTemplate {
                vmid,
                label: format!("{wanted} ({vmid})"),
                is_template: true,
            }),
            _ => Err(not_allowed(format!(
                "VM {wanted} is not a template on node {node}"
            ))),
        }
    }

    fn clone_mode(&self, template: &ResolvedTemplate) -> Result<CloneMode> {
        match self.settings().clone_mode {
            Some(CloneMode::Linked) if !template.is_template => Err(Error::Settings(format!(
                "PROXMOX_CLONE=linked needs a template, and VM {} is not one; convert it to a \
                 template or use PROXMOX_CLONE=full",
                template.label
            ))),
            Some(mode) => Ok(mode),
            None if template.is_template => Ok(CloneMode::Linked),
            None => Ok(CloneMode::Full),
        }
    }

    /// A random VMID in the range that `nextid?vmid=` says is free.
    async fn pick_free_vmid(&mut self) -> Result<u32> {
        let (low, high) = self.settings().vmid_range;
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
            let free = self.client.vmid_is_free(vmid).await.map_err(|err| {
                Error::proxmox(format!("checking whether VMID {vmid} is free"), err)
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

    async fn clone_into_new_vm(&mut self, template: &ResolvedTemplate, full: bool) -> Result<()> {
        let started = Instant::now();
        let mode = if full { "full" } else { "linked" };
        let mut pauses = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(MAX_CLONE_PAUSE)
            .with_max_times(MAX_CLONE_ATTEMPTS)
            .with_jitter()
            .build();
        if !full && self.settings().storage.is_some() {
            joblog::warn(
                "PROXMOX_STORAGE applies to full clones only; ignored for this linked clone \
                 (set PROXMOX_CLONE=full to use it)",
            );
        }
        let mut last_problem = String::new();
        for _ in 0..MAX_CLONE_ATTEMPTS {
            // Held from the VMID check until the clone task ends; released before any pause.
            let slot = clone_slots::acquire(self.settings()).await?;
            let vmid = self.pick_free_vmid().await?;
            // Saved before the clone request: whatever happens next, cleanup can find it.
            self.state = Some(JobState {
                node: self.node().to_string(),
                vmid,
                phase: Phase::Allocated,
                vm_name: self.vm_name.clone(),
                marker: self.marker.render(),
                template_vmid: Some(template.vmid),
                ip: None,
                ssh_port: None,
                ssh_user: None,
                host_keys: Vec::new(),
                host_key_source: None,
                // Saved as sent before it is: from here on, a VM may appear at this VMID.
                clone_sent_at: Some(crate::clone_watch::now_epoch()),
                clone_upid: None,
                lost: None,
            });
            self.save_state()?;
            let attempt = self.try_clone(template, vmid, full).await?;
            drop(slot);
            match attempt {
                CloneAttempt::Done => {
                    self.set_phase(Phase::Cloned)?;
                    self.timings.push(("clone", started.elapsed()));
                    joblog::info(format!(
                        "cloned template {} → VM {vmid} ({mode}) in {}",
                        template.label,
                        joblog::secs(started.elapsed())
                    ));
                    return Ok(());
                }
                CloneAttempt::Clash(reason) => {
                    joblog::info(format!(
                        "VMID {vmid} was taken meanwhile ({reason}); trying another"
                    ));
                    last_problem = reason;
                }
                CloneAttempt::Transient(err) => {
                    let pause = pauses.next().unwrap_or(Duration::from_secs(1));
                    joblog::info(format!(
                        "clone into VM {vmid} failed ({err}); trying again with another VMID in {}",
                        joblog::secs(pause)
                    ));
                    last_problem = err.to_string();
                    tokio::time::sleep(pause).await;
                }
            }
            // Nothing of ours is left at that VMID (try_clone made sure): forget it.
            self.state = None;
            JobState::remove(&self.context.job_dir)?;
        }
        Err(Error::Proxmox {
            context: format!(
                "cloning template {} on node {}",
                template.label,
                self.node()
            ),
            message: format!(
                "gave up after {MAX_CLONE_ATTEMPTS} attempts; the last one failed with: \
                 {last_problem}"
            ),
        })
    }

    async fn try_clone(
        &mut self,
        template: &ResolvedTemplate,
        vmid: u32,
        full: bool,
    ) -> Result<CloneAttempt> {
        let settings = self.context.settings.clone();
        let node = settings.node.as_str();
        let context = || {
            format!(
                "cloning template {} into VM {vmid} on node {node}",
                template.label
            )
        };
        let request = CloneRequest {
            newid: vmid,
            name: self.vm_name.clone(),
            description: self.marker.description(),
            full,
            storage: settings.storage.clone(),
            pool: settings.pool.clone(),
        };
        let upid = match self.client.clone_vm(node, template.vmid, &request).await {
            Ok(upid) => upid,
            Err(err) if err.is_clash_on(vmid) => return Ok(CloneAttempt::Clash(err.message)),
            // The template is locked for a moment (a backup, another job's clone start).
            Err(err) if err.is_vm_locked() => return Ok(CloneAttempt::Transient(err)),
            Err(err) if err.kind == ApiErrorKind::Transport => {
                // The request may have reached PVE, whose worker writes the VM a moment later:
                // once no clone that could be ours runs, a VM with our marker is ours.
                return if self.adopt_if_ours(vmid).await? {
                    Ok(CloneAttempt::Done)
                } else {
                    Ok(CloneAttempt::Transient(err))
                };
            }
            Err(err) if err.is_transient() => return Ok(CloneAttempt::Transient(err)),
            Err(err) => return Err(Error::proxmox(context(), err)),
        };
        if let Some(state) = &mut self.state {
            state.clone_upid = Some(upid.raw.clone());
        }
        self.save_state()?;
        match self
            .client
            .finish_task(&upid, Instant::now() + CLONE_TIMEOUT)
            .await
        {
            Ok(()) => {
                // PVE may hold `lock: clone` a moment after the task ends; config and start
                // would be refused until it clears.
                teardown::wait_unlocked(self.client, node, vmid, Instant::now() + TASK_TIMEOUT)
                    .await?;
                Ok(CloneAttempt::Done)
            }
            Err(err) if err.kind == ApiErrorKind::Task => {
                // The task failed, and PVE removed what it had made. Make sure, unless the VMID
                // belongs to another job's clone in flight (our worker never got its lock).
                if !err.is_clash_on(vmid) {
                    self.remove_leftover(vmid).await?;
                }
                if err.is_clash_on(vmid) {
                    Ok(CloneAttempt::Clash(err.message))
                } else if err.is_transient() {
                    Ok(CloneAttempt::Transient(err))
                } else {
                    Err(Error::proxmox(context(), err))
                }
            }
            // Lost track of the task (timeout, API gone): rollback and cleanup take it from here.
            Err(err) => Err(Error::proxmox(context(), err)),
        }
    }

    async fn adopt_if_ours(&self, vmid: u32) -> Result<bool> {
        let node = self.node();
        if let Some(state) = &self.state {
            let deadline = Instant::now() + CLONE_TIMEOUT;
            crate::clone_watch::wait_clone_settled(self.client, state, deadline).await?;
        }
        if !teardown::wait_unlocked(self.client, node, vmid, Instant::now() + CLONE_TIMEOUT).await?
        {
            return Ok(false);
        }
        let config = self
            .client
            .vm_config(node, vmid)
            .await
            .map_err(|err| Error::proxmox(format!("reading VM {vmid} on node {node}"), err))?;
        let marker = config
            .and_then(|config| config.description())
            .and_then(|description| Marker::find_in(&description));
        Ok(marker.as_ref() == Some(&self.marker))
    }

    async fn remove_leftover(&self, vmid: u32) -> Result<()> {
        let deadline = Instant::now() + ROLLBACK_TIMEOUT;
        teardown::destroy_owned_vm(self.client, self.node(), vmid, &self.marker, deadline).await?;
        Ok(())
    }

    /// Tags, cores, memory and disk; returns net0's MAC (new for the clone).
    async fn configure(&mut self, template: &ResolvedTemplate) -> Result<Option<String>> {
        let started = Instant::now();
        let settings = self.settings();
        let node = self.node().to_string();
        let vmid = self.vmid();
        let context = || format!("configuring VM {vmid} on node {node}");
        // Overwrites the tags inherited from the template.
        let mut fields = vec![("tags", crate::VM_TAG.to_string())];
        if let Some(cores) = settings.vm_cores {
            fields.push(("cores", cores.to_string()));
        }
        if let Some(memory) = settings.vm_memory_mb {
            fields.push(("memory", memory.to_string()));
        }
        self.client
            .set_config(&node, vmid, &fields)
            .await
            .map_err(|err| Error::proxmox(context(), err))?;
        let read_config = || async {
            self.client
                .vm_config(&node, vmid)
                .await
                .map_err(|err| Error::proxmox(context(), err))?
                .ok_or_else(|| Error::proxmox(context(), "the VM vanished right after its clone"))
        };
        let mut config = read_config().await?;
        if let Some(grow) = settings.vm_disk_grow_gb.filter(|grow| *grow > 0) {
            let disk = config.boot_disk().ok_or_else(|| {
                Error::Settings(format!(
                    "VM_DISK_GROW_GB is set, but VM {vmid} (from template {}) has no boot disk to grow",
                    template.label
                ))
            })?;
            let upid = self
                .client
                .grow_disk(&node, vmid, &disk, grow)
                .await
                .map_err(|err| Error::proxmox(format!("growing disk {disk} of VM {vmid}"), err))?;
            if let Some(upid) = upid {
                self.client
                    .finish_task(&upid, Instant::now() + TASK_TIMEOUT)
                    .await
                    .map_err(|err| {
                        Error::proxmox(format!("growing disk {disk} of VM {vmid}"), err)
                    })?;
            }
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
        self.timings.push(("configure", started.elapsed()));
        Ok(config.net0_mac())
    }

    async fn start(&mut self) -> Result<()> {
        let started = Instant::now();
        let node = self.node().to_string();
        let vmid = self.vmid();
        let context = || format!("starting VM {vmid} on node {node}");
        let result = match self.client.start_vm(&node, vmid).await {
            Ok(upid) => {
                self.client
                    .finish_task(&upid, Instant::now() + TASK_TIMEOUT)
                    .await
            }
            Err(err) => Err(err),
        };
        match result {
            Ok(()) => {}
            Err(err) if err.message.contains("already running") => {}
            Err(err) => return Err(Error::proxmox(context(), err)),
        }
        self.set_phase(Phase::Started)?;
        self.timings.push(("start", started.elapsed()));
        joblog::info(format!(
            "started VM {vmid} in {}",
            joblog::secs(started.elapsed())
        ));
        Ok(())
    }

    /// Polls the guest agent (at most 100 ms apart while the VM boots, see `next_poll_delay`)
    /// until it reports a usable address.
    async fn wait_for_address(
        &mut self,
        net0_mac: Option<&str>,
        deadline: Instant,
    ) -> Result<IpAddr> {
        let started = Instant::now();
        let node = self.node().to_string();
        let vmid = self.vmid();
        let cidrs = self.settings().network_cidrs.clone();
        let mut next_progress = started + PROGRESS_EVERY;
        let mut delay = crate::proxmox::client::MIN_POLL_DELAY;
        let mut last = String::new();
        // Since when the agent has offered an IPv6 address and nothing better.
        let mut only_ipv6_since: Option<Instant> = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let answer =
                tokio::time::timeout(remaining, self.client.agent_interfaces(&node, vmid)).await;
            match answer {
                Err(_) if last.is_empty() => last = "the guest agent did not answer in time".into(),
                Err(_) => {}
                Ok(Ok(answer)) => {
                    let v6_for = *only_ipv6_since.get_or_insert_with(Instant::now);
                    let grace_over = v6_for.elapsed() >= IPV4_GRACE
                        || deadline.saturating_duration_since(Instant::now()) <= IPV4_GRACE;
                    let chosen = choose_address(&answer.result, net0_mac, &cidrs);
                    if chosen.is_none_or(|ip| ip.is_ipv4()) {
                        only_ipv6_since = None;
                    }
                    if let Some(ip) =
                        preferred_address(&answer.result, net0_mac, &cidrs, grace_over)
                    {
                        self.timings.push(("agent+IP", started.elapsed()));
                        joblog::info(format!(
                            "guest agent up, IP {ip} after {}",
                            joblog::secs(started.elapsed())
                        ));
                        return Ok(ip);
                    }
                    last = if chosen.is_some() {
                        format!(
                            "only an IPv6 address so far; waiting up to {} for IPv4 (seen: {})",
                            joblog::secs(IPV4_GRACE),
                            seen_addresses(&answer.result)
                        )
                    } else {
                        format!(
                            "the guest agent reports no usable address yet (seen: {})",
                            seen_addresses(&answer.result)
                        )
                    };
                }
                Ok(Err(err)) if err.message.contains("No QEMU guest agent configured") => {
                    return Err(Error::Settings(format!(
                        "VM {vmid} has no QEMU guest agent configured; enable it on the \
                         template (qm set <template> --agent enabled=1)"
                    )))
                }
                Ok(Err(err)) if agent_not_ready(&err) || err.is_transient() => last = err.message,
                Ok(Err(err)) => {
                    return Err(Error::proxmox(
                        format!("asking the guest agent of VM {vmid} for its addresses"),
                        err,
                    ))
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Infrastructure(format!(
                    "VM {vmid} on {node} reported no usable IP address within VM_BOOT_TIMEOUT \
                     ({} s); last: {last}. Check that qemu-guest-agent starts in the template \
                     and that VM_NETWORK_CIDRS matches the VM's network",
                    self.settings().boot_timeout.as_secs()
                )));
            }
            if now >= next_progress {
                joblog::info(format!(
                    "still waiting for VM {vmid}'s address after {}: {last}",
                    joblog::secs(started.elapsed())
                ));
                next_progress = now + PROGRESS_EVERY;
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = crate::proxmox::client::next_poll_delay(delay, started.elapsed());
        }
    }

    /// The VM's SSH host keys, read through the guest agent (a channel that needs no trust in
    /// the network). Empty when none could be read.
    async fn read_host_keys(&self, deadline: Instant) -> HostKeyRead {
        let mut read = HostKeyRead::default();
        for file in HOST_KEY_FILES {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let answer = tokio::time::timeout(
                remaining,
                self.client.agent_file_read(self.node(), self.vmid(), file),
            )
            .await;
            match answer {
                Ok(Ok(answer)) => match parse_public_key_line(&answer.content) {
                    Some(key) => read.keys.push(key),
                    None => {
                        read.only_missing = false;
                        read.problems.push(format!("{file}: not a public key"));
                    }
                },
                Ok(Err(err)) => {
                    if !is_missing_file(&err) {
                        read.only_missing = false;
                    }
                    read.problems.push(format!("{file}: {}", err.message));
                }
                Err(_) => {
                    read.problems
                        .push(format!("{file}: the guest agent did not answer in time"));
                    break;
                }
            }
        }
        read
    }

    /// Reads the host keys through the agent until one exists or `deadline` passes: cloud-init
    /// generates them after networking is up, so the first read often finds none. A read the
    /// agent refuses for another reason (permissions, a blocked command) ends the wait at once.
    async fn wait_for_host_keys(&self, deadline: Instant) -> HostKeyRead {
        let started = Instant::now();
        let mut pause = Duration::from_millis(200);
        let mut announced = false;
        loop {
            let read = self.read_host_keys(deadline).await;
            let now = Instant::now();
            if !read.keys.is_empty() || !read.only_missing || now + pause >= deadline {
                if announced && !read.keys.is_empty() {
                    joblog::info(format!(
                        "VM {}'s SSH host keys appeared after {}",
                        self.vmid(),
                        joblog::secs(started.elapsed())
                    ));
                }
                return read;
            }
            if !announced {
                joblog::info(format!(
                    "VM {} has no SSH host key yet (cloud-init writes them after networking is \
                     up); reading again through the guest agent until VM_BOOT_TIMEOUT",
                    self.vmid()
                ));
                announced = true;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    async fn connect_ssh(
        &mut self,
        ip: IpAddr,
        net0_mac: Option<&str>,
        deadline: Instant,
    ) -> Result<()> {
        let started = Instant::now();
        let settings = self.context.settings.clone();
        let vmid = self.vmid();
        let HostKeyRead { keys, problems, .. } = self.wait_for_host_keys(deadline).await;
        let check = if !keys.is_empty() {
            HostKeyCheck::Pinned(keys)
        } else if settings.host_key_policy == HostKeyPolicy::Strict {
            return Err(Error::ssh(
                format!("reading VM {vmid}'s SSH host key through the guest agent"),
                format!(
                    "{} (VM_SSH_HOST_KEY_POLICY=strict accepts no other source); give the API \
                     token the guest-agent file-read permission",
                    problems.join("; ")
                ),
            ));
        } else {
            joblog::warn(format!(
                "could not read VM {vmid}'s SSH host key through the guest agent ({}); trusting \
                 the key it presents on first connection",
                problems.join("; ")
            ));
            HostKeyCheck::FirstUse
        };
        let key = ssh::load_private_key(&settings)?;
        let mut ip = ip;
        let mut target = Target {
            host: ip.to_string(),
            port: settings.ssh_port,
            user: settings.ssh_user.clone(),
            vm_label: format!("VM {vmid} on {}", self.node()),
        };
        let mut check = check;
        let mut rereads = 0;
        let connection = loop {
            // An IPv6 address may be unreachable from this runner host: try it for a while,
            // then ask the agent again (DHCPv4 may have finished meanwhile).
            let attempt_deadline = if ip.is_ipv6() {
                deadline.min(Instant::now() + IPV6_CONNECT_SLICE)
            } else {
                deadline
            };
            let waited = ssh::wait_until_ready(
                &target,
                key.clone(),
                &check,
                attempt_deadline,
                &self.context.cancel,
            )
            .await;
            if waited.is_err()
                && attempt_deadline < deadline
                && !matches!(waited, Err(Error::HostKeyMismatch { .. }))
            {
                if let Some(better) = self.requery_ipv4(net0_mac, deadline).await {
                    joblog::info(format!(
                        "VM {vmid} did not answer SSH at its IPv6 address {ip}; the guest agent \
                         now reports {better}, trying that"
                    ));
                    ip = better;
                    target.host = ip.to_string();
                }
                continue;
            }
            // cloud-init regenerates the host keys on first boot, and the guest agent can answer
            // before it has: the keys read a moment ago may be the template's. The agent is the
            // trusted channel, so when it now reports different keys, pin those and try again.
            let Err(Error::HostKeyMismatch { .. }) = &waited else {
                break waited?;
            };
            let HostKeyCheck::Pinned(pinned) = &check else {
                break waited?;
            };
            let fresh = self.read_host_keys(deadline).await.keys;
            if rereads >= MAX_HOST_KEY_REREADS || fresh.is_empty() || &fresh == pinned {
                break waited?;
            }
            rereads += 1;
            joblog::info(format!(
                "VM {vmid}'s SSH host keys changed since the guest agent first read them \
                 (regenerated at first boot); pinning the new ones"
            ));
            check = HostKeyCheck::Pinned(fresh);
        };
        let (host_keys, source) = match check {
            HostKeyCheck::Pinned(keys) => (keys, "guest-agent"),
            HostKeyCheck::FirstUse => (vec![connection.host_key()], "first-use"),
        };
        if let Some(state) = &mut self.state {
            state.ip = Some(ip.to_string());
            state.ssh_port = Some(target.port);
            state.ssh_user = Some(target.user.clone());
            state.host_keys = host_keys;
            state.host_key_source = Some(source.to_string());
            state.phase = Phase::Ready;
        }
        self.save_state()?;
        self.timings.push(("ssh", started.elapsed()));

        // Bounded like the boot: a VM that stops answering mid-install must not hold prepare
        // until prepare_exec_timeout (with a floor, so a slow boot leaves the install a chance).
        let helper = Instant::now();
        let budget = deadline
            .saturating_duration_since(helper)
            .max(MIN_HELPER_INSTALL_TIME);
        tokio::time::timeout(
            budget,
            ssh::provision_runner_helper(&connection, settings.runner_helper_path.as_deref()),
        )
        .await
        .map_err(|_| {
            Error::ssh(
                format!("installing gitlab-runner in VM {vmid}"),
                format!(
                    "not done after {} (VM_BOOT_TIMEOUT); the VM stopped answering or is \
                         very slow",
                    joblog::secs(budget)
                ),
            )
        })??;
        self.timings.push(("helper", helper.elapsed()));
        Ok(())
    }

    /// Asks the agent again for an IPv4 address (any family counts once it differs).
    async fn requery_ipv4(&self, net0_mac: Option<&str>, deadline: Instant) -> Option<IpAddr> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let answer = tokio::time::timeout(
            remaining,
            self.client.agent_interfaces(self.node(), self.vmid()),
        )
        .await
        .ok()?
        .ok()?;
        let cidrs = &self.settings().network_cidrs;
        choose_address(&answer.result, net0_mac, cidrs).filter(IpAddr::is_ipv4)
    }
}

/// What one pass over the host key files found.
#[derive(Debug)]
struct HostKeyRead {
    keys: Vec<String>,
    problems: Vec<String>,
    /// Every failure was a missing file: worth reading again later.
    only_missing: bool,
}

impl Default for HostKeyRead {
    fn default() -> Self {
        HostKeyRead {
            keys: Vec::new(),
            problems: Vec::new(),
            only_missing: true,
        }
    }
}

/// qemu-guest-agent's `failed to open file '...' (mode: 'r'): No such file or directory`.
fn is_missing_file(err: &ApiError) -> bool {
    let text = err.message.to_ascii_lowercase();
    text.contains("failed to open file") && text.contains("no such file or directory")
}

fn agent_not_ready(err: &ApiError) -> bool {
    let text = err.message.to_ascii_lowercase();
    text.contains("guest agent is not running")
        || text.contains("is not running")
        || text.contains("got timeout")
        || text.contains("qga")
}

fn seen_addresses(interfaces: &[crate::proxmox::types::AgentInterface]) -> String {
    let seen: Vec<String> = interfaces
        .iter()
        .flat_map(|iface| {
            iface
                .ip_addresses
                .iter()
                .map(move |addr| format!("{}={}", iface.name, addr.ip_address))
        })
        .collect();
    if seen.is_empty() {
        "none".into()
    } else {
        seen.join(", ")
    }
}

/// `ssh-ed25519 AAAA... comment` → `ssh-ed25519 AAAA...`; `None` for anything else.
pub fn parse_public_key_line(content: &str) -> Option<String> {
    let line = content
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))?;
    let mut fields = line.split_whitespace();
    let kind = fields.next()?;
    let blob = fields.next()?;
    let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-");
    let base64 = blob
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='));
    (known && base64 && blob.len() >= 16).then(|| format!("{kind} {blob}"))
}

/// The names a job may ask for, for error messages.
fn allowed_templates_text(settings: &Settings) -> String {
    let mut names: Vec<String> = settings.templates.keys().cloned().collect();
    match &settings.allowed_templates {
        AllowedTemplates::MapOnly => {}
        AllowedTemplates::Listed(list) => names.extend(list.iter().cloned()),
        AllowedTemplates::AnyOnNode => names.push(format!(
            "or any template VM on node {} by VMID or name",
            settings.node
        )),
    }
    names.join(", ")
}

/// `ci-<job id>-<project slug>`: a valid DNS name of at most 63 characters.
pub fn vm_name(job: &JobInfo) -> String {
    let mut name = String::from("ci");
    if let Some(id) = job.job_id {
        name.push('-');
        name.push_str(&id.to_string());
    }
    let slug = job
        .project_slug
        .as_deref()
        .map(dns_label)
        .unwrap_or_default();
    if !slug.is_empty() {
        name.push('-');
        name.push_str(&slug);
    }
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

/// Lower-case letters, digits and single hyphens, nothing else.
fn dns_label(text: &str) -> String {
    let mut label = String::with_capacity(text.len());
    for ch in text.chars() {
        let ch = ch.to_ascii_lowercase();
        if ch.is_ascii_alphanumeric() {
            label.push(ch);
        } else if !label.ends_with('-') && !label.is_empty() {
            label.push('-');
        }
    }
    label.trim_end_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: Option<u64>, slug: Option<&str>) -> JobInfo {
        JobInfo {
            job_id: id,
            project_slug: slug.map(String::from),
            ..Default::default()
        }
    }

    #[test]
    fn vm_names_are_dns_valid() {
        assert_eq!(
            vm_name(&job(Some(8123456), Some("group-project"))),
            "ci-8123456-group-project"
        );
        assert_eq!(
            vm_name(&job(Some(1), Some("My Group/Ünïcode__Project!"))),
            "ci-1-my-group-n-code-project"
        );
        assert_eq!(vm_name(&job(None, None)), "ci");
        let long = vm_name(&job(Some(12345678901), Some(&"a-".repeat(60))));
        assert!(long.len() <= 63, "{long}");
        assert!(!long.ends_with('-'));
        for name in [long, vm_name(&job(Some(5), Some("--x--")))] {
            assert!(name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
            assert!(!name.starts_with('-') && !name.contains("--"), "{name}");
        }
    }

    #[test]
    fn host_key_files_become_pinnable_lines() {
        assert_eq!(
            parse_public_key_line(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHnN0E7mBOmkZ2dJ7iU1eC3c root@vm\n"
            )
            .as_deref(),
            Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHnN0E7mBOmkZ2dJ7iU1eC3c")
        );
        assert!(parse_public_key_line(
            "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAA= x"
        )
        .is_some());
        assert!(parse_public_key_line("").is_none());
        assert!(parse_public_key_line("cat: No such file or directory").is_none());
        assert!(parse_public_key_line("ssh-ed25519 not*base64!").is_none());
    }

    #[test]
    fn agent_boot_errors_are_retryable() {
        let http = |text: &str| crate::proxmox::error::from_http_answer(500, Some(text), b"");
        assert!(agent_not_ready(&http("QEMU guest agent is not running")));
        assert!(agent_not_ready(&http("VM 2000123 is not running")));
        assert!(agent_not_ready(&http(
            "VM 2000123 qga command 'guest-network-get-interfaces' failed - got timeout"
        )));
        assert!(!agent_not_ready(&http("No QEMU guest agent configured")));
    }
}
