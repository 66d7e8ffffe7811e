//! `/v1/policies` and the policies of an agent, with the bundle its sidecar fetches.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use perfecx_api::{
    AgentPolicyList, ApplyPoliciesRequest, BundledPolicy, ErrorBody, PolicyBundle, PolicyList,
    PolicyRecord, Scope, ServerMessage,
};
use perfecx_policy::{MAX_DOCUMENT_BYTES, Policy, PolicySet, parse_policy};
use sha2::{Digest, Sha256};

use super::agents::no_agent;
use super::{Page, page};
use crate::auth::Principal;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, read_body};
use crate::ratelimit::Class;
use crate::state::AppState;
use crate::store::NewPolicy;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/policies", get(list).post(create))
        .route(
            "/policies/{policy_id}",
            get(show).put(update).delete(remove),
        )
        .route("/agents/{agent_id}/policies", get(agent_list).post(apply))
        .route("/agents/{agent_id}/policies/{policy_id}", delete(detach))
        .route("/agents/{agent_id}/policy-bundle", get(bundle))
}

/// Reads a JSON or YAML policy body through the engine; its diagnostics are the 400's message.
async fn read_policy(request: Request) -> ApiResult<(Policy, NewPolicy)> {
    let bytes = read_body(request, MAX_DOCUMENT_BYTES).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the policy body is not UTF-8: {e}")))?;
    let policy = parse_policy("request body", text)
        .map_err(|diagnostics| ApiError::bad_request(diagnostics.to_string()))?;
    // Compiling catches what parsing alone cannot (patterns that do not build, ...).
    PolicySet::compile(vec![policy.clone()])
        .map_err(|diagnostics| ApiError::bad_request(diagnostics.to_string()))?;
    let document = serde_json::to_string(&policy).map_err(ApiError::internal)?;
    let stored = NewPolicy {
        name: policy.name.clone(),
        document,
        source: text.to_string(),
    };
    Ok((policy, stored))
}

fn no_policy(policy_id: &str) -> ApiError {
    ApiError::not_found(format!("no policy `{policy_id}`"))
}

#[utoipa::path(post, path = "/v1/policies", tag = "policies",
    request_body(description = "the policy object of the API reference, as JSON or YAML",
        content((PolicyRecord = "application/json"), (PolicyRecord = "application/yaml"))),
    responses((status = 201, body = PolicyRecord), (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    who: Principal,
    request: Request,
) -> ApiResult<impl IntoResponse> {
    who.require(Scope::Write)?;
    let quota = state.rate_limit(&who, Class::Policies, 1)?;
    let (_, policy) = read_policy(request).await?;
    let policy_id = format!("pol_{}", uuid::Uuid::new_v4().simple());
    let stored = state.store().insert_policy(&policy_id, &policy).await?;
    Ok((StatusCode::CREATED, quota, Json(stored.record)))
}

#[utoipa::path(get, path = "/v1/policies", tag = "policies",
    params(("limit" = Option<u32>, Query), ("offset" = Option<u64>, Query)),
    responses((status = 200, body = PolicyList)))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    ApiQuery(query): ApiQuery<Page>,
) -> ApiResult<Json<PolicyList>> {
    who.require(Scope::Read)?;
    let (limit, offset) = page(query.limit, query.offset)?;
    let (policies, total) = state.store().list_policies(limit, offset).await?;
    Ok(Json(PolicyList {
        policies,
        total,
        limit,
        offset,
    }))
}

#[utoipa::path(get, path = "/v1/policies/{policy_id}", tag = "policies",
    responses((status = 200, body = PolicyRecord), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(policy_id): ApiPath<String>,
) -> ApiResult<Json<PolicyRecord>> {
    who.require(Scope::Read)?;
    let policy = state.store().get_policy(&policy_id).await?;
    policy
        .map(|p| Json(p.record))
        .ok_or_else(|| no_policy(&policy_id))
}

#[utoipa::path(put, path = "/v1/policies/{policy_id}", tag = "policies",
    request_body(description = "the whole policy object, as JSON or YAML",
        content((PolicyRecord = "application/json"), (PolicyRecord = "application/yaml"))),
    responses((status = 200, body = PolicyRecord, description = "the new version"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(policy_id): ApiPath<String>,
    request: Request,
) -> ApiResult<impl IntoResponse> {
    who.require(Scope::Write)?;
    let quota = state.rate_limit(&who, Class::Policies, 1)?;
    let (_, policy) = read_policy(request).await?;
    let stored = state.store().update_policy(&policy_id, &policy).await?;
    let stored = stored.ok_or_else(|| no_policy(&policy_id))?;
    let agents = state.store().agents_with_policy(&policy_id).await?;
    publish_bundles(&state, &agents).await;
    Ok((quota, Json(stored.record)))
}

#[utoipa::path(delete, path = "/v1/policies/{policy_id}", tag = "policies",
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn remove(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(policy_id): ApiPath<String>,
) -> ApiResult<impl IntoResponse> {
    who.require(Scope::Write)?;
    let quota = state.rate_limit(&who, Class::Policies, 1)?;
    let agents = state.store().agents_with_policy(&policy_id).await?;
    if state.store().delete_policy(&policy_id).await? {
        publish_bundles(&state, &agents).await;
        Ok((quota, StatusCode::NO_CONTENT))
    } else {
        Err(no_policy(&policy_id))
    }
}

#[utoipa::path(post, path = "/v1/agents/{agent_id}/policies", tag = "policies",
    request_body = ApplyPoliciesRequest,
    responses((status = 200, body = AgentPolicyList, description = "all policies now applied"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn apply(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(agent_id): ApiPath<String>,
    ApiJson(request): ApiJson<ApplyPoliciesRequest>,
) -> ApiResult<impl IntoResponse> {
    who.require(Scope::Write)?;
    let quota = state.rate_limit(&who, Class::Policies, 1)?;
    if request.policy_ids.is_empty() || request.policy_ids.len() > 100 {
        return Err(ApiError::bad_request(
            "field `policy_ids` must hold 1 to 100 policy ids",
        ));
    }
    let store = state.store();
    if !store.agent_exists(&agent_id).await? {
        return Err(no_agent(&agent_id));
    }
    let mut documents = Vec::new();
    for stored in store.agent_policies(&agent_id).await? {
        if !request.policy_ids.contains(&stored.record.policy_id) {
            documents.push(stored.document);
        }
    }
    for policy_id in &request.policy_ids {
        let stored = store.get_policy(policy_id).await?;
        documents.push(stored.ok_or_else(|| no_policy(policy_id))?.document);
    }
    // The agent's sidecar must be able to compile what it is given: check the whole set now.
    compile_documents(&documents).map_err(ApiError::BadRequest)?;
    store
        .attach_policies(&agent_id, &request.policy_ids)
        .await?;
    publish_bundles(&state, std::slice::from_ref(&agent_id)).await;
    let policies = store
        .agent_policies(&agent_id)
        .await?
        .into_iter()
        .map(|p| p.record)
        .collect();
    Ok((quota, Json(AgentPolicyList { agent_id, policies })))
}

fn compile_documents(documents: &[serde_json::Value]) -> Result<PolicySet, String> {
    let mut policies = Vec::with_capacity(documents.len());
    for document in documents {
        let text = document.to_string();
        policies.push(parse_policy("stored policy", &text).map_err(|d| d.to_string())?);
    }
    PolicySet::compile(policies).map_err(|d| format!("these policies do not combine: {d}"))
}

#[utoipa::path(get, path = "/v1/agents/{agent_id}/policies", tag = "policies",
    responses((status = 200, body = AgentPolicyList), (status = 404, body = ErrorBody)))]
pub async fn agent_list(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(agent_id): ApiPath<String>,
) -> ApiResult<Json<AgentPolicyList>> {
    who.require_agent(&agent_id, Scope::Read)?;
    let store = state.store();
    if !store.agent_exists(&agent_id).await? {
        return Err(no_agent(&agent_id));
    }
    let policies = store
        .agent_policies(&agent_id)
        .await?
        .into_iter()
        .map(|p| p.record)
        .collect();
    Ok(Json(AgentPolicyList { agent_id, policies }))
}

#[utoipa::path(delete, path = "/v1/agents/{agent_id}/policies/{policy_id}", tag = "policies",
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn detach(
    State(state): State<AppState>,
    who: Principal,
    ApiPath((agent_id, policy_id)): ApiPath<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    who.require(Scope::Write)?;
    let quota = state.rate_limit(&who, Class::Policies, 1)?;
    if state.store().detach_policy(&agent_id, &policy_id).await? {
        publish_bundles(&state, std::slice::from_ref(&agent_id)).await;
        Ok((quota, StatusCode::NO_CONTENT))
    } else {
        Err(ApiError::not_found(format!(
            "policy `{policy_id}` is not applied to agent `{agent_id}`"
        )))
    }
}

#[utoipa::path(get, path = "/v1/agents/{agent_id}/policy-bundle", tag = "policies",
    params(("If-None-Match" = Option<String>, Header, description = "the ETag of the bundle held")),
    responses((status = 200, body = PolicyBundle, headers(("ETag" = String))),
        (status = 304, description = "the bundle held is current"), (status = 404, body = ErrorBody)))]
pub async fn bundle(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(agent_id): ApiPath<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    who.require_agent(&agent_id, Scope::Read)?;
    let bundle = build_bundle(&state, &agent_id).await?;
    let etag = format!("\"{}\"", bundle.revision);
    let etag_value = HeaderValue::from_str(&etag).map_err(ApiError::internal)?;
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',').any(|tag| {
                let tag = tag.trim();
                tag == "*" || tag.trim_start_matches("W/") == etag
            })
        });
    if matches {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    Ok(([(header::ETAG, etag_value)], Json(bundle)).into_response())
}

/// The agent's policies as its sidecar needs them; 404 for an unknown agent.
pub async fn build_bundle(state: &AppState, agent_id: &str) -> ApiResult<PolicyBundle> {
    let store = state.store();
    if !store.agent_exists(agent_id).await? {
        return Err(no_agent(agent_id));
    }
    let policies: Vec<BundledPolicy> = store
        .agent_policies(agent_id)
        .await?
        .into_iter()
        .map(|p| BundledPolicy {
            policy_id: p.record.policy_id,
            version: p.record.version,
            document: p.document,
        })
        .collect();
    // The revision is a hash of the content, so that it is the same on every replica.
    let content = serde_json::to_vec(&policies).map_err(ApiError::internal)?;
    let revision = hex::encode(Sha256::digest(&content));
    Ok(PolicyBundle {
        agent_id: agent_id.to_string(),
        revision,
        policies,
    })
}

/// Sends the current bundle to the watchers of each agent (their sidecars), here and, through
/// the relay, on the other replicas.
async fn publish_bundles(state: &AppState, agent_ids: &[String]) {
    push_bundles(state, agent_ids).await;
    state
        .announce(crate::relay::Note::Bundles {
            agent_ids: agent_ids.to_vec(),
        })
        .await;
}

/// Sends the current bundle to this replica's watchers of each agent.
pub async fn push_bundles(state: &AppState, agent_ids: &[String]) {
    for agent_id in agent_ids {
        if !state.hub().is_watched(agent_id) {
            continue;
        }
        match build_bundle(state, agent_id).await {
            Ok(bundle) => state
                .hub()
                .publish(agent_id, ServerMessage::PolicyBundle(bundle)),
            Err(e) => tracing::warn!(agent_id, error = ?e, "cannot push a policy bundle"),
        }
    }
}
