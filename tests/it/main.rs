//! The integration tests: one binary (the crate links once), a module per area.

mod api_footprint;
mod check;
mod check_nodes;
mod cli;
mod common;
mod e2e;
mod examples;
mod gc;
mod hostile_job;
mod load;
mod per_vm_keys;
mod placement;
mod prepare_cleanup;
mod prepare_ssh;
mod real_pve;
mod ssh_bench;
mod ssh_bounds;
mod ssh_cancel;
mod ssh_inprocess;
mod ssh_keys;
mod ssh_lost_vm;
mod ssh_run_sshd;
mod tls;
mod vm_engine;
mod warm_pool;
mod warm_pool_nodes;
