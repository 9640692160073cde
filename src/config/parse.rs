//! Parsers for setting values: endpoints, ranges, fingerprints, networks, durations, the
//! template map and the SSH key's form. Pure functions of text; no trust decisions here.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::secret::Secret;

/// An IP network such as `192.0.2.0/24` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((addr, prefix)) => (addr.parse::<IpAddr>().ok()?, prefix.parse::<u8>().ok()?),
            None => {
                let addr = text.trim().parse::<IpAddr>().ok()?;
                (addr, if addr.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, prefix: u8, width: u8) -> u128 {
            if prefix == 0 {
                0
            } else {
                bits >> (width - prefix)
            }
        }
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net) as u128, self.prefix, 32)
                    == masked(u32::from(ip) as u128, self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), self.prefix, 128)
                    == masked(u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

/// The Proxmox API endpoint, normalised to `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiEndpoint {
    pub host: String,
    pub port: u16,
}

impl ApiEndpoint {
    pub fn parse(text: &str) -> Option<ApiEndpoint> {
        let text = text.trim().trim_end_matches('/');
        let rest = match text.split_once("://") {
            Some(("https", rest)) => rest,
            Some(_) => return None,
            None => text,
        };
        let rest = rest.strip_suffix("/api2/json").unwrap_or(rest);
        if rest.is_empty() || rest.contains('/') || rest.contains('@') {
            return None;
        }
        // `[v6]:port`, `[v6]`, bare v6, `host:port`, `host`.
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (addr, after) = bracketed.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(port) => port.parse().ok()?,
                None if after.is_empty() => 8006,
                None => return None,
            };
            (addr.to_string(), port)
        } else if rest.matches(':').count() > 1 {
            (rest.to_string(), 8006)
        } else if let Some((host, port)) = rest.split_once(':') {
            (host.to_string(), port.parse().ok()?)
        } else {
            (rest.to_string(), 8006)
        };
        if host.is_empty() || port == 0 {
            return None;
        }
        Some(ApiEndpoint { host, port })
    }

    /// `https://host:port/api2/json`, with IPv6 literals bracketed.
    pub fn base_url(&self) -> String {
        if self.host.contains(':') {
            format!("https://[{}]:{}/api2/json", self.host, self.port)
        } else {
            format!("https://{}:{}/api2/json", self.host, self.port)
        }
    }
}

/// An explicit HTTP(S) proxy for the API: `http://host:port` or `https://host:port`, no
/// credentials in the URL (they would be a second secret to guard).
pub fn parse_proxy_url(text: &str) -> Result<String> {
    let text = text.trim();
    let bad = || {
        Error::Settings(format!(
            "PROXMOX_HTTPS_PROXY={text:?} is not a proxy URL like http://proxy.example:3128 \
             (http:// or https://, host and port, no user:password@)"
        ))
    };
    let rest = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
        .ok_or_else(bad)?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains(['/', '@', '?', '#']) {
        return Err(bad());
    }
    Ok(text.trim_end_matches('/').to_string())
}

pub fn parse_bool(name: &str, text: &str) -> Result<bool> {
    match text.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(Error::Settings(format!(
            "{name}={text:?} is not a boolean (use true or false)"
        ))),
    }
}

/// Parses `name=vmid,name=vmid`.
pub fn parse_template_map(text: &str) -> Result<BTreeMap<String, u32>> {
    let mut map = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let parsed = entry
            .split_once('=')
            .and_then(|(name, id)| Some((name.trim(), id.trim().parse::<u32>().ok()?)))
            .filter(|(name, id)| !name.is_empty() && (100..=999_999_999).contains(id));
        let (name, id) = parsed.ok_or_else(|| {
            Error::Settings(format!(
                "PROXMOX_TEMPLATES entry {entry:?} is not of the form name=vmid (vmid 100..999999999)"
            ))
        })?;
        map.insert(name.to_string(), id);
    }
    if map.is_empty() {
        return Err(Error::Settings("PROXMOX_TEMPLATES is empty".into()));
    }
    Ok(map)
}

/// Parses a certificate fingerprint as PVE shows it (`AA:BB:...`), colons optional.
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let hex: String = text
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub fn parse_vmid_range(text: &str) -> Result<(u32, u32)> {
    let bad = || {
        Error::Settings(format!(
            "PROXMOX_VMID_RANGE={text:?} is not a range like 2000000-2999999 within 100..999999999"
        ))
    };
    let (low, high) = text.split_once('-').ok_or_else(bad)?;
    let low: u32 = low.trim().parse().map_err(|_| bad())?;
    let high: u32 = high.trim().parse().map_err(|_| bad())?;
    if low < 100 || high > 999_999_999 || low > high {
        return Err(bad());
    }
    Ok((low, high))
}

/// A runner identity for ownership markers: 1 to 64 of `A-Z a-z 0-9 . _ -`, so it needs no
/// encoding on the marker line and reads the same in `gc --runner`.
pub fn is_runner_id(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The runner host's name, made into a valid runner identity (`runner` when it has none).
pub fn default_runner_id() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let name = if ok {
        let end = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    } else {
        String::new()
    };
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if is_runner_id(&cleaned) {
        cleaned
    } else {
        "runner".into()
    }
}

/// What `VM_SSH_PRIVATE_KEY` holds.
#[derive(Debug, Clone)]
pub enum SshKey {
    /// Key text (PEM, OpenSSH or PuTTY armour; or a public key, refused when parsed).
    Text(Secret),
    /// The path of a key file on the runner host.
    File(PathBuf),
}

/// Text that carries key armour is key text; a short single line is a path; anything else is
/// neither. The value is never quoted in the error.
pub fn classify_private_key(value: Secret) -> Result<SshKey> {
    let text = value.expose().trim();
    let looks_public = ["ssh-", "ecdsa-sha2-", "sk-"]
        .iter()
        .any(|prefix| text.starts_with(prefix));
    if text.contains("-----BEGIN") || text.contains("PuTTY-User-Key-File") || looks_public {
        return Ok(SshKey::Text(value));
    }
    if text.contains('\n') || text.len() > 4096 {
        return Err(Error::Settings(
            "VM_SSH_PRIVATE_KEY: not a private key: the value is neither PEM/OpenSSH key text \
             (-----BEGIN ...) nor the path of a key file"
                .into(),
        ));
    }
    Ok(SshKey::File(PathBuf::from(text)))
}

/// Turns a TOML value into the text the other sources would give.
pub fn toml_value_to_string(name: &str, value: toml::Value) -> Result<String> {
    match value {
        toml::Value::String(text) => Ok(text),
        toml::Value::Integer(number) => Ok(number.to_string()),
        toml::Value::Boolean(flag) => Ok(flag.to_string()),
        toml::Value::Array(items) => items
            .into_iter()
            .map(|item| toml_value_to_string(name, item))
            .collect::<Result<Vec<_>>>()
            .map(|items| items.join(",")),
        toml::Value::Table(table) => Ok(table
            .into_iter()
            .map(|(key, value)| Ok(format!("{key}={}", toml_value_to_string(name, value)?)))
            .collect::<Result<Vec<_>>>()?
            .join(",")),
        _ => Err(Error::Settings(format!(
            "{name} in the config file must be a string, number, boolean, list or table"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_in_every_documented_form() {
        let cases = [
            ("pve", "https://pve:8006/api2/json"),
            ("pve:8443", "https://pve:8443/api2/json"),
            ("https://pve:8443/", "https://pve:8443/api2/json"),
            ("https://pve:8443/api2/json", "https://pve:8443/api2/json"),
            ("[::1]:8006", "https://[::1]:8006/api2/json"),
            ("::1", "https://[::1]:8006/api2/json"),
        ];
        for (input, url) in cases {
            assert_eq!(
                ApiEndpoint::parse(input).unwrap().base_url(),
                url,
                "{input}"
            );
        }
        assert!(ApiEndpoint::parse("http://pve").is_none());
        assert!(ApiEndpoint::parse("pve:notaport").is_none());
    }

    #[test]
    fn tls_fingerprints_parse_as_pve_shows_them() {
        let fp = "AB:".repeat(31) + "CD";
        assert_eq!(parse_fingerprint(&fp).unwrap()[31], 0xCD);
        assert!(parse_fingerprint("AB:CD").is_none());
    }

    #[test]
    fn cidrs_match_addresses() {
        let net = Cidr::parse("192.0.2.0/24").unwrap();
        assert!(net.contains("192.0.2.77".parse().unwrap()));
        assert!(!net.contains("192.0.3.1".parse().unwrap()));
        assert!(!net.contains("2001:db8::1".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("198.51.100.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
    }

    #[test]
    fn template_map_rejects_garbage() {
        assert!(parse_template_map("a=1").is_err());
        assert!(parse_template_map("a").is_err());
        assert_eq!(parse_template_map("a=100, b=200").unwrap().len(), 2);
    }

    #[test]
    fn proxies_are_plain_urls_without_credentials() {
        assert_eq!(
            parse_proxy_url("http://proxy.example:3128/").unwrap(),
            "http://proxy.example:3128"
        );
        assert!(parse_proxy_url("https://[::1]:3128").is_ok());
        for bad in [
            "proxy:3128",
            "socks5://p:1",
            "http://u:p@proxy:1",
            "http://",
        ] {
            assert!(parse_proxy_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn runner_ids_need_no_encoding() {
        assert!(is_runner_id("runner-01.example"));
        assert!(!is_runner_id(""));
        assert!(!is_runner_id("a b"));
        assert!(!is_runner_id("a\nb"));
        assert!(is_runner_id(&default_runner_id()));
    }

    #[test]
    fn keys_are_text_or_a_short_path() {
        let key = |text: &str| classify_private_key(Secret::new(text.to_string()));
        assert!(matches!(
            key("-----BEGIN OPENSSH PRIVATE KEY-----\nx\n"),
            Ok(SshKey::Text(_))
        ));
        assert!(matches!(key("/etc/key"), Ok(SshKey::File(_))));
        assert!(key("two\nlines").is_err());
    }
}
