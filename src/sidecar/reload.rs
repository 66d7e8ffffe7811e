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

/// Whether an event can mean changed policy files. Opening and reading a file cannot, and must
/// not trigger a reload: [`Policies::refresh`] reads the files itself, and the watcher (inotify
/// reports opens) would wake it again at once, reloading about ten times a second for ever.
fn changes_files(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        // A file written and closed: the end of an edit.
        notify::EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        notify::EventKind::Access(_) => false,
        _ => true,
    }
}

/// Runs until `shutdown` completes.
pub async fn watch(policies: Arc<Policies>, poll: Duration, shutdown: impl Future<Output = ()>) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| changes_files(&e.kind)) {
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

#[cfg(test)]
mod tests {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind, RenameMode};

    use super::changes_files;

    #[test]
    fn reading_the_files_is_no_change() {
        assert!(!changes_files(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!changes_files(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(changes_files(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(changes_files(&EventKind::Create(CreateKind::File)));
        assert!(changes_files(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
        assert!(changes_files(&EventKind::Remove(RemoveKind::File)));
    }
}
