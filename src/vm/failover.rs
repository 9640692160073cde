//! Bringing a VM up on another node when the node under it fails (`PROXMOX_NODES`): the loop
//! every caller that may move shares, so that the rule for "may this node be left for
//! another" lives in one place ([`Strategy::may_fail_over`]).

use std::collections::HashSet;

use super::placement::Strategy;
use crate::error::{Error, Result};
use crate::proxmox::ApiError;

/// Nodes one bring-up tries when nodes fail under it.
pub const MAX_NODE_ATTEMPTS: usize = 3;

/// One caller's tries at a VM on a node placement chooses.
#[allow(async_fn_in_trait)] // used in this crate only, on one thread
pub trait NodeAttempts {
    /// Places the VM (skipping `avoid`) and brings it up.
    async fn attempt(&mut self, avoid: &HashSet<String>) -> Result<()>;
    /// After a failed attempt: the node its VM was placed on (if placement got that far), and
    /// the template's node when the clone ran there (a clone with `target`).
    fn failed_nodes(&mut self) -> (Option<String>, Option<String>);
    /// What the failed attempt was doing, for the log ("waiting for SSH").
    fn step(&self) -> String;
    /// Removes the failed attempt's VM, or keeps it for the caller's cleanup.
    async fn give_up(&mut self) -> Result<()>;
    fn warn(&self, message: &str);
}

/// Runs `attempts` until one succeeds, moving to another node after a node failure (an API
/// error that [`ApiError::is_node_failure`]) while the strategy allows it and fewer than
/// [`MAX_NODE_ATTEMPTS`] nodes were tried. Any other error ends it.
pub async fn fail_over(strategy: Strategy<'_>, attempts: &mut impl NodeAttempts) -> Result<()> {
    let mut avoid = HashSet::new();
    loop {
        let err: Error = match attempts.attempt(&avoid).await {
            Ok(()) => return Ok(()),
            Err(err) => err,
        };
        let (failed_node, template_node) = attempts.failed_nodes();
        let node_failed = err.api_error().is_some_and(ApiError::is_node_failure);
        let (Some(node), true) = (failed_node, node_failed) else {
            return Err(err);
        };
        if !strategy.may_fail_over() || avoid.len() + 1 >= MAX_NODE_ATTEMPTS {
            return Err(err);
        }
        attempts.warn(&format!(
            "node {node} failed while {} ({err}); placing the VM on another node",
            attempts.step()
        ));
        avoid.insert(node);
        // A clone with `target` talks to the template's node too, and the error does not say
        // which of the two failed: avoid both.
        avoid.extend(template_node);
        attempts.give_up().await?;
    }
}
