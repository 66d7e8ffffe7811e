//! `GET /v1/agents/{agent_id}/metrics` (from the per-minute rollups) and `/anomalies` (what
//! the detector of `crate::monitor` stored).

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use perfecx_api::{
    AnomalyList, ErrorBody, LatencyPercentiles, Metrics, MetricsResponse, Scope, SecurityEvents,
    Severity, TimeRange, ToolMetrics, ViolationsByAction, ViolationsByRule,
};
use serde::Deserialize;

use super::agents::no_agent;
use super::page;
use crate::auth::Principal;
use crate::error::{ApiError, ApiPath, ApiQuery, ApiResult};
use crate::ratelimit::Class;
use crate::state::AppState;
use crate::store::{AnomalyFilter, Totals, now_ms, rfc3339};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/agents/{agent_id}/metrics", get(metrics))
        .route("/agents/{agent_id}/anomalies", get(anomalies))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    start: Option<String>,
    end: Option<String>,
}

fn instant(name: &str, text: &str) -> ApiResult<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            ApiError::bad_request(format!(
                "query parameter `{name}`: `{text}` is not an RFC 3339 timestamp ({e})"
            ))
        })
}

fn check_order(start: Option<i64>, end: Option<i64>) -> ApiResult<()> {
    match (start, end) {
        (Some(start), Some(end)) if start >= end => Err(ApiError::bad_request(
            "query parameter `start` must be before `end`",
        )),
        _ => Ok(()),
    }
}

pub const HOUR_MS: i64 = 3_600_000;

#[utoipa::path(get, path = "/v1/agents/{agent_id}/metrics", tag = "monitoring",
    params(("start" = Option<String>, Query, description = "RFC 3339; default one hour before end"),
        ("end" = Option<String>, Query, description = "RFC 3339; default now")),
    responses((status = 200, body = MetricsResponse), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn metrics(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(agent_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<RangeQuery>,
) -> ApiResult<impl IntoResponse> {
    who.require(Scope::Read)?;
    let quota = state.rate_limit(&who, Class::Metrics, 1)?;
    let end = match &query.end {
        Some(text) => instant("end", text)?,
        None => now_ms(),
    };
    let start = match &query.start {
        Some(text) => instant("start", text)?,
        None => end.saturating_sub(HOUR_MS),
    };
    check_order(Some(start), Some(end))?;
    if !state.store().agent_exists(&agent_id).await? {
        return Err(no_agent(&agent_id));
    }
    let response = compute(&state, agent_id, start, end).await?;
    Ok((quota, Json(response)))
}

/// The metrics of one agent over `[start, end)`.
pub async fn compute(
    state: &AppState,
    agent_id: String,
    start: i64,
    end: i64,
) -> ApiResult<MetricsResponse> {
    let store = state.store();
    let totals = store.metric_totals(&agent_id, start, end).await?;
    let anomaly_score = store.max_anomaly_score(&agent_id, start, end).await?;
    Ok(MetricsResponse {
        agent_id,
        time_range: TimeRange {
            start: rfc3339(start),
            end: rfc3339(end),
        },
        metrics: metrics_of(&totals, anomaly_score.unwrap_or(0.0)),
    })
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn mean(sum: i64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { sum as f64 / n as f64 }
}

fn metrics_of(totals: &Totals, anomaly_score: f64) -> Metrics {
    let c = &totals.counts;
    let [
        tool_restriction,
        execution_limit,
        content_filter,
        memory_protection,
    ] = c.by_rule;
    let [blocked, redacted, alerted] = c.by_action;
    Metrics {
        total_requests: c.requests,
        average_response_time_ms: mean(c.latency_sum, c.timed),
        error_rate: ratio(c.errors, c.requests),
        anomaly_score,
        policy_violations: c.violations,
        security_events: SecurityEvents {
            memory_tampering_attempts: memory_protection,
            unauthorized_tool_access: tool_restriction,
            suspicious_patterns: content_filter,
        },
        latency_percentiles_ms: LatencyPercentiles {
            p50: c.percentile(0.50),
            p95: c.percentile(0.95),
            p99: c.percentile(0.99),
        },
        violations_by_rule: ViolationsByRule {
            tool_restriction,
            execution_limit,
            content_filter,
            memory_protection,
        },
        violations_by_action: ViolationsByAction {
            blocked,
            redacted,
            alerted,
        },
        tools: totals
            .tools
            .iter()
            .filter(|(_, t)| t.requests > 0 || t.violations > 0)
            .map(|(name, t)| {
                let metrics = ToolMetrics {
                    requests: t.requests,
                    errors: t.errors,
                    average_response_time_ms: mean(t.latency_sum, t.timed),
                    policy_violations: t.violations,
                };
                (name.clone(), metrics)
            })
            .collect(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyQuery {
    start: Option<String>,
    end: Option<String>,
    severity: Option<String>,
    min_severity: Option<String>,
    limit: Option<u32>,
    offset: Option<u64>,
}

fn severity(name: &str, text: &str) -> ApiResult<Severity> {
    Severity::parse(text).ok_or_else(|| {
        ApiError::bad_request(format!(
            "query parameter `{name}`: `{text}` is not a severity; use low, medium, high or critical"
        ))
    })
}

/// `severity` (levels, comma-separated: any of them) and `min_severity` (that level or
/// above), both applying when both are given.
fn severities(exact: Option<&str>, min: Option<&str>) -> ApiResult<Vec<Severity>> {
    let mut wanted: Vec<Severity> = match exact {
        Some(list) => list
            .split(',')
            .map(|s| severity("severity", s.trim()))
            .collect::<ApiResult<_>>()?,
        None => Severity::ALL.to_vec(),
    };
    if let Some(min) = min {
        let min = severity("min_severity", min)?;
        wanted.retain(|s| *s >= min);
        if wanted.is_empty() {
            return Err(ApiError::bad_request(
                "query parameters `severity` and `min_severity` exclude every level",
            ));
        }
    }
    wanted.sort();
    wanted.dedup();
    if wanted.len() == Severity::ALL.len() {
        wanted.clear();
    }
    Ok(wanted)
}

#[utoipa::path(get, path = "/v1/agents/{agent_id}/anomalies", tag = "monitoring",
    params(("start" = Option<String>, Query, description = "RFC 3339; detected at or after; default: no bound"),
        ("end" = Option<String>, Query, description = "RFC 3339; detected before; default: no bound"),
        ("severity" = Option<String>, Query, description = "exactly these levels, comma-separated: low, medium, high, critical"),
        ("min_severity" = Option<String>, Query, description = "this level or above"),
        ("limit" = Option<u32>, Query, description = "1 to 100, default 20"),
        ("offset" = Option<u64>, Query, description = "default 0")),
    responses((status = 200, body = AnomalyList, description = "newest first"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 429, body = ErrorBody)))]
pub async fn anomalies(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(agent_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<AnomalyQuery>,
) -> ApiResult<impl IntoResponse> {
    who.require(Scope::Read)?;
    let quota = state.rate_limit(&who, Class::Metrics, 1)?;
    let (limit, offset) = page(query.limit, query.offset)?;
    let start = query
        .start
        .as_deref()
        .map(|t| instant("start", t))
        .transpose()?;
    let end = query
        .end
        .as_deref()
        .map(|t| instant("end", t))
        .transpose()?;
    check_order(start, end)?;
    let filter = AnomalyFilter {
        start,
        end,
        severities: severities(query.severity.as_deref(), query.min_severity.as_deref())?,
    };
    let store = state.store();
    if !store.agent_exists(&agent_id).await? {
        return Err(no_agent(&agent_id));
    }
    let (anomalies, total) = store
        .list_anomalies(&agent_id, &filter, limit, offset)
        .await?;
    Ok((
        quota,
        Json(AnomalyList {
            anomalies,
            total,
            limit,
            offset,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_filters() {
        let levels = |exact, min| severities(exact, min).map_err(|e| format!("{e:?}"));
        assert_eq!(levels(None, None), Ok(vec![]));
        assert_eq!(levels(Some("high"), None), Ok(vec![Severity::High]));
        assert_eq!(
            levels(None, Some("high")),
            Ok(vec![Severity::High, Severity::Critical])
        );
        assert_eq!(
            levels(Some("critical, low"), Some("medium")),
            Ok(vec![Severity::Critical])
        );
        assert!(levels(Some("severe"), None).is_err_and(|e| e.contains("`severity`")));
        assert!(levels(None, Some("HIGH")).is_err_and(|e| e.contains("`min_severity`")));
        assert!(levels(Some("low"), Some("high")).is_err_and(|e| e.contains("exclude")));
    }
}
