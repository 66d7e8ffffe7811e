//! What every handler shares.

use std::sync::Arc;

use crate::auth::Principal;
use crate::config::WebSocketSettings;
use crate::error::ApiResult;
use crate::hub::Hub;
use crate::monitor::Monitor;
use crate::ratelimit::{Class, Quota, RateLimiter};
use crate::relay::{Note, Relay};
use crate::store::Store;
use crate::telemetry::Telemetry;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    store: Store,
    limiter: RateLimiter,
    telemetry: Telemetry,
    hub: Hub,
    monitor: Monitor,
    relay: Relay,
    websocket: WebSocketSettings,
    /// `ws://host:port` or `wss://...`, the base of each agent's monitoring endpoint.
    monitoring_base: String,
}

/// What [`AppState::new`] is made of.
pub struct Parts {
    pub store: Store,
    pub limiter: RateLimiter,
    pub telemetry: Telemetry,
    pub monitor: Monitor,
    pub relay: Relay,
    pub websocket: WebSocketSettings,
    pub monitoring_base: String,
}

impl AppState {
    pub fn new(parts: Parts) -> AppState {
        AppState(Arc::new(Inner {
            hub: Hub::new(parts.websocket.buffer),
            store: parts.store,
            limiter: parts.limiter,
            telemetry: parts.telemetry,
            monitor: parts.monitor,
            relay: parts.relay,
            websocket: parts.websocket,
            monitoring_base: parts.monitoring_base,
        }))
    }

    pub fn store(&self) -> &Store {
        &self.0.store
    }

    pub fn hub(&self) -> &Hub {
        &self.0.hub
    }

    pub fn monitor(&self) -> &Monitor {
        &self.0.monitor
    }

    pub fn relay(&self) -> &Relay {
        &self.0.relay
    }

    /// Tells the other replicas (on PostgreSQL) what happened here.
    pub async fn announce(&self, note: Note) {
        self.0.relay.announce(&self.0.store, note).await;
    }

    pub fn websocket(&self) -> &WebSocketSettings {
        &self.0.websocket
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
