use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `GET /v1/agents/{agent_id}/metrics`, in the API reference's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricsResponse {
    pub agent_id: String,
    pub time_range: TimeRange,
    pub metrics: Metrics,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TimeRange {
    pub start: String,
    pub end: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Metrics {
    /// Tool executions in the range.
    pub total_requests: u64,
    /// Mean `duration_ms` of the tool executions that reported one; 0 without any.
    pub average_response_time_ms: f64,
    /// Share of tool executions with `success: false`, in [0, 1].
    pub error_rate: f64,
    /// Highest anomaly score detected in the range, in [0, 1].
    pub anomaly_score: f64,
    pub policy_violations: u64,
    pub security_events: SecurityEvents,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SecurityEvents {
    /// `memory_protection` violations.
    pub memory_tampering_attempts: u64,
    /// `tool_restriction` violations.
    pub unauthorized_tool_access: u64,
    /// `content_filter` violations.
    pub suspicious_patterns: u64,
}

/// A detected departure from an agent's baseline behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Anomaly {
    pub anomaly_id: String,
    pub agent_id: String,
    /// What departed from the baseline: call_rate, latency, error_rate, tool_mix, ...
    #[serde(rename = "type")]
    pub anomaly_type: String,
    /// In [0, 1].
    pub score: f64,
    pub description: String,
    pub detected_at: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub details: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AnomalyList {
    pub anomalies: Vec<Anomaly>,
    pub total: u64,
    pub limit: u32,
    pub offset: u64,
}
