//! Watching the policy directory: file-system events (notify), debounced, plus polling as a
//! fallback where events do not arrive (network file systems, Kubernetes ConfigMap volumes that
//! swap a symlink). Either path only triggers [`Policies::refresh`], which recompiles only when
//! the files' contents changed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::policies::Policies;

/// Quiet time after a file-system event before reloading: editors write files in several steps.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Runs until `shutdown` completes.
pub async fn watch(policies: Arc<Policies>, poll: Duration, shutdown: impl Future<Output = ()>) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            // A full channel already holds a wake-up: dropping this one loses nothing.
            let _ = tx.try_send(());
        }
    });
    let _watcher = match watcher {
        Ok(mut w) => match w.watch(policies.dir(), RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %policies.dir().display(), error = %e, "cannot watch the policy directory; polling only");
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "no file-system watcher; polling only");
            None
        }
    };
    let mut interval = tokio::time::interval(poll);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            Some(()) = rx.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
            }
            _ = interval.tick() => {}
        }
        policies.refresh().await;
    }
}
