//! Agent identifiers (`agentidentifiers` metadata, `--agent-identifiers`
//! flag) and the server's agent-selection strategies.
//!
//! Owns: the URL-query form `host=n1&ipv4=1.2.3.4&ipv6=%3A%3A1&cidr=..&
//! default-route=true` and what `--proxy-strategies` accepts. Pure.

use std::fmt;

/// What an agent says it can reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identifiers {
    pub host: Vec<String>,
    pub ipv4: Vec<String>,
    pub ipv6: Vec<String>,
    pub cidr: Vec<String>,
    pub default_route: bool,
}

impl Identifiers {
    /// Parses the URL-query form. `strict` rejects unknown keys (the agent's
    /// flag); the server is lenient and skips them, so newer agents still
    /// connect.
    pub fn parse(query: &str, strict: bool) -> Result<Self, String> {
        let mut ids = Identifiers::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(key)?;
            let value = percent_decode(value)?;
            match key.as_str() {
                "host" => ids.host.push(value),
                "ipv4" => ids.ipv4.push(value),
                "ipv6" => ids.ipv6.push(value),
                "cidr" => ids.cidr.push(value),
                "default-route" => {
                    ids.default_route = crate::cli::parse_bool(&value)
                        .map_err(|_| format!("default-route={value:?} is not a boolean"))?
                }
                other if strict => return Err(format!("unknown agent identifier {other:?}")),
                other => log::warn!("ignoring unknown agent identifier {other:?}"),
            }
        }
        Ok(ids)
    }

    /// Whether the agent names `host` (a dial address without its port) as
    /// one of its hosts or addresses: the destHost strategy.
    pub fn names(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.host
            .iter()
            .chain(&self.ipv4)
            .chain(&self.ipv6)
            .any(|h| h == host)
    }
}

impl fmt::Display for Identifiers {
    /// The URL-query form, keys in a fixed order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (key, values) in [
            ("host", &self.host),
            ("ipv4", &self.ipv4),
            ("ipv6", &self.ipv6),
            ("cidr", &self.cidr),
        ] {
            for value in values {
                parts.push(format!("{key}={}", percent_encode(value)));
            }
        }
        if self.default_route {
            parts.push("default-route=true".to_string());
        }
        f.write_str(&parts.join("&"))
    }
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape in {text:?}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How the server picks an agent for a dial (`--proxy-strategies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Any ready agent, at random, non-draining first.
    Default,
    /// An agent whose identifiers name the dial's host.
    DestHost,
    /// An agent advertising `default-route=true`.
    DefaultRoute,
}

/// Parses the comma list of `--proxy-strategies`, as upstream: names are
/// case-sensitive, empty items are an error.
pub fn parse_strategies(text: &str) -> Result<Vec<Strategy>, String> {
    if text.trim().is_empty() {
        return Err("proxy strategies cannot be empty".into());
    }
    text.split(',')
        .map(|name| match name.trim() {
            "default" => Ok(Strategy::Default),
            "destHost" => Ok(Strategy::DestHost),
            "defaultRoute" => Ok(Strategy::DefaultRoute),
            other => Err(format!(
                "unknown proxy strategy {other:?} (use default, destHost, defaultRoute)"
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_upstream_agents_send() {
        let ids = Identifiers::parse(
            "host=node-1&ipv4=10.0.0.5&ipv6=fd00%3A%3A5&cidr=10.0.0.0%2F8&default-route=true",
            true,
        )
        .unwrap();
        assert_eq!(ids.host, vec!["node-1"]);
        assert_eq!(ids.ipv4, vec!["10.0.0.5"]);
        assert_eq!(ids.ipv6, vec!["fd00::5"]);
        assert_eq!(ids.cidr, vec!["10.0.0.0/8"]);
        assert!(ids.default_route);
        assert!(ids.names("node-1") && ids.names("10.0.0.5") && ids.names("[fd00::5]"));
        assert!(!ids.names("10.0.0.6"));
        assert_eq!(Identifiers::parse(&ids.to_string(), true).unwrap(), ids);
    }

    #[test]
    fn empty_and_bad_identifiers() {
        assert_eq!(
            Identifiers::parse("", true).unwrap(),
            Identifiers::default()
        );
        assert!(Identifiers::parse("zone=a", true).is_err());
        assert!(Identifiers::parse("zone=a", false).is_ok());
        assert!(Identifiers::parse("host=%zz", false).is_err());
        assert!(Identifiers::parse("host=%4", false).is_err());
        assert!(Identifiers::parse("default-route=perhaps", false).is_err());
    }

    #[test]
    fn strategies() {
        assert_eq!(
            parse_strategies("destHost,default").unwrap(),
            vec![Strategy::DestHost, Strategy::Default]
        );
        assert!(parse_strategies("").is_err());
        assert!(parse_strategies("desthost").is_err());
        assert!(parse_strategies("default,").is_err());
    }
}
