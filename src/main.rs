use std::process::ExitCode;

use clap::Parser;
use gitlab_proxmox_runner::cli::{effective_args, Cli};
use gitlab_proxmox_runner::{app, hardening, ExitCodes};

/// musl's malloc returns freed buffers to the kernel eagerly, so every SSH packet of a stage's
/// output cost page faults; see Cargo.toml.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    hardening::disable_core_dumps();
    let cli = match Cli::try_parse_from(effective_args(std::env::args_os())) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(ExitCodes::from_env().system_failure as u8)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    ExitCode::from(app::execute(cli).clamp(0, 255) as u8)
}
