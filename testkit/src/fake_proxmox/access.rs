//! ACLs and `GET /access/permissions`, the way PVE computes effective privileges: per subject
//! (the user, the token), the most specific ACL path at or above the asked path decides, and a
//! privilege-separated token gets the intersection of its own and its user's privileges.
//! Only the answer is modelled: no other endpoint enforces these ACLs.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

use super::api::{fail, Result};
use super::state::State;

/// Everything the README's GitLabRunner role holds, PVE 8 and PVE 9 names together.
pub const RUNNER_ROLE: &[&str] = &[
    "VM.Allocate",
    "VM.Clone",
    "VM.Audit",
    "VM.PowerMgmt",
    "VM.Config.Options",
    "VM.Config.CPU",
    "VM.Config.Memory",
    "VM.Config.Disk",
    "VM.Config.Cloudinit",
    "VM.Monitor",
    "VM.GuestAgent.Audit",
    "VM.GuestAgent.FileRead",
    "Datastore.AllocateSpace",
    "Datastore.Audit",
    "SDN.Use",
];

/// Whose ACL entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclSubject {
    User,
    Token,
}

#[derive(Debug, Clone)]
pub(crate) struct Acls {
    pub user: BTreeMap<String, BTreeSet<String>>,
    pub token: BTreeMap<String, BTreeSet<String>>,
    /// `pveum user token add ... --privsep 1`, PVE's default.
    pub privsep: bool,
}

impl Default for Acls {
    /// The README's checklist: the role on `/` for the user and for the token.
    fn default() -> Self {
        let role: BTreeSet<String> = RUNNER_ROLE.iter().map(|p| p.to_string()).collect();
        Acls {
            user: BTreeMap::from([("/".to_string(), role.clone())]),
            token: BTreeMap::from([("/".to_string(), role)]),
            privsep: true,
        }
    }
}

/// `/vms/100` → `/vms/100`, `/vms`, `/`.
fn ancestors(path: &str) -> Vec<String> {
    let mut paths = vec![];
    let mut current = path.trim_end_matches('/').to_string();
    while !current.is_empty() {
        paths.push(current.clone());
        match current.rfind('/') {
            Some(index) => current.truncate(index),
            None => break,
        }
    }
    paths.push("/".to_string());
    paths
}

pub(crate) fn most_specific(
    acl: &BTreeMap<String, BTreeSet<String>>,
    path: &str,
) -> BTreeSet<String> {
    ancestors(path)
        .iter()
        .find_map(|candidate| acl.get(candidate))
        .cloned()
        .unwrap_or_default()
}

impl Acls {
    pub fn effective(&self, subject: AclSubject, path: &str) -> BTreeSet<String> {
        let user = most_specific(&self.user, path);
        match subject {
            AclSubject::User => user,
            AclSubject::Token if self.privsep => {
                let token = most_specific(&self.token, path);
                token.intersection(&user).cloned().collect()
            }
            AclSubject::Token => user,
        }
    }

    fn paths(&self) -> BTreeSet<String> {
        let mut paths: BTreeSet<String> = self.user.keys().cloned().collect();
        paths.extend(self.token.keys().cloned());
        paths
    }
}

fn privilege_map(privileges: &BTreeSet<String>) -> Value {
    Value::Object(
        privileges
            .iter()
            .map(|name| (name.clone(), json!(1)))
            .collect::<Map<String, Value>>(),
    )
}

/// `GET /access/permissions[?path=][&userid=]`, asked by the fake's token.
pub(crate) fn permissions(state: &State, params: &BTreeMap<String, String>) -> Result<Value> {
    let token_id = state.token_user();
    let subject = match params.get("userid").map(String::as_str) {
        None => AclSubject::Token,
        Some(id) if id == token_id => AclSubject::Token,
        Some(id) if id == state.config.token_user => {
            // PVE: anyone else's permissions need Sys.Audit on /access.
            if !state
                .acls
                .effective(AclSubject::Token, "/access")
                .contains("Sys.Audit")
            {
                return Err(fail(403, "Permission check failed (/access, Sys.Audit)"));
            }
            AclSubject::User
        }
        Some(id) => return Err(fail(500, format!("no such user ('{id}')"))),
    };
    let paths: Vec<String> = match params.get("path") {
        Some(path) => vec![path.clone()],
        None => state.acls.paths().into_iter().collect(),
    };
    let mut answer = Map::new();
    for path in paths {
        let held = state.acls.effective(subject, &path);
        answer.insert(path, privilege_map(&held));
    }
    Ok(Value::Object(answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_path_decides_and_privsep_intersects() {
        let mut acls = Acls::default();
        acls.token.insert(
            "/vms/60900".into(),
            BTreeSet::from(["VM.Audit".to_string()]),
        );
        let token = acls.effective(AclSubject::Token, "/vms/60900");
        assert_eq!(token, BTreeSet::from(["VM.Audit".to_string()]));
        assert!(acls
            .effective(AclSubject::User, "/vms/60900")
            .contains("VM.Clone"));
        assert!(acls
            .effective(AclSubject::Token, "/vms/60910")
            .contains("VM.Clone"));
        acls.privsep = false;
        assert!(acls
            .effective(AclSubject::Token, "/vms/60900")
            .contains("VM.Clone"));
        acls.privsep = true;
        acls.user.insert("/".into(), BTreeSet::new());
        assert!(acls.effective(AclSubject::Token, "/vms/60910").is_empty());
    }
}
