//! Where setting values come from, before any trust decision: the driver's TOML file, the
//! driver process's own environment under the plain name, and `CUSTOM_ENV_<NAME>` (which
//! gitlab-runner fills from `[[runners]] environment` *and* from the job's own variables,
//! secrets and predefined-variable overrides, the job's value winning).

use std::collections::BTreeMap;
use std::path::Path;

use super::parse::toml_value_to_string;
use super::trust::{spec_for, SPECS};
use crate::error::{Error, Result};
use crate::secret::Secret;

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    File,
    ProcessEnv,
    CustomEnv,
}

/// What `Settings::from_sources` reads from.
pub struct Sources<'a> {
    /// The TOML file's text and its path (for messages).
    pub file: Option<(&'a str, &'a Path)>,
    /// The process environment.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// `$JOB_RESPONSE_FILE`'s bytes: `None` when the variable is unset, `Err` (a message)
    /// when it names a file that cannot be read. Read only when the trust rule needs it.
    pub job_response: Option<std::result::Result<&'a [u8], String>>,
}

/// Every known setting's value in each source (blank values included: a blank file entry
/// still shadows the environment, as it always did).
#[derive(Default)]
pub struct Layers {
    pub file: BTreeMap<&'static str, Secret>,
    pub process_env: BTreeMap<&'static str, Secret>,
    pub custom_env: BTreeMap<&'static str, Secret>,
    /// A settings file was given (even one that sets nothing).
    pub has_file: bool,
}

/// Whether a value counts as set: blank values are as good as absent everywhere.
pub fn is_set(value: &Secret) -> bool {
    !value.expose().trim().is_empty()
}

impl Layers {
    pub fn collect(sources: &Sources<'_>) -> Result<Layers> {
        let mut layers = Layers::default();
        for spec in SPECS {
            if let Some(value) = (sources.env)(&format!("CUSTOM_ENV_{}", spec.name)) {
                layers.custom_env.insert(spec.name, Secret::new(value));
            }
            if let Some(value) = (sources.env)(spec.name) {
                layers.process_env.insert(spec.name, Secret::new(value));
            }
        }
        if let Some((text, path)) = sources.file {
            layers.has_file = true;
            let table: toml::Table = toml::from_str(text).map_err(|err| {
                // The parser's message can quote the offending line, which may hold a secret.
                let line = err
                    .span()
                    .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
                Error::Settings(format!(
                    "the driver config file {} is not valid TOML{}",
                    path.display(),
                    line.map(|l| format!(" (near line {l})"))
                        .unwrap_or_default()
                ))
            })?;
            for (key, value) in table {
                let spec = spec_for(&key).ok_or_else(|| {
                    Error::Settings(format!(
                        "unknown setting {key:?} in {}; known settings: {}",
                        path.display(),
                        SPECS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                    ))
                })?;
                let value = toml_value_to_string(spec.name, value)?;
                layers.file.insert(spec.name, Secret::new(value));
            }
        }
        Ok(layers)
    }
}
