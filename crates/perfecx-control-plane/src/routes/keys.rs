//! `/v1/api-keys`: minting and revoking API keys (admin scope).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get};
use axum::{Json, Router};
use perfecx_api::{ApiKeyList, CreateApiKeyRequest, CreatedApiKey, ErrorBody, Scope};

use super::check_text;
use crate::auth::Principal;
use crate::error::{ApiError, ApiJson, ApiPath, ApiResult};
use crate::state::AppState;
use crate::store::Store;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api-keys", get(list).post(create))
        .route("/api-keys/{key_id}", delete(remove))
}

/// Mints a key; shared by the endpoint and `perfecx keys create`.
pub async fn mint_key(store: &Store, name: &str, scopes: &[Scope]) -> ApiResult<CreatedApiKey> {
    check_text("name", name, 128)?;
    if scopes.is_empty() {
        return Err(ApiError::bad_request(
            "field `scopes` must hold at least one of read, write, admin",
        ));
    }
    let mut scopes = scopes.to_vec();
    scopes.sort();
    scopes.dedup();
    let key = crate::auth::new_secret(crate::auth::API_KEY_PREFIX);
    let key_id = format!("key_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let stored = store
        .insert_key(&key_id, name, &crate::auth::hash_secret(&key), &scopes)
        .await?;
    Ok(CreatedApiKey {
        key_id: stored.key_id,
        name: stored.name,
        scopes: stored.scopes,
        key,
        created_at: stored.created_at,
    })
}

#[utoipa::path(post, path = "/v1/api-keys", tag = "api-keys", request_body = CreateApiKeyRequest,
    responses((status = 201, body = CreatedApiKey, description = "the key is shown this once"),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    who: Principal,
    ApiJson(request): ApiJson<CreateApiKeyRequest>,
) -> ApiResult<impl IntoResponse> {
    who.require(Scope::Admin)?;
    let created = mint_key(state.store(), &request.name, &request.scopes).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(get, path = "/v1/api-keys", tag = "api-keys",
    responses((status = 200, body = ApiKeyList), (status = 403, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, who: Principal) -> ApiResult<Json<ApiKeyList>> {
    who.require(Scope::Admin)?;
    Ok(Json(ApiKeyList {
        api_keys: state.store().list_keys().await?,
    }))
}

#[utoipa::path(delete, path = "/v1/api-keys/{key_id}", tag = "api-keys",
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn remove(
    State(state): State<AppState>,
    who: Principal,
    ApiPath(key_id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    who.require(Scope::Admin)?;
    if state.store().delete_key(&key_id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no API key `{key_id}`")))
    }
}
