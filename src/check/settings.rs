//! The settings as `check` read them: where from, what they let jobs or other users do (the
//! advisories), and whether the files holding secrets are readable by others.

use std::path::Path;

use crate::check::{nodes, Finding};
use crate::config::{AllowedTemplates, CloneMode, CopyDiscovery, Settings};

/// The settings as read, and the advisories about what they let jobs or other users do.
/// `source` names where they came from.
pub fn findings(settings: &Settings, source: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    let clones = match settings.clone.mode {
        Some(CloneMode::Linked) => "linked clones",
        Some(CloneMode::Full) => "full clones",
        None => "linked clones of templates",
    };
    out.push(Finding::pass(
        "settings",
        format!(
            "settings: read from {} ({}, {} templates, VMIDs {}-{}, {clones})",
            source,
            nodes::describe(&settings.placement.nodes, &settings.placement.node),
            settings.placement.templates.len(),
            settings.vmid_range.0,
            settings.vmid_range.1
        ),
    ));
    for warning in &settings.trust_warnings {
        out.push(
            Finding::fail(
                "settings.trust",
                format!("settings: {warning}"),
                "move the setting into the settings file (README, Security model)",
            )
            .advisory(),
        );
    }
    if settings.placement.allowed_templates == AllowedTemplates::MapOnly
        && !settings
            .placement
            .templates
            .contains_key(settings.template.trim())
    {
        out.push(Finding::fail(
            "settings.template",
            format!(
                "settings: the default template PROXMOX_TEMPLATE={:?} is not in \
                 PROXMOX_TEMPLATES ({})",
                settings.template,
                settings
                    .placement
                    .templates
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "set PROXMOX_TEMPLATE to a name in PROXMOX_TEMPLATES, or add it to the map",
        ));
    }
    if settings.placement.template_copies == CopyDiscovery::ByName {
        out.push(
            Finding::fail(
                "settings.placement.template_copies",
                "settings: PROXMOX_TEMPLATE_COPIES=by-name: on every node without a listed copy, \
                 any template VM named like a PROXMOX_TEMPLATES template is cloned for its jobs; \
                 on a cluster shared with other users, anyone with VM.Allocate can make one",
                "list every copy in PROXMOX_TEMPLATES (name=VMID@node|VMID@node...; the template \
                 lines below name them) and drop PROXMOX_TEMPLATE_COPIES",
            )
            .advisory(),
        );
    }
    let by_name: Vec<&str> = match &settings.placement.allowed_templates {
        AllowedTemplates::MapOnly => Vec::new(),
        AllowedTemplates::AnyOnNode => vec!["*"],
        AllowedTemplates::Listed(list) => list
            .iter()
            .map(String::as_str)
            .filter(|item| item.parse::<u32>().is_err())
            .collect(),
    };
    if !by_name.is_empty() {
        out.push(
            Finding::fail(
                "settings.placement.allowed_templates",
                format!(
                    "settings: PROXMOX_ALLOWED_TEMPLATES lets jobs ask for templates by VM name \
                     ({}): every template VM of that name counts, and on a cluster shared with \
                     other users anyone with VM.Allocate can make one",
                    by_name.join(", ")
                ),
                "map the templates jobs may use in PROXMOX_TEMPLATES by VMID, or allow VMIDs \
                 only in PROXMOX_ALLOWED_TEMPLATES",
            )
            .advisory(),
        );
    }
    if settings.clone.storage.is_some() && settings.clone.mode != Some(CloneMode::Full) {
        out.push(
            Finding::fail(
                "settings.clone.storage",
                "settings: PROXMOX_STORAGE is set, but linked clones always stay on the \
                 template's storage, so it is ignored",
                "drop it, or set PROXMOX_CLONE=full",
            )
            .advisory(),
        );
    }
    out
}

/// The settings file and the SSH key file: readable by their owner only. Advisory: a file
/// others can read hands them the token or the key, but the hooks still work.
pub fn file_modes(config_file: Option<&Path>, settings: &Settings) -> Vec<Finding> {
    let files = crate::config::file_modes::secret_files(config_file, settings);
    let mut out = Vec::new();
    for file in files {
        let id = if file.what.contains("SSH key") {
            "ssh_key.file_mode"
        } else {
            "settings.file_mode"
        };
        let finding = match file.exposed() {
            None => Finding::pass(
                id,
                format!(
                    "{}: {} is readable by its owner only (mode {:04o})",
                    file.what,
                    file.path.display(),
                    file.mode
                ),
            ),
            Some(exposed) => Finding::fail(
                id,
                format!(
                    "{}: another local user can take the secrets it holds",
                    exposed.message()
                ),
                exposed.fix(),
            )
            .advisory(),
        };
        out.push(finding);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{test_settings, Status};

    fn ids(findings: &[Finding]) -> Vec<&str> {
        findings.iter().map(|finding| finding.id.as_str()).collect()
    }

    #[test]
    fn plain_settings_are_one_line_naming_their_source() {
        let found = findings(&test_settings(&[]), "the process environment");
        let [line] = &found[..] else {
            panic!("{found:?}");
        };
        assert_eq!(line.status, Status::Pass);
        assert!(
            line.message
                .starts_with("settings: read from the process environment (node pve1, "),
            "{line:?}"
        );
        assert!(line
            .message
            .ends_with("VMIDs 2000000-2999999, linked clones of templates)"));
    }

    #[test]
    fn what_the_settings_let_others_do_is_advisory() {
        let found = findings(
            &test_settings(&[
                ("PROXMOX_ALLOWED_TEMPLATES", "60900, debian-12"),
                ("PROXMOX_STORAGE", "fast"),
            ]),
            "the process environment",
        );
        assert_eq!(
            ids(&found),
            [
                "settings",
                "settings.placement.allowed_templates",
                "settings.clone.storage"
            ]
        );
        assert!(found[1..]
            .iter()
            .all(|f| f.status == Status::Fail && !f.required));
        // Only the name counts as a risk; a VMID names one VM.
        assert!(found[1].message.contains("(debian-12)"), "{:?}", found[1]);
    }

    #[test]
    fn a_default_template_outside_the_map_is_an_error() {
        let found = findings(
            &test_settings(&[
                ("PROXMOX_TEMPLATES", "ubuntu=60900"),
                ("PROXMOX_TEMPLATE", "debian"),
            ]),
            "the process environment",
        );
        assert_eq!(ids(&found), ["settings", "settings.template"]);
        assert!(found[1].is_required_failure());
    }
}
