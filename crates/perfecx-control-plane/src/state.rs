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
    /// Becomes true when the server shuts down: WebSocket clients are told to go elsewhere.
    closing: tokio::sync::watch::Sender<bool>,
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
            closing: tokio::sync::watch::Sender::new(false),
        }))
    }

    /// Tells every WebSocket client that the server is shutting down.
    pub fn close_sockets(&self) {
        self.0.closing.send_replace(true);
    }

    /// Resolves once the server is shutting down.
    pub async fn closing(&self) {
        let mut closing = self.0.closing.subscribe();
        // An error means the state is gone: shutting down all the same.
        let _ = closing.wait_for(|c| *c).await;
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
