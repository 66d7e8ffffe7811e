//! `GET /v1/openapi.json`: the OpenAPI 3.1 document, generated from the handlers' annotations.

use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{agents, events, keys, metrics, policies};
use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "perfecx control plane", description = "Agent registry, events, policies, metrics and API keys. Every request carries `Authorization: Bearer <key>`; errors answer `{\"error\": {\"code\", \"message\"}}`."),
    paths(
        agents::register, agents::list, agents::show, agents::update, agents::remove,
        events::ingest,
        policies::create, policies::list, policies::show, policies::update, policies::remove,
        policies::apply, policies::agent_list, policies::detach, policies::bundle,
        metrics::metrics, metrics::anomalies,
        keys::create, keys::list, keys::remove,
    ),
    components(schemas(perfecx_api::NewEvent)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
}
