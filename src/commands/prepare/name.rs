//! What a job's VM is called.

use crate::job::JobInfo;

/// `ci-<job id>-<project slug>`: a valid DNS name of at most 63 characters.
pub fn vm_name(job: &JobInfo) -> String {
    let mut name = String::from("ci");
    if let Some(id) = job.job_id {
        name.push('-');
        name.push_str(&id.to_string());
    }
    let slug = job
        .project_slug
        .as_deref()
        .map(dns_label)
        .unwrap_or_default();
    if !slug.is_empty() {
        name.push('-');
        name.push_str(&slug);
    }
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

/// Lower-case letters, digits and single hyphens, nothing else.
fn dns_label(text: &str) -> String {
    let mut label = String::with_capacity(text.len());
    for ch in text.chars() {
        let ch = ch.to_ascii_lowercase();
        if ch.is_ascii_alphanumeric() {
            label.push(ch);
        } else if !label.ends_with('-') && !label.is_empty() {
            label.push('-');
        }
    }
    label.trim_end_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: Option<u64>, slug: Option<&str>) -> JobInfo {
        JobInfo {
            job_id: id,
            project_slug: slug.map(String::from),
            ..Default::default()
        }
    }

    #[test]
    fn vm_names_are_dns_valid() {
        assert_eq!(
            vm_name(&job(Some(8123456), Some("group-project"))),
            "ci-8123456-group-project"
        );
        assert_eq!(
            vm_name(&job(Some(1), Some("My Group/Ünïcode__Project!"))),
            "ci-1-my-group-n-code-project"
        );
        assert_eq!(vm_name(&job(None, None)), "ci");
        let long = vm_name(&job(Some(12345678901), Some(&"a-".repeat(60))));
        assert!(long.len() <= 63, "{long}");
        assert!(!long.ends_with('-'));
        for name in [long, vm_name(&job(Some(5), Some("--x--")))] {
            assert!(name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
            assert!(!name.starts_with('-') && !name.contains("--"), "{name}");
        }
    }
}
