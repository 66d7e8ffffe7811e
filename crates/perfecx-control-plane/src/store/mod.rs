//! Storage over sqlx's `Any` driver: one set of queries and one migration for SQLite and
//! PostgreSQL, so both behave the same. Placeholders are `$1, $2, ...`, which both accept.
//!
//! SQLite runs in WAL mode with `synchronous=FULL` by default: a commit returns only once the
//! WAL is fsynced, so an acknowledged write survives kill -9 and also power loss. (`NORMAL`
//! would survive kill -9 too, since the WAL is in the OS cache, but may lose the last commits
//! on power loss; it is available as an option.) SQLite has one writer at a time, so writes
//! queue on an in-process lock instead of spinning on `SQLITE_BUSY`, and concurrent event
//! batches share commits (see `events::spawn_writer`).

mod agents;
mod anomalies;
mod events;
mod keys;
mod metrics;
mod policies;
pub mod rollups;

use std::str::FromStr;
use std::sync::Arc;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Executor};
use tokio::sync::{Mutex, MutexGuard};

pub use agents::NewAgent;
pub use anomalies::{AnomalyFilter, NewAnomaly};
pub use events::EventRow;
pub use keys::KeyRecord;
pub use policies::{NewPolicy, StoredPolicy};
pub use rollups::Totals;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How SQLite commits reach the disk; ignored for PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SqliteSync {
    /// fsync the WAL at every commit: survives kill -9 and power loss.
    #[default]
    Full,
    /// fsync at checkpoints only: survives kill -9, may lose the last commits on power loss.
    Normal,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint refused the write; the message says what already exists.
    #[error("{0}")]
    Duplicate(String),
    /// A referenced row does not exist; the message says which.
    #[error("{0}")]
    Missing(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The one place where constraint violations become API-level meanings.
fn constraint(
    error: sqlx::Error,
    duplicate: impl FnOnce() -> String,
    missing: impl FnOnce() -> String,
) -> StoreError {
    if let sqlx::Error::Database(db) = &error {
        match db.kind() {
            sqlx::error::ErrorKind::UniqueViolation => return StoreError::Duplicate(duplicate()),
            sqlx::error::ErrorKind::ForeignKeyViolation => return StoreError::Missing(missing()),
            _ => {}
        }
    }
    StoreError::Database(error)
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// Present for SQLite: its single writer, taken before every write transaction.
    write_gate: Option<Arc<Mutex<()>>>,
    /// Present for SQLite: events go through the group-committing writer.
    event_queue: Option<events::EventQueue>,
}

impl Store {
    /// Connects to `sqlite://path` (created if missing) or `postgres://...` and migrates.
    pub async fn connect(url: &str, sync: SqliteSync) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let is_sqlite = url.starts_with("sqlite:");
        let url = if is_sqlite && !url.contains("mode=") {
            let separator = if url.contains('?') { '&' } else { '?' };
            format!("{url}{separator}mode=rwc")
        } else {
            url.to_string()
        };
        let options = AnyConnectOptions::from_str(&url)
            .map_err(|e| anyhow::anyhow!("bad database URL: {e}"))?
            .disable_statement_logging();
        let synchronous = match sync {
            SqliteSync::Full => "FULL",
            SqliteSync::Normal => "NORMAL",
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if is_sqlite { 8 } else { 16 })
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if conn.backend_name() == "SQLite" {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute(format!("PRAGMA synchronous = {synchronous}").as_str())
                            .await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the database: {e}"))?;
        // SQLite has no migration lock: a process migrating the same new file at the same
        // time (`perfecx keys create` while the server starts) makes one attempt fail. The
        // failed migration rolled back, and the next attempt finds it applied.
        let mut attempts = 0;
        while let Err(e) = MIGRATOR.run(&pool).await {
            attempts += 1;
            if !is_sqlite || attempts == 3 {
                return Err(anyhow::anyhow!("cannot migrate the database: {e}"));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let write_gate = is_sqlite.then(|| Arc::new(Mutex::new(())));
        let event_queue = write_gate
            .as_ref()
            .map(|gate| events::spawn_writer(pool.clone(), gate.clone()));
        Ok(Store {
            pool,
            write_gate,
            event_queue,
        })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn is_postgres(&self) -> bool {
        self.write_gate.is_none()
    }

    /// Serializes writers on SQLite; a no-op on PostgreSQL.
    async fn write_lock(&self) -> Option<MutexGuard<'_, ()>> {
        match &self.write_gate {
            Some(gate) => Some(gate.lock().await),
            None => None,
        }
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// RFC 3339 in UTC, with a fraction only when there is one: `2024-01-15T10:30:00Z`.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// `$start, $start+1, ...` placeholders for one row of `width` values.
fn placeholders(start: usize, width: usize) -> String {
    let mut out = String::from("(");
    for i in 0..width {
        if i > 0 {
            out.push_str(", ");
        }
        out.push('$');
        out.push_str(&(start + i).to_string());
    }
    out.push(')');
    out
}
