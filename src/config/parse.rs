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

/// One template VM the admin listed for a template name: its VMID, and the node it must be on
/// when the entry says so (`61900@pve2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedCopy {
    pub vmid: u32,
    /// `Some(node)`: a VM with this VMID anywhere else is not this copy (VMIDs are not
    /// reserved: after the template is gone, another user may create one with its VMID).
    pub node: Option<String>,
}

impl std::fmt::Display for ListedCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.node {
            Some(node) => write!(f, "{}@{node}", self.vmid),
            None => write!(f, "{}", self.vmid),
        }
    }
}

/// A `PROXMOX_TEMPLATES` entry: the template VMs that are the copies of one template name, in
/// the admin's order. Never empty. Only these VMs are ever cloned for the name, unless
/// `PROXMOX_TEMPLATE_COPIES=by-name` adds same-name templates on nodes without a listed copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateCopies {
    copies: Vec<ListedCopy>,
}

impl TemplateCopies {
    /// `None` for an empty list.
    pub fn new(copies: Vec<ListedCopy>) -> Option<TemplateCopies> {
        (!copies.is_empty()).then_some(TemplateCopies { copies })
    }

    /// The copies, in the order the admin listed them.
    pub fn list(&self) -> &[ListedCopy] {
        &self.copies
    }

    /// The VMIDs that may be `node`'s copy, in the order listed: those pinned to it and those
    /// pinned to no node.
    pub fn candidates_on(&self, node: &str) -> Vec<u32> {
        self.copies
            .iter()
            .filter(|copy| copy.node.as_deref().is_none_or(|pinned| pinned == node))
            .map(|copy| copy.vmid)
            .collect()
    }

    /// The first listed copy (the template a name maps to in the simple form `name=vmid`).
    pub fn first(&self) -> &ListedCopy {
        // `new` refuses an empty list.
        &self.copies[0]
    }

    pub fn vmids(&self) -> impl Iterator<Item = u32> + '_ {
        self.copies.iter().map(|copy| copy.vmid)
    }

    /// Whether `vmid` is one of the listed copies.
    pub fn lists(&self, vmid: u32) -> bool {
        self.vmids().any(|listed| listed == vmid)
    }
}

/// `60900|61900@pve2`, the entry's value as the string form writes it.
impl std::fmt::Display for TemplateCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let texts: Vec<String> = self.copies.iter().map(ListedCopy::to_string).collect();
        f.write_str(&texts.join("|"))
    }
}

/// A node name as PVE allows it (a DNS label, dots for FQDNs).
pub fn is_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

/// Parses `PROXMOX_TEMPLATES`: entries `name=copies` separated by `,`; the copies of one name
/// separated by `|`, each a VMID or `VMID@node` (the node it must be on):
/// `ubuntu-focal=60900|61900@pve2,plain=9000`. `|` and `@` cannot occur in a VMID or a node
/// name, so an entry reads one way only. The settings file's table form
/// `{ ubuntu-focal = [60900, "61900@pve2"], plain = 9000 }` arrives in this form
/// ([`toml_value_to_string`]).
pub fn parse_template_map(text: &str) -> Result<BTreeMap<String, TemplateCopies>> {
    let mut map = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = |why: &str| {
            Error::Settings(format!(
                "PROXMOX_TEMPLATES entry {entry:?} {why}; write name=vmid, or name=vmid|vmid@node|... \
                 to list a template's copies (vmid 100..999999999, node a node name)"
            ))
        };
        let (name, value) = entry
            .split_once('=')
            .map(|(name, value)| (name.trim(), value.trim()))
            .filter(|(name, _)| !name.is_empty())
            .ok_or_else(|| bad("is not of the form name=vmid"))?;
        let mut copies: Vec<ListedCopy> = Vec::new();
        for text in value.split('|').map(str::trim) {
            let (vmid, node) = match text.split_once('@') {
                Some((vmid, node)) => (vmid.trim(), Some(node.trim())),
                None => (text, None),
            };
            let vmid = vmid
                .parse::<u32>()
                .ok()
                .filter(|id| (100..=999_999_999).contains(id))
                .ok_or_else(|| bad(&format!("has {text:?}, which is not a VMID or VMID@node")))?;
            if let Some(node) = node.filter(|node| !is_node_name(node)) {
                return Err(bad(&format!(
                    "has {text:?}, whose node {node:?} is not a node name"
                )));
            }
            if copies.iter().any(|copy| copy.vmid == vmid) {
                return Err(bad(&format!("lists VMID {vmid} twice")));
            }
            if let Some(other) = copies
                .iter()
                .find(|copy| node.is_some() && copy.node.as_deref() == node)
            {
                return Err(bad(&format!(
                    "lists two copies for node {} ({} and {vmid}); list one per node",
                    node.unwrap_or_default(),
                    other.vmid
                )));
            }
            copies.push(ListedCopy {
                vmid,
                node: node.map(str::to_string),
            });
        }
        let copies = TemplateCopies::new(copies).ok_or_else(|| bad("lists no VMID"))?;
        map.insert(name.to_string(), copies);
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
        // `{ name = value, ... }` → `name=value,...`. A list inside a table is one entry's
        // several values (`{ ubuntu-focal = [60900, "61900@pve2"] }` → `ubuntu-focal=60900|61900@pve2`):
        // `|`, because `,` already separates the entries.
        toml::Value::Table(table) => Ok(table
            .into_iter()
            .map(|(key, value)| {
                let text = match value {
                    toml::Value::Array(items) => items
                        .into_iter()
                        .map(|item| toml_value_to_string(name, item))
                        .collect::<Result<Vec<_>>>()?
                        .join("|"),
                    other => toml_value_to_string(name, other)?,
                };
                Ok(format!("{key}={text}"))
            })
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

    fn copy(vmid: u32, node: Option<&str>) -> ListedCopy {
        ListedCopy {
            vmid,
            node: node.map(str::to_string),
        }
    }

    #[test]
    fn template_map_entries_list_copies_with_pipes_and_pin_nodes_with_at() {
        let map =
            parse_template_map(" ubuntu-focal = 60900 | 61900@pve2|62900 , plain=9000").unwrap();
        assert_eq!(
            map["ubuntu-focal"].list(),
            [
                copy(60900, None),
                copy(61900, Some("pve2")),
                copy(62900, None)
            ]
        );
        assert_eq!(map["ubuntu-focal"].to_string(), "60900|61900@pve2|62900");
        assert_eq!(map["plain"].list(), [copy(9000, None)]);
        assert_eq!(map["plain"].first().vmid, 9000);
        assert!(map["ubuntu-focal"].lists(61900) && !map["ubuntu-focal"].lists(9000));
        // A node name may be a FQDN.
        let fqdn = parse_template_map("a=9000@pve1.example.org").unwrap();
        assert_eq!(fqdn["a"].first().node.as_deref(), Some("pve1.example.org"));
    }

    #[test]
    fn template_map_copies_that_cannot_be_read_one_way_are_refused() {
        for (bad, says) in [
            ("a=9000|", "\"\", which is not a VMID"),
            ("a=|9000", "\"\", which is not a VMID"),
            ("a=9000@", "whose node \"\" is not a node name"),
            ("a=9000@pve 2", "whose node \"pve 2\" is not a node name"),
            ("a=9000@pve2@pve3", "is not a node name"),
            ("a=@pve2", "which is not a VMID"),
            ("a=9000|9000@pve2", "lists VMID 9000 twice"),
            (
                "a=9000@pve2|9001@pve2",
                "lists two copies for node pve2 (9000 and 9001)",
            ),
            ("a=99", "which is not a VMID"),
            ("a=9000;9001", "which is not a VMID"),
            ("=9000", "is not of the form name=vmid"),
        ] {
            let err = parse_template_map(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(err.contains("name=vmid|vmid@node"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_settings_file_table_of_lists_reads_as_the_string_form() {
        let table: toml::Value = toml::from_str::<toml::Table>(
            "PROXMOX_TEMPLATES = { ubuntu-focal = [60900, \"61900@pve2\"], plain = 9000 }",
        )
        .map(|mut table| table.remove("PROXMOX_TEMPLATES").unwrap())
        .unwrap();
        let text = toml_value_to_string("PROXMOX_TEMPLATES", table).unwrap();
        assert_eq!(text, "plain=9000,ubuntu-focal=60900|61900@pve2");
        let map = parse_template_map(&text).unwrap();
        assert_eq!(
            map["ubuntu-focal"].list(),
            [copy(60900, None), copy(61900, Some("pve2"))]
        );
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
