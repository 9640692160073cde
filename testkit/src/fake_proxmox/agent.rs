//! The guest agent endpoints: PVE's errors while a guest boots, then the answers of a booted
//! Linux guest with Docker installed.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::api::{fail, not_implemented, param_error, vm_on_node, ApiRequest, Result};
use super::state::{Identity, State};

pub(super) fn agent(
    state: &mut State,
    request: &ApiRequest,
    node: &str,
    vmid: u32,
    rest: &[&str],
    params: &BTreeMap<String, String>,
) -> Result<Value> {
    let method = request.method.as_str();
    let known = matches!(
        (method, rest),
        ("POST", ["ping"])
            | ("GET", ["network-get-interfaces"])
            | ("GET", ["file-read"])
            | ("POST", ["exec"])
            | ("GET", ["exec-status"])
            | ("GET", ["info"])
    );
    if !known {
        return Err(not_implemented(request));
    }
    let guest_ip = state.config.guest_ip;
    let vm = vm_on_node(state, node, vmid)?;
    // assert_agent_available's order: config key, running, then a guest-ping. A disabled agent
    // (`agent: 0`) has no QGA device, so its ping fails like a guest that has not booted yet.
    if !vm.config.contains_key("agent") {
        return Err(fail(500, "No QEMU guest agent configured"));
    }
    if !vm.running {
        return Err(fail(500, format!("VM {vmid} is not running")));
    }
    let ready = vm.agent_enabled()
        && !vm.agent_never
        && vm.agent_ready_at.is_some_and(|at| at <= Instant::now());
    if !ready {
        return Err(fail(500, "QEMU guest agent is not running"));
    }
    let mac = vm.net0_mac().unwrap_or_default().to_ascii_lowercase();
    let now = Instant::now();
    let agent_up_for = vm
        .agent_ready_at
        .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
    let own = match state.identity_of(vmid) {
        Identity::Shared => None,
        Identity::Own(identity) => Some(identity),
        Identity::Waiting => return Err(fail(500, "QEMU guest agent is not running")),
    };
    let guest_ip = own.as_ref().map_or(guest_ip, |identity| identity.ip);
    match rest {
        ["ping"] => Ok(json!({ "result": {} })),
        ["info"] => Ok(json!({ "result": { "version": "8.5.2", "supported_commands": [] } })),
        ["network-get-interfaces"] => {
            let mut addresses = Vec::new();
            if let Some(ip6) = state.config.guest_ip6 {
                addresses.push(ip6);
            }
            if agent_up_for >= state.config.guest_ip_delay {
                addresses.push(guest_ip);
            }
            Ok(interfaces(&mac, &addresses))
        }
        ["file-read"] => {
            let Some(file) = params.get("file") else {
                return Err(param_error(
                    "file",
                    "property is missing and it is not optional",
                ));
            };
            if let Some((stale, reads_left)) = state.stale_guest_files.get_mut(file.as_str()) {
                if *reads_left > 0 {
                    *reads_left -= 1;
                    return Ok(json!({ "content": stale.clone(), "bytes-read": stale.len() }));
                }
            }
            let late = state
                .late_guest_files
                .get(file.as_str())
                .map(|(content, after)| (agent_up_for >= *after).then(|| content.clone()));
            let own_file = own
                .as_ref()
                .and_then(|identity| identity.files.get(file.as_str()).cloned());
            let content = match (own_file, late) {
                (Some(own), _) => Some(own),
                (None, Some(late)) => late,
                (None, None) => state.config.guest_files.get(file).cloned(),
            };
            match content {
                // `truncated` appears only when the 16 MiB limit cut the file.
                Some(content) => Ok(json!({
                    "content": content,
                    "bytes-read": content.len(),
                })),
                None => Err(fail(
                    500,
                    format!(
                        "Agent error: failed to open file '{file}' (mode: 'r'): No such file or directory"
                    ),
                )),
            }
        }
        ["exec"] => {
            if !params.contains_key("command")
                && !request.params.iter().any(|(k, _)| k == "command")
            {
                return Err(param_error(
                    "command",
                    "property is missing and it is not optional",
                ));
            }
            let pid = state.next_exec_pid();
            Ok(json!({ "pid": pid }))
        }
        ["exec-status"] => {
            let Some(pid) = params.get("pid") else {
                return Err(param_error(
                    "pid",
                    "property is missing and it is not optional",
                ));
            };
            if pid.parse::<u32>().is_err() {
                return Err(param_error(
                    "pid",
                    format!("type check ('integer') failed - got '{pid}'"),
                ));
            }
            Ok(json!({ "exited": 1, "exitcode": 0, "out-data": "" }))
        }
        _ => Err(not_implemented(request)),
    }
}

fn interfaces(mac: &str, addresses: &[IpAddr]) -> Value {
    let mut eth0: Vec<Value> = addresses
        .iter()
        .map(|ip| {
            let (ip_type, prefix) = match ip {
                IpAddr::V4(_) => ("ipv4", 24),
                IpAddr::V6(_) => ("ipv6", 64),
            };
            json!({ "ip-address": ip.to_string(), "ip-address-type": ip_type, "prefix": prefix })
        })
        .collect();
    let link_local = format!(
        "fe80::be24:11ff:fe{}:{}",
        mac.get(9..11).unwrap_or("00"),
        mac.get(12..17).unwrap_or("00:00").replace(':', "")
    );
    eth0.push(json!({ "ip-address": link_local, "ip-address-type": "ipv6", "prefix": 64 }));
    json!({ "result": [
        {
            "name": "lo",
            "hardware-address": "00:00:00:00:00:00",
            "ip-addresses": [
                { "ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8 },
                { "ip-address": "::1", "ip-address-type": "ipv6", "prefix": 128 },
            ],
            "statistics": { "rx-bytes": 1234, "rx-packets": 12, "tx-bytes": 1234, "tx-packets": 12,
                            "rx-errs": 0, "rx-dropped": 0, "tx-errs": 0, "tx-dropped": 0 },
        },
        {
            "name": "eth0",
            "hardware-address": mac,
            "ip-addresses": eth0,
            "statistics": { "rx-bytes": 987654, "rx-packets": 4321, "tx-bytes": 123456, "tx-packets": 1234,
                            "rx-errs": 0, "rx-dropped": 0, "tx-errs": 0, "tx-dropped": 0 },
        },
        {
            "name": "docker0",
            "hardware-address": "02:42:8c:1f:3a:07",
            "ip-addresses": [
                { "ip-address": "172.17.0.1", "ip-address-type": "ipv4", "prefix": 16 },
            ],
            "statistics": { "rx-bytes": 0, "rx-packets": 0, "tx-bytes": 0, "tx-packets": 0,
                            "rx-errs": 0, "rx-dropped": 0, "tx-errs": 0, "tx-dropped": 0 },
        },
    ]})
}
