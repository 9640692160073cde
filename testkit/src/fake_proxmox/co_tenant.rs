//! A second user of the fake cluster: `mallory@pve` with the API token `mallory@pve!t`, who is
//! not the driver's admin but holds `VM.Allocate` and friends on a resource pool of its own, the
//! way a colleague, another team or another CI system shares a Proxmox cluster with us.
//!
//! Server side ([`CoTenantAccount`]): the fake accepts the co-tenant's token next to the
//! driver's, and unlike the driver's (see the module docs of `fake_proxmox`) checks the
//! co-tenant's privileges on every VM endpoint the way PVE does (`403 Permission check failed
//! (/vms/N, PRIV)`, a VM in a pool inheriting the pool's ACL), shows it only the VMs it may
//! audit, and names it in the UPIDs of its tasks. Injected [`Fault`](super::Fault)s are aimed at
//! the driver: the co-tenant's requests neither trigger nor consume them, and they are recorded
//! apart ([`FakeProxmox::co_tenant_requests`]), so request counts of the driver stay exact.
//!
//! Client side ([`CoTenant`], from [`FakeProxmox::co_tenant`]): real HTTPS requests with the
//! co-tenant's token, blocking, usable from plain and from `#[tokio::test]` tests.
//!
//! What the co-tenant may do by default, as PVE's built-in roles would grant it:
//! - `PVEVMAdmin`-like privileges ([`CO_TENANT_ROLE`]) on `/pool/tenant`: it can create VMs
//!   (`POST /nodes/N/qemu`) and clone into **any free VMID** (ours included: VMIDs are not
//!   reserved) as long as it puts them into its pool, and then configure (name, tags,
//!   description), start, stop, delete them and convert them to templates.
//! - `PVETemplateUser` (`VM.Clone`, `VM.Audit`) on `/vms/<id>` of each template of
//!   [`FakeConfig::templates`](super::FakeConfig): the admin lets everyone clone the shared
//!   templates. Templates added later with [`NewVm`](super::NewVm) get nothing unless a test
//!   grants it with [`FakeProxmox::set_co_tenant_acl`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::access::most_specific;
use super::api::{fail, Reply};
use super::FakeProxmox;

/// The co-tenant's user.
pub const CO_TENANT_USER: &str = "mallory@pve";
/// The co-tenant's token name: its token id is `mallory@pve!t`.
pub const CO_TENANT_TOKEN_NAME: &str = "t";
/// The co-tenant's pool: VMs it creates or clones go there (its clients pass `pool=tenant`).
pub const CO_TENANT_POOL: &str = "tenant";
const CO_TENANT_TOKEN_VALUE: &str = "c0-7e4a-47-mallory-5b1d";

/// PVE's `PVEVMAdmin` role, roughly: everything about VMs, nothing about the cluster.
pub const CO_TENANT_ROLE: &[&str] = &[
    "VM.Allocate",
    "VM.Clone",
    "VM.Audit",
    "VM.Backup",
    "VM.Console",
    "VM.Migrate",
    "VM.PowerMgmt",
    "VM.Snapshot",
    "VM.Monitor",
    "VM.GuestAgent.Audit",
    "VM.Config.Options",
    "VM.Config.CPU",
    "VM.Config.Memory",
    "VM.Config.Disk",
    "VM.Config.CDROM",
    "VM.Config.Network",
    "VM.Config.HWType",
    "VM.Config.Cloudinit",
];

/// PVE's `PVETemplateUser` role: may look at and clone a template.
pub const TEMPLATE_USER_ROLE: &[&str] = &["VM.Clone", "VM.Audit"];

/// Which user a request authenticated as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Caller {
    /// The driver's token ([`FakeConfig::token_user`](super::FakeConfig)).
    #[default]
    Runner,
    /// `mallory@pve!t`.
    CoTenant,
}

/// The co-tenant's identity and ACL, held in the fake's state.
#[derive(Debug, Clone)]
pub(crate) struct CoTenantAccount {
    pub acl: BTreeMap<String, BTreeSet<String>>,
}

impl CoTenantAccount {
    pub fn new(template_vmids: impl IntoIterator<Item = u32>) -> CoTenantAccount {
        let set = |privileges: &[&str]| -> BTreeSet<String> {
            privileges.iter().map(|p| p.to_string()).collect()
        };
        let mut acl = BTreeMap::from([
            (format!("/pool/{CO_TENANT_POOL}"), set(CO_TENANT_ROLE)),
            (
                "/storage".to_string(),
                set(&["Datastore.AllocateSpace", "Datastore.Audit"]),
            ),
        ]);
        for vmid in template_vmids {
            acl.insert(format!("/vms/{vmid}"), set(TEMPLATE_USER_ROLE));
        }
        CoTenantAccount { acl }
    }

    pub fn token_id() -> String {
        format!("{CO_TENANT_USER}!{CO_TENANT_TOKEN_NAME}")
    }

    /// Whether `Authorization: PVEAPIToken=<id>=<value>` is the co-tenant's.
    pub fn accepts(id: &str, value: &str) -> bool {
        id == Self::token_id() && value == CO_TENANT_TOKEN_VALUE
    }

    /// Its privileges on `/vms/<vmid>`: the most specific ACL path at or above it, plus what
    /// the VM's pool grants (PVE lets a pool's ACL cover its members).
    pub fn on_vm(&self, vmid: u32, pool: Option<&str>) -> BTreeSet<String> {
        let mut held = most_specific(&self.acl, &format!("/vms/{vmid}"));
        if let Some(pool) = pool {
            held.extend(most_specific(&self.acl, &format!("/pool/{pool}")));
        }
        held
    }

    /// Its privileges on any other path (`/pool/tenant`, `/storage/local-lvm`, ...).
    pub fn on_path(&self, path: &str) -> BTreeSet<String> {
        most_specific(&self.acl, path)
    }

    /// PVE's check before a VM is created or cloned into `vmid`: `VM.Allocate` on
    /// `/vms/<vmid>`, or on `/pool/<pool>` when the request names a pool.
    pub fn check_allocate(&self, vmid: u32, pool: Option<&str>) -> Result<(), Reply> {
        let path = format!("/vms/{vmid}");
        if self.on_path(&path).contains("VM.Allocate") {
            return Ok(());
        }
        match pool {
            Some(pool)
                if self
                    .on_path(&format!("/pool/{pool}"))
                    .contains("VM.Allocate") =>
            {
                Ok(())
            }
            Some(pool) => Err(fail(
                403,
                format!("Permission check failed (/pool/{pool}, VM.Allocate)"),
            )),
            None => Err(fail(
                403,
                format!("Permission check failed ({path}, VM.Allocate)"),
            )),
        }
    }
}

/// The privilege PVE checks on `/vms/<vmid>` for the co-tenant's request, by endpoint.
pub(crate) fn privilege_for(
    method: &str,
    rest: &[&str],
    params: &BTreeMap<String, String>,
) -> &'static str {
    match (method, rest) {
        ("DELETE", []) => "VM.Allocate",
        ("POST", ["clone"]) => "VM.Clone",
        ("POST", ["template"]) => "VM.Allocate",
        ("PUT" | "POST", ["config"]) => config_privilege(params),
        ("PUT" | "POST", ["resize"]) => "VM.Config.Disk",
        ("POST", ["status", _]) => "VM.PowerMgmt",
        (_, ["agent", ..]) => "VM.Monitor",
        _ => "VM.Audit",
    }
}

/// The most demanding privilege among the keys a config update sets (PVE checks each key's).
fn config_privilege(params: &BTreeMap<String, String>) -> &'static str {
    let for_key = |key: &str| -> &'static str {
        let bus = key.trim_end_matches(|c: char| c.is_ascii_digit());
        match bus {
            "cores" | "sockets" | "vcpus" | "cpu" | "cpuunits" | "numa" => "VM.Config.CPU",
            "memory" | "balloon" => "VM.Config.Memory",
            "net" => "VM.Config.Network",
            "ciuser" | "cipassword" | "sshkeys" | "ipconfig" | "nameserver" | "searchdomain"
            | "citype" | "cicustom" => "VM.Config.Cloudinit",
            "scsi" | "virtio" | "sata" | "ide" | "efidisk" | "tpmstate" => "VM.Config.Disk",
            "vga" | "serial" | "ostype" | "machine" => "VM.Config.HWType",
            _ => "VM.Config.Options",
        }
    };
    params
        .keys()
        .filter(|key| !matches!(key.as_str(), "digest" | "delete" | "skiplock"))
        .map(|key| for_key(key))
        .find(|privilege| *privilege != "VM.Config.Options")
        .unwrap_or("VM.Config.Options")
}

// ---------------------------------------------------------------------------------------------
// The client.

/// An answer the co-tenant got that was not a success: the HTTP status and PVE's message (the
/// reason phrase, or the `errors` map of a 400), or a task that ended with an error (status 0,
/// the task's exit status as message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.status == 0 {
            write!(f, "task failed: {}", self.message)
        } else {
            write!(f, "HTTP {}: {}", self.status, self.message)
        }
    }
}

impl std::error::Error for ApiError {}

/// The co-tenant `mallory@pve!t` acting over HTTPS with its own token, as a real second user of
/// the cluster would (from [`FakeProxmox::co_tenant`]). Every call is a blocking HTTP request;
/// the calls that start a task (clone, create, start, template) wait until the task has ended
/// and fail with its exit status. Clones and new VMs go into the co-tenant's pool
/// ([`CO_TENANT_POOL`]), which is what its ACL allows.
///
/// ```ignore
/// let mallory = fake.co_tenant();
/// // A look-alike of our template on pve3, where we have no copy.
/// mallory.create_template("pve3", 61950, "ubuntu-focal")?;
/// // A VM in our VMID range, named and tagged like one of ours, running.
/// mallory.clone_vm("pve1", 60900, 2_000_123, "ci-job-42")?;
/// mallory.set_config("pve1", 2_000_123, &[("tags", "gitlab-ci"), ("description", "...")])?;
/// mallory.start("pve1", 2_000_123)?;
/// ```
#[derive(Debug, Clone)]
pub struct CoTenant {
    base: String,
    auth: String,
    ca_der: Vec<u8>,
}

impl FakeProxmox {
    /// The co-tenant `mallory@pve!t`: another user of the same cluster with `VM.Allocate` on
    /// its own pool (see [`CoTenant`] and the `co_tenant` module's docs for its ACL).
    pub fn co_tenant(&self) -> CoTenant {
        CoTenant {
            base: self.api_url(),
            auth: format!(
                "PVEAPIToken={}={CO_TENANT_TOKEN_VALUE}",
                CoTenantAccount::token_id()
            ),
            ca_der: self.tls.ca_der.clone(),
        }
    }

    /// Replaces the co-tenant's ACL entry on `path` (e.g. `/vms/61900` with
    /// [`TEMPLATE_USER_ROLE`] to let it clone a template added with `NewVm`; an empty list takes
    /// everything `path` would inherit away).
    pub fn set_co_tenant_acl(&self, path: &str, privileges: &[&str]) {
        let privileges = privileges.iter().map(|p| p.to_string()).collect();
        self.lock()
            .co_tenant
            .acl
            .insert(path.to_string(), privileges);
    }

    /// The co-tenant's requests so far (kept apart from [`FakeProxmox::requests`], which holds
    /// the driver's).
    pub fn co_tenant_requests(&self) -> Vec<super::RecordedRequest> {
        self.lock().co_tenant_requests.clone()
    }
}

impl CoTenant {
    /// `mallory@pve!t`, as its UPIDs name it.
    pub fn token_id(&self) -> String {
        CoTenantAccount::token_id()
    }

    /// `POST /nodes/{node}/qemu/{source}/clone` with `newid`, `name` and `pool=tenant`, then
    /// waits for the clone task. A linked clone when `source` is a template (PVE's default).
    pub fn clone_vm(
        &self,
        node: &str,
        source: u32,
        newid: u32,
        name: &str,
    ) -> Result<(), ApiError> {
        self.clone_vm_with(node, source, newid, &[("name", name)])
    }

    /// The same with further clone parameters (`target`, `full`, `description`, ...).
    pub fn clone_vm_with(
        &self,
        node: &str,
        source: u32,
        newid: u32,
        params: &[(&str, &str)],
    ) -> Result<(), ApiError> {
        let newid = newid.to_string();
        let mut form = vec![("newid", newid.as_str()), ("pool", CO_TENANT_POOL)];
        form.extend_from_slice(params);
        let upid = self.call("POST", &format!("/nodes/{node}/qemu/{source}/clone"), &form)?;
        self.wait_task(&upid_of(&upid)?)
    }

    /// `PUT /nodes/{node}/qemu/{vmid}/config` (`name`, `tags`, `description`, `memory`, ...).
    /// Tags are `;`-separated, as PVE stores them.
    pub fn set_config(
        &self,
        node: &str,
        vmid: u32,
        params: &[(&str, &str)],
    ) -> Result<(), ApiError> {
        self.call("PUT", &format!("/nodes/{node}/qemu/{vmid}/config"), params)
            .map(|_| ())
    }

    /// `POST .../status/start`, then waits for the start task (the guest then boots; its agent
    /// answers after the fake's boot time).
    pub fn start(&self, node: &str, vmid: u32) -> Result<(), ApiError> {
        let upid = self.call(
            "POST",
            &format!("/nodes/{node}/qemu/{vmid}/status/start"),
            &[],
        )?;
        self.wait_task(&upid_of(&upid)?)
    }

    /// `POST .../status/stop`, then waits for the task.
    pub fn stop(&self, node: &str, vmid: u32) -> Result<(), ApiError> {
        let upid = self.call(
            "POST",
            &format!("/nodes/{node}/qemu/{vmid}/status/stop"),
            &[],
        )?;
        self.wait_task(&upid_of(&upid)?)
    }

    /// `POST /nodes/{node}/qemu/{vmid}/template`: converts its (stopped) VM to a template, then
    /// waits for the `qmtemplate` task.
    pub fn make_template(&self, node: &str, vmid: u32) -> Result<(), ApiError> {
        let upid = self.call("POST", &format!("/nodes/{node}/qemu/{vmid}/template"), &[])?;
        self.wait_task(&upid_of(&upid)?)
    }

    /// `POST /nodes/{node}/qemu` with `vmid`, `pool=tenant` and `params` (`name`, `memory`,
    /// `scsi0=local-lvm:8` for a new 8 GiB disk, `net0=virtio,bridge=vmbr0`, `tags`, ...), then
    /// waits for the `qmcreate` task.
    pub fn create_vm(
        &self,
        node: &str,
        vmid: u32,
        params: &[(&str, &str)],
    ) -> Result<(), ApiError> {
        let vmid = vmid.to_string();
        let mut form = vec![("vmid", vmid.as_str()), ("pool", CO_TENANT_POOL)];
        form.extend_from_slice(params);
        let upid = self.call("POST", &format!("/nodes/{node}/qemu"), &form)?;
        self.wait_task(&upid_of(&upid)?)
    }

    /// A template of its own named `name` on `node`: creates a VM there (disk on the node's
    /// `local-lvm`, agent on, cloud-init drive) and converts it. A look-alike of one of ours
    /// for the node where we have no copy.
    pub fn create_template(&self, node: &str, vmid: u32, name: &str) -> Result<(), ApiError> {
        self.create_vm(
            node,
            vmid,
            &[
                ("name", name),
                ("memory", "2048"),
                ("cores", "2"),
                ("agent", "1"),
                ("ostype", "l26"),
                ("scsi0", "local-lvm:20"),
                ("ide2", "local-lvm:cloudinit,media=cdrom"),
                ("net0", "virtio,bridge=vmbr0"),
                ("tags", "template;ubuntu"),
                ("description", &format!("{name} cloud image template")),
            ],
        )?;
        self.make_template(node, vmid)
    }

    /// Any request: `GET`/`DELETE` parameters go into the query, `POST`/`PUT` ones into a form
    /// body. Answers the `data` of a success.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        params: &[(&str, &str)],
    ) -> Result<Value, ApiError> {
        let url = format!("{}{path}", self.base);
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|_| ApiError {
            status: 0,
            message: format!("not an HTTP method: {method}"),
        })?;
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        let client = self.client()?;
        let auth = self.auth.clone();
        // A runtime of its own on a thread of its own: callable from sync tests and from inside
        // a tokio test's runtime alike.
        let outcome = std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|err| transport(format!("building a runtime: {err}")))?;
                    runtime.block_on(async move {
                        let mut request = client
                            .request(method.clone(), url)
                            .header("Authorization", auth);
                        request = if method == reqwest::Method::GET
                            || method == reqwest::Method::DELETE
                        {
                            request.query(&params)
                        } else {
                            request.form(&params)
                        };
                        let response = request
                            .send()
                            .await
                            .map_err(|err| transport(format!("request failed: {err}")))?;
                        read_answer(response).await
                    })
                })
                .join()
        });
        match outcome {
            Ok(answer) => answer,
            Err(_) => Err(transport("the request thread panicked".into())),
        }
    }

    /// Polls the task's status on the node its UPID names until it has stopped; an exit status
    /// other than `OK` or `WARNINGS: N` is an error (status 0). Gives up after 30 s.
    pub fn wait_task(&self, upid: &str) -> Result<(), ApiError> {
        let node = upid.split(':').nth(1).unwrap_or_default().to_string();
        let encoded =
            percent_encoding::utf8_percent_encode(upid, percent_encoding::NON_ALPHANUMERIC);
        let path = format!("/nodes/{node}/tasks/{encoded}/status");
        // A real client's poll interval, short because the fake's tasks are.
        crate::poll(Duration::from_secs(30), Duration::from_millis(10), || {
            let status = match self.call("GET", &path, &[]) {
                Ok(status) => status,
                Err(err) => return Some(Err(err)),
            };
            if status["status"] != "stopped" {
                return None;
            }
            let exit = status["exitstatus"].as_str().unwrap_or_default();
            Some(if exit == "OK" || exit.starts_with("WARNINGS: ") {
                Ok(())
            } else {
                Err(ApiError {
                    status: 0,
                    message: exit.to_string(),
                })
            })
        })
        .unwrap_or_else(|| Err(transport(format!("task {upid} did not end within 30 s"))))
    }

    fn client(&self) -> Result<reqwest::Client, ApiError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(self.ca_der.clone()))
            .map_err(|err| transport(format!("the fake's CA: {err}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| transport(format!("TLS versions: {err}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .map_err(|err| transport(format!("building the HTTP client: {err}")))
    }
}

fn transport(message: String) -> ApiError {
    ApiError { status: 0, message }
}

fn upid_of(data: &Value) -> Result<String, ApiError> {
    data.as_str()
        .map(str::to_string)
        .ok_or_else(|| transport(format!("expected a UPID, got {data}")))
}

async fn read_answer(response: reqwest::Response) -> Result<Value, ApiError> {
    let status = response.status().as_u16();
    let reason = response
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|reason| String::from_utf8_lossy(reason.as_bytes()).into_owned());
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status == 200 {
        return Ok(body["data"].clone());
    }
    let mut message = reason.unwrap_or_default();
    if let Some(errors) = body["errors"].as_object() {
        let fields: Vec<String> = errors
            .iter()
            .map(|(field, text)| format!("{field}: {}", text.as_str().unwrap_or_default().trim()))
            .collect();
        message = format!("{message} {}", fields.join("; "));
    }
    Err(ApiError { status, message })
}
