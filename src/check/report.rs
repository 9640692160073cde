//! Findings and their output: one line per check (`✔ ...` or `✘ ...` followed by the fix), a
//! summary, or the same as JSON.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    /// Not run: what it needs failed first (the API, the settings).
    Skip,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable identifier for scripts (`api.tls`, `template.ubuntu-focal`, ...).
    pub id: String,
    pub status: Status,
    /// Whether a failure makes `check` fail; advisory findings only warn.
    pub required: bool,
    pub message: String,
    /// What to do, in the README's words (failures only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    pub fn pass(id: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding {
            id: id.into(),
            status: Status::Pass,
            required: true,
            message: message.into(),
            fix: None,
        }
    }

    pub fn fail(
        id: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            id: id.into(),
            status: Status::Fail,
            required: true,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn skip(id: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding {
            id: id.into(),
            status: Status::Skip,
            required: true,
            message: message.into(),
            fix: None,
        }
    }

    /// A failure that does not make `check` fail.
    pub fn advisory(mut self) -> Finding {
        self.required = false;
        self
    }

    pub fn is_required_failure(&self) -> bool {
        self.required && self.status == Status::Fail
    }

    /// `✔ message`, or `✘ message` and the fix on the next line.
    pub fn text(&self) -> String {
        let mark = match self.status {
            Status::Pass => "✔",
            Status::Fail => "✘",
            Status::Skip => "-",
        };
        let advisory = if !self.required && self.status == Status::Fail {
            " (advisory)"
        } else {
            ""
        };
        let mut line = format!("{mark} {}{advisory}", self.message);
        if let Some(fix) = &self.fix {
            line.push_str("\n    fix: ");
            line.push_str(fix);
        }
        line
    }
}

/// Every finding, in the order the checks ran, and the smoke test's phase times.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub checks: Vec<Finding>,
    /// `(phase, seconds)` of `--smoke`, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub smoke_phases: Vec<(String, f64)>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    pub advisory: usize,
    pub skipped: usize,
}

impl Report {
    pub fn add(&mut self, finding: Finding) {
        self.checks.push(finding);
    }

    pub fn summary(&self) -> Summary {
        let count =
            |keep: &dyn Fn(&Finding) -> bool| self.checks.iter().filter(|f| keep(f)).count();
        Summary {
            passed: count(&|f| f.status == Status::Pass),
            failed: count(&|f| f.is_required_failure()),
            advisory: count(&|f| !f.required && f.status == Status::Fail),
            skipped: count(&|f| f.status == Status::Skip),
        }
    }

    pub fn all_required_passed(&self) -> bool {
        !self.checks.iter().any(Finding::is_required_failure)
    }

    pub fn summary_line(&self) -> String {
        let summary = self.summary();
        let verdict = if self.all_required_passed() {
            "ready for jobs"
        } else {
            "NOT ready for jobs: fix the ✘ lines above (README, Troubleshooting)"
        };
        format!(
            "{} passed, {} failed, {} advisory, {} skipped: {verdict}",
            summary.passed, summary.failed, summary.advisory, summary.skipped
        )
    }

    pub fn json(&self, exit_code: i32) -> serde_json::Value {
        serde_json::json!({
            "checks": self.checks,
            "smoke_phases": self.smoke_phases.iter()
                .map(|(phase, secs)| serde_json::json!({"phase": phase, "seconds": secs}))
                .collect::<Vec<_>>(),
            "summary": self.summary(),
            "exit_code": exit_code,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_carry_their_fix_and_only_required_ones_count() {
        let mut report = Report::default();
        report.add(Finding::pass("a", "fine"));
        report.add(Finding::fail("b", "broken", "mend it").advisory());
        assert!(report.all_required_passed());
        report.add(Finding::fail("c", "really broken", "replace it"));
        assert!(!report.all_required_passed());
        assert_eq!(
            report.checks[2].text(),
            "✘ really broken\n    fix: replace it"
        );
        assert_eq!(
            report.checks[1].text(),
            "✘ broken (advisory)\n    fix: mend it"
        );
        assert_eq!(
            report.summary(),
            Summary {
                passed: 1,
                failed: 1,
                advisory: 1,
                skipped: 0
            }
        );
    }
}
