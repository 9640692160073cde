//! The fleet's settings file as a runner host keeps it: `PROXMOX_FLEET_KEY` may come from the
//! settings file only, so every hook, pool service and fleet command of the test kit gets one
//! (mode 0600) through `GITLAB_PROXMOX_RUNNER_CONFIG`. One file per test process: every runner
//! host of a test is one fleet.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The test fleet's key (32 bytes, base64), as `gitlab-proxmox-runner fleet-key` prints one.
pub const FLEET_KEY: &str = "dGVzdCBmbGVldCBrZXkgb2YgdGhlIHRlc3Qga2l0ISE=";

/// The variable that names the settings file.
pub const CONFIG_ENV: &str = "GITLAB_PROXMOX_RUNNER_CONFIG";

/// A settings file that holds only [`FLEET_KEY`].
pub fn settings_file() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("gpr-fleet-")
            .tempdir()
            .expect("a directory for the fleet settings")
            .keep();
        let path = dir.join("fleet.toml");
        write_settings(&path, &format!("PROXMOX_FLEET_KEY = \"{FLEET_KEY}\"\n"));
        path
    })
}

/// Writes a settings file the way an admin should: readable by its owner only.
pub fn write_settings(path: &Path, text: &str) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
    file.write_all(text.as_bytes())
        .unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
}

/// `(GITLAB_PROXMOX_RUNNER_CONFIG, path)` for a hook's or command's environment.
pub fn settings_env() -> (String, String) {
    (
        CONFIG_ENV.to_string(),
        settings_file().to_string_lossy().into_owned(),
    )
}
