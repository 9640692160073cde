//! `VM_SSH_PRIVATE_KEY` → a private key in memory.
//!
//! The PEM armour is taken apart here rather than by `russh::keys::decode_secret_key`, because
//! that function keeps the base64 text and the decoded DER in plain `String`/`Vec` buffers that
//! are freed without being wiped. Every buffer below that holds key bytes is `Zeroizing`; the
//! format-specific decoders (ssh-key, pkcs8, sec1) are handed slices of those buffers and
//! return ssh-key types that wipe themselves on drop.
//!
//! Messages never quote the key text, the file contents or the passphrase.

use std::path::Path;
use std::sync::Arc;

use base64ct::{Base64, Encoding};
use zeroize::Zeroizing;

use super::PrivateKey;
use crate::config::{SshKey, SshSettings};
use crate::error::{Error, Result};

const SETTING: &str = "VM_SSH_PRIVATE_KEY";

fn key_error(message: impl Into<String>) -> Error {
    Error::Settings(format!("{SETTING}: {}", message.into()))
}

pub(super) fn load_private_key(settings: &SshSettings) -> Result<PrivateKey> {
    let setting = settings.private_key.as_ref().ok_or_else(|| {
        Error::Settings(format!(
            "{SETTING} is not set; set it to the private key text or the path of a key file \
             whose public half is authorized in the VM template"
        ))
    })?;
    let passphrase = settings
        .key_passphrase
        .as_ref()
        .map(|secret| secret.expose())
        .filter(|pass| !pass.is_empty());
    // Whether a path may be opened was decided with the trust rule (config::trust): a job's
    // value is never a `File`.
    let parsed = match &setting.key {
        SshKey::Text(text) => parse_private_key(text.expose().trim(), passphrase),
        SshKey::File(path) => {
            read_key_file(path).and_then(|text| parse_private_key(&text, passphrase))
        }
    };
    // A key or passphrase the job supplied that does not parse is the job's own mistake: a
    // build failure, not a system failure the runner would retry.
    match parsed {
        Err(Error::Settings(message)) if setting.from_job || settings.key_passphrase_from_job => {
            Err(Error::JobRequest(format!(
                "{message} (the key or its passphrase came from the job's CI/CD variables)"
            )))
        }
        other => other,
    }
}

/// Reads a key file into wiped memory. The path is not echoed: a mangled key pasted into the
/// variable would otherwise end up in the job log.
fn read_key_file(path: &Path) -> Result<Zeroizing<String>> {
    let bytes = std::fs::read(path).map(Zeroizing::new).map_err(|err| {
        key_error(format!(
            "not a private key: the value is neither key text (no -----BEGIN line) nor a \
             readable key file (reading it as a path failed: {})",
            err.kind()
        ))
    })?;
    match std::str::from_utf8(&bytes) {
        Ok(text) => Ok(Zeroizing::new(text.to_string())),
        Err(_) => Err(key_error(
            "not a private key: the key file is not text (binary DER keys are not supported; \
             use PEM or OpenSSH format)",
        )),
    }
}

/// One `-----BEGIN X-----` block: its label, its `Name: value` headers and its decoded body.
struct PemBlock {
    label: String,
    headers: Vec<(String, String)>,
    der: Zeroizing<Vec<u8>>,
}

impl PemBlock {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Finds the first PEM block. Tolerates CRLF line ends, indentation and a literal `\n` (what
/// some CI variable editors make of newlines).
fn parse_pem(text: &str) -> Option<PemBlock> {
    let unescaped;
    let text = if !text.contains('\n') && text.contains("\\n") {
        unescaped = Zeroizing::new(text.replace("\\n", "\n"));
        unescaped.as_str()
    } else {
        text
    };
    let mut lines = text.lines().map(str::trim);
    let label = lines.by_ref().find_map(|line| {
        line.strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
    })?;
    let end = format!("-----END {label}-----");
    let mut headers = Vec::new();
    let mut body = Zeroizing::new(String::new());
    let mut ended = false;
    for line in lines.by_ref() {
        if line == end {
            ended = true;
            break;
        }
        if body.is_empty() {
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_string(), value.trim().to_string()));
                continue;
            }
        }
        body.push_str(line);
    }
    if !ended {
        return None;
    }
    let mut der = Zeroizing::new(vec![0u8; body.len()]);
    let len = Base64::decode(body.as_bytes(), &mut der).ok()?.len();
    der.truncate(len);
    Some(PemBlock {
        label: label.to_string(),
        headers,
        der,
    })
}

pub(super) fn parse_private_key(text: &str, passphrase: Option<&str>) -> Result<PrivateKey> {
    let trimmed = text.trim_start();
    if trimmed.starts_with("PuTTY-User-Key-File") {
        return Err(key_error(
            "PuTTY keys are not supported; export it in OpenSSH format (puttygen: Conversions → \
             Export OpenSSH key)",
        ));
    }
    let looks_public = ["ssh-", "ecdsa-sha2-", "sk-"]
        .iter()
        .any(|prefix| trimmed.starts_with(prefix));
    let Some(block) = parse_pem(text) else {
        return Err(key_error(if looks_public {
            "not a private key: this is a public key line; set the private half"
        } else {
            "not a private key: no complete -----BEGIN ... PRIVATE KEY----- block with valid \
             base64 found"
        }));
    };
    let key = match block.label.as_str() {
        "OPENSSH PRIVATE KEY" => decode_openssh(&block.der, passphrase)?,
        "PRIVATE KEY" => decode_pkcs8(&block.der, None, false)?,
        "ENCRYPTED PRIVATE KEY" => {
            let pass = passphrase.ok_or_else(encrypted_without_passphrase)?;
            decode_pkcs8(&block.der, Some(pass), true)?
        }
        "RSA PRIVATE KEY" | "EC PRIVATE KEY" => {
            let legacy_encrypted = block
                .header("Proc-Type")
                .is_some_and(|value| value.contains("ENCRYPTED"));
            let der = if legacy_encrypted {
                let pass = passphrase.ok_or_else(encrypted_without_passphrase)?;
                decrypt_legacy_pem(&block, pass)?
            } else {
                Zeroizing::new(block.der.to_vec())
            };
            let wrong = |message: &str| {
                if legacy_encrypted {
                    wrong_passphrase()
                } else {
                    key_error(format!("not a valid {}: {message}", block.label))
                }
            };
            if block.label == "RSA PRIVATE KEY" {
                let pkcs8 = wrap_pkcs1_in_pkcs8(&der).ok_or_else(|| wrong("bad DER"))?;
                decode_pkcs8(&pkcs8, None, false).map_err(|_| wrong("not an RSA key"))?
            } else {
                decode_pkcs8(&der, None, false).map_err(|_| wrong("not a SEC1 EC key"))?
            }
        }
        other if other.contains("PUBLIC KEY") || other.contains("CERTIFICATE") => {
            return Err(key_error(format!(
                "not a private key: found a {other} block; set the private key"
            )))
        }
        other => {
            return Err(key_error(format!(
                "not a private key: unsupported PEM block {other:?}; use an OpenSSH, PKCS#8, \
                 PKCS#1 RSA or SEC1 EC private key"
            )))
        }
    };
    check_supported_algorithm(&key)?;
    Ok(PrivateKey { key: Arc::new(key) })
}

fn encrypted_without_passphrase() -> Error {
    key_error("key is encrypted, set VM_SSH_KEY_PASSPHRASE")
}

fn wrong_passphrase() -> Error {
    key_error("wrong passphrase: VM_SSH_KEY_PASSPHRASE does not decrypt the key")
}

fn decode_openssh(der: &[u8], passphrase: Option<&str>) -> Result<russh::keys::PrivateKey> {
    let key = russh::keys::PrivateKey::from_bytes(der).map_err(|err| {
        key_error(format!(
            "not a private key: the OpenSSH key block is malformed ({})",
            redacted_ssh_key_error(&err)
        ))
    })?;
    if !key.is_encrypted() {
        return Ok(key);
    }
    let pass = passphrase.ok_or_else(encrypted_without_passphrase)?;
    key.decrypt(pass).map_err(|_| wrong_passphrase())
}

fn decode_pkcs8(
    der: &[u8],
    passphrase: Option<&str>,
    encrypted: bool,
) -> Result<russh::keys::PrivateKey> {
    russh::keys::pkcs8::decode_pkcs8(der, passphrase.map(str::as_bytes)).map_err(|err| {
        if encrypted {
            wrong_passphrase()
        } else {
            key_error(format!(
                "not a private key: the PKCS#8 block does not hold a supported key ({})",
                redacted_key_error(&err)
            ))
        }
    })
}

/// Error kinds only: some decoder errors carry fragments of their input.
fn redacted_key_error(err: &russh::keys::Error) -> &'static str {
    use russh::keys::Error as E;
    match err {
        E::UnsupportedKeyType { .. } | E::UnknownAlgorithm(_) => "unsupported key type",
        E::KeyIsEncrypted => "the key is encrypted",
        _ => "malformed key data",
    }
}

fn redacted_ssh_key_error(err: &russh::keys::ssh_key::Error) -> &'static str {
    use russh::keys::ssh_key::Error as E;
    match err {
        E::AlgorithmUnknown | E::AlgorithmUnsupported { .. } => "unsupported key type",
        _ => "malformed key data",
    }
}

fn check_supported_algorithm(key: &russh::keys::PrivateKey) -> Result<()> {
    use russh::keys::Algorithm;
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Rsa { .. } | Algorithm::Ecdsa { .. } => Ok(()),
        other => Err(key_error(format!(
            "unsupported key type {other}; use ed25519, RSA or ECDSA"
        ))),
    }
}

/// `-----BEGIN RSA PRIVATE KEY-----` with `Proc-Type: 4,ENCRYPTED` / `DEK-Info: AES-xxx-CBC,IV`
/// (what `ssh-keygen -m PEM` and `openssl ... -aes256` write): OpenSSL's MD5-based key
/// derivation, AES-CBC, decrypted in place inside a wiped buffer.
fn decrypt_legacy_pem(block: &PemBlock, passphrase: &str) -> Result<Zeroizing<Vec<u8>>> {
    use aes::cipher::{block_padding::Pkcs7, BlockModeDecrypt, KeyIvInit};

    let dek = block.header("DEK-Info").unwrap_or_default();
    let (cipher, iv_hex) = dek.split_once(',').unwrap_or((dek, ""));
    let key_len = match cipher.trim() {
        "AES-128-CBC" => 16,
        "AES-256-CBC" => 32,
        other => {
            return Err(key_error(format!(
                "the key uses legacy PEM encryption {other:?}, which is not supported; \
                 re-encrypt it in OpenSSH format (ssh-keygen -p -f KEYFILE)"
            )))
        }
    };
    let iv = parse_hex(iv_hex.trim())
        .filter(|iv| iv.len() == 16)
        .ok_or_else(|| key_error("not a private key: malformed DEK-Info header"))?;
    // EVP_BytesToKey(MD5, salt = first 8 bytes of the IV, 1 iteration).
    let mut key = Zeroizing::new([0u8; 32]);
    let mut previous: Option<Zeroizing<[u8; 16]>> = None;
    let mut filled = 0;
    while filled < key_len {
        let mut context = md5::Context::new();
        if let Some(previous) = &previous {
            context.consume(previous.as_slice());
        }
        context.consume(passphrase.as_bytes());
        context.consume(&iv[..8]);
        let digest = Zeroizing::new(context.finalize().0);
        let take = (key_len - filled).min(16);
        key[filled..filled + take].copy_from_slice(&digest[..take]);
        filled += take;
        previous = Some(digest);
    }
    let mut buffer = Zeroizing::new(block.der.to_vec());
    let plain_len = if key_len == 16 {
        cbc::Decryptor::<aes::Aes128>::new_from_slices(&key[..16], &iv)
            .map_err(|_| wrong_passphrase())?
            .decrypt_padded::<Pkcs7>(&mut buffer)
            .map_err(|_| wrong_passphrase())?
            .len()
    } else {
        cbc::Decryptor::<aes::Aes256>::new_from_slices(&key[..32], &iv)
            .map_err(|_| wrong_passphrase())?
            .decrypt_padded::<Pkcs7>(&mut buffer)
            .map_err(|_| wrong_passphrase())?
            .len()
    };
    buffer.truncate(plain_len);
    Ok(buffer)
}

fn parse_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// PKCS#1 `RSAPrivateKey` → PKCS#8 `PrivateKeyInfo` (rsaEncryption, NULL parameters), so that
/// the one PKCS#8 decoder handles both and no second RSA parser is needed.
fn wrap_pkcs1_in_pkcs8(pkcs1: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    // A PKCS#1 key is a DER SEQUENCE; refuse anything else before wrapping it.
    if pkcs1.first() != Some(&0x30) {
        return None;
    }
    const VERSION: &[u8] = &[0x02, 0x01, 0x00];
    const RSA_ALGORITHM: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let octet_len = der_length(pkcs1.len());
    let inner_len = VERSION.len() + RSA_ALGORITHM.len() + 1 + octet_len.len() + pkcs1.len();
    let outer_len = der_length(inner_len);
    let mut out = Zeroizing::new(Vec::with_capacity(1 + outer_len.len() + inner_len));
    out.push(0x30);
    out.extend_from_slice(&outer_len);
    out.extend_from_slice(VERSION);
    out.extend_from_slice(RSA_ALGORITHM);
    out.push(0x04);
    out.extend_from_slice(&octet_len);
    out.extend_from_slice(pkcs1);
    Some(out)
}

fn der_length(len: usize) -> Vec<u8> {
    if len < 0x80 {
        return vec![len as u8];
    }
    let bytes: Vec<u8> = len
        .to_be_bytes()
        .into_iter()
        .skip_while(|byte| *byte == 0)
        .collect();
    let mut out = vec![0x80 | bytes.len() as u8];
    out.extend(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // A throwaway ed25519 key made for this test only.
    const ED25519: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACARH2519THowMXIkqaIsAzAZZAVjbUN5abrsa3ckWELrwAAAJhi1XC+YtVw
vgAAAAtzc2gtZWQyNTUxOQAAACARH2519THowMXIkqaIsAzAZZAVjbUN5abrsa3ckWELrw
AAAECrw6xhT90lFAJf1Cptiij4mmtgG8KxZD0a8x4fEjyPZREfbnX1MejAxciSpoiwDMBl
kBWNtQ3lpuuxrdyRYQuvAAAAEHRlc3RAZ3ByLWV4YW1wbGUBAgMEBQ==
-----END OPENSSH PRIVATE KEY-----
";

    #[test]
    fn openssh_ed25519_parses_and_tolerates_escaped_newlines() {
        let key = parse_private_key(ED25519, None).unwrap();
        assert_eq!(key.algorithm(), "ssh-ed25519");
        let escaped = ED25519.replace('\n', "\\n");
        let again = parse_private_key(&escaped, None).unwrap();
        assert_eq!(again.fingerprint(), key.fingerprint());
        let crlf = ED25519.replace('\n', "\r\n");
        assert_eq!(
            parse_private_key(&crlf, None).unwrap().fingerprint(),
            key.fingerprint()
        );
    }

    #[test]
    fn garbage_and_public_keys_are_not_private_keys_and_are_not_echoed() {
        for text in [
            "hello world",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBEfbnX1MejAxciSpoiwDMBlkBWNtQ3lpuuxrdyRYQuv x",
            "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAASECRETSECRET\n-----END OPENSSH PRIVATE KEY-----",
        ] {
            let message = parse_private_key(text, None).unwrap_err().to_string();
            assert!(message.contains("not a private key"), "{message}");
            assert!(!message.contains("SECRET") && !message.contains("AAAA"), "{message}");
        }
    }

    #[test]
    fn truncated_blocks_are_refused() {
        let cut = &ED25519[..ED25519.len() / 2];
        let message = parse_private_key(cut, None).unwrap_err().to_string();
        assert!(message.contains("not a private key"), "{message}");
    }

    #[test]
    fn pkcs1_wrapping_encodes_long_lengths() {
        assert_eq!(der_length(5), vec![5]);
        assert_eq!(der_length(0x80), vec![0x81, 0x80]);
        assert_eq!(der_length(0x1234), vec![0x82, 0x12, 0x34]);
        assert!(wrap_pkcs1_in_pkcs8(b"not der").is_none());
    }
}
