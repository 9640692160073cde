//! What every endpoint works with: the decoded request, the reply (PVE's error shapes
//! included) and the VM lookups with PVE's "does not exist" wording. The server decodes into
//! these, the routes and the agent endpoints answer with them; nothing here calls back up.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::state::{State, Vm};

pub(crate) struct ApiRequest {
    /// Whose token the request carried.
    pub caller: super::co_tenant::Caller,
    pub method: String,
    /// Decoded path below `/api2/json`, e.g. `/nodes/pve1/qemu`.
    pub path: String,
    pub segments: Vec<String>,
    /// Query parameters, then body parameters, in order.
    pub params: Vec<(String, String)>,
}

pub(crate) enum Reply {
    Data(Value),
    /// `data` plus further top-level keys (e.g. the task log's `total`).
    DataWith(Value, Map<String, Value>),
    /// An error: the message goes into the reason phrase; `errors` makes it a 400-style
    /// "Parameter verification failed." with a field map.
    Fail {
        status: u16,
        message: String,
        errors: Option<BTreeMap<String, String>>,
    },
    /// The request took effect, but the connection drops before any answer.
    Dropped,
    /// This answer, after a pause (with the state unlocked meanwhile).
    Delayed(std::time::Duration, Box<Reply>),
}

pub(super) type Result<T> = std::result::Result<T, Reply>;

pub(super) fn fail(status: u16, message: impl Into<String>) -> Reply {
    Reply::Fail {
        status,
        message: message.into(),
        errors: None,
    }
}

pub(super) fn param_errors(errors: BTreeMap<String, String>) -> Reply {
    Reply::Fail {
        status: 400,
        message: "Parameter verification failed.".into(),
        errors: Some(errors),
    }
}

pub(super) fn param_error(field: &str, message: impl Into<String>) -> Reply {
    param_errors(BTreeMap::from([(field.to_string(), message.into())]))
}

pub(super) fn not_implemented(request: &ApiRequest) -> Reply {
    fail(
        501,
        format!(
            "Method '{} {}' not implemented",
            request.method, request.path
        ),
    )
}

pub(super) fn missing_config_text(node: &str, vmid: u32) -> String {
    format!("Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist")
}

fn missing_config(node: &str, vmid: u32) -> Reply {
    fail(500, missing_config_text(node, vmid))
}

pub(super) fn vm_on_node<'a>(state: &'a State, node: &str, vmid: u32) -> Result<&'a Vm> {
    state
        .vms
        .get(&vmid)
        .filter(|vm| vm.node == node)
        .ok_or_else(|| missing_config(node, vmid))
}

pub(super) fn vm_on_node_mut<'a>(
    state: &'a mut State,
    node: &str,
    vmid: u32,
) -> Result<&'a mut Vm> {
    state
        .vms
        .get_mut(&vmid)
        .filter(|vm| vm.node == node)
        .ok_or_else(|| missing_config(node, vmid))
}

/// Parameters as a map (the last value wins, like PVE's decoder).
pub(crate) fn param_map(params: &[(String, String)]) -> BTreeMap<String, String> {
    params.iter().cloned().collect()
}
