//! What a cluster listing alone says about a guest: the one place that decides which listed
//! VMs are candidates to be ours. A candidate is only that: its marker (and, for a warm VM,
//! the marker's MAC) decides. Anyone with `VM.Allocate` can give a VM of theirs our tag, a
//! VMID in our range and a marker line, so nothing here is proof.

use crate::proxmox::types::ClusterVm;

/// Whether `tags` (PVE: `a;b`, older or hand-edited: `a,b` or `a b`) holds the driver's tag.
pub fn has_driver_tag(tags: Option<&str>) -> bool {
    tags.unwrap_or("")
        .split([';', ',', ' '])
        .any(|tag| tag.trim() == crate::VM_TAG)
}

/// What the listing alone says about a guest.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstLook {
    Foreign,
    /// Ours by tag, in range: read its marker.
    Tagged {
        node: String,
        vmid: u32,
    },
    /// In range but without the tag: what a prepare that died between the clone and tagging
    /// leaves; its marker decides.
    Untagged {
        node: String,
        vmid: u32,
    },
}

/// A QEMU guest, not a template, on a named node, with its VMID inside `range`; tagged or not.
pub fn first_look(vm: &ClusterVm, range: (u32, u32)) -> FirstLook {
    let Ok(vmid) = u32::try_from(vm.vmid) else {
        return FirstLook::Foreign;
    };
    let is_qemu = vm.kind.as_deref().is_none_or(|kind| kind == "qemu");
    if !is_qemu || vm.template || vm.node.is_empty() || !(range.0..=range.1).contains(&vmid) {
        return FirstLook::Foreign;
    }
    let node = vm.node.clone();
    if has_driver_tag(vm.tags.as_deref()) {
        FirstLook::Tagged { node, vmid }
    } else {
        FirstLook::Untagged { node, vmid }
    }
}

/// Whether a listed VM takes a place on its node for placement: one of ours by tag, or a
/// clone in flight into our range (it carries only its lock until it is configured).
pub fn occupies_our_range(vm: &ClusterVm, range: (u32, u32)) -> bool {
    match first_look(vm, range) {
        FirstLook::Tagged { .. } => true,
        FirstLook::Untagged { .. } => vm.lock.as_deref() == Some("clone"),
        FirstLook::Foreign => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_match_whole_words_in_any_separator_style() {
        assert!(has_driver_tag(Some("gitlab-proxmox-runner")));
        assert!(has_driver_tag(Some("ubuntu;gitlab-proxmox-runner")));
        assert!(has_driver_tag(Some("a, gitlab-proxmox-runner")));
        assert!(!has_driver_tag(Some("gitlab-proxmox-runner-old")));
        assert!(!has_driver_tag(Some("template;ubuntu")));
        assert!(!has_driver_tag(None));
    }

    fn listed(vmid: u64, tags: Option<&str>, template: bool) -> ClusterVm {
        ClusterVm {
            vmid,
            node: "pve1".into(),
            name: None,
            status: Some("running".into()),
            template,
            tags: tags.map(String::from),
            lock: None,
            kind: Some("qemu".into()),
            maxmem: None,
        }
    }

    #[test]
    fn only_tagged_non_templates_in_range_are_looked_at() {
        let range = (2_000_000, 2_999_999);
        let ours = Some("gitlab-proxmox-runner");
        assert_eq!(
            first_look(&listed(2_000_001, ours, false), range),
            FirstLook::Tagged {
                node: "pve1".into(),
                vmid: 2_000_001
            }
        );
        assert_eq!(
            first_look(&listed(2_000_001, ours, true), range),
            FirstLook::Foreign
        );
        assert_eq!(
            first_look(&listed(1_999_999, ours, false), range),
            FirstLook::Foreign
        );
        assert_eq!(
            first_look(&listed(3_000_000, ours, false), range),
            FirstLook::Foreign
        );
        assert_eq!(
            first_look(&listed(2_000_001, Some("ubuntu"), false), range),
            FirstLook::Untagged {
                node: "pve1".into(),
                vmid: 2_000_001
            }
        );
        assert_eq!(
            first_look(&listed(1_000_001, Some("ubuntu"), false), range),
            FirstLook::Foreign
        );
        let mut container = listed(2_000_001, ours, false);
        container.kind = Some("lxc".into());
        assert_eq!(first_look(&container, range), FirstLook::Foreign);
    }

    #[test]
    fn a_clone_in_flight_takes_a_place_before_it_is_tagged() {
        let range = (2_000_000, 2_999_999);
        let mut cloning = listed(2_000_002, None, false);
        assert!(!occupies_our_range(&cloning, range));
        cloning.lock = Some("clone".into());
        assert!(occupies_our_range(&cloning, range));
        assert!(occupies_our_range(
            &listed(2_000_003, Some("gitlab-proxmox-runner"), false),
            range
        ));
        assert!(!occupies_our_range(
            &listed(2_000_003, Some("gitlab-proxmox-runner"), true),
            range
        ));
    }
}
