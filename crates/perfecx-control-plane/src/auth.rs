//! Who is calling: an API key with scopes, or an agent's registration token.
//!
//! Secrets are 32 random bytes, shown once and stored as SHA-256 hashes. A presented secret is
//! hashed, looked up by hash, and the stored hash compared in constant time.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use perfecx_api::Scope;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub const AGENT_TOKEN_PREFIX: &str = "agt_";
pub const API_KEY_PREFIX: &str = "pfx_";

/// A fresh secret: `prefix` and 64 hex digits from the OS-seeded CSPRNG.
pub fn new_secret(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{prefix}{}", hex::encode(bytes))
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn same_hash(presented: &str, stored: &str) -> bool {
    presented.as_bytes().ct_eq(stored.as_bytes()).into()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Key { key_id: String, scopes: Vec<Scope> },
    Agent { agent_id: String },
}

impl Principal {
    /// The identity that rate limits count against.
    pub fn caller_id(&self) -> String {
        match self {
            Principal::Key { key_id, .. } => format!("key:{key_id}"),
            Principal::Agent { agent_id } => format!("agent:{agent_id}"),
        }
    }

    /// An API key with `scope` (`admin` includes `write`, which includes `read`).
    pub fn require(&self, scope: Scope) -> ApiResult<()> {
        match self {
            Principal::Key { scopes, .. } if scopes.iter().any(|s| *s >= scope) => Ok(()),
            Principal::Key { .. } => Err(ApiError::Forbidden(format!(
                "this API key lacks the `{}` scope",
                scope.as_str()
            ))),
            Principal::Agent { .. } => Err(ApiError::Forbidden(
                "an agent token may only send its own agent's events and read its own policies; \
                 this needs an API key"
                    .into(),
            )),
        }
    }

    /// That agent's own token, or an API key with `scope`.
    pub fn require_agent(&self, agent_id: &str, scope: Scope) -> ApiResult<()> {
        match self {
            Principal::Agent { agent_id: own } if own == agent_id => Ok(()),
            Principal::Agent { agent_id: own } => Err(ApiError::Forbidden(format!(
                "this token belongs to agent `{own}`, not to `{agent_id}`"
            ))),
            Principal::Key { .. } => self.require(scope),
        }
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            ApiError::Unauthorized("missing `Authorization: Bearer <key>` header".into())
        })?;
        let secret = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthorized("the Authorization header must be `Bearer <key>`".into())
            })?;
        authenticate(state, secret).await
    }
}

/// The principal a presented secret stands for (also for the WebSocket's auth message).
pub async fn authenticate(state: &AppState, secret: &str) -> ApiResult<Principal> {
    let hash = hash_secret(secret);
    let store = state.store();
    if secret.starts_with(AGENT_TOKEN_PREFIX) {
        if let Some((agent_id, stored)) = store.agent_by_token_hash(&hash).await?
            && same_hash(&hash, &stored)
        {
            return Ok(Principal::Agent { agent_id });
        }
    } else if let Some(key) = store.key_by_hash(&hash).await?
        && same_hash(&hash, &key.key_hash)
    {
        return Ok(Principal::Key {
            key_id: key.key_id,
            scopes: key.scopes,
        });
    }
    Err(ApiError::Unauthorized(
        "invalid or revoked API key or agent token".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest() {
        let write = Principal::Key {
            key_id: "k".into(),
            scopes: vec![Scope::Write],
        };
        assert!(write.require(Scope::Read).is_ok());
        assert!(write.require(Scope::Write).is_ok());
        assert!(write.require(Scope::Admin).is_err());
        let agent = Principal::Agent {
            agent_id: "a".into(),
        };
        assert!(agent.require(Scope::Read).is_err());
        assert!(agent.require_agent("a", Scope::Write).is_ok());
        assert!(agent.require_agent("b", Scope::Write).is_err());
    }

    #[test]
    fn secrets_are_fresh_and_hashed() {
        let a = new_secret(AGENT_TOKEN_PREFIX);
        assert!(a.starts_with("agt_") && a.len() == 68);
        assert_ne!(a, new_secret(AGENT_TOKEN_PREFIX));
        assert_eq!(hash_secret(&a).len(), 64);
        assert!(same_hash(&hash_secret(&a), &hash_secret(&a)));
    }
}
