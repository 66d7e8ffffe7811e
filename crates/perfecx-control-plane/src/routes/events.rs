//! `POST /v1/agents/{agent_id}/events`: one event or a batch, stored idempotently.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use perfecx_api::{
    ErrorBody, EventBatch, EventType, EventsAccepted, MAX_BATCH_EVENTS, NewEvent, Scope,
    ServerMessage, validate_agent_id,
};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::auth::Principal;
use crate::error::{ApiError, ApiPath, ApiResult, parse_json, read_body};
use crate::ratelimit::Class;
use crate::relay::Note;
use crate::state::AppState;
use crate::store::{EventRow, now_ms, rollups};

/// Largest request body: a full batch of moderately sized events.
pub const MAX_EVENTS_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Largest `data` plus `context` of one event, serialized.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

pub fn router() -> Router<AppState> {
    Router::new().route("/agents/{agent_id}/events", post(ingest))
}

/// Either body shape, told apart by a top-level `events` key; `true` for a batch.
fn parse_events(bytes: &[u8]) -> ApiResult<(Vec<NewEvent>, bool)> {
    // Fast path: straight into the typed shape. Anything it refuses goes the slow way below,
    // which reaches the same result or names the offending field.
    let maybe_batch = bytes.windows(8).any(|w| w == b"\"events\"");
    let fast = if maybe_batch {
        serde_json::from_slice::<EventBatch>(bytes)
            .ok()
            .map(|b| (b.events, true))
    } else {
        serde_json::from_slice::<NewEvent>(bytes)
            .ok()
            .map(|e| (vec![e], false))
    };
    match fast {
        Some((events, true)) => check_batch_size(events.len()).map(|()| (events, true)),
        Some(single) => Ok(single),
        None => parse_events_slowly(bytes),
    }
}

fn check_batch_size(count: usize) -> ApiResult<()> {
    if count == 0 {
        return Err(ApiError::bad_request(
            "field `events` must hold at least one event",
        ));
    }
    if count > MAX_BATCH_EVENTS {
        return Err(ApiError::PayloadTooLarge(format!(
            "field `events` holds {count} events; a batch holds at most {MAX_BATCH_EVENTS}"
        )));
    }
    Ok(())
}

fn parse_events_slowly(bytes: &[u8]) -> ApiResult<(Vec<NewEvent>, bool)> {
    let object: Map<String, Value> = parse_json(bytes)?;
    if object.contains_key("events") {
        let batch: EventBatch = from_value(Value::Object(object), "")?;
        check_batch_size(batch.events.len())?;
        Ok((batch.events, true))
    } else {
        Ok((vec![from_value(Value::Object(object), "")?], false))
    }
}

fn from_value<T: DeserializeOwned>(value: Value, prefix: &str) -> ApiResult<T> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let path = if path == "." {
            prefix.to_string()
        } else {
            format!("{prefix}{path}")
        };
        if path.is_empty() {
            ApiError::bad_request(format!("invalid event: {}", error.into_inner()))
        } else {
            ApiError::bad_request(format!("field `{path}`: {}", error.into_inner()))
        }
    })
}

/// Checks one event and copies out what metrics count, so that queries need no JSON functions.
fn to_row(event: NewEvent, field: &str, now: i64) -> ApiResult<EventRow> {
    let ts = match &event.timestamp {
        None => now,
        Some(text) => chrono::DateTime::parse_from_rfc3339(text)
            .map_err(|e| {
                ApiError::bad_request(format!(
                    "field `{field}timestamp`: `{text}` is not an RFC 3339 timestamp ({e})"
                ))
            })?
            .timestamp_millis(),
    };
    let text = |key: &str| {
        event
            .data
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let tool = event
        .data
        .get("tool")
        .and_then(Value::as_str)
        .map(|t| rollups::tool_key(t).to_string());
    let rule = text("rule");
    let action = text("action");
    let duration_ms = event
        .data
        .get("duration_ms")
        .and_then(|v| {
            v.as_i64().or_else(|| {
                v.as_f64()
                    .filter(|f| f.is_finite())
                    .map(|f| f.round().clamp(i64::MIN as f64, i64::MAX as f64) as i64)
            })
        })
        .map(|ms| ms.clamp(0, rollups::MAX_DURATION_MS));
    // An MCP result with `isError: true` is a failed call, whatever `success` says.
    let is_error = event.data.get("isError").and_then(Value::as_bool) == Some(true);
    let success = if is_error {
        Some(false)
    } else {
        event.data.get("success").and_then(Value::as_bool)
    };
    let data = serde_json::to_string(&event.data).map_err(ApiError::internal)?;
    let context = serde_json::to_string(&event.context).map_err(ApiError::internal)?;
    let size = data.len() + context.len();
    if size > MAX_EVENT_BYTES {
        return Err(ApiError::PayloadTooLarge(format!(
            "event {}: `data` and `context` take {size} bytes; at most {MAX_EVENT_BYTES} are allowed",
            field.trim_end_matches('.')
        )));
    }
    Ok(EventRow {
        event_id: event
            .event_id
            .unwrap_or_else(uuid::Uuid::new_v4)
            .to_string(),
        event_type: event.event_type.as_str(),
        ts,
        tool,
        rule,
        action,
        duration_ms,
        success,
        data,
        context,
    })
}

#[utoipa::path(post, path = "/v1/agents/{agent_id}/events", tag = "events",
    request_body(content = EventBatch, description = "one event (NewEvent) or {\"events\": [...]} of up to 1,000"),
    responses((status = 202, body = EventsAccepted), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn ingest(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(agent_id): ApiPath<String>,
    request: Request,
) -> ApiResult<impl IntoResponse> {
    who.require_agent(&agent_id, Scope::Write)?;
    validate_agent_id(&agent_id)
        .map_err(|e| ApiError::bad_request(format!("agent id in the path {e}")))?;
    let bytes = read_body(request, MAX_EVENTS_BODY_BYTES).await?;
    let (events, batch) = parse_events(&bytes)?;
    let now = now_ms();
    let status = match events.last().map(|e| e.event_type) {
        Some(EventType::Error) => "error",
        _ => "active",
    };
    let rows = events
        .into_iter()
        .enumerate()
        .map(|(i, event)| {
            let field = if batch {
                format!("events[{i}].")
            } else {
                String::new()
            };
            to_row(event, &field, now)
        })
        .collect::<ApiResult<Vec<_>>>()?;
    let received = rows.len() as u64;
    // Valid events count one by one against the quota; a refused request takes nothing.
    let quota = state.rate_limit(&who, Class::Events, received)?;
    let new = state
        .store()
        .insert_events(&agent_id, rows, status, now)
        .await?;
    let stored = new.len() as u64;
    state.telemetry().events_accepted.inc_by(stored);
    state.telemetry().events_duplicate.inc_by(received - stored);
    publish_violations(&state, &agent_id, &new).await;
    state.monitor().observe(&agent_id, &new).await;
    let answer = EventsAccepted {
        received,
        stored,
        duplicates: received - stored,
    };
    Ok((StatusCode::ACCEPTED, quota, Json(answer)))
}

/// Sends the newly stored violations to the agent's watchers, here and on other replicas.
async fn publish_violations(state: &AppState, agent_id: &str, new: &[EventRow]) {
    let violations = || new.iter().filter(|e| e.event_type == "policy_violation");
    if violations().next().is_none() {
        return;
    }
    if state.hub().is_watched(agent_id) {
        for event in violations() {
            let data = serde_json::from_str(&event.data).unwrap_or(Value::Null);
            state
                .hub()
                .publish(agent_id, ServerMessage::PolicyViolation(data));
        }
    }
    state
        .announce(Note::Violations {
            agent_id: agent_id.to_string(),
            event_ids: violations().map(|e| e.event_id.clone()).collect(),
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(result: ApiResult<(Vec<NewEvent>, bool)>) -> String {
        match result {
            Err(ApiError::BadRequest(m)) | Err(ApiError::PayloadTooLarge(m)) => m,
            other => format!("unexpected: {:?}", other.map(|e| e.0.len())),
        }
    }

    #[test]
    fn errors_name_the_field() {
        let m = message(parse_events(
            br#"{"events": [{"event_type": "tool_execution"}, {"event_type": "nope"}]}"#,
        ));
        assert!(m.contains("events[1].event_type"), "{m}");
        assert!(m.contains("unknown variant `nope`"), "{m}");
        let m = message(parse_events(br#"{"event_type": "custom", "dat": {}}"#));
        assert!(m.contains("unknown field `dat`"), "{m}");
        let m = message(parse_events(br#"{"events": []}"#));
        assert!(m.contains("at least one"), "{m}");
    }

    #[test]
    fn timestamps_and_extracted_fields() {
        let event: NewEvent = serde_json::from_value(serde_json::json!({
            "event_type": "tool_execution",
            "timestamp": "2024-01-15T10:35:00Z",
            "data": {"tool": "web_search", "duration_ms": 1250, "success": true}
        }))
        .unwrap_or_else(|e| unreachable!("{e}"));
        let row = to_row(event, "", 0).unwrap_or_else(|e| unreachable!("{e:?}"));
        assert_eq!(row.ts, 1_705_314_900_000);
        assert_eq!(row.tool.as_deref(), Some("web_search"));
        assert_eq!(row.duration_ms, Some(1250));
        assert_eq!(row.success, Some(true));
        let event: NewEvent = serde_json::from_value(serde_json::json!({
            "event_type": "tool_execution",
            "data": {"tool": "t".repeat(300), "duration_ms": -5, "success": true, "isError": true}
        }))
        .unwrap_or_else(|e| unreachable!("{e}"));
        let row = to_row(event, "", 0).unwrap_or_else(|e| unreachable!("{e:?}"));
        assert_eq!(row.tool.map(|t| t.len()), Some(rollups::MAX_TOOL_CHARS));
        assert_eq!(row.duration_ms, Some(0));
        assert_eq!(row.success, Some(false));
        let event: NewEvent = serde_json::from_value(serde_json::json!({
            "event_type": "tool_execution", "data": {"duration_ms": 1e300}
        }))
        .unwrap_or_else(|e| unreachable!("{e}"));
        let row = to_row(event, "", 0).unwrap_or_else(|e| unreachable!("{e:?}"));
        assert_eq!(row.duration_ms, Some(rollups::MAX_DURATION_MS));
        let bad: NewEvent = serde_json::from_value(serde_json::json!({
            "event_type": "custom", "timestamp": "yesterday"
        }))
        .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(
            matches!(to_row(bad, "events[2].", 0), Err(ApiError::BadRequest(m)) if m.contains("events[2].timestamp"))
        );
    }
}
