//! Whether a VM's SSH host keys are its own.
//!
//! Pinning a host key read through the guest agent proves "this is the VM the agent runs in"
//! only if no other machine holds the same private key. A template whose host keys were never
//! removed gives every clone the same key: then any clone (another cluster user's clone of the
//! same template included, and any job, which is root in its VM and can read the key file)
//! can pose as any other on the network, and the pin proves nothing. No single VM shows this;
//! comparing VMs does. So the pool and `check --smoke` compare a new VM's keys with:
//!
//! - the pinned keys of the warm VMs on the cluster (their descriptions carry them);
//! - the keys of every warm VM this pool service made or saw before (its [`Ledger`]), so that
//!   a pool of one still notices once its second VM comes up;
//! - the template's own keys where they can be seen: a template cannot run, so its agent
//!   cannot be asked, but a clone's agent sometimes answers before first boot replaced the
//!   keys, and the keys read then are the template's (see `Sink::host_keys_replaced`).
//!
//! A duplicate is never a false alarm: two different VMs cannot generate the same key.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::VmRef;

/// How many keys a [`Ledger`] remembers (about 100 bytes each); the oldest go first.
const LEDGER_CAPACITY: usize = 10_000;

/// How many holders of a shared key the messages name.
const SHARED_HOLDERS_NAMED: usize = 3;

/// After a duplicate, the pool warms no VM of that template name for this long: every clone
/// of it would be refused too, and each costs a clone, a boot and a destroy.
pub const HOLD_OFF: Duration = Duration::from_secs(10 * 60);

/// What the README and the messages tell the admin to do.
pub const REGENERATE: &str = "regenerate the host keys in the template: remove \
     /etc/ssh/ssh_host_* from it and have them generated at first boot (cloud-init does so with \
     `ssh_deletekeys: true`, its default, after `cloud-init clean`; without cloud-init, a \
     first-boot unit that runs `ssh-keygen -A`), then convert it to a template again (README, \
     Proxmox checklist)";

/// Who holds a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Tells holders apart: a VM's marker nonce (a VMID can be reused), or `template <vmid>`.
    pub id: String,
    /// For people: `warm VM 2004711 on pve1`.
    pub label: String,
}

impl Holder {
    /// A VM, by the nonce of its marker: `warm VM 2004711 on pve1` for `what` = `warm VM`.
    pub fn vm(vm: &VmRef, nonce: &str, what: &str) -> Holder {
        Holder {
            id: nonce.to_string(),
            label: format!("{what} {} on {}", vm.vmid, vm.node),
        }
    }

    /// The template itself (keys a clone showed before first boot replaced them).
    pub fn template(vmid: u32, label: &str) -> Holder {
        Holder {
            id: format!("template {vmid}"),
            label: format!(
                "template {label} itself (read in a clone before its first boot replaced them)"
            ),
        }
    }
}

/// A key of the VM being judged that someone else holds too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    /// `ssh-ed25519 AAAA...`
    pub key: String,
    /// Who else: [`Holder::label`].
    pub other: String,
}

/// `ssh-ed25519 AAAA...` without a comment, for comparing; the line itself if it does not parse.
fn normalized(key: &str) -> String {
    crate::ssh::key_lines::public_key_line(key).unwrap_or_else(|| key.trim().to_string())
}

/// The keys in `keys` that a holder other than `own_id` in `others` holds too.
pub fn duplicates<'a>(
    keys: &[String],
    own_id: &str,
    others: impl IntoIterator<Item = (&'a Holder, &'a [String])>,
) -> Vec<Duplicate> {
    let mine: BTreeSet<String> = keys.iter().map(|key| normalized(key)).collect();
    let mut found = Vec::new();
    for (holder, their_keys) in others {
        if holder.id == own_id {
            continue;
        }
        for key in their_keys.iter().map(|key| normalized(key)) {
            if mine.contains(&key) && !found.iter().any(|d: &Duplicate| d.key == key) {
                found.push(Duplicate {
                    key,
                    other: holder.label.clone(),
                });
            }
        }
    }
    found
}

/// Why `vm`, a clone of `template` (`ubuntu-focal (60900)`), must not be trusted, and what the
/// admin must do.
pub fn cloned_keys_message(vm: &VmRef, template: &str, duplicates: &[Duplicate]) -> String {
    let shared: Vec<String> = duplicates
        .iter()
        .map(|duplicate| {
            let kind = duplicate.key.split_whitespace().next().unwrap_or("key");
            let fingerprint = crate::ssh::fingerprint_of_line(&duplicate.key)
                .unwrap_or_else(|| "(unparsable)".into());
            format!("{kind} {fingerprint}, also held by {}", duplicate.other)
        })
        .collect();
    format!(
        "{vm}, cloned from template {template}, has an SSH host key that is not its own ({}): \
         the template's clones share one host private key, so pinning it proves nothing (any \
         clone, another cluster user's included, and any job, as root in its VM, can read it \
         and pose as this VM); {REGENERATE}",
        shared.join("; ")
    )
}

/// What one pool service has seen: which VM first showed each key, which keys are known to be
/// shared, and which template names it holds off warming.
#[derive(Debug, Default)]
pub struct Ledger {
    holders: BTreeMap<String, Holder>,
    /// Keys in the order first seen, for [`LEDGER_CAPACITY`].
    order: VecDeque<String>,
    /// Keys seen on more than one holder, and the holders seen with each (a few, for the
    /// messages).
    shared: BTreeMap<String, Vec<Holder>>,
    held_off: BTreeMap<String, Instant>,
}

/// One ledger for the pool service's rounds and its warm-ups.
pub type SharedLedger = Arc<Mutex<Ledger>>;

impl Ledger {
    pub fn shared() -> SharedLedger {
        Arc::new(Mutex::new(Ledger::default()))
    }

    /// Records `keys` as `holder`'s and returns those another holder showed first (or that are
    /// known to be shared already). Those become shared keys.
    pub fn record(&mut self, keys: &[String], holder: &Holder) -> Vec<Duplicate> {
        let mut found = Vec::new();
        for key in keys.iter().map(|key| normalized(key)) {
            if let Some(seen) = self.shared.get_mut(&key) {
                let others: Vec<&str> = seen
                    .iter()
                    .filter(|other| other.id != holder.id)
                    .map(|other| other.label.as_str())
                    .collect();
                found.push(Duplicate {
                    key: key.clone(),
                    other: others.join(" and "),
                });
                if seen.len() < SHARED_HOLDERS_NAMED && !seen.iter().any(|h| h.id == holder.id) {
                    seen.push(holder.clone());
                }
                continue;
            }
            match self.holders.get(&key) {
                Some(first) if first.id != holder.id => {
                    found.push(Duplicate {
                        key: key.clone(),
                        other: first.label.clone(),
                    });
                    self.shared.insert(key, vec![first.clone(), holder.clone()]);
                }
                Some(_) => {}
                None => {
                    self.holders.insert(key.clone(), holder.clone());
                    self.order.push_back(key);
                    while self.order.len() > LEDGER_CAPACITY {
                        if let Some(oldest) = self.order.pop_front() {
                            self.holders.remove(&oldest);
                        }
                    }
                }
            }
        }
        found
    }

    /// Stops warming template name `name` until `until`.
    pub fn hold_off(&mut self, name: &str, until: Instant) {
        self.held_off.insert(name.to_string(), until);
    }

    /// Whether warming `name` is held off now.
    pub fn is_held_off(&self, name: &str) -> bool {
        self.held_off
            .get(name)
            .is_some_and(|until| Instant::now() < *until)
    }
}

/// Locks the ledger; a panic elsewhere while it was held leaves it usable.
pub fn lock(ledger: &SharedLedger) -> std::sync::MutexGuard<'_, Ledger> {
    ledger
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA0GkcNr1qXsL694TCv+gP+I9qw3rQik0xV5/4E4hKm9";
    const KEY_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINqkmz3nEp7b65WIHfG+Ic5yZeaOnMrWCOPMBLWy66nK";

    fn vm(vmid: u32) -> VmRef {
        VmRef {
            node: "pve1".into(),
            vmid,
        }
    }

    #[test]
    fn a_key_another_vm_holds_is_a_duplicate_whatever_its_comment() {
        let other = Holder::vm(&vm(2000002), "n2", "warm VM");
        let other_keys = vec![format!("{KEY_A} root@template")];
        let found = duplicates(
            &[KEY_A.to_string()],
            "n1",
            [(&other, other_keys.as_slice())],
        );
        assert_eq!(
            found,
            vec![Duplicate {
                key: KEY_A.into(),
                other: "warm VM 2000002 on pve1".into()
            }]
        );
        // Its own listing is not another VM.
        let me = Holder::vm(&vm(2000001), "n1", "warm VM");
        let mine = vec![KEY_A.to_string()];
        assert!(duplicates(&[KEY_A.to_string()], "n1", [(&me, mine.as_slice())]).is_empty());
        assert!(duplicates(
            &[KEY_B.to_string()],
            "n1",
            [(&other, other_keys.as_slice())]
        )
        .is_empty());
    }

    #[test]
    fn the_ledger_remembers_keys_of_vms_gone_since_and_marks_shared_keys() {
        let mut ledger = Ledger::default();
        let first = Holder::vm(&vm(2000001), "n1", "warm VM");
        let second = Holder::vm(&vm(2000002), "n2", "warm VM");
        let third = Holder::vm(&vm(2000003), "n3", "warm VM");
        assert!(ledger.record(&[KEY_A.into()], &first).is_empty());
        // Seen again with the same nonce (the next round's listing): still its own.
        assert!(ledger.record(&[KEY_A.into()], &first).is_empty());
        let found = ledger.record(&[KEY_A.into()], &second);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].other, "warm VM 2000001 on pve1");
        // From now on the first one is known to share it too, with the second.
        let found = ledger.record(&[KEY_A.into()], &first);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].other, "warm VM 2000002 on pve1");
        let found = ledger.record(&[KEY_A.into()], &third);
        assert_eq!(
            found[0].other,
            "warm VM 2000001 on pve1 and warm VM 2000002 on pve1"
        );
        let fourth = Holder::vm(&vm(2000004), "n4", "warm VM");
        assert!(ledger.record(&[KEY_B.into()], &fourth).is_empty());
        let template = Holder::template(60900, "ubuntu-focal (60900)");
        assert!(ledger.record(&[KEY_B.into()], &template)[0]
            .other
            .contains("warm VM 2000004"));
    }

    #[test]
    fn the_message_names_both_vms_the_fingerprint_and_the_fix() {
        let message = cloned_keys_message(
            &vm(2000002),
            "ubuntu-focal (60900)",
            &[Duplicate {
                key: KEY_A.into(),
                other: "warm VM 2000001 on pve1".into(),
            }],
        );
        for fragment in [
            "VM 2000002 on pve1, cloned from template ubuntu-focal (60900)",
            "ssh-ed25519 SHA256:",
            "also held by warm VM 2000001 on pve1",
            "remove /etc/ssh/ssh_host_*",
            "ssh_deletekeys",
            "ssh-keygen -A",
        ] {
            assert!(message.contains(fragment), "{fragment:?} in {message}");
        }
        assert!(
            !message.contains("AAAAC3"),
            "fingerprints, not keys: {message}"
        );
    }

    #[test]
    fn a_hold_off_ends() {
        let mut ledger = Ledger::default();
        assert!(!ledger.is_held_off("debian-12"));
        ledger.hold_off("debian-12", Instant::now() + HOLD_OFF);
        assert!(ledger.is_held_off("debian-12"));
        assert!(!ledger.is_held_off("ubuntu-focal"));
        ledger.hold_off("debian-12", Instant::now());
        assert!(!ledger.is_held_off("debian-12"));
    }
}
