//! The background task that deletes expired events (with their rollups and anomalies) and
//! marks silent agents inactive.

use crate::config::Retention;
use crate::store::{Store, now_ms};

pub async fn run(store: Store, retention: Retention) {
    // The first pass after one interval: not while the server starts taking requests.
    let first = tokio::time::Instant::now() + retention.interval;
    let mut ticks = tokio::time::interval_at(first, retention.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        prune_once(&store, &retention).await;
    }
}

/// One pass; failures are logged and retried at the next tick.
pub async fn prune_once(store: &Store, retention: &Retention) {
    let now = now_ms();
    let age = |d: std::time::Duration| {
        now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    };
    match store.prune_events(age(retention.events)).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(deleted = n, "pruned expired events"),
        Err(e) => tracing::warn!(error = %e, "cannot prune events"),
    }
    match store
        .prune_rollups_and_anomalies(age(retention.events))
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::info!(deleted = n, "pruned expired rollups and anomalies"),
        Err(e) => tracing::warn!(error = %e, "cannot prune rollups and anomalies"),
    }
    if let Err(e) = store
        .mark_idle_agents_inactive(age(retention.inactive_after))
        .await
    {
        tracing::warn!(error = %e, "cannot mark idle agents inactive");
    }
}
