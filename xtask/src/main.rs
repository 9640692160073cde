//! Build-time helper for the Debian package (see `packaging/build-deb.sh`):
//!
//!     cargo run --locked -p xtask -- package-assets [--out DIR]
//!
//! writes, into DIR (default `target/package-assets` in the workspace, where the
//! `[package.metadata.deb]` assets in Cargo.toml look for them):
//! - `man/*.1`: the man pages, one per subcommand plus the main page;
//! - `completions/`: bash, zsh and fish completions;
//! - `doc/config.toml`: `examples/config.toml` with the package's paths.
//!
//! Pages and completions come from the driver's own clap definitions
//! (`gitlab_proxmox_runner::cli::Cli`), so they list exactly the subcommands and options the
//! binary accepts. This lives here rather than in the driver (a `completions` subcommand, a build
//! script) so the shipped binary carries no generator code and its dependency tree stays as it is.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::roff::{bold, italic, roman, Inline, Roff};
use clap_mangen::Man;
use gitlab_proxmox_runner::cli::Cli;

const BIN: &str = "gitlab-proxmox-runner";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = match args.as_slice() {
        [task] if task == "package-assets" => workspace_root().join("target/package-assets"),
        [task, flag, dir] if task == "package-assets" && flag == "--out" => PathBuf::from(dir),
        _ => {
            eprintln!("usage: cargo run -p xtask -- package-assets [--out DIR]");
            return ExitCode::from(2);
        }
    };
    match package_assets(&out) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!(
                "xtask: writing package assets into {}: {err}",
                out.display()
            );
            ExitCode::FAILURE
        }
    }
}

/// Writes every generated asset under `out`, replacing what an earlier run left there (a page
/// for a subcommand that no longer exists must not end up in the package).
fn package_assets(out: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = man_pages(&fresh_dir(&out.join("man"))?)?;
    written.extend(completions(&fresh_dir(&out.join("completions"))?)?);
    written.push(runner_config_example(&fresh_dir(&out.join("doc"))?)?);
    Ok(written)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The README's and examples' paths are those of a hand install (/usr/local/bin, the older
/// driver's /opt/gitlab-proxmox); a config.toml copied from the package's docs must name the
/// package's. Each rewrite must match, so an edited example cannot silently keep a wrong path.
fn runner_config_example(dir: &Path) -> io::Result<PathBuf> {
    let source = workspace_root().join("examples/config.toml");
    let mut text = fs::read_to_string(&source)?;
    for (hand_install, package) in [
        (
            "/usr/local/bin/gitlab-proxmox-runner",
            "/usr/bin/gitlab-proxmox-runner",
        ),
        (
            "/opt/gitlab-proxmox/vm_",
            "/usr/lib/gitlab-proxmox-runner/vm_",
        ),
    ] {
        if !text.contains(hand_install) {
            return Err(io::Error::other(format!(
                "{} no longer mentions {hand_install}: update runner_config_example",
                source.display()
            )));
        }
        text = text.replace(hand_install, package);
    }
    let path = dir.join("config.toml");
    fs::write(&path, text)?;
    Ok(path)
}

fn fresh_dir(dir: &Path) -> io::Result<PathBuf> {
    match fs::remove_dir_all(dir) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    fs::create_dir_all(dir)?;
    Ok(dir.to_path_buf())
}

fn completions(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        // As the binary parses: `help` included (`gitlab-proxmox-runner help gc` works).
        written.push(clap_complete::generate_to(
            shell,
            &mut Cli::command(),
            BIN,
            dir,
        )?);
    }
    Ok(written)
}

/// The command the man pages describe: `help` is clap's, it needs no page of its own.
fn man_command() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    // Gives subcommands their "gitlab-proxmox-runner-gc" display names, which name their pages.
    cmd.build();
    cmd
}

fn man_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let cmd = man_command();
    let source = format!("{BIN} {}", cmd.get_version().unwrap_or_default());
    let manual = "GitLab Runner custom executor";
    // roff drops an empty .TH argument, which shifts source and manual into the wrong slots.
    let date = page_date()?;
    let page_for = |cmd: &clap::Command| {
        Man::new(cmd.clone())
            .date(date.clone())
            .source(source.clone())
            .manual(manual)
    };
    let mut written = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written.push(page_for(sub).generate_to(dir)?);
    }

    let page = page_for(&cmd);
    let path = dir.join(page.get_filename());
    let mut file = fs::File::create(&path)?;
    // clap_mangen's sections, then what clap cannot know: where the files are, the environment,
    // the exit codes gitlab-runner relies on, and the older driver's names.
    page.render_title(&mut file)?;
    page.render_name_section(&mut file)?;
    page.render_synopsis_section(&mut file)?;
    page.render_description_section(&mut file)?;
    page.render_options_section(&mut file)?;
    page.render_subcommands_section(&mut file)?;
    extra_sections(&cmd).to_writer(&mut file)?;
    page.render_version_section(&mut file)?;
    file.flush()?;
    written.push(path);
    Ok(written)
}

fn extra_sections(cmd: &clap::Command) -> Roff {
    let mut roff = Roff::default();
    let entry = |roff: &mut Roff, term: Vec<Inline>, text: &str| {
        roff.control("TP", []);
        roff.text(term);
        roff.text([roman(text)]);
    };

    roff.control("SH", ["FILES"]);
    roff.text([roman("Paths as the Debian package installs them.")]);
    entry(
        &mut roff,
        vec![bold("/etc/gitlab-runner/proxmox.toml")],
        "The driver's settings (Proxmox API endpoint and token, node, templates, SSH key), \
         passed with --config from the [[runners.custom]] hooks in config.toml. Owner root \
         (or the gitlab-runner service's user), mode 0600. The package does not ship or \
         touch this file.",
    );
    entry(
        &mut roff,
        vec![bold("/etc/gitlab-runner/proxmox.toml.example")],
        "An annotated example of every setting, to copy to proxmox.toml. A conffile: an \
         upgrade replaces it only if it was not edited.",
    );
    entry(
        &mut roff,
        vec![
            bold("/usr/lib/gitlab-proxmox-runner/vm_config_exec"),
            roman(", "),
            bold("vm_prepare_exec"),
            roman(", "),
            bold("vm_run_exec"),
            roman(", "),
            bold("vm_cleanup_exec"),
        ],
        "The older Python driver's executable names, symlinks to this binary: invoked by one \
         of them it behaves as the config, prepare, run or cleanup subcommand, so an existing \
         config.toml keeps working.",
    );
    entry(
        &mut roff,
        vec![
            bold("/usr/lib/systemd/system/gitlab-proxmox-runner-gc.timer"),
            roman(", "),
            bold("gitlab-proxmox-runner-gc.service"),
        ],
        "The orphan sweep (gc) every 30 minutes; not enabled by the package: \
         systemctl enable --now gitlab-proxmox-runner-gc.timer",
    );
    entry(
        &mut roff,
        vec![bold("/usr/share/doc/gitlab-proxmox-runner/README.md")],
        "Setup on Proxmox VE and in gitlab-runner, every setting, the security model and the \
         troubleshooting table for the driver's messages.",
    );

    roff.control("SH", ["ENVIRONMENT"]);
    entry(
        &mut roff,
        vec![bold(settings_env_name())],
        "The settings file when --config is not given.",
    );
    entry(
        &mut roff,
        vec![bold("PROXMOX_*"), roman(", "), bold("VM_*")],
        "Any setting may also come from the process environment under its plain name; the \
         settings file takes precedence. Settings that reach the driver as CUSTOM_ENV_* \
         (config.toml's [[runners]] environment) are refused, except the template choice and \
         the SSH key, when a job defines them itself.",
    );
    entry(
        &mut roff,
        vec![
            bold("BUILD_FAILURE_EXIT_CODE"),
            roman(", "),
            bold("SYSTEM_FAILURE_EXIT_CODE"),
        ],
        "Set by gitlab-runner for every hook: the exit codes for a failure that is the job's \
         fault and one that is the infrastructure's. 1 and 2 when unset.",
    );

    roff.control("SH", ["EXIT STATUS"]);
    entry(
        &mut roff,
        vec![bold("0")],
        "Success; also for --help and --version.",
    );
    entry(
        &mut roff,
        vec![italic("$BUILD_FAILURE_EXIT_CODE")],
        "The job is at fault: its script failed (its own exit code is written to \
         $BUILD_EXIT_CODE_FILE), or it asked for a template or setting it may not use.",
    );
    entry(
        &mut roff,
        vec![italic("$SYSTEM_FAILURE_EXIT_CODE")],
        "The infrastructure is at fault (settings, the Proxmox API, the VM, SSH), or the \
         command line was not understood. gitlab-runner can retry these with \
         retry: when: runner_system_failure.",
    );
    roff.control("PP", []);
    roff.text([roman(
        "gc exits 0 when every orphan is gone or was skipped because it is locked, and \
         non-zero when the cluster could not be listed or a VM could not be destroyed.",
    )]);
    roff.control("PP", []);
    roff.text([roman(
        "check exits 0 when every required check passed (advisory failures allowed), 1 when \
         at least one required check failed (each failure is a line starting with \u{2718}, \
         followed by its fix), and 2 when the check itself did not finish: interrupted by a \
         signal, or the --smoke VM could not be removed.",
    )]);

    roff.control("SH", ["SEE ALSO"]);
    let mut see_also: Vec<Inline> = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_display_name().unwrap_or_else(|| sub.get_name());
        see_also.push(bold(name));
        see_also.push(roman("(1), "));
    }
    see_also.push(bold("gitlab-runner"));
    see_also.push(roman("(1)"));
    roff.text(see_also);
    roff
}

/// The one place the driver names its settings-file variable, so the page cannot drift from it.
fn settings_env_name() -> &'static str {
    gitlab_proxmox_runner::config::CONFIG_FILE_ENV
}

/// The pages' date: `$SOURCE_DATE_EPOCH` (reproducible builds; `packaging/build-deb.sh` sets it
/// to the last commit's time), else today.
fn page_date() -> io::Result<String> {
    let seconds = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(value) => value.trim().parse::<u64>().map_err(|_| {
            io::Error::other(format!(
                "SOURCE_DATE_EPOCH={value:?} is not a number of seconds"
            ))
        })?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(io::Error::other)?
            .as_secs(),
    };
    let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
    Ok(format!("{year:04}-{month:02}-{day:02}"))
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
