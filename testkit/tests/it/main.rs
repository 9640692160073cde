//! The testkit's own tests: one binary, a module per area.

mod common;
mod fake_proxmox;
mod fake_proxmox_fixtures;
mod runner;
