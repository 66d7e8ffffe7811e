//! Enforcement step: where a request comes from. DNS-rebinding protection for the tool listener,
//! as the MCP spec asks of servers: a web page whose name an attacker points at 127.0.0.1 would
//! otherwise reach the tools through the sidecar, and the sidecar sends every tool its own
//! `Host`, so a tool's own check could not see it.
//!
//! On a loopback listener (the default), or whenever `allowed_hosts` is set, a request is
//! refused when its `Host` names anything but a loopback name (`localhost`, `127.x.x.x`,
//! `[::1]`) or an allowed host, and when it carries an `Origin` (browsers send one) whose host
//! is not one of those either. A listener on another address without `allowed_hosts` cannot know
//! the names it is reached by, so it checks neither and says so at startup.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use http::header::{HOST, ORIGIN};

use super::denial::ForeignHost;

/// Which hosts requests may name.
#[derive(Debug, Clone)]
pub struct HostGuard {
    /// Lowercase host names or IP literals (IPv6 bracketed) allowed besides the loopback ones.
    allowed: Vec<String>,
    on: bool,
}

impl HostGuard {
    /// The guard for a listener bound to `listen`, with the configured `allowed_hosts`.
    pub fn new(listen: SocketAddr, allowed_hosts: Option<&[String]>) -> HostGuard {
        let allowed: Vec<String> = allowed_hosts
            .unwrap_or_default()
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        HostGuard {
            on: listen.ip().is_loopback() || allowed_hosts.is_some(),
            allowed,
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
                    return Err(ForeignHost {
                        header: name,
                        value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    });
                }
            }
        }
        Ok(())
    }

    fn allows(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        is_loopback(&host) || self.allowed.contains(&host)
    }
}

/// Checks one `allowed_hosts` entry: a host name or IP literal, without scheme, port or path.
pub fn check_allowed_host(entry: &str) -> Result<(), String> {
    let trimmed = entry.trim();
    let valid = !trimmed.is_empty()
        && host_of_authority(trimmed) == Some(trimmed)
        && !trimmed.contains(['/', '@', '*']);
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`allowed_hosts` entry `{entry}` is not a host name or IP address (no scheme, port, path or wildcard)"
        ))
    }
}

fn is_loopback(host: &str) -> bool {
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    literal.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
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
        ] {
            assert_eq!(guard.check(&headers(Some(host), None)), Ok(()), "{host}");
        }
        let ok = headers(Some("localhost:15001"), Some("http://localhost:6274"));
        assert_eq!(guard.check(&ok), Ok(()));
        assert_eq!(guard.check(&headers(None, None)), Ok(()));

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

        let allowed = ["perfecx.agents.svc".to_owned(), "10.0.0.7".to_owned()];
        let guard = HostGuard::new(any, Some(&allowed));
        assert!(guard.is_on());
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
        for ok in ["example.com", "10.0.0.7", "[::1]", "perfecx-sidecar"] {
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
