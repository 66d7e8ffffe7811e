//! Rate limits per caller and class of endpoint, in fixed windows.
//!
//! A fixed window is what the reference's "100 per hour" says, and it gives the caller exact
//! `X-RateLimit-Remaining` and `X-RateLimit-Reset` values. Counts live in this process: with
//! several replicas each enforces its own share.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponseParts, ResponseParts};

use crate::error::ApiError;

/// `count` per `per`; a `count` of 0 turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub count: u64,
    pub per: Duration,
}

impl Limit {
    pub const fn new(count: u64, per: Duration) -> Limit {
        Limit { count, per }
    }
}

/// The limits of the API reference by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub registration: Limit,
    /// Counted in events, not requests.
    pub events: Limit,
    pub metrics: Limit,
    pub policies: Limit,
}

impl Default for RateLimits {
    fn default() -> RateLimits {
        const HOUR: Duration = Duration::from_secs(3600);
        RateLimits {
            registration: Limit::new(100, HOUR),
            events: Limit::new(10_000, Duration::from_secs(60)),
            metrics: Limit::new(1_000, HOUR),
            policies: Limit::new(100, HOUR),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Registration,
    Events,
    Metrics,
    Policies,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Registration => "registration",
            Class::Events => "events",
            Class::Metrics => "metrics",
            Class::Policies => "policies",
        }
    }
}

/// Where a caller stands in its window; written as `X-RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u64,
    pub remaining: u64,
    /// Unix time (seconds) at which the window resets.
    pub reset_at: u64,
    reset_in: Duration,
}

impl Quota {
    pub fn retry_after_secs(&self) -> u64 {
        // Round up so that a client waiting this long finds a fresh window.
        self.reset_in.as_secs() + u64::from(self.reset_in.subsec_nanos() > 0)
    }

    pub fn write_headers(&self, headers: &mut HeaderMap) {
        for (name, value) in [
            ("x-ratelimit-limit", self.limit),
            ("x-ratelimit-remaining", self.remaining),
            ("x-ratelimit-reset", self.reset_at),
        ] {
            headers.insert(name, HeaderValue::from(value));
        }
    }
}

/// Successful answers carry the caller's quota too, so that clients can pace themselves.
impl IntoResponseParts for Quota {
    type Error = std::convert::Infallible;

    fn into_response_parts(self, mut parts: ResponseParts) -> Result<ResponseParts, Self::Error> {
        self.write_headers(parts.headers_mut());
        Ok(parts)
    }
}

struct Window {
    started: Instant,
    used: u64,
}

pub struct RateLimiter {
    limits: RateLimits,
    windows: Mutex<HashMap<(String, Class), Window>>,
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> RateLimiter {
        RateLimiter {
            limits,
            windows: Mutex::new(HashMap::new()),
        }
    }

    fn limit(&self, class: Class) -> Limit {
        match class {
            Class::Registration => self.limits.registration,
            Class::Events => self.limits.events,
            Class::Metrics => self.limits.metrics,
            Class::Policies => self.limits.policies,
        }
    }

    /// Takes `cost` units from `caller`'s window of `class`, or refuses them all.
    /// `Ok(None)` when the class is not limited.
    pub fn check(&self, caller: &str, class: Class, cost: u64) -> Result<Option<Quota>, ApiError> {
        let limit = self.limit(class);
        if limit.count == 0 {
            return Ok(None);
        }
        let now = Instant::now();
        // A poisoned lock only means another request panicked mid-update; counts stay usable.
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() > 100_000 {
            windows.retain(|(_, class), w| now.duration_since(w.started) < self.limit(*class).per);
        }
        let window = windows
            .entry((caller.to_string(), class))
            .or_insert(Window {
                started: now,
                used: 0,
            });
        if now.duration_since(window.started) >= limit.per {
            *window = Window {
                started: now,
                used: 0,
            };
        }
        let reset_in = limit.per.saturating_sub(now.duration_since(window.started));
        let reset_at = SystemTime::now()
            .checked_add(reset_in)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
        let fits = window.used.saturating_add(cost) <= limit.count;
        if fits {
            window.used += cost;
        }
        let quota = Quota {
            limit: limit.count,
            remaining: limit.count - window.used,
            reset_at,
            reset_in,
        };
        if fits {
            return Ok(Some(quota));
        }
        let message = if cost > limit.count {
            format!(
                "this request counts {cost} against a limit of {} per {}s for {}; send smaller batches",
                limit.count,
                limit.per.as_secs(),
                class.as_str()
            )
        } else {
            format!(
                "rate limit of {} per {}s for {} exceeded; retry in {}s",
                limit.count,
                limit.per.as_secs(),
                class.as_str(),
                quota.retry_after_secs()
            )
        };
        Err(ApiError::RateLimited { quota, message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cost_and_refuses_whole_requests() {
        let limits = RateLimits {
            events: Limit::new(10, Duration::from_secs(60)),
            ..RateLimits::default()
        };
        let limiter = RateLimiter::new(limits);
        let quota = limiter.check("k", Class::Events, 7).ok().flatten();
        assert_eq!(quota.map(|q| q.remaining), Some(3));
        assert!(limiter.check("k", Class::Events, 4).is_err());
        let quota = limiter.check("k", Class::Events, 3).ok().flatten();
        assert_eq!(quota.map(|q| q.remaining), Some(0));
        // Other callers and classes have their own windows.
        assert!(limiter.check("other", Class::Events, 10).is_ok());
        assert!(limiter.check("k", Class::Metrics, 1).is_ok());
    }

    #[test]
    fn zero_means_unlimited() {
        let limits = RateLimits {
            events: Limit::new(0, Duration::from_secs(60)),
            ..RateLimits::default()
        };
        let limiter = RateLimiter::new(limits);
        assert!(matches!(
            limiter.check("k", Class::Events, 1_000_000),
            Ok(None)
        ));
    }
}
