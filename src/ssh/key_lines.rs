//! OpenSSH public key lines as the driver pins them: `type base64`, without the comment.

/// `ssh-ed25519 AAAA... comment` → `ssh-ed25519 AAAA...`; `None` for anything else.
pub fn public_key_line(content: &str) -> Option<String> {
    let line = content
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))?;
    let mut fields = line.split_whitespace();
    let kind = fields.next()?;
    let blob = fields.next()?;
    let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-");
    let base64 = blob
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='));
    (known && base64 && blob.len() >= 16).then(|| format!("{kind} {blob}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_key_files_become_pinnable_lines() {
        assert_eq!(
            public_key_line(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHnN0E7mBOmkZ2dJ7iU1eC3c root@vm\n"
            )
            .as_deref(),
            Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHnN0E7mBOmkZ2dJ7iU1eC3c")
        );
        assert!(
            public_key_line("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAA= x").is_some()
        );
        assert!(public_key_line("").is_none());
        assert!(public_key_line("cat: No such file or directory").is_none());
        assert!(public_key_line("ssh-ed25519 not*base64!").is_none());
    }
}
