//! The control plane's own Prometheus metrics, served at `/metrics`.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{Encoder, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

use crate::state::AppState;

/// One registry per server, so that several servers in one test process do not collide.
pub struct Telemetry {
    registry: Registry,
    requests: IntCounterVec,
    pub events_accepted: IntCounter,
    pub events_duplicate: IntCounter,
    pub rate_limited: IntCounterVec,
    pub anomalies_detected: IntCounter,
    pub socket_messages_dropped: IntCounter,
}

impl Telemetry {
    pub fn new() -> Result<Telemetry, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "perfecx_cp_http_requests_total",
                "HTTP requests by route and status",
            ),
            &["method", "route", "status"],
        )?;
        let events_accepted = IntCounter::new(
            "perfecx_cp_events_accepted_total",
            "Events stored (resends of a stored event_id not counted)",
        )?;
        let events_duplicate = IntCounter::new(
            "perfecx_cp_events_duplicate_total",
            "Events received again with an event_id already stored",
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "perfecx_cp_rate_limited_total",
                "Requests refused by rate limits",
            ),
            &["class"],
        )?;
        let anomalies_detected = IntCounter::new(
            "perfecx_cp_anomalies_detected_total",
            "Anomalies detected (and stored) by this replica",
        )?;
        let socket_messages_dropped = IntCounter::new(
            "perfecx_cp_websocket_messages_dropped_total",
            "Messages not sent to a WebSocket client that fell too far behind",
        )?;
        registry.register(Box::new(anomalies_detected.clone()))?;
        registry.register(Box::new(socket_messages_dropped.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(events_accepted.clone()))?;
        registry.register(Box::new(events_duplicate.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        Ok(Telemetry {
            registry,
            requests,
            events_accepted,
            events_duplicate,
            rate_limited,
            anomalies_detected,
            socket_messages_dropped,
        })
    }

    fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// Counts every routed request under its route template, so that ids do not explode labels.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let response = next.run(request).await;
    state
        .telemetry()
        .requests
        .with_label_values(&[method.as_str(), route.as_str(), response.status().as_str()])
        .inc();
    response
}

pub async fn scrape(State(state): State<AppState>) -> Response {
    match state.telemetry().render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot render metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
