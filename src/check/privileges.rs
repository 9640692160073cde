//! The privileges the driver needs, path by path, and the token's effective privileges there
//! as PVE computes them (`GET /access/permissions?path=`: inheritance, roles, and for a
//! privilege-separated token the intersection with its user's, all done by PVE).
//!
//! PVE 9 split `VM.Monitor` into `VM.GuestAgent.*`; which name counts follows the API's
//! version, and a missing one is named with both.

use std::collections::BTreeMap;

use reqwest::Method;

use crate::check::api::Api;
use crate::check::templates::TemplateNeeds;
use crate::check::Finding;
use crate::config::Settings;
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
pub const VM_CONFIG_CLOUDINIT: Privilege = same("VM.Config.Cloudinit");
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

/// One finding per path the driver needs privileges on: held by the token, or which are
/// missing and how to grant them.
pub async fn findings(api: &Api, settings: &Settings, templates: &TemplateNeeds) -> Vec<Finding> {
    let mut out = Vec::new();
    for need in &needs(settings, templates, api.major) {
        out.push(privilege_finding(api, need).await);
    }
    out
}

/// The paths the driver needs privileges on for these settings and templates, on a PVE of
/// major version `major` (SDN only from 8 on).
pub fn needs(settings: &Settings, templates: &TemplateNeeds, major: Option<u32>) -> Vec<Need> {
    let mut needs: Vec<Need> = Vec::new();
    for (name, listed) in &settings.placement.templates {
        let vmid = listed.first().vmid;
        needs.push(Need {
            path: format!("/vms/{vmid}"),
            alternative_path: None,
            privileges: vec![VM_CLONE, VM_AUDIT],
            what_for: format!("cloning template {name}"),
        });
    }
    for (vmid, what_for) in &templates.copies {
        needs.push(Need {
            path: format!("/vms/{vmid}"),
            alternative_path: None,
            privileges: vec![VM_CLONE, VM_AUDIT],
            what_for: what_for.clone(),
        });
    }
    let new_vm = format!("/vms/{}", settings.vmid_range.0);
    let mut job = vec![
        VM_ALLOCATE,
        VM_AUDIT,
        VM_POWER,
        VM_CONFIG_OPTIONS,
        AGENT_AUDIT,
        AGENT_FILE_READ,
    ];
    if settings.clone.cores.is_some() {
        job.push(VM_CONFIG_CPU);
    }
    if settings.clone.memory_mb.is_some() {
        job.push(VM_CONFIG_MEMORY);
    }
    if settings.clone.disk_grow_gb.is_some() {
        job.push(VM_CONFIG_DISK);
    }
    // Each VM's own SSH key goes into its `sshkeys`.
    if templates.per_vm_keys {
        job.push(VM_CONFIG_CLOUDINIT);
    }
    needs.push(match &settings.clone.pool {
        Some(pool) => Need {
            path: format!("/pool/{pool}"),
            alternative_path: Some(new_vm),
            privileges: job,
            what_for: "the job VMs: create, configure, start, guest agent, destroy".into(),
        },
        None => Need {
            path: new_vm,
            alternative_path: None,
            privileges: job,
            what_for: "the job VMs: create, configure, start, guest agent, destroy".into(),
        },
    });
    for storage in &templates.storages {
        needs.push(Need {
            path: format!("/storage/{storage}"),
            alternative_path: None,
            privileges: vec![DATASTORE_ALLOCATE, DATASTORE_AUDIT],
            what_for: "the clones' disks".into(),
        });
    }
    if major.is_none_or(|major| major >= 8) {
        for bridge in &templates.bridges {
            needs.push(Need {
                path: format!("/sdn/zones/localnetwork/{bridge}"),
                alternative_path: None,
                privileges: vec![SDN_USE],
                what_for: format!("the clones' NIC on bridge {bridge}"),
            });
        }
    }
    needs
}

async fn privilege_finding(api: &Api, need: &Need) -> Finding {
    let id = format!("privileges{}", need.path);
    let token = &api.token;
    let held = match effective(&api.client, &need.path, None).await {
        Ok(held) => held,
        Err(err) => {
            return Finding::fail(
                id,
                format!(
                    "privileges on {}: cannot read the token's permissions: {err}",
                    need.path
                ),
                "the message names it (GET /access/permissions needs no privilege of its own)",
            )
        }
    };
    let alternative = match &need.alternative_path {
        Some(path) => effective(&api.client, path, None).await.ok(),
        None => None,
    };
    let lacking = missing(need, &held, alternative.as_ref(), api.major);
    let names = |list: &[Privilege]| {
        list.iter()
            .map(Privilege::describe)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if lacking.is_empty() {
        return Finding::pass(
            id,
            format!(
                "privileges of {token} on {} ({}): {}",
                need.path,
                need.what_for,
                names(&need.privileges)
            ),
        );
    }
    // Whether the user holds them: then only the token's own ACL is missing (privilege
    // separation). Reading another user's permissions needs Sys.Audit on /access; without
    // it, both ACLs are named.
    let user_has_them = match effective(&api.client, &need.path, Some(&api.user)).await {
        Ok(user) => Some(missing(need, &user, None, api.major).is_empty()),
        Err(_) => None,
    };
    let mut role_privs: Vec<&str> = lacking
        .iter()
        .map(|p| {
            if api.major.is_some_and(|m| m < 9) {
                p.pve8
            } else {
                p.pve9
            }
        })
        .collect();
    role_privs.dedup();
    let role_privs = role_privs.join(" ");
    let (why, fix) = match user_has_them {
        Some(true) => (
            format!(
                "; its user {} has them, so the token's own ACL is missing (the token has \
                 privilege separation)",
                api.user
            ),
            format!(
                "grant the role to the token as well: pveum acl modify {} --tokens '{token}' \
                 --roles GitLabRunner (README, Proxmox checklist, step 3)",
                acl_path(&need.path)
            ),
        ),
        _ => (
            String::new(),
            format!(
                "add them to the role (pveum role modify GitLabRunner --append 1 --privs \
                 \"{role_privs}\") and make sure both ACLs cover {}: pveum acl modify {} --users \
                 {} --roles GitLabRunner; pveum acl modify {} --tokens '{token}' --roles \
                 GitLabRunner (README, Proxmox checklist, step 3)",
                need.path,
                acl_path(&need.path),
                api.user,
                acl_path(&need.path)
            ),
        ),
    };
    Finding::fail(
        id,
        format!(
            "privileges: {token} lacks {} on {} ({}){why}",
            names(&lacking),
            need.path,
            need.what_for
        ),
        fix,
    )
}

/// Where to put the ACL: a new VM's id stands for `/vms` (or `/`).
fn acl_path(path: &str) -> &str {
    if path.starts_with("/vms/") {
        "/vms"
    } else {
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::test_settings;

    fn paths(needs: &[Need]) -> Vec<&str> {
        needs.iter().map(|need| need.path.as_str()).collect()
    }

    #[test]
    fn job_vms_need_config_privileges_only_for_what_the_settings_change() {
        let plain = needs(&test_settings(&[]), &TemplateNeeds::default(), Some(8));
        let job = plain
            .iter()
            .find(|need| need.path == "/vms/2000000")
            .unwrap();
        assert!(job.privileges.contains(&VM_ALLOCATE) && job.privileges.contains(&AGENT_FILE_READ));
        assert!(!job.privileges.contains(&VM_CONFIG_CPU), "{job:?}");
        let sized = needs(
            &test_settings(&[("VM_CORES", "4"), ("VM_DISK_GROW_GB", "10")]),
            &TemplateNeeds::default(),
            Some(8),
        );
        let job = sized
            .iter()
            .find(|need| need.path == "/vms/2000000")
            .unwrap();
        assert!(
            job.privileges.contains(&VM_CONFIG_CPU) && job.privileges.contains(&VM_CONFIG_DISK)
        );
        assert!(!job.privileges.contains(&VM_CONFIG_MEMORY), "{job:?}");
        assert!(!job.privileges.contains(&VM_CONFIG_CLOUDINIT), "{job:?}");
        let keyed = TemplateNeeds {
            per_vm_keys: true,
            ..TemplateNeeds::default()
        };
        let keyed = needs(&test_settings(&[]), &keyed, Some(8));
        let job = keyed
            .iter()
            .find(|need| need.path == "/vms/2000000")
            .unwrap();
        assert!(job.privileges.contains(&VM_CONFIG_CLOUDINIT), "{job:?}");
    }

    #[test]
    fn a_pool_is_asked_first_and_the_new_vmid_accepted_instead() {
        let needs = needs(
            &test_settings(&[("PROXMOX_POOL", "ci")]),
            &TemplateNeeds::default(),
            Some(9),
        );
        let job = needs.iter().find(|need| need.path == "/pool/ci").unwrap();
        assert_eq!(job.alternative_path.as_deref(), Some("/vms/2000000"));
        assert!(!paths(&needs).contains(&"/vms/2000000"));
    }

    #[test]
    fn templates_storages_and_bridges_each_get_their_path() {
        let templates = TemplateNeeds {
            storages: vec!["local-lvm".into()],
            bridges: vec!["vmbr1".into()],
            copies: vec![(61_900, "cloning template ubuntu-focal on pve2".into())],
            per_vm_keys: false,
        };
        let settings = test_settings(&[("PROXMOX_TEMPLATES", "ubuntu-focal=60900")]);
        let on_pve8 = needs(&settings, &templates, Some(8));
        assert_eq!(
            paths(&on_pve8),
            [
                "/vms/60900",
                "/vms/61900",
                "/vms/2000000",
                "/storage/local-lvm",
                "/sdn/zones/localnetwork/vmbr1"
            ]
        );
        // SDN came with PVE 8; an older API has no such path to ask about.
        let on_pve7 = needs(&settings, &templates, Some(7));
        assert!(!paths(&on_pve7).contains(&"/sdn/zones/localnetwork/vmbr1"));
        assert!(
            paths(&needs(&settings, &templates, None)).contains(&"/sdn/zones/localnetwork/vmbr1")
        );
    }

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
