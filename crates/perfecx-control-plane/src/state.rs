//! What every handler shares.

use std::sync::Arc;

use crate::auth::Principal;
use crate::error::ApiResult;
use crate::hub::Hub;
use crate::ratelimit::{Class, Quota, RateLimiter};
use crate::store::Store;
use crate::telemetry::Telemetry;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    store: Store,
    limiter: RateLimiter,
    telemetry: Telemetry,
    hub: Hub,
    /// `ws://host:port` or `wss://...`, the base of each agent's monitoring endpoint.
    monitoring_base: String,
}

impl AppState {
    pub fn new(
        store: Store,
        limiter: RateLimiter,
        telemetry: Telemetry,
        monitoring_base: String,
    ) -> AppState {
        AppState(Arc::new(Inner {
            store,
            limiter,
            telemetry,
            hub: Hub::default(),
            monitoring_base,
        }))
    }

    pub fn store(&self) -> &Store {
        &self.0.store
    }

    pub fn hub(&self) -> &Hub {
        &self.0.hub
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.0.telemetry
    }

    pub fn monitoring_endpoint(&self, agent_id: &str) -> String {
        format!("{}/agents/{agent_id}", self.0.monitoring_base)
    }

    /// Takes `cost` from the caller's quota of `class`, counting refusals for `/metrics`.
    pub fn rate_limit(&self, who: &Principal, class: Class, cost: u64) -> ApiResult<Option<Quota>> {
        let result = self.0.limiter.check(&who.caller_id(), class, cost);
        if result.is_err() {
            self.0
                .telemetry
                .rate_limited
                .with_label_values(&[class.as_str()])
                .inc();
        }
        result
    }
}
