//! From a started VM to one that answers SSH: the guest agent's address, the SSH host keys
//! read through the agent (a channel that needs no trust in the network), an SSH connection
//! that proves them, and the runner helper installed.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::provision::Provisioned;
use super::{HostKeySource, Milestone, ReadyVm, Sink, VmRef};
use crate::cancel::Cancel;
use crate::config::{HostKeyPolicy, Settings};
use crate::error::{Error, Result};
use crate::joblog;
use crate::poll::Poll;
use crate::proxmox::address::choose_address;
use crate::proxmox::types::AgentInterface;
use crate::proxmox::Client;
use crate::ssh::{self, HostKeyCheck, Target};

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
    connect_ssh(client, settings, &started.vm, ip, deadline, cancel, sink).await
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
    let first_look = AGENT_FIRST_LOOK.min(deadline.saturating_duration_since(Instant::now()));
    tokio::time::sleep(first_look).await;
    let mut poll = Poll::proportional(deadline, first_look, AGENT_MIN_POLL, AGENT_MAX_POLL);
    let mut last = String::new();
    loop {
        let answer =
            tokio::time::timeout(poll.remaining(), client.agent_interfaces(node, vmid)).await;
        match answer {
            Err(_) if last.is_empty() => last = "the guest agent did not answer in time".into(),
            Err(_) => {}
            Ok(Ok(answer)) => {
                if let Some(ip) = choose_address(&answer.result, net0_mac, cidrs) {
                    sink.timing("agent+IP", poll.elapsed());
                    sink.info(&format!(
                        "guest agent up, IP {ip} after {}",
                        joblog::secs(poll.elapsed())
                    ));
                    return Ok(ip);
                }
                last = format!(
                    "the guest agent reports no usable address yet (seen: {})",
                    seen_addresses(&answer.result)
                );
            }
            Ok(Err(err)) if err.is_agent_not_configured() => {
                return Err(Error::Settings(format!(
                    "VM {vmid} has no QEMU guest agent configured; enable it on the \
                     template (qm set <template> --agent enabled=1)"
                )))
            }
            Ok(Err(err)) if err.is_agent_not_ready() || err.is_transient() => last = err.message,
            Ok(Err(err)) => {
                return Err(Error::api(
                    format!("asking the guest agent of VM {vmid} for its addresses"),
                    err,
                ))
            }
        }
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

/// The VM's preferred SSH host key, read through the guest agent (the first of
/// [`HOST_KEY_FILES`] it has: the SSH client then asks only for that type, so one is enough and
/// saves API calls). Empty when none could be read, with why not.
async fn read_host_keys(client: &Client, vm: &VmRef) -> (Vec<String>, Vec<String>) {
    let mut keys = Vec::new();
    let mut problems = Vec::new();
    for file in HOST_KEY_FILES {
        match client.agent_file_read(&vm.node, vm.vmid, file).await {
            Ok(answer) => match parse_public_key_line(&answer.content) {
                Some(key) => {
                    keys.push(key);
                    break;
                }
                None => problems.push(format!("{file}: not a public key")),
            },
            Err(err) => problems.push(format!("{file}: {}", err.message)),
        }
    }
    (keys, problems)
}

async fn connect_ssh(
    client: &Client,
    settings: &Settings,
    vm: &VmRef,
    ip: IpAddr,
    deadline: Instant,
    cancel: &Cancel,
    sink: &mut dyn Sink,
) -> Result<ReadyVm> {
    let started = Instant::now();
    let vmid = vm.vmid;
    let (keys, problems) = read_host_keys(client, vm).await;
    let mut check = if !keys.is_empty() {
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
        sink.warn(&format!(
            "could not read VM {vmid}'s SSH host key through the guest agent ({}); trusting \
             the key it presents on first connection",
            problems.join("; ")
        ));
        HostKeyCheck::FirstUse
    };
    let key = ssh::load_private_key(settings)?;
    let target = Target {
        host: ip.to_string(),
        port: settings.ssh_port,
        user: settings.ssh_user.clone(),
        vm_label: format!("VM {vmid} on {}", vm.node),
    };
    let mut rereads = 0;
    let connection = loop {
        let waited = ssh::wait_until_ready(&target, key.clone(), &check, deadline, cancel).await;
        // cloud-init regenerates the host keys on first boot, and the guest agent can answer
        // before it has: the keys read a moment ago may be the template's. The agent is the
        // trusted channel, so when it now reports different keys, pin those and try again.
        let Err(Error::HostKeyMismatch { .. }) = &waited else {
            break waited?;
        };
        let HostKeyCheck::Pinned(pinned) = &check else {
            break waited?;
        };
        let (fresh, _) = read_host_keys(client, vm).await;
        if rereads >= MAX_HOST_KEY_REREADS || fresh.is_empty() || &fresh == pinned {
            break waited?;
        }
        rereads += 1;
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
    };
    sink.reached(Milestone::Ready(&ready))?;
    sink.timing("ssh", started.elapsed());

    let helper = Instant::now();
    ssh::provision_runner_helper(&connection, settings.runner_helper_path.as_deref()).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
