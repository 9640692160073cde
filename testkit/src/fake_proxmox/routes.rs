//! The API endpoints: parameter checks with PVE's wording, and the state changes behind them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::agent::agent;
use super::api::{
    fail, missing_config_text, not_implemented, param_error, param_errors, param_map, vm_on_node,
    vm_on_node_mut, ApiRequest, Reply, Result,
};
use super::co_tenant::{privilege_for, Caller};
use super::state::{random_mac, Effect, State, TaskSpec, Vm, MAX_DESCRIPTION};
use super::Fault;

pub(crate) fn dispatch(state: &mut State, request: &ApiRequest) -> Reply {
    state.caller = request.caller;
    let reply = dispatch_for_caller(state, request);
    state.caller = Caller::Runner;
    reply
}

fn dispatch_for_caller(state: &mut State, request: &ApiRequest) -> Reply {
    state.advance();
    if let Some(Fault::HttpErrors {
        status, message, ..
    }) = state.take_counted(|fault| match fault {
        Fault::HttpErrors { path_contains, .. } => path_contains
            .as_deref()
            .is_none_or(|needle| request.path.contains(needle)),
        _ => false,
    }) {
        return fail(status, message);
    }
    let reply = match route(state, request) {
        Ok(data) => data,
        Err(reply) => reply,
    };
    let is_clone =
        request.method == "POST" && request.segments.last().is_some_and(|s| s == "clone");
    if is_clone && matches!(reply, Reply::Data(_)) {
        if state
            .take_counted(|fault| matches!(fault, Fault::CloneAnswerLost { .. }))
            .is_some()
        {
            return Reply::Dropped;
        }
        let slow = state
            .faults_for_caller()
            .iter()
            .find_map(|fault| match fault {
                Fault::SlowCloneAnswer { delay } => Some(*delay),
                _ => None,
            });
        if let Some(delay) = slow {
            return Reply::Delayed(delay, Box::new(reply));
        }
    }
    if matches!(reply, Reply::Data(_)) {
        let slow = state
            .faults_for_caller()
            .iter()
            .find_map(|fault| match fault {
                Fault::SlowAnswer {
                    method,
                    path_contains,
                    delay,
                } if *method == request.method && request.path.contains(path_contains.as_str()) => {
                    Some(*delay)
                }
                _ => None,
            });
        if let Some(delay) = slow {
            return Reply::Delayed(delay, Box::new(reply));
        }
    }
    reply
}

fn route(state: &mut State, request: &ApiRequest) -> Result<Reply> {
    let segments: Vec<&str> = request.segments.iter().map(String::as_str).collect();
    let method = request.method.as_str();
    let params = param_map(&request.params);
    let data = match (method, segments.as_slice()) {
        ("GET", ["version"]) => json!({
            "version": "8.2.4",
            "release": "8.2",
            "repoid": "faa83925c9641325",
        }),
        ("GET", ["nodes"]) => Value::Array(
            state
                .nodes()
                .into_iter()
                .map(|node| {
                    let status = if state.offline_nodes.contains(&node) { "offline" } else { "online" };
                    json!({
                        "node": node, "status": status, "type": "node", "id": format!("node/{node}"),
                        "level": "", "maxcpu": 16, "maxmem": 68719476736u64, "uptime": 864000,
                    })
                })
                .collect(),
        ),
        ("GET", ["access", "permissions"]) if request.caller == Caller::CoTenant => {
            co_tenant_permissions(state, &params)
        }
        ("GET", ["access", "permissions"]) => super::access::permissions(state, &params)?,
        ("GET", ["cluster", "nextid"]) => nextid(state, &params)?,
        ("GET", ["cluster", "resources"]) => resources(state, &params)?,
        (_, ["nodes", node, rest @ ..]) => {
            check_node(state, node)?;
            if state.offline_nodes.contains(*node) {
                // pveproxy cannot reach the node it would forward the request to.
                return Err(fail(595, format!("No route to host ({node})")));
            }
            return node_route(state, request, node, rest, &params);
        }
        _ => return Err(not_implemented(request)),
    };
    Ok(Reply::Data(data))
}

fn node_route(
    state: &mut State,
    request: &ApiRequest,
    node: &str,
    rest: &[&str],
    params: &BTreeMap<String, String>,
) -> Result<Reply> {
    let method = request.method.as_str();
    let data = match (method, rest) {
        ("GET", ["qemu"]) => node_qemu_list(state, node),
        ("POST", ["qemu"]) => create_vm(state, node, params)?,
        ("GET", ["storage"]) => node_storage_list(),
        ("GET", ["tasks"]) => task_list(state, node, params)?,
        ("GET", ["tasks", upid, "status"]) => task_status(state, node, upid)?,
        ("GET", ["tasks", upid, "log"]) => return task_log(state, node, upid, params),
        (_, ["qemu", vmid, rest @ ..]) => {
            let vmid = parse_vmid("vmid", vmid)?;
            return vm_route(state, request, node, vmid, rest, params);
        }
        _ => return Err(not_implemented(request)),
    };
    Ok(Reply::Data(data))
}

fn vm_route(
    state: &mut State,
    request: &ApiRequest,
    node: &str,
    vmid: u32,
    rest: &[&str],
    params: &BTreeMap<String, String>,
) -> Result<Reply> {
    let method = request.method.as_str();
    check_vm_permission(state, vmid, method, rest, params)?;
    let data = match (method, rest) {
        ("GET", []) => {
            vm_on_node(state, node, vmid)?;
            Value::Array(
                ["config", "status", "agent", "clone", "resize"]
                    .iter()
                    .map(|subdir| json!({ "subdir": subdir }))
                    .collect(),
            )
        }
        ("DELETE", []) => destroy(state, node, vmid, params)?,
        ("POST", ["clone"]) => clone(state, node, vmid, params)?,
        ("POST", ["template"]) => make_template(state, node, vmid, params)?,
        ("GET", ["config"]) => get_config(state, node, vmid)?,
        ("PUT", ["config"]) => {
            set_config(state, node, vmid, params)?;
            Value::Null
        }
        ("POST", ["config"]) => {
            set_config(state, node, vmid, params)?;
            Value::String(state.spawn_task(TaskSpec {
                node: node.to_string(),
                kind: "qmconfig",
                id: vmid.to_string(),
                duration: Duration::ZERO,
                error: None,
                effect: Effect::None,
                log: vec![format!("update VM {vmid}: -config")],
            }))
        }
        ("PUT" | "POST", ["resize"]) => resize(state, node, vmid, params)?,
        ("GET", ["status"]) => {
            vm_on_node(state, node, vmid)?;
            json!([{"subdir":"current"},{"subdir":"start"},{"subdir":"stop"},{"subdir":"shutdown"}])
        }
        ("GET", ["status", "current"]) => status_current(state, node, vmid)?,
        ("POST", ["status", action @ ("start" | "stop" | "shutdown")]) => {
            power(state, node, vmid, action, params)?
        }
        (_, ["agent", rest @ ..]) => agent(state, request, node, vmid, rest, params)?,
        _ => return Err(not_implemented(request)),
    };
    Ok(Reply::Data(data))
}

// ---------------------------------------------------------------------------------------------
// Parameter checks with PVE's wording.

fn check_node(state: &State, node: &str) -> Result<()> {
    if state.is_known_node(node) {
        Ok(())
    } else {
        Err(fail(
            500,
            format!("hostname lookup '{node}' failed - failed to get address info for: {node}: Name or service not known"),
        ))
    }
}

fn parse_vmid(field: &str, raw: &str) -> Result<u32> {
    let number: i64 = raw.trim().parse().map_err(|_| {
        param_error(
            field,
            format!("type check ('integer') failed - got '{raw}'"),
        )
    })?;
    if number < 100 {
        return Err(param_error(field, "value must have a minimum value of 100"));
    }
    if number > 999_999_999 {
        return Err(param_error(
            field,
            "value must have a maximum value of 999999999",
        ));
    }
    Ok(number as u32)
}

/// Booleans are `1`/`0` on the wire; `true` is refused.
fn parse_bool(
    params: &BTreeMap<String, String>,
    field: &str,
    errors: &mut BTreeMap<String, String>,
) -> Option<bool> {
    match params.get(field).map(String::as_str) {
        None => None,
        Some("1") => Some(true),
        Some("0") => Some(false),
        Some(other) => {
            errors.insert(
                field.to_string(),
                format!("type check ('boolean') failed - got '{other}'"),
            );
            None
        }
    }
}

fn check_allowed(
    params: &BTreeMap<String, String>,
    allowed: &[&str],
    errors: &mut BTreeMap<String, String>,
) {
    for key in params.keys() {
        if !allowed.contains(&key.as_str()) {
            errors.insert(
                key.clone(),
                "property is not defined in schema and the schema does not allow additional properties"
                    .into(),
            );
        }
    }
}

pub(crate) fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && chars.all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '+' | '.')
        })
}

/// PVE accepts tags split on `;`, `,` or spaces and stores them `;`-joined.
fn normalize_tags(raw: &str) -> std::result::Result<String, String> {
    let tags: Vec<&str> = raw
        .split([';', ',', ' '])
        .filter(|tag| !tag.is_empty())
        .collect();
    if let Some(bad) = tags.iter().find(|tag| !is_tag(tag)) {
        return Err(format!(
            "invalid format - invalid characters in tag '{bad}'"
        ));
    }
    Ok(tags.join(";"))
}

/// What `ssh-keygen -l` accepts as one line of an authorized_keys file: a key type and its
/// base64 (options before them are not checked by the fake).
fn is_public_key_line(line: &str) -> bool {
    let mut fields = line.split_whitespace();
    let (Some(kind), Some(blob)) = (fields.next(), fields.next()) else {
        return false;
    };
    let known =
        kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-") || kind.starts_with("sk-");
    known
        && blob.len() >= 16
        && blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
}

/// `sshkeys` must arrive percent-encoded (once more than the form encoding).
fn is_urlencoded(text: &str) -> bool {
    text.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-%_.!~*'()".contains(c))
}

/// Options only root@pam may use; an API token gets a parameter error.
fn root_only(params: &BTreeMap<String, String>, options: &[&str]) -> Result<()> {
    let errors: BTreeMap<String, String> = options
        .iter()
        .filter(|option| {
            params
                .get(**option)
                .is_some_and(|v| !v.is_empty() && v != "0")
        })
        .map(|option| {
            (
                option.to_string(),
                "Only root may use this option.".to_string(),
            )
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(param_errors(errors))
    }
}

/// PVE checks the privileges on `/vms/<vmid>` before the handler runs, so with pool-scoped
/// ACLs a VMID that is not a member of the pool (missing, not yet created, gone, or foreign)
/// answers 403 whatever its state.
fn check_vm_permission(
    state: &State,
    vmid: u32,
    method: &str,
    rest: &[&str],
    params: &BTreeMap<String, String>,
) -> Result<()> {
    if state.caller == Caller::CoTenant {
        // The co-tenant's ACL is enforced like PVE's: its privileges on /vms/<vmid>, with the
        // VM's pool's ACL inherited by its members.
        let privilege = privilege_for(method, rest, params);
        let pool = state.vms.get(&vmid).and_then(|vm| vm.pool.as_deref());
        if state.co_tenant.on_vm(vmid, pool).contains(privilege) {
            return Ok(());
        }
        return Err(permission_denied(&format!("/vms/{vmid}"), privilege));
    }
    if state.config.token_pool.is_none() {
        return Ok(());
    }
    let privilege = match (method, rest) {
        ("DELETE", []) => "VM.Allocate",
        ("POST", ["clone"]) => "VM.Clone",
        ("POST", ["template"]) => "VM.Allocate",
        ("PUT" | "POST", ["config"]) => "VM.Config.Options",
        ("PUT" | "POST", ["resize"]) => "VM.Config.Disk",
        ("POST", ["status", _]) => "VM.PowerMgmt",
        // PVE 8 (the version this fake reports) guards the agent with VM.Monitor.
        (_, ["agent", ..]) => "VM.Monitor",
        _ => "VM.Audit",
    };
    match state.vms.get(&vmid) {
        Some(vm) if state.token_sees(vm) => Ok(()),
        _ => Err(permission_denied(&format!("/vms/{vmid}"), privilege)),
    }
}

pub(super) fn permission_denied(path: &str, privilege: &str) -> Reply {
    fail(
        403,
        format!("Permission check failed ({path}, {privilege})"),
    )
}

fn locked(lock: &str) -> Reply {
    fail(500, format!("VM is locked ({lock})"))
}

// ---------------------------------------------------------------------------------------------
// Cluster.

fn nextid(state: &State, params: &BTreeMap<String, String>) -> Result<Value> {
    if let Some(raw) = params.get("vmid") {
        let vmid = parse_vmid("vmid", raw)?;
        if state.vms.contains_key(&vmid) {
            return Err(param_error("vmid", format!("VM {vmid} already exists")));
        }
        return Ok(Value::String(vmid.to_string()));
    }
    let free = (100u32..)
        .find(|id| !state.vms.contains_key(id))
        .unwrap_or(100);
    Ok(Value::String(free.to_string()))
}

fn resources(state: &State, params: &BTreeMap<String, String>) -> Result<Value> {
    let kind = params.get("type").map(String::as_str);
    if let Some(kind) = kind {
        if !matches!(kind, "vm" | "node" | "storage" | "sdn") {
            return Err(param_error(
                "type",
                format!("value '{kind}' does not have a value in the enumeration 'vm, storage, node, sdn'"),
            ));
        }
    }
    let now = Instant::now();
    let mut list = Vec::new();
    if kind.is_none() || kind == Some("vm") {
        for vm in state.vms.values().filter(|vm| state.caller_sees(vm)) {
            let mut entry = json!({
                "id": format!("qemu/{}", vm.vmid),
                "type": "qemu",
                "vmid": vm.vmid,
                "node": vm.node,
                "name": vm.name(),
                "status": vm.status(),
                "template": u8::from(vm.is_template()),
                "uptime": vm.uptime(now),
                "maxcpu": config_number(vm, "cores").unwrap_or(1),
                "maxmem": config_number(vm, "memory").unwrap_or(512) * 1024 * 1024,
                "maxdisk": 21474836480u64,
                "mem": if vm.running { 412_000_000u64 } else { 0 },
                "cpu": 0,
                "disk": 0,
                "diskread": 0,
                "diskwrite": 0,
                "netin": 0,
                "netout": 0,
            });
            if let Some(object) = entry.as_object_mut() {
                if let Some(tags) = vm.config.get("tags") {
                    object.insert("tags".into(), Value::String(tags.clone()));
                }
                if let Some(lock) = &vm.lock {
                    object.insert("lock".into(), Value::String(lock.clone()));
                }
                if let Some(pool) = &vm.pool {
                    object.insert("pool".into(), Value::String(pool.clone()));
                }
            }
            list.push(entry);
        }
    }
    if kind.is_none() || kind == Some("node") {
        for node in state.nodes() {
            let load = state.node_load(&node);
            let mut entry = json!({
                "id": format!("node/{node}"), "type": "node", "node": node,
                "status": if load.online { "online" } else { "offline" },
                "maxcpu": 16, "maxmem": load.max_mem, "uptime": 864000, "level": "",
            });
            // An offline node's entry has no live figures.
            if load.online {
                if let Some(object) = entry.as_object_mut() {
                    object.insert("mem".into(), json!(load.used_mem));
                    object.insert("cpu".into(), json!(0.05));
                }
            }
            list.push(entry);
        }
    }
    if kind.is_none() || kind == Some("storage") {
        for node in state.nodes() {
            let online = !state.offline_nodes.contains(&node);
            for (name, plugin, content, shared) in STORAGES {
                list.push(json!({
                    "id": format!("storage/{node}/{name}"), "type": "storage",
                    "node": node, "storage": name, "plugintype": plugin, "content": content,
                    "shared": u8::from(*shared),
                    "status": if online { "available" } else { "unknown" },
                    "maxdisk": 1_796_988_674_048u64, "disk": 214_748_364_800u64,
                }));
            }
        }
    }
    Ok(Value::Array(list))
}

fn config_number(vm: &Vm, key: &str) -> Option<u64> {
    vm.config.get(key).and_then(|value| value.parse().ok())
}

/// The storages of a stock PVE install, `local` (a directory) and `local-lvm` (LVM-thin), plus a
/// shared RBD pool `ceph-vm` that every node sees.
const STORAGES: &[(&str, &str, &str, bool)] = &[
    ("local", "dir", "iso,vztmpl,backup,images", false),
    ("local-lvm", "lvmthin", "images,rootdir", false),
    ("ceph-vm", "rbd", "images,rootdir", true),
];

/// Whether PVE's storage config marks `storage` as shared (unknown ones are local).
pub(super) fn is_shared_storage(storage: &str) -> bool {
    STORAGES
        .iter()
        .any(|(name, _, _, shared)| *name == storage && *shared)
}

/// Storages that can hold the base volume of a linked clone.
fn is_thin_storage(storage: &str) -> bool {
    STORAGES
        .iter()
        .any(|(name, kind, _, _)| *name == storage && matches!(*kind, "lvmthin" | "rbd"))
}

fn node_storage_list() -> Value {
    Value::Array(
        STORAGES
            .iter()
            .map(|(name, kind, content, shared)| {
                json!({"storage": name, "type": kind, "content": content,
                       "active": 1, "enabled": 1, "shared": u8::from(*shared),
                       "total": 1_796_988_674_048u64, "used": 214_748_364_800u64,
                       "avail": 1_582_240_309_248u64})
            })
            .collect(),
    )
}

/// The storage of a drive value (`local-lvm:base-9000-disk-0,size=20G` → `local-lvm`); `None`
/// for `none`, a physical `cdrom` and paths.
fn drive_storage(value: &str) -> Option<&str> {
    let volume = value.split(',').next()?.trim();
    let (storage, _) = volume.split_once(':')?;
    Some(storage)
}

/// qemu-server's check before a clone to another node: every drive (CD-ROMs and the
/// cloud-init drive included) must be on shared storage.
fn uses_local_storage(config: &BTreeMap<String, String>) -> bool {
    config.iter().any(|(key, value)| {
        let bus = key.trim_end_matches(|c: char| c.is_ascii_digit());
        let is_drive = (matches!(bus, "scsi" | "virtio" | "sata" | "ide") && bus != key)
            || matches!(key.as_str(), "efidisk0" | "tpmstate0");
        is_drive && drive_storage(value).is_some_and(|storage| !is_shared_storage(storage))
    })
}

fn node_qemu_list(state: &State, node: &str) -> Value {
    let now = Instant::now();
    Value::Array(
        state
            .vms
            .values()
            .filter(|vm| vm.node == node && state.caller_sees(vm))
            .map(|vm| {
                let mut entry = json!({
                    "vmid": vm.vmid,
                    "name": vm.name(),
                    "status": vm.status(),
                    "uptime": vm.uptime(now),
                    "cpus": config_number(vm, "cores").unwrap_or(1),
                    "maxmem": config_number(vm, "memory").unwrap_or(512) * 1024 * 1024,
                    "maxdisk": 21474836480u64,
                });
                if let Some(object) = entry.as_object_mut() {
                    if vm.is_template() {
                        object.insert("template".into(), json!(1));
                    }
                    if let Some(tags) = vm.config.get("tags") {
                        object.insert("tags".into(), Value::String(tags.clone()));
                    }
                    if let Some(lock) = &vm.lock {
                        object.insert("lock".into(), Value::String(lock.clone()));
                    }
                    if vm.running {
                        object.insert("pid".into(), json!(10000 + vm.vmid % 50000));
                    }
                }
                entry
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// Clone.

fn clone(
    state: &mut State,
    node: &str,
    source: u32,
    params: &BTreeMap<String, String>,
) -> Result<Value> {
    let mut errors = BTreeMap::new();
    check_allowed(
        params,
        &[
            "newid",
            "name",
            "full",
            "storage",
            "format",
            "target",
            "pool",
            "description",
            "snapname",
            "bwlimit",
        ],
        &mut errors,
    );
    let newid = match params.get("newid") {
        None => {
            errors.insert(
                "newid".into(),
                "property is missing and it is not optional".into(),
            );
            None
        }
        Some(raw) => match parse_vmid("newid", raw) {
            Ok(id) => Some(id),
            Err(Reply::Fail {
                errors: Some(field_errors),
                ..
            }) => {
                errors.extend(field_errors);
                None
            }
            Err(_) => None,
        },
    };
    let full = parse_bool(params, "full", &mut errors);
    if let Some(name) = params.get("name") {
        if !is_dns_name(name) {
            errors.insert(
                "name".into(),
                "invalid format - value does not look like a valid DNS name".into(),
            );
        }
    }
    if params
        .get("description")
        .is_some_and(|d| d.len() > MAX_DESCRIPTION)
    {
        errors.insert(
            "description".into(),
            format!("value may only be {MAX_DESCRIPTION} characters long"),
        );
    }
    if let Some(format) = params.get("format") {
        if !matches!(format.as_str(), "raw" | "qcow2" | "vmdk") {
            errors.insert(
                "format".into(),
                format!(
                    "value '{format}' does not have a value in the enumeration 'raw, qcow2, vmdk'"
                ),
            );
        }
    }
    if !errors.is_empty() {
        return Err(param_errors(errors));
    }
    let Some(newid) = newid else {
        return Err(param_error(
            "newid",
            "property is missing and it is not optional",
        ));
    };

    // The API's permission check: VM.Clone on the source (checked by `vm_route`), and
    // VM.Allocate on /vms/<newid> or, with `pool`, on /pool/<pool>.
    if let Some(pool) = params.get("pool") {
        if !state.pool_exists(pool) {
            return Err(param_error("pool", format!("pool '{pool}' does not exist")));
        }
    }
    if state.caller == Caller::CoTenant {
        state
            .co_tenant
            .check_allocate(newid, params.get("pool").map(String::as_str))?;
    } else if let Some(scope) = &state.config.token_pool {
        match params.get("pool") {
            Some(pool) if pool == scope => {}
            Some(pool) => return Err(permission_denied(&format!("/pool/{pool}"), "VM.Allocate")),
            None => return Err(permission_denied(&format!("/vms/{newid}"), "VM.Allocate")),
        }
    }

    // The checks qemu-server's clone API makes before forking the worker, in its order; each
    // `die`s, which the API server turns into a 500 with the text as reason phrase.
    let source_vm = vm_on_node(state, node, source)?;
    if let Some(lock) = &source_vm.lock {
        return Err(locked(lock));
    }
    let is_template = source_vm.is_template();
    let full = full.unwrap_or(!is_template);
    for field in ["storage", "format"] {
        if !full && params.contains_key(field) {
            return Err(fail(
                500,
                format!("parameter '{field}' not allowed for linked clones"),
            ));
        }
    }
    let target = params
        .get("target")
        .filter(|target| *target != node)
        .cloned();
    if let Some(target) = &target {
        if !state.is_known_node(target) {
            return Err(fail(500, format!("no such cluster node '{target}'")));
        }
        if uses_local_storage(&source_vm.config) {
            return Err(fail(
                500,
                format!("can't clone VM to node '{target}' (VM uses local storage)"),
            ));
        }
    }
    if let Some(Fault::CloneRequestFails {
        status, message, ..
    }) = state.take_counted(|fault| matches!(fault, Fault::CloneRequestFails { .. }))
    {
        return Err(fail(status, message));
    }
    if state.vms.contains_key(&newid) {
        return Err(fail(
            500,
            format!("unable to create VM {newid}: config file already exists"),
        ));
    }
    let source_vm = vm_on_node(state, node, source)?;
    let source_disk = source_vm.config.get("scsi0").cloned().unwrap_or_default();
    let source_storage = drive_storage(&source_disk)
        .unwrap_or("local-lvm")
        .to_string();
    // Only a template's base volume on thin storage can back a linked clone.
    let linked_clone_ok = is_template
        && is_thin_storage(&source_storage)
        && source_disk.contains(&format!("base-{source}-disk"));
    if !full && !linked_clone_ok {
        let volume = source_disk.split(',').next().unwrap_or_default();
        return Err(fail(
            500,
            format!("Linked clone feature is not supported for '{volume}' (scsi0)"),
        ));
    }

    let source_vm = vm_on_node(state, node, source)?;
    let mut config = source_vm.config.clone();
    config.remove("template");
    let name = params
        .get("name")
        .cloned()
        .unwrap_or_else(|| format!("Copy-of-VM-{}", source_vm.name()));
    config.insert("name".into(), name);
    if let Some(description) = params.get("description") {
        config.insert("description".into(), description.clone());
    }
    let bridge_and_rest = config
        .get("net0")
        .and_then(|net0| net0.split_once(',').map(|(_, rest)| rest.to_string()))
        .unwrap_or_else(|| "bridge=vmbr0".into());
    config.insert(
        "net0".into(),
        format!("virtio={},{bridge_and_rest}", random_mac()),
    );
    let size = source_disk
        .split(',')
        .find_map(|part| part.strip_prefix("size="))
        .unwrap_or("20G")
        .to_string();
    // A full clone goes to the source's storage unless `storage` says otherwise.
    let storage = params
        .get("storage")
        .cloned()
        .unwrap_or_else(|| source_storage.clone());
    let disk = if full {
        format!("{storage}:vm-{newid}-disk-0,size={size}")
    } else {
        format!("{source_storage}:base-{source}-disk-0/vm-{newid}-disk-0,size={size}")
    };
    config.insert("scsi0".into(), disk);
    if config.contains_key("ide2") {
        config.insert(
            "ide2".into(),
            format!("{storage}:vm-{newid}-cloudinit,media=cdrom"),
        );
    }
    config.insert(
        "smbios1".into(),
        format!("uuid={}", super::state::pseudo_uuid(rand::random::<u128>())),
    );
    config.insert(
        "vmgenid".into(),
        super::state::pseudo_uuid(rand::random::<u128>()),
    );

    // Decide the task's fate now: faults are counted per request.
    let concurrent_limit = state
        .faults_for_caller()
        .iter()
        .find_map(|fault| match fault {
            Fault::ConcurrentCloneLimit { max, message } => Some((*max, message.clone())),
            _ => None,
        });
    let mut error = state
        .take_counted(|fault| matches!(fault, Fault::CloneTaskFails { .. }))
        .and_then(|fault| match fault {
            Fault::CloneTaskFails { message, .. } => Some(message),
            _ => None,
        });
    let mut duration = if full {
        state.config.clone_time * 3
    } else {
        state.config.clone_time
    };
    if error.is_none() {
        if let Some((max, message)) = concurrent_limit {
            if state.running_good_clones() >= max {
                error = Some(message);
                // A lock timeout ends the task early (after ~10 s on PVE; quick here).
                duration = duration.min(state.config.task_time);
            }
        }
    }
    // A clone into a VMID whose worker has not written its config yet passes the early check,
    // then its own worker times out on that VMID's config lock.
    if error.is_none() && state.pending_clones.iter().any(|p| p.vmid == newid) {
        error = Some(format!(
            "can't lock file '/var/lock/qemu-server/lock-{newid}.conf' - got timeout"
        ));
        duration = duration.min(state.config.task_time);
    }
    let agent_never = state.has_fault(|fault| matches!(fault, Fault::AgentNeverStarts));
    let pool = params.get("pool").cloned();
    let node_name = node.to_string();
    let now = Instant::now();
    let ends = now + duration;
    // Joining the pool comes last, a moment after the lock is gone.
    let pool_step = (duration / 10).min(Duration::from_millis(20));
    let config_at = (now + state.config.clone_config_delay).min(ends - pool_step);
    let extra_lock = state
        .faults_for_caller()
        .iter()
        .find_map(|fault| match fault {
            Fault::LockAfterClone { duration } => Some(*duration),
            _ => None,
        });
    let unlock_at = match extra_lock {
        Some(extra) => ends + extra,
        None => ends - pool_step,
    };
    // A worker that cannot get the new VMID's lock writes nothing.
    let writes_config = error
        .as_deref()
        .is_none_or(|error| !error.contains(&format!("lock-{newid}.conf")));
    // The temporary config: `# qmclone temporary file` and `lock: clone`, nothing else.
    let vm = Vm {
        vmid: newid,
        node: node_name,
        running: false,
        lock: Some("clone".into()),
        lock_until: None,
        config: BTreeMap::new(),
        cloned_from: Some(source),
        full_clone: Some(full),
        pool: None,
        started_at: None,
        agent_ready_at: None,
        agent_never,
        destroying: false,
        cloud_init: None,
        booted_once: false,
        clone: Some(super::state::CloneProgress {
            full_config: error.is_none().then_some(config),
            // A linked clone's disk is a snapshot, written at once; a full clone's first disk
            // copy takes most of the task.
            full_at: if full {
                config_at + (ends - pool_step).saturating_duration_since(config_at) / 2
            } else {
                (config_at + state.config.clone_config_delay).min(ends - pool_step)
            },
            unlock_at,
            unlocked: false,
            pool,
            upid: String::new(),
            target,
        }),
    };
    let log = vec![
        format!(
            "create {} clone of drive scsi0 ({source_disk})",
            if full { "full" } else { "linked" }
        ),
        if full {
            "transferred 20.0 GiB of 20.0 GiB (100.00%)".to_string()
        } else {
            format!("  Logical volume \"vm-{newid}-disk-0\" created.")
        },
    ];
    let upid = state.spawn_task(TaskSpec {
        node: node.to_string(),
        kind: "qmclone",
        id: source.to_string(),
        duration,
        error,
        effect: Effect::CloneDone {
            vmid: newid,
            ok: true,
        },
        log,
    });
    if writes_config {
        let mut vm = vm;
        if let Some(progress) = vm.clone.as_mut() {
            progress.upid = upid.clone();
        }
        state.pending_clones.push(super::state::PendingClone {
            vmid: newid,
            upid: upid.clone(),
            config_at,
            vm,
        });
        // Apply at once what is already due (a zero delay writes the config right away).
        state.advance();
    }
    let running = state.running_clones();
    state.max_concurrent_clones = state.max_concurrent_clones.max(running);
    let node_fails = |fault: &Fault| matches!(fault, Fault::NodeDownAfterCloneRequest { node: down, .. } if down == node);
    if state.take_counted(node_fails).is_some() {
        state.offline_nodes.insert(node.to_string());
    }
    Ok(Value::String(upid))
}

// ---------------------------------------------------------------------------------------------
// Create and convert to template.

/// `POST /nodes/{node}/qemu`: a new VM from parameters (new disks as `storage:SIZE_GIB`,
/// `storage:cloudinit` for the cloud-init drive, NICs without a MAC get a random one). As
/// qemu-server's `create_vm`: `VM.Allocate` on `/vms/<vmid>` or on `/pool/<pool>`; the config is
/// created locked (`lock: create`) before the worker is forked, and a taken VMID fails at once
/// with `unable to create VM N - VM N already exists on node 'X'`. Simplified: the full config
/// and the pool membership are there at once; the lock goes when the `qmcreate` task ends.
fn create_vm(state: &mut State, node: &str, params: &BTreeMap<String, String>) -> Result<Value> {
    let mut errors = BTreeMap::new();
    let mut allowed: Vec<&str> = SETTABLE_KEYS.to_vec();
    allowed.extend(["vmid", "pool", "scsihw", "start", "unique"]);
    check_allowed(params, &allowed, &mut errors);
    let vmid = match params.get("vmid") {
        None => {
            errors.insert(
                "vmid".into(),
                "property is missing and it is not optional".into(),
            );
            None
        }
        Some(raw) => match parse_vmid("vmid", raw) {
            Ok(id) => Some(id),
            Err(Reply::Fail {
                errors: Some(field_errors),
                ..
            }) => {
                errors.extend(field_errors);
                None
            }
            Err(_) => None,
        },
    };
    parse_bool(params, "start", &mut errors);
    if params.get("name").is_some_and(|name| !is_dns_name(name)) {
        errors.insert(
            "name".into(),
            "invalid format - value does not look like a valid DNS name".into(),
        );
    }
    let tags = match params.get("tags").map(|raw| normalize_tags(raw)) {
        Some(Err(message)) => {
            errors.insert("tags".into(), message);
            None
        }
        Some(Ok(tags)) => Some(tags),
        None => None,
    };
    if params
        .get("description")
        .is_some_and(|d| d.len() > MAX_DESCRIPTION)
    {
        errors.insert(
            "description".into(),
            format!("value may only be {MAX_DESCRIPTION} characters long"),
        );
    }
    if !errors.is_empty() {
        return Err(param_errors(errors));
    }
    let Some(vmid) = vmid else {
        return Err(param_error(
            "vmid",
            "property is missing and it is not optional",
        ));
    };
    let pool = params.get("pool").cloned();
    if let Some(pool) = &pool {
        if !state.pool_exists(pool) {
            return Err(param_error("pool", format!("pool '{pool}' does not exist")));
        }
    }
    if state.caller == Caller::CoTenant {
        state.co_tenant.check_allocate(vmid, pool.as_deref())?;
    } else if let Some(scope) = &state.config.token_pool {
        match &pool {
            Some(pool) if pool == scope => {}
            Some(pool) => return Err(permission_denied(&format!("/pool/{pool}"), "VM.Allocate")),
            None => return Err(permission_denied(&format!("/vms/{vmid}"), "VM.Allocate")),
        }
    }
    if let Some(existing) = state.vms.get(&vmid) {
        return Err(fail(
            500,
            format!(
                "unable to create VM {vmid} - VM {vmid} already exists on node '{}'",
                existing.node
            ),
        ));
    }
    if state.pending_clones.iter().any(|p| p.vmid == vmid) {
        return Err(fail(
            500,
            format!("unable to create VM {vmid} - {}", lock_timeout(vmid)),
        ));
    }

    let mut config = BTreeMap::new();
    let mut error = None;
    let mut log = Vec::new();
    for (key, value) in params {
        if matches!(key.as_str(), "vmid" | "pool" | "start" | "unique") {
            continue;
        }
        let value = match key.as_str() {
            "tags" => tags.clone().unwrap_or_default(),
            _ if is_drive_key(key) => {
                let (volume, options) = value.split_once(',').unwrap_or((value.as_str(), ""));
                let options = if options.is_empty() {
                    String::new()
                } else {
                    format!(",{options}")
                };
                match volume.split_once(':') {
                    Some((storage, _)) if !STORAGES.iter().any(|(name, ..)| *name == storage) => {
                        error = Some(format!(
                            "unable to create VM {vmid} - storage '{storage}' does not exist"
                        ));
                        value.clone()
                    }
                    Some((storage, "cloudinit")) => {
                        format!("{storage}:vm-{vmid}-cloudinit{options}")
                    }
                    Some((storage, size)) if size.chars().all(|c| c.is_ascii_digit()) => {
                        let index = config
                            .keys()
                            .filter(|key: &&String| is_drive_key(key))
                            .count();
                        log.push(format!(
                            "  Logical volume \"vm-{vmid}-disk-{index}\" created."
                        ));
                        format!("{storage}:vm-{vmid}-disk-{index},size={size}G{options}")
                    }
                    _ => value.clone(),
                }
            }
            // `virtio,bridge=vmbr0`: no MAC given, PVE adds a random one.
            _ if key.starts_with("net") && !value.split(',').next().unwrap_or("").contains('=') => {
                let (model, rest) = value.split_once(',').unwrap_or((value.as_str(), ""));
                format!("{model}={},{rest}", random_mac())
                    .trim_end_matches(',')
                    .to_string()
            }
            _ => value.clone(),
        };
        config.insert(key.clone(), value);
    }
    config.insert(
        "smbios1".into(),
        format!("uuid={}", super::state::pseudo_uuid(rand::random::<u128>())),
    );
    config.insert(
        "vmgenid".into(),
        super::state::pseudo_uuid(rand::random::<u128>()),
    );
    state.vms.insert(
        vmid,
        Vm {
            vmid,
            node: node.to_string(),
            running: false,
            lock: Some("create".into()),
            lock_until: None,
            config,
            cloned_from: None,
            full_clone: None,
            pool,
            started_at: None,
            agent_ready_at: None,
            agent_never: false,
            destroying: false,
            cloud_init: None,
            booted_once: false,
            clone: None,
        },
    );
    let duration = state.config.task_time;
    Ok(Value::String(state.spawn_task(TaskSpec {
        node: node.to_string(),
        kind: "qmcreate",
        id: vmid.to_string(),
        duration,
        error,
        effect: Effect::Created { vmid },
        log,
    })))
}

/// `scsi0`, `virtio1`, `sata2`, `ide2`, `efidisk0`, `tpmstate0`.
fn is_drive_key(key: &str) -> bool {
    let bus = key.trim_end_matches(|c: char| c.is_ascii_digit());
    (matches!(bus, "scsi" | "virtio" | "sata" | "ide") && bus != key)
        || matches!(key, "efidisk0" | "tpmstate0")
}

/// `POST /nodes/{node}/qemu/{vmid}/template`, as qemu-server's `template` endpoint: it loads
/// the config and checks, in this order, the lock (`VM is locked (clone)`), that it is not a
/// template already (`you can't convert a template to a template`, unless `disk` is given) and
/// not running (`you can't convert a VM to template if VM is running`), each a 500 before any
/// task; then a `qmtemplate` worker sets `template: 1` and renames the disks to base volumes.
/// Needs `VM.Allocate` on `/vms/<vmid>`.
fn make_template(
    state: &mut State,
    node: &str,
    vmid: u32,
    params: &BTreeMap<String, String>,
) -> Result<Value> {
    let mut errors = BTreeMap::new();
    check_allowed(params, &["disk"], &mut errors);
    if !errors.is_empty() {
        return Err(param_errors(errors));
    }
    let vm = vm_on_node(state, node, vmid)?;
    if let Some(lock) = &vm.lock {
        return Err(locked(lock));
    }
    if vm.is_template() && !params.contains_key("disk") {
        return Err(fail(500, "you can't convert a template to a template"));
    }
    if vm.running {
        return Err(fail(
            500,
            "you can't convert a VM to template if VM is running",
        ));
    }
    let log = vm
        .config
        .iter()
        .filter(|(key, value)| is_drive_key(key) && value.contains(&format!("vm-{vmid}-disk")))
        .map(|(_, value)| {
            let volume = value.split(',').next().unwrap_or_default();
            let name = volume.rsplit(['/', ':']).next().unwrap_or_default();
            format!(
                "  Renamed \"{name}\" to \"{}\" in volume group \"pve\"",
                name.replacen("vm-", "base-", 1)
            )
        })
        .collect();
    let duration = state.config.task_time;
    Ok(Value::String(state.spawn_task(TaskSpec {
        node: node.to_string(),
        kind: "qmtemplate",
        id: vmid.to_string(),
        duration,
        error: None,
        effect: Effect::Templated { vmid },
        log,
    })))
}

/// `GET /access/permissions` asked by the co-tenant: its own privileges (PVE answers only
/// about oneself without Sys.Audit).
fn co_tenant_permissions(state: &State, params: &BTreeMap<String, String>) -> Value {
    let paths: Vec<String> = match params.get("path") {
        Some(path) => vec![path.clone()],
        None => state.co_tenant.acl.keys().cloned().collect(),
    };
    let mut answer = Map::new();
    for path in paths {
        let held = match path
            .strip_prefix("/vms/")
            .and_then(|id| id.parse::<u32>().ok())
        {
            Some(vmid) => {
                let pool = state.vms.get(&vmid).and_then(|vm| vm.pool.as_deref());
                state.co_tenant.on_vm(vmid, pool)
            }
            None => state.co_tenant.on_path(&path),
        };
        let privileges: Map<String, Value> =
            held.into_iter().map(|name| (name, json!(1))).collect();
        answer.insert(path, Value::Object(privileges));
    }
    Value::Object(answer)
}

// ---------------------------------------------------------------------------------------------
// Config, resize, status.

/// Config keys whose schema type is an integer; PVE's JSON gives them as numbers.
const NUMERIC_KEYS: &[&str] = &[
    "cores",
    "sockets",
    "template",
    "vcpus",
    "cpuunits",
    "onboot",
    "protection",
    "numa",
    "balloon",
];

fn get_config(state: &State, node: &str, vmid: u32) -> Result<Value> {
    let vm = vm_on_node(state, node, vmid)?;
    let mut object = Map::new();
    for (key, value) in &vm.config {
        let rendered = match value.parse::<u64>() {
            Ok(number) if NUMERIC_KEYS.contains(&key.as_str()) => json!(number),
            _ => Value::String(value.clone()),
        };
        object.insert(key.clone(), rendered);
    }
    if let Some(lock) = &vm.lock {
        object.insert("lock".into(), Value::String(lock.clone()));
    }
    object.insert("digest".into(), Value::String(digest(vm)));
    Ok(Value::Object(object))
}

/// Like PVE's (a SHA-1 of the config file, lock line included): 40 hex digits that change with
/// every write.
fn digest(vm: &Vm) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let lock = vm.lock.iter().map(|lock| ("lock", lock.as_str()));
    let config = vm
        .config
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()));
    for (key, value) in config.chain(lock) {
        hasher.update(key.as_bytes());
        hasher.update(b": ");
        hasher.update(value.as_bytes());
        hasher.update(b"\n");
    }
    hasher.finalize()[..20]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

const SETTABLE_KEYS: &[&str] = &[
    "name",
    "cores",
    "sockets",
    "memory",
    "balloon",
    "agent",
    "tags",
    "description",
    "ciuser",
    "cipassword",
    "sshkeys",
    "ipconfig0",
    "ipconfig1",
    "nameserver",
    "searchdomain",
    "net0",
    "net1",
    "onboot",
    "cpu",
    "ostype",
    "boot",
    "serial0",
    "vga",
    "scsi0",
    "ide2",
    "cicustom",
    "citype",
    "protection",
];

fn set_config(
    state: &mut State,
    node: &str,
    vmid: u32,
    params: &BTreeMap<String, String>,
) -> Result<()> {
    let mut errors = BTreeMap::new();
    let mut updates = BTreeMap::new();
    let mut deletes = Vec::new();
    for (key, value) in params {
        match key.as_str() {
            "digest" | "skiplock" | "background_delay" => {}
            "delete" => deletes.extend(
                value
                    .split([',', ';', ' '])
                    .filter(|key| !key.is_empty())
                    .map(str::to_string),
            ),
            "tags" => match normalize_tags(value) {
                Ok(tags) => {
                    updates.insert(key.clone(), tags);
                }
                Err(message) => {
                    errors.insert(key.clone(), message);
                }
            },
            "description" if value.len() > MAX_DESCRIPTION => {
                errors.insert(
                    key.clone(),
                    format!("value may only be {MAX_DESCRIPTION} characters long"),
                );
            }
            "sshkeys" if !is_urlencoded(value) => {
                errors.insert(
                    key.clone(),
                    "invalid format - invalid urlencoded string".into(),
                );
            }
            "cores" | "sockets" | "memory" | "balloon" => match value.parse::<u64>() {
                Ok(number) if number >= 1 || key == "balloon" => {
                    updates.insert(key.clone(), number.to_string());
                }
                Ok(_) => {
                    errors.insert(key.clone(), "value must have a minimum value of 1".into());
                }
                Err(_) => {
                    errors.insert(
                        key.clone(),
                        format!("type check ('integer') failed - got '{value}'"),
                    );
                }
            },
            "name" if !is_dns_name(value) => {
                errors.insert(
                    key.clone(),
                    "invalid format - value does not look like a valid DNS name".into(),
                );
            }
            other if SETTABLE_KEYS.contains(&other) => {
                updates.insert(key.clone(), value.clone());
            }
            _ => {
                errors.insert(
                    key.clone(),
                    "property is not defined in schema and the schema does not allow additional properties"
                        .into(),
                );
            }
        }
    }
    if !errors.is_empty() {
        return Err(param_errors(errors));
    }
    root_only(params, &["skiplock"])?;
    // update_vm_api unescapes `sshkeys` and has `ssh-keygen -l` read every line, before it
    // takes the config lock; a plain die, so a 500.
    if let Some(keys) = params.get("sshkeys") {
        let lines = super::state::decode_sshkeys(keys);
        if !lines.iter().all(|line| is_public_key_line(line)) {
            return Err(fail(500, "SSH public key validation error"));
        }
    }
    let vm = vm_on_node_mut(state, node, vmid)?;
    // qemu-server compares the digest inside the config lock, before the VM lock: this is
    // the compare-and-swap a warm-pool claim relies on. QEMU configs answer with
    // update_vm_api's own wording, not PVE::Tools::assert_if_modified's (LXC, node, firewall).
    if let Some(expected) = params.get("digest").filter(|digest| !digest.is_empty()) {
        if *expected != digest(vm) {
            return Err(fail(500, "checksum mismatch (file change by other user?)"));
        }
    }
    if let Some(lock) = &vm.lock {
        return Err(locked(lock));
    }
    for key in deletes {
        vm.config.remove(&key);
    }
    vm.config.extend(updates);
    Ok(())
}

fn resize(
    state: &mut State,
    node: &str,
    vmid: u32,
    params: &BTreeMap<String, String>,
) -> Result<Value> {
    let mut errors = BTreeMap::new();
    let disk = params.get("disk");
    let size = params.get("size");
    if disk.is_none() {
        errors.insert(
            "disk".into(),
            "property is missing and it is not optional".into(),
        );
    }
    let parsed = size.and_then(|size| parse_size(size));
    match size {
        None => {
            errors.insert(
                "size".into(),
                "property is missing and it is not optional".into(),
            );
        }
        Some(raw) if parsed.is_none() => {
            errors.insert(
                "size".into(),
                format!("value does not match the regex pattern - got '{raw}'"),
            );
        }
        _ => {}
    }
    if !errors.is_empty() {
        return Err(param_errors(errors));
    }
    let (Some(disk), Some((grow, bytes))) = (disk, parsed) else {
        return Err(fail(500, "internal error in the fake: resize"));
    };
    let vm = vm_on_node_mut(state, node, vmid)?;
    if let Some(lock) = &vm.lock {
        return Err(locked(lock));
    }
    let Some(current) = vm.config.get(disk).cloned() else {
        return Err(fail(500, format!("disk '{disk}' does not exist")));
    };
    let current_gib = current
        .split(',')
        .find_map(|part| part.strip_prefix("size="))
        .and_then(parse_size)
        .map(|(_, bytes)| bytes)
        .unwrap_or(0);
    let new_bytes = if grow { current_gib + bytes } else { bytes };
    if new_bytes < current_gib {
        return Err(fail(500, "shrinking disks is not supported"));
    }
    let updated: Vec<String> = current
        .split(',')
        .map(|part| {
            if part.starts_with("size=") {
                format!("size={}G", new_bytes >> 30)
            } else {
                part.to_string()
            }
        })
        .collect();
    vm.config.insert(disk.clone(), updated.join(","));
    let duration = state.config.task_time;
    Ok(Value::String(state.spawn_task(TaskSpec {
        node: node.to_string(),
        kind: "qmresize",
        id: vmid.to_string(),
        duration,
        error: None,
        effect: Effect::None,
        log: vec![format!("resize {disk} to {}G", new_bytes >> 30)],
    })))
}

/// `+10G`, `32G`, `512M`, `1T` or bytes → (grow, bytes).
fn parse_size(raw: &str) -> Option<(bool, u64)> {
    let (grow, rest) = match raw.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, raw),
    };
    let (number, unit) = match rest.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((index, _)) => rest.split_at(index),
        None => (rest, ""),
    };
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return None,
    };
    Some((grow, number.checked_mul(factor)?))
}

fn status_current(state: &State, node: &str, vmid: u32) -> Result<Value> {
    let vm = vm_on_node(state, node, vmid)?;
    let now = Instant::now();
    let mut object = Map::new();
    object.insert("vmid".into(), json!(vm.vmid));
    object.insert("name".into(), json!(vm.name()));
    object.insert("status".into(), json!(vm.status()));
    object.insert(
        "qmpstatus".into(),
        json!(if vm.running { "running" } else { "stopped" }),
    );
    object.insert("uptime".into(), json!(vm.uptime(now)));
    object.insert(
        "cpus".into(),
        json!(config_number(vm, "cores").unwrap_or(1)),
    );
    object.insert(
        "maxmem".into(),
        json!(config_number(vm, "memory").unwrap_or(512) * 1024 * 1024),
    );
    object.insert("maxdisk".into(), json!(21474836480u64));
    object.insert("ha".into(), json!({ "managed": 0 }));
    if vm.agent_enabled() {
        object.insert("agent".into(), json!(1));
    }
    if vm.running {
        object.insert("pid".into(), json!(10000 + vm.vmid % 50000));
        object.insert("running-machine".into(), json!("pc-i440fx-8.1+pve0"));
        object.insert("running-qemu".into(), json!("8.1.5"));
    }
    if let Some(lock) = &vm.lock {
        object.insert("lock".into(), json!(lock));
    }
    if let Some(tags) = vm.config.get("tags") {
        object.insert("tags".into(), json!(tags));
    }
    if vm.is_template() {
        object.insert("template".into(), json!(1));
    }
    Ok(Value::Object(object))
}

// ---------------------------------------------------------------------------------------------
// Power and delete.

fn power(
    state: &mut State,
    node: &str,
    vmid: u32,
    action: &str,
    params: &BTreeMap<String, String>,
) -> Result<Value> {
    let mut errors = BTreeMap::new();
    let allowed: &[&str] = match action {
        "start" => &["timeout", "skiplock", "machine", "migratedfrom", "stateuri"],
        "stop" => &[
            "timeout",
            "skiplock",
            "keepActive",
            "migratedfrom",
            "overrule-shutdown",
        ],
        _ => &["timeout", "skiplock", "keepActive", "forceStop"],
    };
    check_allowed(params, allowed, &mut errors);
    parse_bool(params, "forceStop", &mut errors);
    parse_bool(params, "keepActive", &mut errors);
    if let Some(timeout) = params.get("timeout") {
        if timeout.parse::<u64>().is_err() {
            errors.insert(
                "timeout".into(),
                format!("type check ('integer') failed - got '{timeout}'"),
            );
        }
    }
    if !errors.is_empty() {
        return Err(param_errors(errors));
    }
    root_only(
        params,
        &["skiplock", "keepActive", "migratedfrom", "stateuri"],
    )?;
    // qemu-server forks the worker without looking at the VM; everything else fails the task.
    let vm = state.vms.get(&vmid).filter(|vm| vm.node == node);
    let missing = vm.is_none().then(|| missing_config_text(node, vmid));
    let busy = vm.is_some_and(|vm| vm.destroying);
    let lock = vm.and_then(|vm| vm.lock.clone());
    let running = vm.is_some_and(|vm| vm.running);
    let template = vm.is_some_and(Vm::is_template);
    let duration = state.config.task_time;
    let (kind, mut error, effect, log) = match action {
        "start" => {
            let boot_time = state.config.boot_time;
            let error = if let Some(missing) = missing {
                Some(missing)
            } else if busy {
                Some(lock_timeout(vmid))
            } else if let Some(lock) = lock {
                Some(format!("VM is locked ({lock})"))
            } else if template {
                Some("you can't start a vm if it's a template".to_string())
            } else if running {
                Some(format!("VM {vmid} already running"))
            } else {
                None
            };
            (
                "qmstart",
                error,
                Effect::Started { vmid, boot_time },
                vec![format!("start VM {vmid}")],
            )
        }
        _ => {
            let error = if let Some(missing) = missing {
                Some(missing)
            } else if busy {
                Some(lock_timeout(vmid))
            } else {
                lock.map(|lock| format!("VM is locked ({lock})"))
            };
            let kind = if action == "stop" {
                "qmstop"
            } else {
                "qmshutdown"
            };
            (
                kind,
                error,
                Effect::Stopped { vmid },
                vec![format!("{action} VM {vmid}")],
            )
        }
    };
    if error.is_none() && action == "start" {
        error = state
            .take_counted(|fault| matches!(fault, Fault::StartTaskFails { .. }))
            .and_then(|fault| match fault {
                Fault::StartTaskFails { message, .. } => Some(message),
                _ => None,
            });
        if error.is_none() {
            state.simulated_time += state.config.boot_time;
        }
    }
    Ok(Value::String(state.spawn_task(TaskSpec {
        node: node.to_string(),
        kind,
        id: vmid.to_string(),
        duration,
        error,
        effect,
        log,
    })))
}

fn lock_timeout(vmid: u32) -> String {
    format!("can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout")
}

fn destroy(
    state: &mut State,
    node: &str,
    vmid: u32,
    params: &BTreeMap<String, String>,
) -> Result<Value> {
    let mut errors = BTreeMap::new();
    check_allowed(
        params,
        &["purge", "destroy-unreferenced-disks", "skiplock"],
        &mut errors,
    );
    parse_bool(params, "purge", &mut errors);
    parse_bool(params, "destroy-unreferenced-disks", &mut errors);
    if !errors.is_empty() {
        return Err(param_errors(errors));
    }
    root_only(params, &["skiplock"])?;
    let vm = vm_on_node_mut(state, node, vmid)?;
    if vm.config.get("protection").is_some_and(|p| p == "1") {
        return Err(fail(
            500,
            format!("can't remove VM {vmid} - protection mode enabled"),
        ));
    }
    // The only early check besides existence; the lock is checked inside the worker.
    if vm.running {
        return Err(fail(500, format!("VM {vmid} is running - destroy failed")));
    }
    let already_destroying = vm.destroying;
    let lock = vm.lock.clone();
    if !already_destroying && lock.is_none() {
        vm.destroying = true;
    }
    let mut duration = state.config.task_time;
    let mut error = None;
    if already_destroying {
        // The second destroy waits for the first one's config lock, then finds no config.
        let now = Instant::now();
        let first_ends = state
            .tasks
            .iter()
            .filter(|task| task.kind == "qmdestroy" && task.id == vmid.to_string())
            .filter(|task| task.running())
            .map(|task| task.ends)
            .max()
            .unwrap_or(now);
        duration = duration.max(first_ends.saturating_duration_since(now));
        error = Some(missing_config_text(node, vmid));
    } else if let Some(lock) = lock {
        error = Some(format!("VM is locked ({lock})"));
    }
    Ok(Value::String(state.spawn_task(TaskSpec {
        node: node.to_string(),
        kind: "qmdestroy",
        id: vmid.to_string(),
        duration,
        error: error.clone(),
        effect: if error.is_some() {
            Effect::None
        } else {
            Effect::Destroyed { vmid }
        },
        log: vec![format!(
            "  Logical volume \"vm-{vmid}-disk-0\" successfully removed."
        )],
    })))
}

// ---------------------------------------------------------------------------------------------
// Tasks.

fn task_status(state: &State, node: &str, upid: &str) -> Result<Value> {
    let task = find_task(state, node, upid)?;
    let mut object = json!({
        "upid": task.upid,
        "node": task.node,
        "pid": task.pid,
        "pstart": task.pstart,
        "starttime": task.starttime,
        "type": task.kind,
        "id": task.id,
        "user": task.user,
        "status": if task.done { "stopped" } else { "running" },
    });
    if task.done {
        if let Some(map) = object.as_object_mut() {
            map.insert("exitstatus".into(), Value::String(task.exitstatus.clone()));
        }
    }
    Ok(object)
}

/// `GET /nodes/<node>/tasks`: the node's tasks, newest first. A token sees its own tasks
/// (`userfilter` matches part of the user, `vmid` the task's id, `source=active` only the
/// running ones).
fn task_list(state: &State, node: &str, params: &BTreeMap<String, String>) -> Result<Value> {
    let source = params.get("source").map_or("archive", String::as_str);
    if !matches!(source, "archive" | "active" | "all") {
        return Err(param_error(
            "source",
            format!(
                "value '{source}' does not have a value in the enumeration 'archive, active, all'"
            ),
        ));
    }
    let limit: usize = params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(50);
    let own = state.caller_user();
    let mut tasks: Vec<&super::state::Task> = state
        .tasks
        .iter()
        .filter(|task| task.node == node && task.user == own)
        .filter(|task| match source {
            "active" => task.running(),
            "archive" => !task.running(),
            _ => true,
        })
        .filter(|task| {
            params
                .get("typefilter")
                .is_none_or(|kind| task.kind == kind)
        })
        .filter(|task| params.get("vmid").is_none_or(|vmid| &task.id == vmid))
        .filter(|task| {
            params.get("userfilter").is_none_or(|user| {
                task.user
                    .to_ascii_lowercase()
                    .contains(&user.to_ascii_lowercase())
            })
        })
        .collect();
    tasks.sort_by(|a, b| b.starttime.cmp(&a.starttime).then(b.pid.cmp(&a.pid)));
    Ok(Value::Array(
        tasks
            .into_iter()
            .take(limit)
            .map(|task| {
                let mut entry = json!({
                    "upid": task.upid, "node": task.node, "pid": task.pid, "pstart": task.pstart,
                    "starttime": task.starttime, "type": task.kind, "id": task.id, "user": task.user,
                });
                if task.done {
                    if let Some(map) = entry.as_object_mut() {
                        map.insert("status".into(), json!(task.exitstatus));
                        map.insert("endtime".into(), json!(task.starttime));
                    }
                }
                entry
            })
            .collect(),
    ))
}

fn find_task<'a>(state: &'a State, node: &str, upid: &str) -> Result<&'a super::state::Task> {
    let parts: Vec<&str> = upid.split(':').collect();
    if parts.len() < 9 || parts[0] != "UPID" {
        return Err(param_error("upid", "unable to parse worker upid"));
    }
    // Each node only knows its own tasks; pvedaemon on another node has no such file.
    match state.find_task(upid) {
        // Another user's task needs Sys.Audit on the node (the co-tenant has none).
        Some(task) if state.caller == Caller::CoTenant && task.user != state.caller_user() => {
            Err(permission_denied(&format!("/nodes/{node}"), "Sys.Audit"))
        }
        Some(task) if task.node == node => Ok(task),
        _ => Err(param_error("upid", "no such task")),
    }
}

fn task_log(
    state: &State,
    node: &str,
    upid: &str,
    params: &BTreeMap<String, String>,
) -> Result<Reply> {
    let task = find_task(state, node, upid)?;
    let start: usize = params
        .get("start")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let limit: usize = params
        .get("limit")
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let lines: Vec<&String> = if task.done {
        task.log.iter().collect()
    } else {
        // The final TASK line appears only when the task ends.
        task.log
            .iter()
            .take(task.log.len().saturating_sub(1))
            .collect()
    };
    let total = lines.len();
    let entries: Vec<Value> = lines
        .into_iter()
        .enumerate()
        .skip(start)
        .take(limit)
        .map(|(index, text)| json!({ "n": index + 1, "t": text }))
        .collect();
    let mut extra = Map::new();
    extra.insert("total".into(), json!(total));
    Ok(Reply::DataWith(Value::Array(entries), extra))
}
