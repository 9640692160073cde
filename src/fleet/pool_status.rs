//! `gitlab-proxmox-runner pool status`: the warm VMs of every `WARM_POOL` template as the
//! cluster shows them now, one line each, for people without Prometheus. Read-only: the same
//! listing as a round of the pool service (warm VMs whose MAC verifies with the fleet key),
//! nothing changed.

use std::time::Duration;

use super::FleetContext;
use crate::error::{Error, Result};
use crate::joblog;
use crate::pool::{list_warm, Scope, WarmVm};
use crate::proxmox::Client;
use crate::vm::placement;

/// One warm VM's line.
#[derive(Debug, serde::Serialize)]
struct Line<'a> {
    template: &'a str,
    node: &'a str,
    vmid: u32,
    /// `warming` (no address and host keys yet), `ready` (claimable), `stopped` (warmed, not
    /// running: the next round recycles it), `locked`.
    state: &'static str,
    age_secs: u64,
    /// Seconds until its idle deadline (0: past it; the next round recycles it).
    idle_left_secs: u64,
    pool: &'a str,
}

fn state(warm: &WarmVm) -> &'static str {
    if warm.locked {
        "locked"
    } else if !warm.is_complete() {
        "warming"
    } else if !warm.running {
        "stopped"
    } else {
        "ready"
    }
}

pub async fn status(context: &FleetContext, json: bool) -> Result<()> {
    let settings = &context.settings;
    if settings.warm.pool.is_empty() {
        return Err(Error::Settings(
            "WARM_POOL is not set: there is no warm pool to show".into(),
        ));
    }
    let client = Client::new(&settings.api)?;
    let key = crate::pool::warm::fleet_key(settings)?;
    let now = joblog::now_epoch();
    let mut failed = Vec::new();
    for (name, target) in &settings.warm.pool {
        let listing = async {
            let copies = placement::Strategy::of(settings)
                .copies(&client, settings, name)
                .await?;
            list_warm(&client, settings.vmid_range, &Scope::of(&copies), key).await
        };
        let mut listing = match listing.await {
            Ok(listing) => listing,
            Err(err) => {
                eprintln!("gitlab-proxmox-runner: {name}: {err}");
                failed.push(name.as_str());
                continue;
            }
        };
        listing.warm.sort_by(|a, b| {
            (&a.vm.node, a.marker.created, a.vm.vmid).cmp(&(
                &b.vm.node,
                b.marker.created,
                b.vm.vmid,
            ))
        });
        let ready = listing.warm.iter().filter(|w| state(w) == "ready").count();
        let warming = listing
            .warm
            .iter()
            .filter(|w| state(w) == "warming")
            .count();
        if !json {
            println!("{name}: {ready} ready, {warming} warming, {target} wanted");
        }
        for warm in &listing.warm {
            let line = Line {
                template: name,
                node: &warm.vm.node,
                vmid: warm.vm.vmid,
                state: state(warm),
                age_secs: warm.marker.age_secs(),
                idle_left_secs: warm
                    .marker
                    .deadline
                    .map_or(0, |deadline| deadline.saturating_sub(now)),
                pool: warm.marker.warm.as_ref().map_or("-", |w| w.pool.as_str()),
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&line).unwrap_or_else(|_| "{}".into())
                );
            } else {
                println!(
                    "  {:<8} {:<12} VM {:<8} age {:<8} idle deadline in {:<8} pool {}",
                    line.state,
                    line.node,
                    line.vmid,
                    joblog::age(Duration::from_secs(line.age_secs)),
                    joblog::age(Duration::from_secs(line.idle_left_secs)),
                    line.pool
                );
            }
        }
        if listing.look_alikes > 0 && !json {
            println!(
                "  ({} look-alike warm VMs ignored: their MAC does not verify)",
                listing.look_alikes
            );
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Infrastructure(format!(
            "pool status: could not list the warm VMs of {}",
            failed.join(", ")
        )))
    }
}
