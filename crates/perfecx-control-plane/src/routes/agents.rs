//! `/v1/agents`: the agent registry.

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, extract::State};
use perfecx_api::{
    Agent, AgentList, AgentStatus, ErrorBody, RegisterAgentRequest, RegisterAgentResponse, Scope,
    UpdateAgentRequest, validate_agent_id,
};
use serde::Deserialize;

use super::{check_text, page};
use crate::auth::{AGENT_TOKEN_PREFIX, Principal, hash_secret, new_secret};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult};
use crate::ratelimit::Class;
use crate::state::AppState;
use crate::store::{NewAgent, rfc3339};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/agents", get(list).post(register))
        .route("/agents/{agent_id}", get(show).put(update).delete(remove))
}

const MAX_NAME: usize = 256;
const MAX_CAPABILITIES: usize = 100;
const MAX_METADATA_BYTES: usize = 16 * 1024;

fn check_details(
    framework: Option<&str>,
    version: Option<&str>,
    capabilities: Option<&[String]>,
    metadata: Option<&serde_json::Map<String, serde_json::Value>>,
) -> ApiResult<()> {
    if let Some(framework) = framework {
        check_text("framework", framework, MAX_NAME)?;
    }
    if let Some(version) = version {
        check_text("version", version, MAX_NAME)?;
    }
    if let Some(capabilities) = capabilities {
        if capabilities.len() > MAX_CAPABILITIES {
            return Err(ApiError::bad_request(format!(
                "field `capabilities` holds {}; at most {MAX_CAPABILITIES} are allowed",
                capabilities.len()
            )));
        }
        for (i, capability) in capabilities.iter().enumerate() {
            check_text(&format!("capabilities[{i}]"), capability, MAX_NAME)?;
        }
    }
    if let Some(metadata) = metadata {
        let size = serde_json::to_string(metadata).map_or(0, |s| s.len());
        if size > MAX_METADATA_BYTES {
            return Err(ApiError::PayloadTooLarge(format!(
                "field `metadata` takes {size} bytes; at most {MAX_METADATA_BYTES} are allowed"
            )));
        }
    }
    Ok(())
}

fn agent_id_in_path(agent_id: &str) -> ApiResult<()> {
    validate_agent_id(agent_id)
        .map_err(|e| ApiError::bad_request(format!("agent id in the path {e}")))
}

#[utoipa::path(post, path = "/v1/agents", tag = "agents", request_body = RegisterAgentRequest,
    responses((status = 201, body = RegisterAgentResponse), (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn register(
    State(state): State<AppState>,
    who: Principal,
    ApiJson(request): ApiJson<RegisterAgentRequest>,
) -> ApiResult<impl IntoResponse> {
    who.require(Scope::Write)?;
    let quota = state.rate_limit(&who, Class::Registration, 1)?;
    let agent_id = match request.agent_id {
        Some(id) => {
            validate_agent_id(&id)
                .map_err(|e| ApiError::bad_request(format!("field `agent_id` {e}")))?;
            id
        }
        None => uuid::Uuid::new_v4().to_string(),
    };
    check_text("name", &request.name, MAX_NAME)?;
    check_details(
        request.framework.as_deref(),
        request.version.as_deref(),
        Some(&request.capabilities),
        Some(&request.metadata),
    )?;
    let token = new_secret(AGENT_TOKEN_PREFIX);
    let agent = NewAgent {
        agent_id,
        name: request.name,
        framework: request.framework,
        version: request.version,
        capabilities: request.capabilities,
        metadata: request.metadata,
        token_hash: hash_secret(&token),
    };
    let created = state.store().insert_agent(&agent).await?;
    let response = RegisterAgentResponse {
        monitoring_endpoint: state.monitoring_endpoint(&agent.agent_id),
        agent_id: agent.agent_id,
        registration_token: token,
        created_at: rfc3339(created),
    };
    Ok((StatusCode::CREATED, quota, Json(response)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    framework: Option<String>,
    limit: Option<u32>,
    offset: Option<u64>,
}

#[utoipa::path(get, path = "/v1/agents", tag = "agents",
    params(("status" = Option<String>, Query, description = "active, inactive or error"),
        ("framework" = Option<String>, Query), ("limit" = Option<u32>, Query, description = "1 to 100, default 20"),
        ("offset" = Option<u64>, Query)),
    responses((status = 200, body = AgentList), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<AgentList>> {
    who.require(Scope::Read)?;
    let (limit, offset) = page(query.limit, query.offset)?;
    let status = query
        .status
        .as_deref()
        .map(|s| {
            AgentStatus::parse(s).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "query parameter `status` must be active, inactive or error, got `{s}`"
                ))
            })
        })
        .transpose()?;
    let (agents, total) = state
        .store()
        .list_agents(status, query.framework.as_deref(), limit, offset)
        .await?;
    Ok(Json(AgentList {
        agents,
        total,
        limit,
        offset,
    }))
}

#[utoipa::path(get, path = "/v1/agents/{agent_id}", tag = "agents",
    responses((status = 200, body = Agent), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(agent_id): ApiPath<String>,
) -> ApiResult<Json<Agent>> {
    who.require(Scope::Read)?;
    agent_id_in_path(&agent_id)?;
    let agent = state.store().get_agent(&agent_id).await?;
    agent.map(Json).ok_or_else(|| no_agent(&agent_id))
}

pub fn no_agent(agent_id: &str) -> ApiError {
    ApiError::not_found(format!("no agent `{agent_id}`"))
}

#[utoipa::path(put, path = "/v1/agents/{agent_id}", tag = "agents", request_body = UpdateAgentRequest,
    responses((status = 200, body = Agent), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(agent_id): ApiPath<String>,
    ApiJson(request): ApiJson<UpdateAgentRequest>,
) -> ApiResult<Json<Agent>> {
    who.require(Scope::Write)?;
    agent_id_in_path(&agent_id)?;
    if let Some(name) = &request.name {
        check_text("name", name, MAX_NAME)?;
    }
    check_details(
        request.framework.as_deref(),
        request.version.as_deref(),
        request.capabilities.as_deref(),
        request.metadata.as_ref(),
    )?;
    let agent = state.store().update_agent(&agent_id, request).await?;
    agent.map(Json).ok_or_else(|| no_agent(&agent_id))
}

#[utoipa::path(delete, path = "/v1/agents/{agent_id}", tag = "agents",
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn remove(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(agent_id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    who.require(Scope::Write)?;
    agent_id_in_path(&agent_id)?;
    if state.store().delete_agent(&agent_id).await? {
        state.hub().close(&agent_id);
        state.monitor().forget(&agent_id).await;
        state
            .announce(crate::relay::Note::Deleted {
                agent_id: agent_id.clone(),
            })
            .await;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(no_agent(&agent_id))
    }
}
