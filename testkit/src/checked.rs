//! `gitlab-proxmox-runner check` as an admin sees it: its exit status and its ✔/✘ lines, with
//! the assertions the check tests make on them (every ✘ line is followed by its fix).

use std::process::{Command, Output};

/// What one `check` run printed.
pub struct Checked {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Checked {
    pub fn of(output: Output) -> Checked {
        Checked {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs `command` to its end; panics with its output unless it exits with `code`.
    #[track_caller]
    pub fn run(command: &mut Command, code: i32) -> Checked {
        let checked = Checked::of(command.output().expect("run check"));
        checked.assert_code(code);
        checked
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Checked {
        assert_eq!(
            self.code, code,
            "exit status\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn has(&self, line_start: &str) -> &Checked {
        assert!(
            self.stdout.lines().any(|line| line.starts_with(line_start)),
            "no line starting {line_start:?}:\n{}",
            self.stdout
        );
        self
    }

    #[track_caller]
    pub fn lacks(&self, fragment: &str) -> &Checked {
        assert!(
            !self.stdout.contains(fragment),
            "{fragment:?} unexpected:\n{}",
            self.stdout
        );
        self
    }

    pub fn fail_lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|line| line.starts_with("✘"))
            .collect()
    }

    /// The one ✘ line (and only one) contains every fragment; its fix line follows.
    #[track_caller]
    pub fn assert_single_failure(&self, fragments: &[&str]) -> &Checked {
        let failures = self.fail_lines();
        assert_eq!(failures.len(), 1, "one ✘ line expected:\n{}", self.stdout);
        for fragment in fragments {
            assert!(
                failures[0].contains(fragment),
                "{fragment:?} missing from {:?}\n{}",
                failures[0],
                self.stdout
            );
        }
        let after = self
            .stdout
            .lines()
            .skip_while(|line| !line.starts_with("✘"))
            .nth(1)
            .unwrap_or("");
        assert!(after.trim_start().starts_with("fix: "), "{}", self.stdout);
        self
    }

    /// The ✘ lines are exactly these (by their start), each followed by its fix.
    #[track_caller]
    pub fn failures_are(&self, starts: &[&str]) -> &Checked {
        let failures = self.fail_lines();
        assert_eq!(failures.len(), starts.len(), "✘ lines:\n{}", self.stdout);
        for start in starts {
            assert!(
                failures.iter().any(|line| line.starts_with(start)),
                "no ✘ line starting {start:?}:\n{}",
                self.stdout
            );
        }
        let lines: Vec<&str> = self.stdout.lines().collect();
        for (index, line) in lines.iter().enumerate() {
            if line.starts_with("✘") {
                let next = lines.get(index + 1).copied().unwrap_or("");
                assert!(next.trim_start().starts_with("fix: "), "{}", self.stdout);
            }
        }
        self
    }
}
