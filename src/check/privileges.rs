//! The privileges the driver needs, path by path, and the token's effective privileges there
//! as PVE computes them (`GET /access/permissions?path=`: inheritance, roles, and for a
//! privilege-separated token the intersection with its user's, all done by PVE).
//!
//! PVE 9 split `VM.Monitor` into `VM.GuestAgent.*`; which name counts follows the API's
//! version, and a missing one is named with both.

use std::collections::BTreeMap;

use reqwest::Method;

use crate::proxmox::{ApiError, Client, Retry};

/// One privilege the driver needs, under its PVE 9 name and (where it differs) its PVE 8 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Privilege {
    pub pve9: &'static str,
    pub pve8: &'static str,
}

const fn same(name: &'static str) -> Privilege {
    Privilege {
        pve9: name,
        pve8: name,
    }
}

pub const VM_CLONE: Privilege = same("VM.Clone");
pub const VM_AUDIT: Privilege = same("VM.Audit");
pub const VM_ALLOCATE: Privilege = same("VM.Allocate");
pub const VM_POWER: Privilege = same("VM.PowerMgmt");
pub const VM_CONFIG_OPTIONS: Privilege = same("VM.Config.Options");
pub const VM_CONFIG_CPU: Privilege = same("VM.Config.CPU");
pub const VM_CONFIG_MEMORY: Privilege = same("VM.Config.Memory");
pub const VM_CONFIG_DISK: Privilege = same("VM.Config.Disk");
pub const AGENT_AUDIT: Privilege = Privilege {
    pve9: "VM.GuestAgent.Audit",
    pve8: "VM.Monitor",
};
pub const AGENT_FILE_READ: Privilege = Privilege {
    pve9: "VM.GuestAgent.FileRead",
    pve8: "VM.Monitor",
};
pub const DATASTORE_ALLOCATE: Privilege = same("Datastore.AllocateSpace");
pub const DATASTORE_AUDIT: Privilege = same("Datastore.Audit");
pub const SDN_USE: Privilege = same("SDN.Use");

impl Privilege {
    /// `VM.Clone`, or `VM.GuestAgent.Audit (PVE 9) / VM.Monitor (PVE 8)`.
    pub fn describe(&self) -> String {
        if self.pve9 == self.pve8 {
            self.pve9.to_string()
        } else {
            format!("{} (PVE 9) / {} (PVE 8)", self.pve9, self.pve8)
        }
    }

    /// Whether `held` grants it on a PVE of major version `major` (either name when unknown).
    pub fn held_in(&self, held: &BTreeMap<String, serde_json::Value>, major: Option<u32>) -> bool {
        let has = |name: &str| {
            held.get(name)
                .is_some_and(crate::proxmox::types::value_as_bool)
        };
        match major {
            Some(major) if major >= 9 => has(self.pve9),
            Some(_) => has(self.pve8),
            None => has(self.pve9) || has(self.pve8),
        }
    }
}

/// What the driver needs on one ACL path, and what for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub path: String,
    /// Also accepted: the same privilege on this path (a pool's VMs: `/pool/x`, else `/vms/N`).
    pub alternative_path: Option<String>,
    pub privileges: Vec<Privilege>,
    pub what_for: String,
}

/// The effective privileges of the token (`userid: None`) or of another user on `path`.
pub async fn effective(
    client: &Client,
    path: &str,
    userid: Option<&str>,
) -> Result<BTreeMap<String, serde_json::Value>, ApiError> {
    let mut query = vec![("path", path.to_string())];
    if let Some(userid) = userid {
        query.push(("userid", userid.to_string()));
    }
    let mut answer: BTreeMap<String, BTreeMap<String, serde_json::Value>> = client
        .call(
            Method::GET,
            "/access/permissions",
            &query,
            &[],
            Retry::Idempotent,
        )
        .await?;
    Ok(answer.remove(path).unwrap_or_default())
}

/// The privileges of `need` missing from `held` (and from `alternative`, when given).
pub fn missing(
    need: &Need,
    held: &BTreeMap<String, serde_json::Value>,
    alternative: Option<&BTreeMap<String, serde_json::Value>>,
    major: Option<u32>,
) -> Vec<Privilege> {
    need.privileges
        .iter()
        .filter(|privilege| {
            !privilege.held_in(held, major)
                && !alternative.is_some_and(|alt| privilege.held_in(alt, major))
        })
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(names: &[&str]) -> BTreeMap<String, serde_json::Value> {
        names
            .iter()
            .map(|name| (name.to_string(), serde_json::json!(1)))
            .collect()
    }

    #[test]
    fn agent_privileges_follow_the_pve_version() {
        let pve8 = held(&["VM.Monitor"]);
        let pve9 = held(&["VM.GuestAgent.Audit"]);
        assert!(AGENT_AUDIT.held_in(&pve8, Some(8)));
        assert!(!AGENT_AUDIT.held_in(&pve8, Some(9)));
        assert!(AGENT_AUDIT.held_in(&pve9, Some(9)));
        assert!(!AGENT_AUDIT.held_in(&pve9, Some(8)));
        assert!(AGENT_AUDIT.held_in(&pve8, None) && AGENT_AUDIT.held_in(&pve9, None));
        assert!(!VM_CLONE.held_in(&held(&[]), None));
        assert!(!VM_CLONE.held_in(
            &BTreeMap::from([("VM.Clone".into(), serde_json::json!(0))]),
            None
        ));
        assert_eq!(
            AGENT_AUDIT.describe(),
            "VM.GuestAgent.Audit (PVE 9) / VM.Monitor (PVE 8)"
        );
    }

    #[test]
    fn an_alternative_path_covers_a_privilege() {
        let need = Need {
            path: "/pool/ci".into(),
            alternative_path: Some("/vms/2000000".into()),
            privileges: vec![VM_ALLOCATE, VM_AUDIT],
            what_for: "job VMs".into(),
        };
        let pool = held(&["VM.Audit"]);
        assert_eq!(missing(&need, &pool, None, Some(8)), vec![VM_ALLOCATE]);
        let vms = held(&["VM.Allocate"]);
        assert!(missing(&need, &pool, Some(&vms), Some(8)).is_empty());
    }
}
