use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A stored policy: the reference's policy object (`name`, `description`, `enforcement`,
/// `rules`, as normalized by the policy engine) with its id and version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyRecord {
    pub policy_id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub enforcement: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Object>))]
    pub rules: Vec<Value>,
    /// 1 at creation, one more at each update.
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyList {
    pub policies: Vec<PolicyRecord>,
    pub total: u64,
    pub limit: u32,
    pub offset: u64,
}

/// `POST /v1/agents/{agent_id}/policies`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApplyPoliciesRequest {
    pub policy_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentPolicyList {
    pub agent_id: String,
    pub policies: Vec<PolicyRecord>,
}

/// Everything a sidecar needs to enforce an agent's policies, from
/// `GET /v1/agents/{agent_id}/policy-bundle`. `revision` is also the answer's `ETag`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyBundle {
    pub agent_id: String,
    pub revision: String,
    pub policies: Vec<BundledPolicy>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BundledPolicy {
    pub policy_id: String,
    pub version: i64,
    /// The policy document in the reference's JSON shape; `perfecx_policy::parse_policy`
    /// reads it back.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub document: Value,
}
