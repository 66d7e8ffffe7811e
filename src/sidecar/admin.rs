//! The admin listener:
//!
//! - `GET /metrics`: Prometheus text format
//! - `GET /healthz`: 200 while the process serves
//! - `GET /readyz`: 200 when a valid policy set is loaded, 503 otherwise (fail closed)
//! - `GET /policies`: the loaded set (names, files, hashes, load time) and the last load error

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/policies", get(policies))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    match shared.policies.current() {
        Ok(_) => (StatusCode::OK, "ready\n".to_owned()).into_response(),
        Err(no) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", no.reason),
        )
            .into_response(),
    }
}

async fn policies(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.policies.report()).into_response()
}
