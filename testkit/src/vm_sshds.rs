//! One real sshd per fake VM, each with host keys of its own, for tests where VMs must not
//! share a host key (the warm pool refuses clones that do, as a template that was never cleaned
//! gives them). Each VM gets its own loopback address (`127.0.1.1`, `127.0.1.2`, ...) on the
//! lab's SSH port, its sshd's ed25519 key served through the fake's agent; the sshd starts
//! before the VM's agent first answers (a couple are kept spare) and stops when the VM is
//! destroyed.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::fake_proxmox::{FakeProxmox, GuestEvent, GuestIdentities, GuestIdentity};
use crate::lab::ED25519_HOST_KEY_FILE;
use crate::sshd::Sshd;
use crate::sshkeys::ClientKey;

/// Identities ready for VMs that have not booted yet: a burst of warm-ups finds them waiting.
const SPARES: usize = 3;

/// The sshds of the lab's VMs; dropping it stops them all.
pub struct VmSshds {
    running: Arc<Mutex<Option<BTreeMap<IpAddr, Sshd>>>>,
    identities: GuestIdentities,
    thread: Option<JoinHandle<()>>,
}

impl VmSshds {
    /// Serves `fake`'s VMs on `port`, each sshd authorizing `key` (baked into the template's
    /// image) and what the VM's cloud-init applies at first boot.
    pub fn start(fake: &FakeProxmox, port: u16, key: &ClientKey) -> VmSshds {
        VmSshds::start_with(fake, port, Some(key))
    }

    /// [`VmSshds::start`] for a template with `baked` in its image, or no key at all (`None`):
    /// then each VM accepts exactly the keys its cloud-init applied at first boot.
    pub fn start_with(fake: &FakeProxmox, port: u16, baked: Option<&ClientKey>) -> VmSshds {
        let (spares, events) = fake.own_guest_identities();
        let running: Arc<Mutex<Option<BTreeMap<IpAddr, Sshd>>>> =
            Arc::new(Mutex::new(Some(BTreeMap::new())));
        let identities = spares.clone();
        let mut maker = Maker {
            spares,
            running: Arc::clone(&running),
            port,
            baked: baked.cloned(),
            next: 0,
            outstanding: 0,
        };
        for _ in 0..SPARES {
            maker.add_spare();
        }
        let thread = std::thread::spawn(move || {
            // Ends when the channel closes (`GuestIdentities::close`).
            while let Ok(event) = events.recv() {
                match event {
                    GuestEvent::Taken => {
                        maker.outstanding = maker.outstanding.saturating_sub(1);
                        if maker.outstanding < SPARES {
                            maker.add_spare();
                        }
                    }
                    GuestEvent::Wanted if maker.outstanding == 0 => maker.add_spare(),
                    GuestEvent::Wanted => {}
                    GuestEvent::Released(identity) => {
                        let stopped = maker
                            .lock()
                            .as_mut()
                            .and_then(|sshds| sshds.remove(&identity.ip));
                        drop(stopped);
                    }
                }
            }
        });
        VmSshds {
            running,
            identities,
            thread: Some(thread),
        }
    }

    /// How many VM sshds run now.
    pub fn count(&self) -> usize {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .map_or(0, BTreeMap::len)
    }
}

impl Drop for VmSshds {
    fn drop(&mut self) {
        // Stops every sshd, and any the thread would start later.
        let sshds = self
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        drop(sshds);
        // Closing the fake's event channel ends the thread.
        self.identities.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Maker {
    spares: GuestIdentities,
    running: Arc<Mutex<Option<BTreeMap<IpAddr, Sshd>>>>,
    port: u16,
    /// The key baked into the template's image, if any.
    baked: Option<ClientKey>,
    next: u32,
    /// Spares added and not taken yet.
    outstanding: usize,
}

impl Maker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<BTreeMap<IpAddr, Sshd>>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts an sshd on the next free loopback address and offers it to the fake.
    fn add_spare(&mut self) {
        let mut last_error = String::new();
        // An address someone else holds the port on is skipped.
        for _ in 0..10 {
            self.next += 1;
            let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 1, 0)) + self.next);
            match Sshd::builder().listen(addr, self.port).try_start() {
                Ok(sshd) => {
                    if let Some(key) = &self.baked {
                        sshd.authorize(key);
                    }
                    let authorized_keys = sshd.authorized_keys_path().to_path_buf();
                    let ed25519 = sshd
                        .host_key_lines()
                        .into_iter()
                        .find(|line| line.starts_with("ssh-ed25519 "))
                        .expect("the test sshd has an ed25519 host key");
                    let mut running = self.lock();
                    let Some(sshds) = running.as_mut() else {
                        return; // the lab is gone
                    };
                    sshds.insert(IpAddr::V4(addr), sshd);
                    drop(running);
                    self.spares.add(GuestIdentity {
                        ip: IpAddr::V4(addr),
                        files: BTreeMap::from([(
                            ED25519_HOST_KEY_FILE.to_string(),
                            format!("{ed25519}\n"),
                        )]),
                        authorized_keys: Some(authorized_keys),
                    });
                    self.outstanding += 1;
                    return;
                }
                Err(err) => last_error = err,
            }
        }
        eprintln!("vm_sshds: no sshd for a new VM: {last_error}");
    }
}
