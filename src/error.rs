//! One error type for the whole driver. Every error knows who is at fault, because gitlab-runner
//! treats the two very differently: a build failure fails the job for good, a system failure is
//! retried (prepare: 3 attempts) and can be retried again by `retry: when: runner_system_failure`.

use std::fmt;

/// Who caused a failure, which decides the exit code the runner sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The job asked for something wrong or its script failed: `$BUILD_FAILURE_EXIT_CODE`.
    Job,
    /// Proxmox, the VM, the network or the runner host failed: `$SYSTEM_FAILURE_EXIT_CODE`.
    Infrastructure,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job asked for something it may not have: an unknown template, a host-only setting.
    #[error("{0}")]
    JobRequest(String),

    /// The job's script ran in the VM and exited with a non-zero status.
    #[error("the job script exited with status {code}")]
    ScriptFailed { code: u32 },

    /// The job's script was killed by a signal inside the VM.
    #[error("the job script was killed by signal {signal}")]
    ScriptKilled { signal: String },

    /// The runner host's settings are missing or invalid: the admin must fix them.
    #[error("settings: {0}")]
    Settings(String),

    /// A Proxmox API request failed or was refused; `source` says how (its `is_*` questions are
    /// for callers that must decide what to do next) and carries the API's own words.
    #[error("{context}: {source}")]
    Api {
        context: String,
        source: crate::proxmox::ApiError,
    },

    /// Proxmox did not get done what we asked, in our words (e.g. gave up after N attempts).
    #[error("{context}: {message}")]
    Proxmox { context: String, message: String },

    /// SSH to the VM failed: connect, authenticate, host key, SFTP, lost connection.
    #[error("{context}: {message}")]
    Ssh { context: String, message: String },

    /// The VM's sshd (with the host key we expected) refused our key: the key, or the
    /// template's authorized keys, is what is wrong, not the VM's readiness.
    #[error("{context}: {message}")]
    AuthRefused { context: String, message: String },

    /// The VM presented an SSH host key other than the pinned ones.
    #[error("{context}: {message}")]
    HostKeyMismatch { context: String, message: String },

    /// A local file or I/O operation on the runner host failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The runner cancelled the job (SIGTERM/SIGINT) or a deadline passed.
    #[error("{0}")]
    Cancelled(String),

    /// Any other infrastructure failure, with a message that says what to check.
    #[error("{0}")]
    Infrastructure(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn blame(&self) -> Blame {
        match self {
            Error::JobRequest(_) | Error::ScriptFailed { .. } | Error::ScriptKilled { .. } => {
                Blame::Job
            }
            Error::Settings(_)
            | Error::Api { .. }
            | Error::Proxmox { .. }
            | Error::Ssh { .. }
            | Error::AuthRefused { .. }
            | Error::HostKeyMismatch { .. }
            | Error::Io { .. }
            | Error::Cancelled(_)
            | Error::Infrastructure(_) => Blame::Infrastructure,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn ssh(context: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::Ssh {
            context: context.into(),
            message: message.to_string(),
        }
    }

    /// `inner` in a wider `context`, keeping what kind of SSH failure it was.
    pub fn ssh_within(context: impl Into<String>, inner: Error) -> Self {
        match inner {
            Error::AuthRefused { .. } => Error::AuthRefused {
                context: context.into(),
                message: inner.to_string(),
            },
            other => Error::ssh(context, other),
        }
    }

    /// Our SSH key was refused by the VM (see [`Error::AuthRefused`]).
    pub fn is_authentication_refused(&self) -> bool {
        matches!(self, Error::AuthRefused { .. })
    }

    /// A failed API request, kept whole so that callers can ask what it means.
    pub fn api(context: impl Into<String>, source: crate::proxmox::ApiError) -> Self {
        Error::Api {
            context: context.into(),
            source,
        }
    }

    /// The API error behind this one, if an API request failed.
    pub fn api_error(&self) -> Option<&crate::proxmox::ApiError> {
        match self {
            Error::Api { source, .. } => Some(source),
            _ => None,
        }
    }

    pub fn proxmox(context: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::Proxmox {
            context: context.into(),
            message: message.to_string(),
        }
    }
}

/// The exit codes gitlab-runner asked for. They are read from the environment on every call,
/// because the runner may change them; 1 and 2 are only the fallback when they are absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitCodes {
    pub build_failure: i32,
    pub system_failure: i32,
}

impl ExitCodes {
    pub const FALLBACK: ExitCodes = ExitCodes {
        build_failure: 1,
        system_failure: 2,
    };

    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let read = |name: &str, fallback: i32| {
            lookup(name)
                .and_then(|value| value.trim().parse::<i32>().ok())
                .filter(|code| (1..=255).contains(code))
                .unwrap_or(fallback)
        };
        ExitCodes {
            build_failure: read("BUILD_FAILURE_EXIT_CODE", Self::FALLBACK.build_failure),
            system_failure: read("SYSTEM_FAILURE_EXIT_CODE", Self::FALLBACK.system_failure),
        }
    }

    pub fn for_blame(&self, blame: Blame) -> i32 {
        match blame {
            Blame::Job => self.build_failure,
            Blame::Infrastructure => self.system_failure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_come_from_the_runner_environment() {
        let codes = ExitCodes::from_lookup(|name| match name {
            "BUILD_FAILURE_EXIT_CODE" => Some("42".into()),
            "SYSTEM_FAILURE_EXIT_CODE" => Some(" 43 ".into()),
            _ => None,
        });
        assert_eq!(codes.for_blame(Blame::Job), 42);
        assert_eq!(codes.for_blame(Blame::Infrastructure), 43);
    }

    #[test]
    fn exit_codes_fall_back_to_one_and_two_when_absent_or_garbage() {
        let codes = ExitCodes::from_lookup(|name| match name {
            "BUILD_FAILURE_EXIT_CODE" => Some("nope".into()),
            _ => None,
        });
        assert_eq!(codes, ExitCodes::FALLBACK);
    }

    #[test]
    fn script_failures_are_the_jobs_fault_and_infrastructure_is_not() {
        assert_eq!(Error::ScriptFailed { code: 3 }.blame(), Blame::Job);
        assert_eq!(Error::JobRequest("template".into()).blame(), Blame::Job);
        assert_eq!(
            Error::proxmox("clone", "got timeout").blame(),
            Blame::Infrastructure
        );
    }
}
