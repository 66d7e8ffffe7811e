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
    /// Accepted and validated; event reporting to the control plane is not part of this
    /// sidecar yet.
    #[serde(default)]
    pub control_plane: Option<ControlPlane>,
    /// Cap on the bytes buffered for one request, response or stream event (default 8 MiB);
    /// a `max_memory_mb` limit in the policies lowers it.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// How often the policy directory is polled as a fallback for lost file-system events
    /// (default 1000 ms).
    #[serde(default)]
    pub policy_poll_interval_ms: Option<u64>,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlane {
    pub url: String,
    #[serde(default)]
    pub token_env: Option<String>,
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
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
        if config.policy_dir.is_relative() {
            let base = path.parent().unwrap_or(Path::new(""));
            config.policy_dir = base.join(&config.policy_dir);
        }
        Ok(config)
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
}
