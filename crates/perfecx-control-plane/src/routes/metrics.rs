//! `GET /v1/agents/{agent_id}/metrics` and `/anomalies`, counted from stored events.
//!
//! The monitoring work (baselines, anomaly scoring) will fill the anomalies table; until then
//! `anomaly_score` is the highest stored score in the range, 0 when none is stored.

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use perfecx_api::{
    AnomalyList, ErrorBody, Metrics, MetricsResponse, Scope, SecurityEvents, TimeRange,
};
use serde::Deserialize;

use super::agents::no_agent;
use super::{Page, page};
use crate::auth::Principal;
use crate::error::{ApiError, ApiPath, ApiQuery, ApiResult};
use crate::ratelimit::Class;
use crate::state::AppState;
use crate::store::{now_ms, rfc3339};

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

const HOUR_MS: i64 = 3_600_000;

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
    if start >= end {
        return Err(ApiError::bad_request(
            "query parameter `start` must be before `end`",
        ));
    }
    let store = state.store();
    if !store.agent_exists(&agent_id).await? {
        return Err(no_agent(&agent_id));
    }
    let counts = store.event_counts(&agent_id, start, end).await?;
    let error_rate = if counts.tool_executions == 0 {
        0.0
    } else {
        counts.failed_tool_executions as f64 / counts.tool_executions as f64
    };
    let response = MetricsResponse {
        agent_id,
        time_range: TimeRange {
            start: rfc3339(start),
            end: rfc3339(end),
        },
        metrics: Metrics {
            total_requests: counts.tool_executions,
            average_response_time_ms: counts.average_duration_ms.unwrap_or(0.0),
            error_rate,
            anomaly_score: counts.max_anomaly_score.unwrap_or(0.0),
            policy_violations: counts.policy_violations,
            security_events: SecurityEvents {
                memory_tampering_attempts: counts.memory_protection_violations,
                unauthorized_tool_access: counts.tool_restriction_violations,
                suspicious_patterns: counts.content_filter_violations,
            },
        },
    };
    Ok((quota, Json(response)))
}

#[utoipa::path(get, path = "/v1/agents/{agent_id}/anomalies", tag = "monitoring",
    params(("limit" = Option<u32>, Query), ("offset" = Option<u64>, Query)),
    responses((status = 200, body = AnomalyList), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn anomalies(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(agent_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<Page>,
) -> ApiResult<impl IntoResponse> {
    who.require(Scope::Read)?;
    let quota = state.rate_limit(&who, Class::Metrics, 1)?;
    let (limit, offset) = page(query.limit, query.offset)?;
    let store = state.store();
    if !store.agent_exists(&agent_id).await? {
        return Err(no_agent(&agent_id));
    }
    let (anomalies, total) = store.list_anomalies(&agent_id, limit, offset).await?;
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
