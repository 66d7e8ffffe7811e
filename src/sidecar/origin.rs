//! Enforcement step: where a request comes from. DNS-rebinding protection, as the MCP spec asks
//! of servers: a web page whose name an attacker points at 127.0.0.1 would otherwise reach the
//! tools through the sidecar, and the sidecar sends every tool its own `Host`, so a tool's own
//! check could not see it.
//!
//! On a loopback listener (the default), or whenever `allowed_hosts` is set, a request is
//! refused when its `Host` names anything but a loopback name (`localhost` and `*.localhost`,
//! `127.x.x.x`, `[::1]`) or an allowed host; when it carries an `Origin` (browsers send one with
//! every request a script makes across origins, and with every POST) whose host is not one of
//! those either; and when a browser says it comes from another site (`Sec-Fetch-Site:
//! cross-site`) without an `Origin`, as an image or a link does. A listener on another address
//! without `allowed_hosts` cannot know the names it is reached by, so it checks none of this and
//! says so at startup. The admin listener is guarded on a loopback address only: scrapers and
//! probes reach it by the pod's address.

use std::net::{IpAddr, SocketAddr};

use http::header::{HOST, ORIGIN};
use http::{HeaderMap, HeaderName};

use super::denial::ForeignHost;

const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// Which hosts requests may name.
#[derive(Debug, Clone)]
pub struct HostGuard {
    /// Allowed besides the loopback names, normalized ([`normalize`]).
    allowed: Vec<String>,
    on: bool,
}

impl HostGuard {
    /// The guard for the tool listener, bound to `listen`, with the configured `allowed_hosts`.
    pub fn new(listen: SocketAddr, allowed_hosts: Option<&[String]>) -> HostGuard {
        let mut guard = HostGuard::for_admin(listen, allowed_hosts);
        guard.on |= allowed_hosts.is_some();
        guard
    }

    /// The guard for the admin listener: on for a loopback address only, whatever
    /// `allowed_hosts` says.
    pub fn for_admin(listen: SocketAddr, allowed_hosts: Option<&[String]>) -> HostGuard {
        HostGuard {
            allowed: allowed_hosts
                .unwrap_or_default()
                .iter()
                .map(|h| normalize(h.trim()))
                .collect(),
            on: listen.ip().is_loopback(),
        }
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Whether a request with these headers may go on. A request without `Host` (HTTP/1.0)
    /// comes from no browser, which always sends one.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ForeignHost> {
        if !self.on {
            return Ok(());
        }
        for (name, header, host_of) in [
            ("Host", HOST, host_of_authority as fn(&str) -> Option<&str>),
            ("Origin", ORIGIN, host_of_origin),
        ] {
            for value in headers.get_all(header) {
                let text = value.to_str().unwrap_or("");
                if !host_of(text).is_some_and(|h| self.allows(h)) {
                    return Err(foreign(name, value.as_bytes()));
                }
            }
        }
        if !headers.contains_key(ORIGIN)
            && let Some(site) = headers.get(SEC_FETCH_SITE)
            && site.as_bytes().eq_ignore_ascii_case(b"cross-site")
        {
            return Err(foreign("Sec-Fetch-Site", site.as_bytes()));
        }
        Ok(())
    }

    /// Loopback names are told without allocating: they are what nearly every request names.
    fn allows(&self, host: &str) -> bool {
        is_loopback(host) || (!self.allowed.is_empty() && self.allowed.contains(&normalize(host)))
    }
}

fn foreign(header: &'static str, value: &[u8]) -> ForeignHost {
    ForeignHost {
        header,
        value: String::from_utf8_lossy(value).into_owned(),
    }
}

/// Checks one `allowed_hosts` entry: a host name or IP address (IPv6 bare or bracketed),
/// without scheme, port, path or wildcard.
pub fn check_allowed_host(entry: &str) -> Result<(), String> {
    let host = entry.trim();
    let valid = !host.is_empty()
        && (bare_ip(host).is_some()
            || (host_of_authority(host) == Some(host) && !host.contains(['/', '@', '*'])));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`allowed_hosts` entry `{entry}` is not a host name or IP address (no scheme, port, path or wildcard)"
        ))
    }
}

/// A host as compared: lowercase, an IP address in its canonical form (IPv6 bracketed), so that
/// `fd00::7`, `[fd00:0::7]` and `[FD00::7]` are one host.
fn normalize(host: &str) -> String {
    match bare_ip(host) {
        Some(IpAddr::V6(ip)) => format!("[{ip}]"),
        Some(IpAddr::V4(ip)) => ip.to_string(),
        None => host.to_ascii_lowercase(),
    }
}

/// The IP address `host` is, bracketed or not.
fn bare_ip(host: &str) -> Option<IpAddr> {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse()
        .ok()
}

/// Whether a host, in any case, is a loopback one.
fn is_loopback(host: &str) -> bool {
    const SUFFIX: &str = ".localhost";
    let suffixed = host.len() > SUFFIX.len()
        && host.is_char_boundary(host.len() - SUFFIX.len())
        && host[host.len() - SUFFIX.len()..].eq_ignore_ascii_case(SUFFIX);
    host.eq_ignore_ascii_case("localhost")
        || suffixed
        || bare_ip(host).is_some_and(|ip| ip.is_loopback())
}

/// The host of an authority (`host`, `host:port`, `[v6]:port`), without its port.
fn host_of_authority(authority: &str) -> Option<&str> {
    let host = if authority.starts_with('[') {
        let end = authority.find(']')?;
        let rest = &authority[end + 1..];
        if !(rest.is_empty() || port_ok(rest.strip_prefix(':')?)) {
            return None;
        }
        &authority[..=end]
    } else {
        match authority.split_once(':') {
            Some((host, port)) if port_ok(port) => host,
            Some(_) => return None,
            None => authority,
        }
    };
    (!host.is_empty()).then_some(host)
}

fn port_ok(port: &str) -> bool {
    !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
}

/// The host of an `Origin` (`scheme://host[:port]`); `None` for `null` and anything else.
fn host_of_origin(origin: &str) -> Option<&str> {
    let (_, authority) = origin.split_once("://")?;
    host_of_authority(authority)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(host: Option<&str>, origin: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = host {
            h.insert(HOST, HeaderValue::from_str(v).unwrap());
        }
        if let Some(v) = origin {
            h.insert(ORIGIN, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_loopback_listener_takes_loopback_names_only() {
        let guard = HostGuard::new("127.0.0.1:15001".parse().unwrap(), None);
        for host in [
            "127.0.0.1:15001",
            "localhost",
            "LOCALHOST:15001",
            "[::1]:15001",
            "127.1.2.3",
            "agent.localhost:1",
            "Agent.LOCALHOST",
        ] {
            assert_eq!(guard.check(&headers(Some(host), None)), Ok(()), "{host}");
        }
        let ok = headers(Some("localhost:15001"), Some("http://localhost:6274"));
        assert_eq!(guard.check(&ok), Ok(()));
        assert_eq!(guard.check(&headers(None, None)), Ok(()));
        // A page on another site that loads an image or follows a link sends no Origin.
        let mut linked = headers(Some("127.0.0.1:15001"), None);
        linked.insert(SEC_FETCH_SITE, HeaderValue::from_static("cross-site"));
        assert_eq!(guard.check(&linked).unwrap_err().header, "Sec-Fetch-Site");
        linked.insert(SEC_FETCH_SITE, HeaderValue::from_static("same-site"));
        assert_eq!(guard.check(&linked), Ok(()));
        let mut fetched = headers(Some("127.0.0.1:15001"), Some("http://localhost:6274"));
        fetched.insert(SEC_FETCH_SITE, HeaderValue::from_static("cross-site"));
        assert_eq!(guard.check(&fetched), Ok(()), "the Origin decides");

        for (host, origin, header) in [
            (Some("evil.example.com:15001"), None, "Host"),
            (Some("127.0.0.1.evil.example"), None, "Host"),
            (Some("localhost:x"), None, "Host"),
            (Some("localhost"), Some("http://evil.example.com"), "Origin"),
            (Some("localhost"), Some("null"), "Origin"),
            (
                Some("localhost"),
                Some("http://localhost.evil.example"),
                "Origin",
            ),
        ] {
            let refused = guard.check(&headers(host, origin)).unwrap_err();
            assert_eq!(refused.header, header, "{host:?} {origin:?}");
        }
    }

    #[test]
    fn allowed_hosts_add_names_and_turn_the_guard_on_anywhere() {
        let any: SocketAddr = "0.0.0.0:15001".parse().unwrap();
        assert!(!HostGuard::new(any, None).is_on());
        let evil = headers(Some("evil.example.com"), Some("http://evil.example.com"));
        assert_eq!(HostGuard::new(any, None).check(&evil), Ok(()));

        let allowed = [
            "perfecx.agents.svc".to_owned(),
            "10.0.0.7".to_owned(),
            "fd00::7".to_owned(),
        ];
        // Scrapers and probes reach the admin listener by the pod's address.
        assert!(!HostGuard::for_admin(any, Some(&allowed)).is_on());
        let guard = HostGuard::new(any, Some(&allowed));
        assert!(guard.is_on());
        assert_eq!(
            guard.check(&headers(Some("[FD00:0::7]:15001"), None)),
            Ok(())
        );
        assert_eq!(
            guard.check(&headers(Some("Perfecx.Agents.Svc:15001"), None)),
            Ok(())
        );
        assert_eq!(guard.check(&headers(Some("10.0.0.7:15001"), None)), Ok(()));
        assert_eq!(guard.check(&headers(Some("localhost"), None)), Ok(()));
        assert_eq!(guard.check(&evil).unwrap_err().header, "Host");
    }

    #[test]
    fn allowed_host_entries_are_bare_hosts() {
        for ok in [
            "example.com",
            "10.0.0.7",
            "[::1]",
            "fd00::7",
            "perfecx-sidecar",
        ] {
            assert_eq!(check_allowed_host(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "http://example.com",
            "example.com:80",
            "*.example.com",
            "a/b",
        ] {
            assert!(check_allowed_host(bad).is_err(), "{bad}");
        }
    }
}
