//! Shapes of the API's answers. PVE sends numbers as strings as often as not (`"memory":"2048"`,
//! `{"data":"101"}`) and booleans as 0/1: every numeric field here accepts both.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer};

/// A number that may arrive as a JSON number or a string.
pub fn flexible_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    flexible_opt_u64(deserializer)?.ok_or_else(|| serde::de::Error::custom("missing number"))
}

pub fn flexible_opt_u64<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    let value = serde_json::Value::deserialize(deserializer)?;
    Ok(value_as_u64(&value))
}

/// `1`, `"1"`, `true` are true; absent, `0`, `"0"`, `false` are false.
pub fn flexible_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    let value = serde_json::Value::deserialize(deserializer)?;
    Ok(value_as_bool(&value))
}

pub fn value_as_u64(value: &serde_json::Value) -> Option<u64> {
    match value {
        serde_json::Value::Number(number) => number.as_u64(),
        serde_json::Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

pub fn value_as_bool(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Bool(flag) => *flag,
        serde_json::Value::Number(number) => number.as_u64().is_some_and(|n| n != 0),
        serde_json::Value::String(text) => {
            matches!(text.trim(), "1" | "true" | "yes" | "on")
        }
        _ => false,
    }
}

/// A task id: `UPID:<node>:<pid>:<pstart>:<starttime>:<type>:<id>:<user>:`. Its status must
/// be asked of the node named in it (another node answers 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upid {
    pub raw: String,
    pub node: String,
    pub task_type: String,
    /// The object the task works on, usually a VMID.
    pub id: String,
}

impl Upid {
    pub fn parse(text: &str) -> Option<Upid> {
        let text = text.trim();
        let rest = text.strip_prefix("UPID:")?;
        let fields: Vec<&str> = rest.split(':').collect();
        // node, pid, pstart, starttime, type, id, user, (empty after the final colon)
        if fields.len() < 7 || fields[0].is_empty() {
            return None;
        }
        Some(Upid {
            raw: text.to_string(),
            node: fields[0].to_string(),
            task_type: fields[4].to_string(),
            id: fields[5].to_string(),
        })
    }
}

impl fmt::Display for Upid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// `GET /nodes/<node>/tasks/<upid>/status`.
#[derive(Debug, Clone, Deserialize)]
pub struct TaskStatus {
    pub status: String,
    #[serde(default)]
    pub exitstatus: Option<String>,
}

/// How a finished task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskOutcome {
    Ok,
    /// `WARNINGS: N`: the task did its job and logged warnings.
    Warnings(u64),
    Failed(String),
}

impl TaskStatus {
    /// `None` while the task runs.
    pub fn outcome(&self) -> Option<TaskOutcome> {
        if self.status != "stopped" {
            return None;
        }
        let exit = self.exitstatus.as_deref().unwrap_or("").trim();
        Some(if exit == "OK" {
            TaskOutcome::Ok
        } else if let Some(count) = exit.strip_prefix("WARNINGS:") {
            TaskOutcome::Warnings(count.trim().parse().unwrap_or(0))
        } else if exit.is_empty() {
            TaskOutcome::Failed("the task stopped without an exit status".into())
        } else {
            TaskOutcome::Failed(exit.to_string())
        })
    }
}

/// `GET /nodes/<node>/qemu/<vmid>/status/current`.
#[derive(Debug, Clone, Deserialize)]
pub struct VmStatus {
    /// `running` or `stopped`.
    pub status: String,
    #[serde(default)]
    pub qmpstatus: Option<String>,
    #[serde(default)]
    pub lock: Option<String>,
    #[serde(default, deserialize_with = "flexible_bool")]
    pub template: bool,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tags: Option<String>,
}

impl VmStatus {
    pub fn is_running(&self) -> bool {
        self.status == "running"
    }

    pub fn lock(&self) -> Option<&str> {
        self.lock.as_deref().filter(|lock| !lock.is_empty())
    }
}

/// `GET /nodes/<node>/qemu/<vmid>/config`: an open set of keys whose values are strings or
/// numbers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct VmConfig(pub BTreeMap<String, serde_json::Value>);

impl VmConfig {
    /// The storages of every drive that sits on one (CD-ROMs and the cloud-init drive
    /// included, `none` and a physical `cdrom` not): what qemu-server checks before it
    /// clones a VM to another node.
    pub fn drive_storages(&self) -> Vec<String> {
        let mut storages: Vec<String> = self
            .0
            .keys()
            .filter(|key| {
                let bus = key.trim_end_matches(|c: char| c.is_ascii_digit());
                (matches!(bus, "scsi" | "virtio" | "sata" | "ide") && bus != key.as_str())
                    || matches!(key.as_str(), "efidisk0" | "tpmstate0")
            })
            .filter_map(|key| self.get(key))
            .filter_map(|value| {
                let volume = value.split(',').next()?.trim();
                // A passed-through device or file path is local to its node.
                if volume.starts_with('/') {
                    return Some(volume.to_string());
                }
                let (storage, _) = volume.split_once(':')?;
                Some(storage.to_string())
            })
            .collect();
        storages.sort();
        storages.dedup();
        storages
    }

    pub fn get(&self, key: &str) -> Option<String> {
        match self.0.get(key)? {
            serde_json::Value::String(text) => Some(text.clone()),
            serde_json::Value::Null => None,
            other => Some(other.to_string()),
        }
    }

    pub fn description(&self) -> Option<String> {
        self.get("description")
    }

    pub fn lock(&self) -> Option<String> {
        self.get("lock").filter(|lock| !lock.is_empty())
    }

    /// The MAC of `net0` (`virtio=BC:24:11:AA:BB:CC,bridge=vmbr0` or `macaddr=...`),
    /// lower-cased.
    pub fn net0_mac(&self) -> Option<String> {
        let net0 = self.get("net0")?;
        net0.split(',')
            .filter_map(|item| item.split_once('='))
            .map(|(_, value)| value.trim())
            .find(|value| is_mac(value))
            .map(str::to_ascii_lowercase)
    }

    /// Whether `agent` is enabled (`1`, or `enabled=1,fstrim_cloned_disks=1`).
    pub fn agent_enabled(&self) -> Option<bool> {
        let agent = self.get("agent")?;
        let first = agent.split(',').next().unwrap_or("").trim();
        let flag = first.strip_prefix("enabled=").unwrap_or(first);
        Some(matches!(flag, "1" | "true" | "yes" | "on"))
    }

    /// The disk the VM boots from: the first disk in `boot: order=...`, else `bootdisk`, else
    /// the first of scsi0, virtio0, sata0, ide0 that exists.
    pub fn boot_disk(&self) -> Option<String> {
        let is_disk = |key: &str| {
            let Some(value) = self.get(key) else {
                return false;
            };
            let bus = key.trim_end_matches(|c: char| c.is_ascii_digit());
            matches!(bus, "scsi" | "virtio" | "sata" | "ide")
                && !value.contains("media=cdrom")
                && value != "none"
        };
        if let Some(boot) = self.get("boot") {
            if let Some(order) = boot
                .split(',')
                .find_map(|item| item.trim().strip_prefix("order="))
            {
                if let Some(disk) = order.split(';').map(str::trim).find(|key| is_disk(key)) {
                    return Some(disk.to_string());
                }
            }
        }
        if let Some(disk) = self.get("bootdisk").filter(|key| is_disk(key)) {
            return Some(disk);
        }
        ["scsi0", "virtio0", "sata0", "ide0"]
            .into_iter()
            .find(|key| is_disk(key))
            .map(String::from)
    }
}

fn is_mac(text: &str) -> bool {
    let parts: Vec<&str> = text.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|part| part.len() == 2 && part.chars().all(|c| c.is_ascii_hexdigit()))
}

/// `GET .../agent/network-get-interfaces` → `{"result": [...]}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AgentInterfaces {
    #[serde(default)]
    pub result: Vec<AgentInterface>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AgentInterface {
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "hardware-address")]
    pub hardware_address: Option<String>,
    #[serde(default, rename = "ip-addresses")]
    pub ip_addresses: Vec<AgentIpAddress>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AgentIpAddress {
    #[serde(default, rename = "ip-address")]
    pub ip_address: String,
    #[serde(default, rename = "ip-address-type")]
    pub ip_address_type: Option<String>,
    #[serde(default, deserialize_with = "flexible_opt_u64")]
    pub prefix: Option<u64>,
}

/// `GET .../agent/file-read?file=...`.
#[derive(Debug, Clone, Deserialize)]
pub struct AgentFileRead {
    #[serde(default)]
    pub content: String,
    #[serde(default, deserialize_with = "flexible_bool")]
    pub truncated: bool,
}

/// One row of `GET /cluster/resources?type=vm`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterVm {
    #[serde(deserialize_with = "flexible_u64")]
    pub vmid: u64,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default, deserialize_with = "flexible_bool")]
    pub template: bool,
    #[serde(default)]
    pub tags: Option<String>,
    #[serde(default)]
    pub lock: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Configured memory in bytes.
    #[serde(default)]
    pub maxmem: Option<u64>,
}

/// A node as `GET /cluster/resources?type=node` lists it. An offline node has no `mem`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ClusterNode {
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub status: Option<String>,
    /// Bytes in use.
    #[serde(default)]
    pub mem: Option<u64>,
    #[serde(default)]
    pub maxmem: Option<u64>,
}

/// A storage as `GET /cluster/resources?type=storage` lists it, once per node that has it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ClusterStorage {
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub storage: String,
    /// PVE's storage config marks it as reachable from every node (Ceph, NFS, iSCSI, ...).
    #[serde(default, deserialize_with = "flexible_bool")]
    pub shared: bool,
}

impl ClusterNode {
    pub fn is_online(&self) -> bool {
        self.status.as_deref() == Some("online")
    }
}

/// A VM on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRef {
    pub node: String,
    pub vmid: u32,
}

impl std::fmt::Display for VmRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VM {} on {}", self.vmid, self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> serde_json::Value {
        let path = format!("{}/fixtures/proxmox/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{path}: {err}"));
        let mut envelope: serde_json::Value = serde_json::from_str(&text).unwrap();
        envelope["data"].take()
    }

    #[test]
    fn upids_name_their_node() {
        let upid = Upid::parse("UPID:pve2:0000C530:0A3F1B2C:6748A1B2:qmclone:60900:ci@pve!runner:")
            .unwrap();
        assert_eq!(upid.node, "pve2");
        assert_eq!(upid.task_type, "qmclone");
        assert_eq!(upid.id, "60900");
        assert!(Upid::parse("UPID::1:2:3:qmstart:100:root@pam:").is_none());
        assert!(Upid::parse("not a upid").is_none());
        assert!(Upid::parse("UPID:pve:1:2").is_none());
    }

    #[test]
    fn warnings_count_as_success() {
        let status = |status: &str, exit: Option<&str>| TaskStatus {
            status: status.into(),
            exitstatus: exit.map(String::from),
        };
        assert_eq!(status("running", None).outcome(), None);
        assert_eq!(
            status("stopped", Some("OK")).outcome(),
            Some(TaskOutcome::Ok)
        );
        assert_eq!(
            status("stopped", Some("WARNINGS: 2")).outcome(),
            Some(TaskOutcome::Warnings(2))
        );
        assert_eq!(
            status("stopped", Some("VM is locked (clone)")).outcome(),
            Some(TaskOutcome::Failed("VM is locked (clone)".into()))
        );
    }

    #[test]
    fn recorded_status_and_config_parse_with_numbers_as_strings() {
        let status: VmStatus = serde_json::from_value(fixture("status-current.json")).unwrap();
        assert!(status.is_running());
        assert_eq!(status.lock(), None);
        let locked: VmStatus =
            serde_json::from_value(fixture("status-current-locked.json")).unwrap();
        assert_eq!(locked.lock(), Some("clone"));
        assert!(!locked.is_running());

        let config: VmConfig = serde_json::from_value(fixture("config.json")).unwrap();
        assert_eq!(config.net0_mac().as_deref(), Some("bc:24:11:b0:4f:a5"));
        assert_eq!(config.get("memory").as_deref(), Some("2048"));
        assert_eq!(config.get("cores").as_deref(), Some("2"));
        assert_eq!(config.agent_enabled(), Some(true));
        assert_eq!(config.boot_disk().as_deref(), Some("scsi0"));
        assert!(config
            .description()
            .unwrap()
            .contains("gitlab-proxmox-runner:"));
    }

    #[test]
    fn recorded_agent_answers_parse() {
        let interfaces: AgentInterfaces =
            serde_json::from_value(fixture("agent-network-get-interfaces.json")).unwrap();
        assert_eq!(interfaces.result.len(), 3);
        assert_eq!(interfaces.result[0].name, "lo");
        assert!(interfaces.result[2].hardware_address.is_some());
        let file: AgentFileRead = serde_json::from_value(fixture("agent-file-read.json")).unwrap();
        assert!(file.content.starts_with("ssh-ed25519 "));
        assert!(!file.truncated);
    }

    #[test]
    fn recorded_cluster_resources_parse() {
        let vms: Vec<ClusterVm> =
            serde_json::from_value(fixture("cluster-resources-vm.json")).unwrap();
        assert!(vms.iter().any(|vm| vm.template && vm.vmid == 60900));
        assert!(vms.iter().any(|vm| vm.lock.as_deref() == Some("clone")));
    }

    #[test]
    fn boot_disk_follows_the_boot_order() {
        let config: VmConfig = serde_json::from_value(serde_json::json!({
            "boot": "order=ide2;virtio0;net0",
            "ide2": "local:iso/x.iso,media=cdrom",
            "virtio0": "local-lvm:vm-1-disk-0,size=8G",
            "scsi0": "local-lvm:vm-1-disk-1,size=8G",
        }))
        .unwrap();
        assert_eq!(config.boot_disk().as_deref(), Some("virtio0"));
        let legacy: VmConfig = serde_json::from_value(serde_json::json!({
            "bootdisk": "sata0", "sata0": "local:1/x.qcow2"
        }))
        .unwrap();
        assert_eq!(legacy.boot_disk().as_deref(), Some("sata0"));
        assert_eq!(VmConfig::default().boot_disk(), None);
    }

    #[test]
    fn macs_come_from_any_net0_model() {
        let config: VmConfig = serde_json::from_value(serde_json::json!({
            "net0": "bridge=vmbr0,macaddr=AA:BB:CC:DD:EE:FF,model=e1000", "agent": "enabled=0"
        }))
        .unwrap();
        assert_eq!(config.net0_mac().as_deref(), Some("aa:bb:cc:dd:ee:ff"));
        assert_eq!(config.agent_enabled(), Some(false));
    }
}
