//! The one error type of the API and the one place where errors become HTTP answers.
//!
//! Every error answers `{"error": {"code": "...", "message": "..."}}`. Internal failures are
//! logged with their cause and answered with a fixed message, so nothing internal leaks.

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use perfecx_api::{ErrorBody, ErrorDetail};
use serde::de::DeserializeOwned;

use crate::ratelimit::Quota;
use crate::store::StoreError;

#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized(String),
    Forbidden(String),
    NotFound(String),
    MethodNotAllowed,
    Conflict(String),
    PayloadTooLarge(String),
    RateLimited {
        quota: Quota,
        message: String,
    },
    /// The cause, for the log only.
    Internal(String),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::BadRequest(message.into())
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::NotFound(message.into())
    }

    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        ApiError::Internal(cause.to_string())
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let (message, quota) = match self {
            ApiError::BadRequest(m)
            | ApiError::Unauthorized(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::Conflict(m)
            | ApiError::PayloadTooLarge(m) => (m, None),
            ApiError::MethodNotAllowed => ("method not allowed on this path".to_string(), None),
            ApiError::RateLimited { quota, message } => (message, Some(quota)),
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                (
                    "internal error; the cause is in the control plane's log".to_string(),
                    None,
                )
            }
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message,
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(quota) = quota {
            quota.write_headers(response.headers_mut());
            if let Ok(value) = HeaderValue::from_str(&quota.retry_after_secs().to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match error {
            StoreError::Duplicate(message) => ApiError::Conflict(message),
            StoreError::Missing(message) => ApiError::NotFound(message),
            StoreError::Database(cause) => ApiError::Internal(cause.to_string()),
        }
    }
}

/// Parses a JSON body; a failure names the field (`events[3].event_type`) and what was wrong.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if path == "." || inner.is_syntax() || inner.is_eof() {
            ApiError::BadRequest(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::BadRequest(format!("field `{path}`: {inner}"))
        }
    })?;
    deserializer
        .end()
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// Bodies larger than this get a 413, unless an endpoint reads with its own limit.
pub const DEFAULT_BODY_BYTES: usize = 1024 * 1024;

/// The raw body, refused with 413 beyond `limit` bytes: from `Content-Length` before reading
/// anything, or while reading a body that did not announce its length.
pub async fn read_body(request: Request, limit: usize) -> ApiResult<axum::body::Bytes> {
    let too_large =
        || ApiError::PayloadTooLarge(format!("request body is larger than {limit} bytes"));
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|error| {
            let error = error.into_inner();
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
            while let Some(e) = cause {
                if e.is::<http_body_util::LengthLimitError>() {
                    return too_large();
                }
                cause = e.source();
            }
            ApiError::BadRequest(format!("could not read the request body: {error}"))
        })
}

/// `Json` whose rejections use the API's error body.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> ApiResult<Self> {
        let bytes = read_body(request, DEFAULT_BODY_BYTES).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// `Query` whose rejections use the API's error body.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> ApiResult<Self> {
        let query = parts.uri.query().unwrap_or_default();
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(ApiQuery)
            .map_err(|error| {
                let path = error.path().to_string();
                ApiError::BadRequest(format!("query parameter `{path}`: {}", error.into_inner()))
            })
    }
}

/// `Path` whose rejections use the API's error body.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|rejection| ApiError::BadRequest(format!("path: {}", rejection.body_text())))
    }
}
