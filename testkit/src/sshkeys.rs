//! Client keys for SSH tests, made by the real `ssh-keygen` (so the driver's parser is tested
//! against what people actually have), or by russh where `ssh-keygen` is absent.

use std::path::Path;
use std::process::Command;

/// Key formats the tests exercise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Ed25519,
    Rsa3072,
    EcdsaP256,
    /// RSA in PEM PKCS#1 (`-----BEGIN RSA PRIVATE KEY-----`).
    RsaPkcs1,
    /// RSA in PKCS#8 (`-----BEGIN PRIVATE KEY-----`).
    RsaPkcs8,
    /// ECDSA P-256 in SEC1 (`-----BEGIN EC PRIVATE KEY-----`).
    EcdsaSec1,
}

/// A private key (text) and its public line.
#[derive(Clone)]
pub struct ClientKey {
    pub kind: KeyKind,
    pub private_text: String,
    pub public_line: String,
    pub passphrase: Option<String>,
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientKey({:?}, {})", self.kind, self.public_line)
    }
}

const SSH_KEYGEN: &str = "/usr/bin/ssh-keygen";

/// A private key (text) that parses but that no VM of the fake accepts: a hook given it gets
/// past its key check and fails at the SSH step.
pub fn unauthorized_key() -> String {
    ClientKey::ed25519().private_text
}

pub fn ssh_keygen_available() -> bool {
    Path::new(SSH_KEYGEN).exists()
}

impl ClientKey {
    /// A new key of `kind`, encrypted with `passphrase` when given.
    pub fn generate(kind: KeyKind, passphrase: Option<&str>) -> ClientKey {
        if ssh_keygen_available() {
            Self::with_ssh_keygen(kind, passphrase)
        } else {
            Self::with_russh(kind, passphrase)
        }
    }

    pub fn ed25519() -> ClientKey {
        Self::generate(KeyKind::Ed25519, None)
    }

    fn with_ssh_keygen(kind: KeyKind, passphrase: Option<&str>) -> ClientKey {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("key");
        let (key_type, bits, format): (&str, Option<&str>, Option<&str>) = match kind {
            KeyKind::Ed25519 => ("ed25519", None, None),
            KeyKind::Rsa3072 => ("rsa", Some("3072"), None),
            KeyKind::EcdsaP256 => ("ecdsa", Some("256"), None),
            KeyKind::RsaPkcs1 => ("rsa", Some("3072"), Some("PEM")),
            KeyKind::RsaPkcs8 => ("rsa", Some("3072"), Some("PKCS8")),
            KeyKind::EcdsaSec1 => ("ecdsa", Some("256"), Some("PEM")),
        };
        let mut command = Command::new(SSH_KEYGEN);
        command
            .args(["-q", "-t", key_type, "-C", "gpr-test", "-N"])
            .arg(passphrase.unwrap_or(""))
            .arg("-f")
            .arg(&path);
        if let Some(bits) = bits {
            command.args(["-b", bits]);
        }
        if let Some(format) = format {
            command.args(["-m", format]);
        }
        let status = command.status().expect("run ssh-keygen");
        assert!(status.success(), "ssh-keygen failed for {kind:?}");
        let private_text = std::fs::read_to_string(&path).expect("read generated key");
        let public_line = std::fs::read_to_string(path.with_extension("pub"))
            .expect("read generated public key")
            .trim()
            .to_string();
        ClientKey {
            kind,
            private_text,
            public_line,
            passphrase: passphrase.map(String::from),
        }
    }

    fn with_russh(kind: KeyKind, passphrase: Option<&str>) -> ClientKey {
        use russh::keys::ssh_key::LineEnding;
        use russh::keys::{Algorithm, EcdsaCurve, PrivateKey};
        let algorithm = match kind {
            KeyKind::Ed25519 => Algorithm::Ed25519,
            KeyKind::EcdsaP256 => Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256,
            },
            other => panic!("{other:?} keys need ssh-keygen in this test environment"),
        };
        let mut rng = russh::keys::key::safe_rng();
        let mut key = PrivateKey::random(&mut rng, algorithm).expect("generate key");
        key.set_comment("gpr-test");
        let public_line = key.public_key().to_openssh().expect("encode public key");
        if let Some(pass) = passphrase {
            key = key.encrypt(&mut rng, pass).expect("encrypt key");
        }
        let private_text = key
            .to_openssh(LineEnding::LF)
            .expect("encode key")
            .to_string();
        ClientKey {
            kind,
            private_text,
            public_line,
            passphrase: passphrase.map(String::from),
        }
    }

    /// Distinctive fragments of the private key, for scanning files and process memory
    /// images: the base64 body lines of the key text.
    pub fn secret_fragments(&self) -> Vec<String> {
        self.private_text
            .lines()
            .filter(|line| !line.starts_with("-----") && !line.contains(':'))
            .map(str::trim)
            .filter(|line| line.len() >= 40)
            .map(String::from)
            .collect()
    }
}

impl ClientKey {
    /// The raw private scalar/seed bytes (decrypted), for scanning binary files too.
    pub fn raw_secret_bytes(&self) -> Vec<u8> {
        let mut key = russh::keys::PrivateKey::from_openssh(&self.private_text)
            .expect("parse test key (OpenSSH format)");
        if key.is_encrypted() {
            key = key
                .decrypt(self.passphrase.as_deref().unwrap_or_default())
                .expect("decrypt test key");
        }
        let data = key.key_data();
        if let Some(ed25519) = data.ed25519() {
            return ed25519.private.as_ref().to_vec();
        }
        if let Some(ecdsa) = data.ecdsa() {
            return ecdsa.private_key_bytes().to_vec();
        }
        panic!("raw_secret_bytes: only ed25519 and ECDSA test keys are supported");
    }
}

/// A host key pair for a test server: OpenSSH private text and the public line.
pub struct HostKey {
    pub private_text: String,
    pub public_line: String,
}

impl HostKey {
    pub fn ed25519() -> HostKey {
        let key = ClientKey::with_russh(KeyKind::Ed25519, None);
        HostKey {
            private_text: key.private_text,
            public_line: key.public_line,
        }
    }

    pub fn ecdsa_p256() -> HostKey {
        let key = ClientKey::with_russh(KeyKind::EcdsaP256, None);
        HostKey {
            private_text: key.private_text,
            public_line: key.public_line,
        }
    }
}
