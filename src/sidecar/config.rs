//! The sidecar's configuration file (`perfecx sidecar --config sidecar.yaml`).
//!
//! Keys follow DESIGN.md ("The sidecar") to the letter; unknown keys are errors so that a typo
//! never silently turns a guard off.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Bytes buffered for one message when no `max_memory_mb` limit is tighter.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub agent_id: String,
    /// Tool traffic from the agent.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`, `/policies`.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Every policy file in it applies to this agent. Relative paths are taken from the
    /// directory of the configuration file.
    #[serde(default = "default_policy_dir")]
    pub policy_dir: PathBuf,
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// Where events are reported ([`super::report`]); without it the sidecar runs alone.
    #[serde(default)]
    pub control_plane: Option<ControlPlane>,
    /// Cap on the bytes buffered for one request, response or stream event (default 8 MiB);
    /// a `max_memory_mb` limit in the policies lowers it.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// How often the policy directory is polled as a fallback for lost file-system events
    /// (default 500 ms).
    #[serde(default)]
    pub policy_poll_interval_ms: Option<u64>,
    /// Extension: host names (or IP addresses) that requests to `listen` may name in `Host` and
    /// `Origin` besides the loopback ones; setting it turns the check on for a listener that is
    /// not on a loopback address ([`super::origin`]).
    #[serde(default)]
    pub allowed_hosts: Option<Vec<String>>,
}

/// One tool server; exactly one of `mcp_url`, `mcp_command` and `http_url` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: String,
    #[serde(default)]
    pub mcp_url: Option<String>,
    #[serde(default)]
    pub mcp_command: Option<Vec<String>>,
    #[serde(default)]
    pub http_url: Option<String>,
}

/// Spooled events kept on disk at most, by default.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// How often events are sent when fewer than a full batch are waiting, by default.
pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 1000;
/// How often the control plane is asked for a new policy bundle, by default.
pub const DEFAULT_BUNDLE_POLL_INTERVAL_MS: u64 = 10_000;

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlane {
    /// The control plane's base URL; events go to `{url}/v1/agents/{agent_id}/events`.
    pub url: String,
    /// The environment variable that holds the agent's `agt_` registration token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Events wait here while the control plane is unreachable. Relative paths are taken from
    /// the directory of the configuration file; default `.perfecx/spool`.
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    /// Extension: the spool's size limit in bytes (default 256 MiB).
    #[serde(default)]
    pub spool_max_bytes: Option<u64>,
    /// Extension: how often a partial batch is sent (default 1000 ms).
    #[serde(default)]
    pub flush_interval_ms: Option<u64>,
    /// Extension: how often the agent's policy bundle is fetched (default 10000 ms; 0: never).
    #[serde(default)]
    pub bundle_poll_interval_ms: Option<u64>,
    /// The token itself, for a sidecar started in-process (`perfecx up`); never read from the
    /// file. Wins over `token_env`.
    #[serde(skip)]
    pub token: Option<String>,
}

impl fmt::Debug for ControlPlane {
    // By hand, so that the token never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane")
            .field("url", &self.url)
            .field("token_env", &self.token_env)
            .field("spool_dir", &self.spool_dir)
            .field("spool_max_bytes", &self.spool_max_bytes)
            .field("flush_interval_ms", &self.flush_interval_ms)
            .field("bundle_poll_interval_ms", &self.bundle_poll_interval_ms)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl ControlPlane {
    /// The control plane's base URL, validated.
    pub fn base_uri(&self) -> Result<http::Uri, String> {
        http_uri("control_plane.url", &self.url)
    }

    /// The registration token: set in-process, or read from the variable `token_env` names.
    pub fn token(&self) -> Result<String, String> {
        if let Some(token) = &self.token {
            return Ok(token.clone());
        }
        let Some(var) = &self.token_env else {
            return Err("`control_plane.token_env` must name the environment variable that holds the agent's registration token".into());
        };
        match std::env::var(var) {
            Ok(token) if !token.trim().is_empty() => Ok(token.trim().to_owned()),
            Ok(_) => Err(format!(
                "the environment variable `{var}` (control_plane.token_env) is empty; set it to the agent's registration token"
            )),
            Err(std::env::VarError::NotPresent) => Err(format!(
                "the environment variable `{var}` (control_plane.token_env) is not set; set it to the agent's registration token"
            )),
            Err(std::env::VarError::NotUnicode(_)) => Err(format!(
                "the environment variable `{var}` (control_plane.token_env) is not valid UTF-8"
            )),
        }
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.spool_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(".perfecx/spool"))
    }

    pub fn spool_max_bytes(&self) -> u64 {
        self.spool_max_bytes.unwrap_or(DEFAULT_SPOOL_MAX_BYTES)
    }

    /// `None` when bundles are not pulled.
    pub fn bundle_poll_interval(&self) -> Option<std::time::Duration> {
        match self
            .bundle_poll_interval_ms
            .unwrap_or(DEFAULT_BUNDLE_POLL_INTERVAL_MS)
        {
            0 => None,
            ms => Some(std::time::Duration::from_millis(ms.max(10))),
        }
    }

    pub fn flush_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.flush_interval_ms
                .unwrap_or(DEFAULT_FLUSH_INTERVAL_MS)
                .max(10),
        )
    }
}

/// What an upstream is, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamKind {
    McpUrl(http::Uri),
    McpCommand(Vec<String>),
    HttpUrl(http::Uri),
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15001))
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}

fn default_policy_dir() -> PathBuf {
    PathBuf::from("policies")
}

/// A configuration that could not be read or is invalid.
#[derive(Debug)]
pub struct ConfigError {
    source: String,
    message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.source, self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses and validates `path`; a relative `policy_dir` is resolved against the
    /// file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source: source.clone(),
            message: format!("cannot read: {e}"),
        })?;
        let mut config = Config::parse(&source, &text)?;
        let base = path.parent().unwrap_or(Path::new(""));
        if config.policy_dir.is_relative() {
            config.policy_dir = base.join(&config.policy_dir);
        }
        if let Some(cp) = &mut config.control_plane {
            let spool = cp.spool_dir();
            if spool.is_relative() {
                cp.spool_dir = Some(base.join(spool));
            }
        }
        Ok(config)
    }

    /// Checks what the file cannot say: that `control_plane.token_env` names a variable that is
    /// set. Run at startup, before serving.
    pub fn check_environment(&self, source: &str) -> Result<(), ConfigError> {
        match &self.control_plane {
            Some(cp) => cp.token().map(drop).map_err(|message| ConfigError {
                source: source.to_owned(),
                message,
            }),
            None => Ok(()),
        }
    }

    /// Parses and validates configuration text; `source` names it in errors.
    pub fn parse(source: &str, text: &str) -> Result<Config, ConfigError> {
        let config: Config = serde_saphyr::from_str(text).map_err(|e| ConfigError {
            source: source.to_owned(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| ConfigError {
            source: source.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.agent_id.trim().is_empty() {
            return Err("`agent_id` must not be empty".into());
        }
        if self.max_body_bytes == Some(0) {
            return Err("`max_body_bytes` must be greater than 0".into());
        }
        for host in self.allowed_hosts.iter().flatten() {
            super::origin::check_allowed_host(host)?;
        }
        if let Some(cp) = &self.control_plane {
            // The agent id goes into the events URL.
            perfecx_api::validate_agent_id(&self.agent_id)
                .map_err(|e| format!("`agent_id` `{}` {e}", self.agent_id))?;
            cp.base_uri()?;
            if cp.token_env.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err("`control_plane.token_env` must not be empty".into());
            }
            if cp.token_env.is_none() && cp.token.is_none() {
                return Err("`control_plane.token_env` is required: the environment variable that holds the agent's registration token".into());
            }
            if cp.spool_max_bytes == Some(0) {
                return Err("`control_plane.spool_max_bytes` must be greater than 0".into());
            }
        }
        let mut names = HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let valid_name = !u.name.is_empty()
                && u.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !valid_name {
                return Err(format!(
                    "upstreams[{i}].name `{}` must be non-empty and use only letters, digits, `_`, `-` and `.`",
                    u.name
                ));
            }
            if !names.insert(u.name.as_str()) {
                return Err(format!(
                    "upstreams[{i}].name `{}` is used by two upstreams",
                    u.name
                ));
            }
            u.kind()
                .map_err(|m| format!("upstreams[{i}] (`{}`): {m}", u.name))?;
        }
        Ok(())
    }

    /// The byte cap for one buffered message.
    pub fn max_body_bytes(&self) -> u64 {
        self.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES)
    }
}

impl Upstream {
    pub fn kind(&self) -> Result<UpstreamKind, String> {
        match (&self.mcp_url, &self.mcp_command, &self.http_url) {
            (Some(url), None, None) => Ok(UpstreamKind::McpUrl(http_uri("mcp_url", url)?)),
            (None, Some(cmd), None) => {
                if cmd.is_empty() || cmd[0].is_empty() {
                    return Err("`mcp_command` must name a program".into());
                }
                Ok(UpstreamKind::McpCommand(cmd.clone()))
            }
            (None, None, Some(url)) => Ok(UpstreamKind::HttpUrl(http_uri("http_url", url)?)),
            _ => Err("set exactly one of `mcp_url`, `mcp_command` and `http_url`".into()),
        }
    }
}

fn http_uri(key: &str, url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{key}` `{url}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(format!(
            "`{key}` `{url}` must be an http:// URL with a host (TLS to tools is not supported)"
        ));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_design_example() {
        let c = Config::parse(
            "sidecar.yaml",
            r#"
agent_id: my-agent-001
listen: 127.0.0.1:15001
admin_listen: 127.0.0.1:15000
policy_dir: policies
upstreams:
  - name: everything
    mcp_url: http://127.0.0.1:3001/mcp
  - name: files
    mcp_command: [npx, -y, "@modelcontextprotocol/server-filesystem", /data]
  - name: web_search
    http_url: http://127.0.0.1:8081
control_plane:
  url: http://127.0.0.1:8080
  token_env: PERFECX_AGENT_TOKEN
  spool_dir: .perfecx/spool
"#,
        )
        .unwrap();
        assert_eq!(c.upstreams.len(), 3);
        assert!(matches!(
            c.upstreams[1].kind().unwrap(),
            UpstreamKind::McpCommand(_)
        ));
    }

    #[test]
    fn rejects_unknown_keys_and_ambiguous_upstreams() {
        let e = Config::parse("s.yaml", "agent_id: a\nlisten_addr: 1\n").unwrap_err();
        assert!(e.to_string().contains("listen_addr"), "{e}");
        let e = Config::parse(
            "s.yaml",
            "agent_id: a\nupstreams:\n  - name: x\n    mcp_url: http://a/\n    http_url: http://b/\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("exactly one"), "{e}");
        let e = Config::parse(
            "s.yaml",
            "agent_id: a\nupstreams:\n  - name: x\n    mcp_url: https://a/\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
    }

    #[test]
    fn control_plane_settings_are_checked() {
        let base = "agent_id: a\ncontrol_plane:\n";
        let e = Config::parse(
            "s.yaml",
            &format!("{base}  url: not a url\n  token_env: T\n"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("control_plane.url"), "{e}");
        let e = Config::parse("s.yaml", &format!("{base}  url: http://cp:8080\n")).unwrap_err();
        assert!(e.to_string().contains("token_env"), "{e}");
        let e = Config::parse(
            "s.yaml",
            "agent_id: a/b\ncontrol_plane:\n  url: http://cp\n  token_env: T\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("agent_id"), "{e}");

        let var = "PERFECX_TEST_TOKEN_THAT_IS_NEVER_SET";
        let c = Config::parse(
            "s.yaml",
            &format!("{base}  url: http://cp:8080\n  token_env: {var}\n"),
        )
        .unwrap();
        let e = c.check_environment("s.yaml").unwrap_err();
        assert!(e.to_string().contains(var), "{e}");
        assert!(e.to_string().contains("not set"), "{e}");

        let mut cp = c.control_plane.clone().unwrap();
        cp.token = Some("agt_x".into());
        assert_eq!(cp.token().unwrap(), "agt_x");
        assert!(
            !format!("{cp:?}").contains("agt_x"),
            "the token is not logged"
        );
    }
}
