//! One module per resource, each exporting its router.

pub mod agents;
pub mod events;
pub mod keys;
pub mod metrics;
pub mod openapi;
pub mod policies;
pub mod socket;

use serde::Deserialize;

use crate::error::{ApiError, ApiResult};

/// `limit` and `offset` of list endpoints.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    pub limit: Option<u32>,
    pub offset: Option<u64>,
}

pub const DEFAULT_LIMIT: u32 = 20;
pub const MAX_LIMIT: u32 = 100;

pub fn page(limit: Option<u32>, offset: Option<u64>) -> ApiResult<(u32, u64)> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "query parameter `limit` must be between 1 and {MAX_LIMIT}, got {limit}"
        )));
    }
    Ok((limit, offset.unwrap_or(0)))
}

/// A required text field: not blank and not longer than `max` bytes.
pub fn check_text(field: &str, value: &str, max: usize) -> ApiResult<()> {
    if value.trim().is_empty() {
        return Err(ApiError::bad_request(format!(
            "field `{field}` must not be empty"
        )));
    }
    if value.len() > max {
        return Err(ApiError::bad_request(format!(
            "field `{field}` is {} bytes long; at most {max} are allowed",
            value.len()
        )));
    }
    Ok(())
}
