//! Facts about the current job, from the predefined CI variables the runner passes as
//! `CUSTOM_ENV_CI_*`. They label the VM (name, ownership marker); they never decide trust.

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobInfo {
    pub job_id: Option<u64>,
    pub pipeline_id: Option<u64>,
    pub project_path: Option<String>,
    pub project_slug: Option<String>,
    pub runner_short_token: Option<String>,
    pub concurrent_id: Option<u32>,
    /// The job's timeout in seconds (`CI_JOB_TIMEOUT`).
    pub timeout_secs: Option<u64>,
}

impl JobInfo {
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| {
            lookup(&format!("CUSTOM_ENV_{name}"))
                .map(|value| value.trim().to_string())
                .filter(|value| !value.is_empty())
        };
        JobInfo {
            job_id: get("CI_JOB_ID").and_then(|v| v.parse().ok()),
            pipeline_id: get("CI_PIPELINE_ID").and_then(|v| v.parse().ok()),
            project_path: get("CI_PROJECT_PATH"),
            project_slug: get("CI_PROJECT_PATH_SLUG").or_else(|| get("CI_PROJECT_NAME")),
            runner_short_token: get("CI_RUNNER_SHORT_TOKEN"),
            concurrent_id: get("CI_CONCURRENT_ID").and_then(|v| v.parse().ok()),
            timeout_secs: get("CI_JOB_TIMEOUT").and_then(|v| v.parse().ok()),
        }
    }
}
