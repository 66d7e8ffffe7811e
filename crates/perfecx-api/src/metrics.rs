use std::collections::BTreeMap;

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

/// The reference's fields first; the others are additions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Metrics {
    /// Tool executions in the range.
    pub total_requests: u64,
    /// Mean `duration_ms` of the tool executions that reported one; 0 without any.
    pub average_response_time_ms: f64,
    /// Share of tool executions that failed (`success: false` or `isError: true`), in [0, 1].
    pub error_rate: f64,
    /// Highest anomaly score detected in the range, in [0, 1]; 0 without any.
    pub anomaly_score: f64,
    pub policy_violations: u64,
    pub security_events: SecurityEvents,
    /// Estimated from a latency histogram (see the control plane's README); 0 without any.
    pub latency_percentiles_ms: LatencyPercentiles,
    pub violations_by_rule: ViolationsByRule,
    /// Per decision: what the sidecar did about each violation.
    pub violations_by_action: ViolationsByAction,
    /// Per tool, by name; violations of calls that named no tool are under `""`.
    pub tools: BTreeMap<String, ToolMetrics>,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LatencyPercentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

/// `policy_violation` events by the type of the rule they broke; a violation naming another
/// rule type (or none) counts only in `policy_violations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ViolationsByRule {
    pub tool_restriction: u64,
    pub execution_limit: u64,
    pub content_filter: u64,
    pub memory_protection: u64,
}

/// `policy_violation` events by their `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ViolationsByAction {
    pub blocked: u64,
    pub redacted: u64,
    pub alerted: u64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ToolMetrics {
    /// Tool executions.
    pub requests: u64,
    /// Failed tool executions.
    pub errors: u64,
    /// Mean `duration_ms` of its executions that reported one; 0 without any.
    pub average_response_time_ms: f64,
    pub policy_violations: u64,
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

/// How serious an anomaly is; it follows the score (see the control plane's README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    /// From the least to the most serious.
    pub const ALL: [Severity; 4] = [
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(text: &str) -> Option<Severity> {
        Severity::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// A detected departure from an agent's baseline behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Anomaly {
    pub anomaly_id: String,
    pub agent_id: String,
    /// What departed from the baseline: `call_rate_spike`, `latency_spike`,
    /// `error_rate_spike`, `violation_burst`, `new_tool` or `rare_transition`.
    #[serde(rename = "type")]
    pub anomaly_type: String,
    pub severity: Severity,
    /// In [0, 1]: 0.5 at the detection threshold, nearer 1 the further from the baseline.
    pub score: f64,
    /// In plain words, with the figures.
    pub description: String,
    /// RFC 3339: the end of the minute it concerns, or the call that revealed it.
    pub detected_at: String,
    /// Baseline against observed, e.g. `{"baseline_latency_ms": 230, "observed_latency_ms":
    /// 1400, "z_score": 9.1}`.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub evidence: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AnomalyList {
    pub anomalies: Vec<Anomaly>,
    pub total: u64,
    pub limit: u32,
    pub offset: u64,
}
