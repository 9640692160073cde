//! Command line: subcommands per hook, plus the older driver's `vm_*_exec` names (symlinks to
//! this binary) so that its users can switch without editing config.toml.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "gitlab-proxmox-runner", version, about, long_about = None)]
pub struct Cli {
    /// The driver's TOML settings file (also: $GITLAB_PROXMOX_RUNNER_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// config_exec: print the driver JSON for gitlab-runner.
    Config,
    /// prepare_exec: clone a VM from the template, boot it, wait for SSH.
    Prepare,
    /// run_exec: run one stage script inside the job's VM.
    Run {
        /// The stage script gitlab-runner wrote.
        #[arg(allow_hyphen_values = true)]
        script: PathBuf,
        /// The stage name (any text).
        #[arg(allow_hyphen_values = true)]
        stage: String,
    },
    /// cleanup_exec: stop and destroy the job's VM.
    Cleanup,
    /// Destroy VMs this driver created whose jobs are long gone (run it from cron or a timer).
    Gc {
        /// Only VMs created by the runner host whose PROXMOX_RUNNER_ID this is (default:
        /// every runner's). VMs of older driver versions are judged by age alone.
        #[arg(long, value_name = "RUNNER_ID")]
        runner: Option<String>,
        /// Sweep VMs older than this, instead of each VM's own recorded deadline (e.g. 90m,
        /// 4h, 2d, 1h 30min). Without it, VMs of older driver versions count as orphans after 25h.
        #[arg(long, value_name = "AGE")]
        max_age: Option<String>,
        /// List what would be destroyed, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also write the sweep's results to this file for node_exporter's textfile collector
        /// (e.g. /var/lib/prometheus/node-exporter/gitlab-proxmox-runner-gc.prom), replaced
        /// whole with each sweep.
        #[arg(long, value_name = "PATH")]
        metrics_file: Option<PathBuf>,
    },
    /// Preflight: check the settings, the API, the token's privileges, the node, the templates,
    /// the VMID range and the SSH key, one line each (exit 0: all required checks passed).
    Check {
        /// Also run one throwaway VM end to end (clone, start, SSH, sudo, destroy).
        #[arg(long)]
        smoke: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = CheckFormat::Text)]
        format: CheckFormat,
    },
    /// Keep WARM_POOL warm VMs per template, ready for jobs to claim (run it as a service).
    #[command(args_conflicts_with_subcommands = true)]
    Pool {
        #[command(subcommand)]
        action: Option<PoolAction>,
        /// This service's id in its warm VMs' markers (default: PROXMOX_RUNNER_ID). Give
        /// every pool service on one host its own.
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// Seconds between looks at the cluster (a finished warm-up also starts one).
        #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
        interval: f64,
        /// Also run the orphan sweep (gc, each VM by its own deadline) every this many
        /// seconds, so one service covers fleet hygiene (default: never; use the gc timer).
        #[arg(long, value_name = "SECONDS")]
        gc_every: Option<u64>,
        /// Serve Prometheus metrics at http://ADDR:PORT/metrics (e.g. 127.0.0.1:9464; port 0
        /// picks a free one, named in the log). Default: no metrics.
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Print a fresh PROXMOX_FLEET_KEY (32 random bytes, base64) for the settings file of every
    /// runner host and pool service of one fleet.
    FleetKey,
}

/// What `pool` does instead of running the service.
#[derive(Debug, Subcommand)]
pub enum PoolAction {
    /// Show the warm VMs of every WARM_POOL template now: node, VMID, state, age, one line each.
    Status {
        /// One JSON object per warm VM per line instead.
        #[arg(long)]
        json: bool,
    },
}

/// How `check` prints its results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckFormat {
    Text,
    Json,
}

/// Maps the older driver's executable names onto subcommands.
fn subcommand_for_program_name(program: &str) -> Option<&'static str> {
    match program {
        "vm_config_exec" => Some("config"),
        "vm_prepare_exec" => Some("prepare"),
        "vm_run_exec" => Some("run"),
        "vm_cleanup_exec" => Some("cleanup"),
        _ => None,
    }
}

/// The arguments clap should see: `vm_run_exec a b` becomes `vm_run_exec run a b`.
pub fn effective_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.into_iter().collect();
    let program = args
        .first()
        .map(PathBuf::from)
        .and_then(|path| path.file_name().map(|n| n.to_string_lossy().into_owned()));
    if let Some(sub) = program.as_deref().and_then(subcommand_for_program_name) {
        args.insert(1.min(args.len()), OsString::from(sub));
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(effective_args(args.iter().map(OsString::from))).unwrap()
    }

    #[test]
    fn older_driver_names_map_to_subcommands() {
        assert!(matches!(
            parse(&["/usr/local/bin/vm_prepare_exec"]).command,
            Command::Prepare
        ));
        match parse(&["vm_run_exec", "/tmp/s/script", "build_script"]).command {
            Command::Run { stage, .. } => assert_eq!(stage, "build_script"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pool_runs_the_service_with_flags_or_shows_its_status() {
        match parse(&[
            "gitlab-proxmox-runner",
            "pool",
            "--id",
            "X",
            "--interval",
            "0.2",
        ])
        .command
        {
            Command::Pool {
                action: None,
                id,
                interval,
                metrics_listen: None,
                ..
            } => assert_eq!((id.as_deref(), interval), (Some("X"), 0.2)),
            other => panic!("{other:?}"),
        }
        match parse(&[
            "gitlab-proxmox-runner",
            "pool",
            "--metrics-listen",
            "127.0.0.1:9464",
        ])
        .command
        {
            Command::Pool { metrics_listen, .. } => {
                assert_eq!(metrics_listen, Some("127.0.0.1:9464".parse().unwrap()))
            }
            other => panic!("{other:?}"),
        }
        for (args, json) in [
            (&["gitlab-proxmox-runner", "pool", "status"][..], false),
            (
                &[
                    "gitlab-proxmox-runner",
                    "--config",
                    "f",
                    "pool",
                    "status",
                    "--json",
                ],
                true,
            ),
        ] {
            match parse(args).command {
                Command::Pool {
                    action: Some(PoolAction::Status { json: got }),
                    ..
                } => assert_eq!(got, json),
                other => panic!("{other:?}"),
            }
        }
        // The service's flags do not mix with status.
        let mixed = ["gitlab-proxmox-runner", "pool", "--id", "X", "status"];
        assert!(Cli::try_parse_from(mixed).is_err());
        let bad = [
            "gitlab-proxmox-runner",
            "pool",
            "--metrics-listen",
            "localhost",
        ];
        assert!(Cli::try_parse_from(bad).is_err());
    }

    #[test]
    fn stage_names_are_data() {
        match parse(&[
            "gitlab-proxmox-runner",
            "run",
            "s",
            "--weird stage; rm -rf /",
        ])
        .command
        {
            Command::Run { stage, .. } => assert_eq!(stage, "--weird stage; rm -rf /"),
            other => panic!("{other:?}"),
        }
    }
}
