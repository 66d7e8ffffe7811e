//! Wire types of the perfecx control plane API, shared by the sidecar and the control plane.
//!
//! Every type here is the JSON of `/v1/...` bodies: requests deny unknown fields so that a typo
//! is a 400 naming the field instead of a silently ignored setting. With the `openapi` feature
//! the types also describe themselves for the generated OpenAPI document.

mod agents;
mod events;
mod keys;
mod metrics;
mod policies;
mod ws;

pub use agents::{
    Agent, AgentList, AgentStatus, RegisterAgentRequest, RegisterAgentResponse, UpdateAgentRequest,
    validate_agent_id,
};
pub use events::{EVENT_TYPES, EventBatch, EventType, EventsAccepted, MAX_BATCH_EVENTS, NewEvent};
pub use keys::{ApiKey, ApiKeyList, CreateApiKeyRequest, CreatedApiKey, Scope};
pub use metrics::{
    Anomaly, AnomalyList, LatencyPercentiles, Metrics, MetricsResponse, SecurityEvents, Severity,
    TimeRange, ToolMetrics, ViolationsByAction, ViolationsByRule,
};
pub use policies::{
    AgentPolicyList, ApplyPoliciesRequest, BundledPolicy, PolicyBundle, PolicyList, PolicyRecord,
};
pub use ws::{ClientMessage, ServerMessage, Topic};

use serde::{Deserialize, Serialize};

/// The body of every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Stable, machine-readable: `bad_request`, `unauthorized`, `forbidden`, `not_found`,
    /// `conflict`, `payload_too_large`, `rate_limited`, `internal`, ...
    pub code: String,
    /// For people; names the offending field when there is one.
    pub message: String,
}
