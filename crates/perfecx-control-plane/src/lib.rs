//! The perfecx control plane: the REST API that sidecars report to and operators use.
//!
//! - [`run`] serves the API on a listener until `shutdown` resolves; tests start it on port 0.
//! - [`app`] builds the router: one module per resource under [`routes`], one error type
//!   ([`error::ApiError`]), one store ([`store::Store`]) for SQLite and PostgreSQL.
//! - [`control_plane`] and [`keys_create`] are the `perfecx control-plane` and
//!   `perfecx keys create` commands, with their clap arguments.

pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod hub;
pub mod monitor;
pub mod ratelimit;
pub mod relay;
pub mod retention;
pub mod routes;
pub mod state;
pub mod store;
pub mod telemetry;

use std::future::Future;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use perfecx_api::Scope;
use tokio::net::TcpListener;

pub use cli::{
    ControlPlaneArgs, KeysCommand, KeysCreateArgs, control_plane, control_plane_main, keys_create,
    keys_main,
};
pub use config::Config;
pub use ratelimit::{Limit, RateLimits};
pub use store::SqliteSync;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::Store;

/// The whole HTTP surface, built in one place.
pub fn app(state: AppState) -> Router {
    let v1 = Router::new()
        .merge(routes::agents::router())
        .merge(routes::events::router())
        .merge(routes::policies::router())
        .merge(routes::metrics::router())
        .merge(routes::keys::router())
        .merge(routes::openapi::router());
    Router::new()
        .nest("/v1", v1)
        .merge(routes::socket::router())
        .route("/metrics", get(telemetry::scrape))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            telemetry::track,
        ))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // Each body is read through `error::read_body` with the limit of its endpoint.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Serves the control plane on `listener` until `shutdown` resolves, then drains requests.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = Store::connect(&config.database_url, config.sqlite_sync).await?;
    bootstrap_admin_key(&store, config.admin_key.as_deref()).await?;
    let address = listener.local_addr()?;
    let monitoring_base = match &config.public_url {
        Some(url) => url
            .trim_end_matches('/')
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1),
        None => format!("ws://{address}"),
    };
    let (monitor, detection) = monitor::channel();
    let relay = relay::Relay::new(&store).await?;
    let state = AppState::new(state::Parts {
        store: store.clone(),
        limiter: ratelimit::RateLimiter::new(config.rate_limits),
        telemetry: telemetry::Telemetry::new()?,
        monitor,
        relay,
        websocket: config.websocket.clone(),
        monitoring_base,
    });
    // Listening before serving: whatever other replicas accept from now on reaches this one.
    let relaying = relay::listen(state.clone(), &config.database_url).await?;
    let detecting = tokio::spawn(detection.run(state.clone(), config.detection.clone()));
    let pruner = tokio::spawn(retention::run(store.clone(), config.retention.clone()));
    tracing::info!(%address, "control plane listening");
    // Upgraded connections are not drained by axum: the sockets close themselves, with 1001.
    let sockets = state.clone();
    let shutdown = async move {
        shutdown.await;
        sockets.close_sockets();
    };
    let served = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await;
    pruner.abort();
    detecting.abort();
    if let Some(relaying) = relaying {
        relaying.abort();
    }
    store.close().await;
    served.map_err(Into::into)
}

/// Makes sure an admin can get in: `PERFECX_ADMIN_KEY` (via `admin_key`) is stored if new;
/// without it and without any admin key, one is generated and printed this once.
async fn bootstrap_admin_key(store: &Store, admin_key: Option<&str>) -> anyhow::Result<()> {
    let to_anyhow = |e: ApiError| anyhow::anyhow!("cannot store the admin key: {e:?}");
    match admin_key {
        Some(key) => {
            if key.len() < 16 {
                anyhow::bail!("PERFECX_ADMIN_KEY must be at least 16 characters long");
            }
            if key.starts_with(auth::AGENT_TOKEN_PREFIX) {
                anyhow::bail!(
                    "PERFECX_ADMIN_KEY must not start with `agt_`, the agent token prefix"
                );
            }
            let hash = auth::hash_secret(key);
            if store.key_by_hash(&hash).await?.is_none() {
                let key_id = format!("key_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
                match store
                    .insert_key(&key_id, "admin (PERFECX_ADMIN_KEY)", &hash, &[Scope::Admin])
                    .await
                {
                    // Another replica, starting at the same time, stored it first.
                    Ok(_) | Err(store::StoreError::Duplicate(_)) => {}
                    Err(e) => return Err(to_anyhow(e.into())),
                }
            }
        }
        None => {
            if !store.has_admin_key().await? {
                let created = routes::keys::mint_key(store, "admin (generated)", &[Scope::Admin])
                    .await
                    .map_err(to_anyhow)?;
                println!(
                    "perfecx: generated the first admin API key; it is shown only this once:\n{}",
                    created.key
                );
            }
        }
    }
    Ok(())
}
