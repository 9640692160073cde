//! The VMID range the driver allocates from, as the cluster holds it now.

use crate::check::api::Api;
use crate::check::Finding;
use crate::config::Settings;
use crate::marker::Marker;
use crate::proxmox::types::ClusterVm;
use crate::proxmox::ApiError;
use crate::vm::ownership::{first_look, FirstLook};

/// Whether `PROXMOX_VMID_RANGE` holds only this driver's VMs (those carrying its marker): a
/// foreign guest there takes VMIDs from the jobs and confuses whoever reads the range as ours.
pub async fn range_finding(
    api: &Api,
    settings: &Settings,
    vms: Result<Vec<ClusterVm>, ApiError>,
) -> Finding {
    let (low, high) = settings.vmid_range;
    let id = "vmid_range";
    let vms = match vms {
        Ok(vms) => vms,
        Err(err) => {
            return Finding::fail(
                id,
                format!("VMID range {low}-{high}: cannot list the cluster's guests: {err}"),
                "the token's VM.Audit (see the privilege lines)",
            )
        }
    };
    let mut ours = 0;
    let mut foreign = Vec::new();
    for vm in &vms {
        // Templates and containers in the range count as foreign; any QEMU guest, tagged or
        // not, as ours when its marker parses.
        let vmid = match first_look(vm, (low, high)) {
            FirstLook::Tagged { vmid, .. } | FirstLook::Untagged { vmid, .. } => vmid,
            FirstLook::Foreign => match u32::try_from(vm.vmid) {
                Ok(vmid) if (low..=high).contains(&vmid) => {
                    foreign.push(format!(
                        "{vmid} ({} on {})",
                        vm.name.as_deref().unwrap_or("unnamed"),
                        vm.node
                    ));
                    continue;
                }
                _ => continue,
            },
        };
        let marked = matches!(
            api.client.vm_config(&vm.node, vmid).await,
            Ok(Some(config)) if config.description().as_deref().and_then(Marker::find_in).is_some()
        );
        if marked {
            ours += 1;
        } else {
            foreign.push(format!(
                "{vmid} ({} on {})",
                vm.name.as_deref().unwrap_or("unnamed"),
                vm.node
            ));
        }
    }
    if foreign.is_empty() {
        Finding::pass(
            id,
            format!("VMID range {low}-{high} (PROXMOX_VMID_RANGE) holds no foreign VM ({ours} of this driver's)"),
        )
    } else {
        Finding::fail(
            id,
            format!(
                "VMID range {low}-{high} (PROXMOX_VMID_RANGE) holds {} guest(s) that are not this \
                 driver's: {}",
                foreign.len(),
                foreign.join(", ")
            ),
            "keep the range free of other guests: move them out of it, or choose another \
             PROXMOX_VMID_RANGE",
        )
    }
}
