use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `POST /v1/agents`. Without `agent_id` the control plane generates one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RegisterAgentRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub framework: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub metadata: Map<String, Value>,
}

/// The answer to a registration; `registration_token` is shown this once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterAgentResponse {
    pub agent_id: String,
    pub registration_token: String,
    pub monitoring_endpoint: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    Active,
    Inactive,
    Error,
}

impl AgentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Active => "active",
            AgentStatus::Inactive => "inactive",
            AgentStatus::Error => "error",
        }
    }

    pub fn parse(text: &str) -> Option<AgentStatus> {
        match text {
            "active" => Some(AgentStatus::Active),
            "inactive" => Some(AgentStatus::Inactive),
            "error" => Some(AgentStatus::Error),
            _ => None,
        }
    }
}

/// A registered agent as `GET /v1/agents/{agent_id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Agent {
    pub agent_id: String,
    pub name: String,
    pub framework: Option<String>,
    pub version: Option<String>,
    pub capabilities: Vec<String>,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub metadata: Map<String, Value>,
    pub status: AgentStatus,
    pub created_at: String,
    pub updated_at: String,
    /// When the agent last reported an event; `null` before its first.
    pub last_seen_at: Option<String>,
}

/// `PUT /v1/agents/{agent_id}`: the fields given replace the stored ones.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateAgentRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub framework: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AgentStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentList {
    pub agents: Vec<Agent>,
    pub total: u64,
    pub limit: u32,
    pub offset: u64,
}

/// Agent ids are 1 to 128 letters, digits, `.`, `_` or `-`, so that they are safe in URLs,
/// file names and metric labels. The error says what is wrong, for a 400 or a config error.
pub fn validate_agent_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".to_string());
    }
    if id.len() > 128 {
        return Err(format!(
            "is {} characters long; at most 128 are allowed",
            id.len()
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "contains {bad:?}; only letters, digits, `.`, `_` and `-` are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids() {
        assert!(validate_agent_id("my-agent-001").is_ok());
        assert!(validate_agent_id("a.b_c-D9").is_ok());
        assert!(validate_agent_id(&"x".repeat(128)).is_ok());
        assert!(validate_agent_id(&"x".repeat(129)).is_err());
        assert!(validate_agent_id("").is_err());
        assert!(validate_agent_id("a/b").is_err());
        assert!(validate_agent_id("é").is_err());
    }
}
