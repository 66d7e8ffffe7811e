//! The admin listener:
//!
//! - `GET /metrics`: Prometheus text format
//! - `GET /healthz`: 200 while the process serves
//! - `GET /readyz`: 200 when a valid policy set is loaded, 503 otherwise (fail closed)
//! - `GET /policies`: the loaded set (names, files, hashes, load time) and the last load error
//!
//! On a loopback address it answers only requests that name a loopback host or an allowed one
//! ([`super::origin`]), so that a web page cannot read it through DNS rebinding.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::Shared;
use super::denial::Refusal;
use super::origin::HostGuard;
use super::rescue;

pub fn router(shared: Arc<Shared>, hosts: HostGuard) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/policies", get(policies))
        .layer(middleware::from_fn_with_state(hosts, guard))
        .with_state(shared)
}

async fn guard(State(hosts): State<HostGuard>, req: Request, next: Next) -> Response {
    match hosts.check(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(foreign) => {
            tracing::warn!(header = foreign.header, value = %foreign.value, "admin request refused: not a host this sidecar answers to");
            rescue::http_error(&Refusal::from(foreign)).into_response()
        }
    }
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
