//! From a started VM to one that answers SSH: the guest agent's address, the SSH host keys
//! read through the agent (a channel that needs no trust in the network), an SSH connection
//! that proves them, and the runner helper installed.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::placement::Strategy;
use super::provision::Provisioned;
use super::{task, HostKeySource, Milestone, ReadyVm, Sink, VmRef};
use crate::cancel::Cancel;
use crate::config::{HostKeyPolicy, Settings};
use crate::error::{Error, Result};
use crate::joblog;
use crate::proxmox::address::{choose_address, preferred_address, IPV4_GRACE};
use crate::proxmox::types::AgentInterface;
use crate::proxmox::Client;
use crate::ssh::{self, HostKeyCheck, Target};

/// How long SSH is tried at an IPv6 address before the agent is asked for IPv4 again.
const IPV6_CONNECT_SLICE: Duration = Duration::from_secs(10);
/// The least time the runner helper install gets, even when the boot used up VM_BOOT_TIMEOUT.
const MIN_HELPER_INSTALL_TIME: Duration = Duration::from_secs(60);
/// Times the host keys are read again through the agent after a mismatch.
const MAX_HOST_KEY_REREADS: u32 = 3;
/// The guest's SSH host keys, in order of preference.
const HOST_KEY_FILES: [&str; 3] = [
    "/etc/ssh/ssh_host_ed25519_key.pub",
    "/etc/ssh/ssh_host_ecdsa_key.pub",
    "/etc/ssh/ssh_host_rsa_key.pub",
];

/// Waits (until `deadline`) for the VM's address and SSH, pins its host keys, installs the
/// runner helper. Reports `Ready` once SSH answered with the pinned keys.
pub async fn ready(
    client: &Client,
    settings: &Settings,
    started: &Provisioned,
    deadline: Instant,
    cancel: &Cancel,
    sink: &mut dyn Sink,
) -> Result<ReadyVm> {
    sink.step("waiting for the guest agent and the VM's address");
    let ip = wait_for_address(
        client,
        settings,
        &started.vm,
        started.net0_mac.as_deref(),
        deadline,
        sink,
    )
    .await?;
    sink.step("waiting for SSH");
    let net0_mac = started.net0_mac.as_deref();
    let target = SshAt {
        ip,
        net0_mac,
        key: &started.key,
    };
    connect_ssh(
        client,
        settings,
        &started.vm,
        target,
        deadline,
        cancel,
        sink,
    )
    .await
}

/// Where prepare connects first, and what picks a better address when that fails.
struct SshAt<'a> {
    ip: IpAddr,
    net0_mac: Option<&'a str>,
    key: &'a super::ssh_key::KeyPath,
}

/// No guest runs its agent this soon after QEMU started, and on real PVE an agent call made
/// before the agent runs holds an API worker until QEMU's agent timeout (seconds): the first
/// call waits this long.
const AGENT_FIRST_LOOK: Duration = Duration::from_millis(500);
/// Later calls come 1/5 of the boot so far apart, within these bounds: a 3 s boot costs about
/// 9 calls and is seen at most 20% late.
const AGENT_MIN_POLL: Duration = Duration::from_millis(250);
const AGENT_MAX_POLL: Duration = Duration::from_secs(2);

/// Polls the guest agent (see [`AGENT_FIRST_LOOK`]) until it reports a usable address.
async fn wait_for_address(
    client: &Client,
    settings: &Settings,
    vm: &VmRef,
    net0_mac: Option<&str>,
    deadline: Instant,
    sink: &mut dyn Sink,
) -> Result<IpAddr> {
    let (node, vmid) = (vm.node.as_str(), vm.vmid);
    let cidrs = &settings.network_cidrs;
    // When this host's guests on this node have been answering (vm::task learns it).
    let mut boot = task::LearnedWait::begin(node, "agent-up");
    let first_look = (boot.first_look(AGENT_FIRST_LOOK).max(AGENT_FIRST_LOOK))
        .min(deadline.saturating_duration_since(Instant::now()));
    tokio::time::sleep(first_look).await;
    let mut poll = boot.poll(deadline, first_look, AGENT_MIN_POLL, AGENT_MAX_POLL);
    let mut last = String::new();
    // Since when the agent has offered an IPv6 address and nothing better.
    let mut only_ipv6_since: Option<Instant> = None;
    loop {
        let answer =
            tokio::time::timeout(poll.remaining(), client.agent_interfaces(node, vmid)).await;
        match answer {
            Err(_) if last.is_empty() => last = "the guest agent did not answer in time".into(),
            Err(_) => {}
            Ok(Ok(answer)) => {
                let chosen = choose_address(&answer.result, net0_mac, cidrs);
                if chosen.is_none_or(|ip| ip.is_ipv4()) {
                    only_ipv6_since = None;
                }
                let v6_for = *only_ipv6_since.get_or_insert_with(Instant::now);
                let grace_over = v6_for.elapsed() >= IPV4_GRACE || poll.remaining() <= IPV4_GRACE;
                if let Some(ip) = preferred_address(&answer.result, net0_mac, cidrs, grace_over) {
                    sink.timing("agent+IP", poll.elapsed());
                    boot.ended();
                    sink.info(&format!(
                        "guest agent up, IP {ip} after {}",
                        joblog::secs(poll.elapsed())
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
            Ok(Err(err)) if err.is_agent_not_configured() => {
                return Err(Error::Settings(format!(
                    "VM {vmid} has no QEMU guest agent configured; enable it on the \
                     template (qm set <template> --agent enabled=1)"
                )))
            }
            // With other nodes to go to, a node that stopped answering is not waited for.
            Ok(Err(err)) if err.is_node_failure() && Strategy::of(settings).may_fail_over() => {
                return Err(Error::api(
                    format!("asking the guest agent of VM {vmid} on {node} for its addresses"),
                    err,
                ))
            }
            Ok(Err(err)) if err.is_agent_not_ready() || err.is_transient() => last = err.message,
            Ok(Err(err)) => {
                return Err(Error::api(
                    format!("asking the guest agent of VM {vmid} for its addresses"),
                    err,
                ))
            }
        }
        boot.missed();
        poll.pause(|waited| {
            sink.info(&format!(
                "still waiting for VM {vmid}'s address after {}: {last}",
                joblog::secs(waited)
            ))
        })
        .await
        .map_err(|_| {
            Error::Infrastructure(format!(
                "VM {vmid} on {node} reported no usable IP address within VM_BOOT_TIMEOUT \
                 ({} s); last: {last}. Check that qemu-guest-agent starts in the template \
                 and that VM_NETWORK_CIDRS matches the VM's network",
                settings.boot_timeout.as_secs()
            ))
        })?;
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

/// The VM's preferred SSH host key (the first of [`HOST_KEY_FILES`] it has), read through the
/// guest agent, each read bounded by `deadline`. Empty when none could be read, with why not.
async fn read_host_keys(client: &Client, vm: &VmRef, deadline: Instant) -> HostKeyRead {
    let mut read = HostKeyRead {
        keys: Vec::new(),
        problems: Vec::new(),
        only_missing: true,
    };
    for file in HOST_KEY_FILES {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let answer =
            tokio::time::timeout(remaining, client.agent_file_read(&vm.node, vm.vmid, file)).await;
        match answer {
            Ok(Ok(answer)) => match ssh::key_lines::public_key_line(&answer.content) {
                // The SSH client asks only for the pinned types, so the preferred key is
                // enough, and saves the API two agent calls.
                Some(key) => {
                    read.keys.push(key);
                    break;
                }
                None => {
                    read.only_missing = false;
                    read.problems.push(format!("{file}: not a public key"));
                }
            },
            Ok(Err(err)) => {
                read.only_missing &= err.is_agent_missing_file();
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
/// generates them after networking is up, so the first read often finds none. A read the agent
/// refuses for another reason (permissions, a blocked command) ends the wait at once.
async fn wait_for_host_keys(
    client: &Client,
    vm: &VmRef,
    deadline: Instant,
    sink: &mut dyn Sink,
) -> HostKeyRead {
    let started = Instant::now();
    let mut pause = Duration::from_millis(200);
    let mut announced = false;
    loop {
        let read = read_host_keys(client, vm, deadline).await;
        let now = Instant::now();
        if !read.keys.is_empty() || !read.only_missing || now + pause >= deadline {
            if announced && !read.keys.is_empty() {
                sink.info(&format!(
                    "VM {}'s SSH host keys appeared after {}",
                    vm.vmid,
                    joblog::secs(started.elapsed())
                ));
            }
            return read;
        }
        if !announced {
            sink.info(&format!(
                "VM {} has no SSH host key yet (cloud-init writes them after networking is up); \
                 reading again through the guest agent until VM_BOOT_TIMEOUT",
                vm.vmid
            ));
            announced = true;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// The address the guest agent reports for the VM right now (one query, bounded by
/// `deadline`), by the same choice as the boot's wait: `None` when it reports none usable.
pub async fn current_address(
    client: &Client,
    settings: &Settings,
    vm: &VmRef,
    net0_mac: Option<&str>,
    deadline: Instant,
) -> Result<Option<IpAddr>> {
    let (node, vmid) = (vm.node.as_str(), vm.vmid);
    let remaining = deadline.saturating_duration_since(Instant::now());
    let answer = tokio::time::timeout(remaining, client.agent_interfaces(node, vmid))
        .await
        .map_err(|_| Error::Infrastructure(format!("the guest agent of VM {vmid} did not answer")))?
        .map_err(|err| Error::api(format!("asking the guest agent of VM {vmid}"), err))?;
    Ok(choose_address(
        &answer.result,
        net0_mac,
        &settings.network_cidrs,
    ))
}

/// Asks the agent again for an IPv4 address.
async fn requery_ipv4(
    client: &Client,
    settings: &Settings,
    vm: &VmRef,
    net0_mac: Option<&str>,
    deadline: Instant,
) -> Option<IpAddr> {
    current_address(client, settings, vm, net0_mac, deadline)
        .await
        .ok()
        .flatten()
        .filter(IpAddr::is_ipv4)
}

/// Where the VM's SSH server is, as the runner host's settings say to reach it.
pub fn ssh_target(settings: &Settings, vm: &VmRef, ip: IpAddr) -> Target {
    Target {
        host: ip.to_string(),
        port: settings.ssh.port,
        user: settings.ssh.user.clone(),
        vm_label: vm.to_string(),
    }
}

/// Installs the runner helper over `connection`, bounded like the boot: a VM that stops
/// answering mid-install must not hold prepare until prepare_exec_timeout (with a floor, so a
/// slow boot leaves the install a chance).
pub async fn install_runner_helper(
    connection: &ssh::Connection,
    settings: &Settings,
    vm: &VmRef,
    deadline: Instant,
) -> Result<()> {
    let budget = deadline
        .saturating_duration_since(Instant::now())
        .max(MIN_HELPER_INSTALL_TIME);
    tokio::time::timeout(
        budget,
        ssh::provision_runner_helper(connection, settings.ssh.runner_helper_path.as_deref()),
    )
    .await
    .map_err(|_| {
        Error::ssh(
            format!("installing gitlab-runner in VM {}", vm.vmid),
            format!(
                "not done after {} (VM_BOOT_TIMEOUT); the VM stopped answering or is very slow",
                joblog::secs(budget)
            ),
        )
    })?
}

async fn connect_ssh(
    client: &Client,
    settings: &Settings,
    vm: &VmRef,
    at: SshAt<'_>,
    deadline: Instant,
    cancel: &Cancel,
    sink: &mut dyn Sink,
) -> Result<ReadyVm> {
    let started = Instant::now();
    let vmid = vm.vmid;
    let HostKeyRead { keys, problems, .. } = wait_for_host_keys(client, vm, deadline, sink).await;
    let mut check = if !keys.is_empty() {
        HostKeyCheck::Pinned(keys)
    } else if settings.ssh.host_key_policy == HostKeyPolicy::Strict {
        return Err(Error::ssh(
            format!("reading VM {vmid}'s SSH host key through the guest agent"),
            format!(
                "{} (VM_SSH_HOST_KEY_POLICY=strict accepts no other source); give the API \
                 token the guest-agent file-read permission",
                problems.join("; ")
            ),
        ));
    } else {
        sink.warn(&format!(
            "could not read VM {vmid}'s SSH host key through the guest agent ({}); trusting \
             the key it presents on first connection",
            problems.join("; ")
        ));
        HostKeyCheck::FirstUse
    };
    let key = super::ssh_key::private_key(settings, vm, at.key)?;
    let mut ip = at.ip;
    let mut target = ssh_target(settings, vm, ip);
    let mut rereads = 0;
    let connection = loop {
        // An IPv6 address may be unreachable from this runner host: try it for a while, then
        // ask the agent again (DHCPv4 may have finished meanwhile).
        let attempt_deadline = if ip.is_ipv6() {
            deadline.min(Instant::now() + IPV6_CONNECT_SLICE)
        } else {
            deadline
        };
        let waited =
            ssh::wait_until_ready(&target, key.clone(), &check, attempt_deadline, cancel).await;
        if waited.is_err()
            && attempt_deadline < deadline
            && !cancel.is_cancelled()
            && !matches!(waited, Err(Error::HostKeyMismatch { .. }))
        {
            if let Some(better) = requery_ipv4(client, settings, vm, at.net0_mac, deadline).await {
                sink.info(&format!(
                    "VM {vmid} did not answer SSH at its IPv6 address {ip}; the guest agent now \
                     reports {better}, trying that"
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
        let fresh = read_host_keys(client, vm, deadline).await.keys;
        if rereads >= MAX_HOST_KEY_REREADS || fresh.is_empty() || &fresh == pinned {
            break waited?;
        }
        rereads += 1;
        sink.host_keys_replaced(pinned);
        sink.info(&format!(
            "VM {vmid}'s SSH host keys changed since the guest agent first read them \
             (regenerated at first boot); pinning the new ones"
        ));
        check = HostKeyCheck::Pinned(fresh);
    };
    let (host_keys, host_key_source) = match check {
        HostKeyCheck::Pinned(keys) => (keys, HostKeySource::GuestAgent),
        HostKeyCheck::FirstUse => (vec![connection.host_key()], HostKeySource::FirstUse),
    };
    let ready = ReadyVm {
        vm: vm.clone(),
        ip,
        ssh_port: target.port,
        ssh_user: target.user.clone(),
        host_keys,
        host_key_source,
        key: at.key.clone(),
    };
    sink.reached(Milestone::Ready(&ready))?;
    sink.timing("ssh", started.elapsed());

    let helper = Instant::now();
    install_runner_helper(&connection, settings, vm, deadline).await?;
    sink.timing("helper", helper.elapsed());
    Ok(ready)
}

fn seen_addresses(interfaces: &[AgentInterface]) -> String {
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
