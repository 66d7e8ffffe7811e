//! Event ingestion and retention.

use std::sync::Arc;

use sqlx::{Any, AnyPool, Transaction};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Store, StoreError, StoreResult, placeholders};

/// One validated event, ready to store.
pub struct EventRow {
    pub event_id: String,
    pub event_type: &'static str,
    pub ts: i64,
    pub tool: Option<String>,
    pub rule: Option<String>,
    pub duration_ms: Option<i64>,
    pub success: Option<bool>,
    pub data: String,
    pub context: String,
}

/// Values bound per event row.
const BINDS_PER_ROW: usize = 11;
/// Rows per INSERT, well under SQLite's and PostgreSQL's bound-parameter limits.
const ROWS_PER_INSERT: usize = 250;
/// Most batches one SQLite commit takes from the queue.
const BATCHES_PER_COMMIT: usize = 64;

/// The events of one request, waiting for the SQLite writer.
pub(super) struct EventJob {
    agent_id: String,
    rows: Vec<EventRow>,
    status: &'static str,
    received_at: i64,
    done: oneshot::Sender<StoreResult<u64>>,
}

pub(super) type EventQueue = mpsc::Sender<EventJob>;

/// SQLite's group commit. Each commit costs an fsync, and SQLite has one writer: requests
/// that arrive while a commit is on disk are committed together by the next one. Every
/// request is still answered only after the commit that holds its events.
pub(super) fn spawn_writer(pool: AnyPool, gate: Arc<Mutex<()>>) -> EventQueue {
    let (queue, mut jobs) = mpsc::channel::<EventJob>(1024);
    tokio::spawn(async move {
        while let Some(first) = jobs.recv().await {
            let mut group = vec![first];
            while group.len() < BATCHES_PER_COMMIT {
                match jobs.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            let _gate = gate.lock().await;
            let results = match commit_group(&pool, &group).await {
                Ok(results) => results,
                // Something failed for the whole group: give each request its own transaction
                // so that one bad request does not fail the others.
                Err(_) => {
                    let mut results = Vec::with_capacity(group.len());
                    for job in &group {
                        results.push(
                            commit_group(&pool, std::slice::from_ref(job))
                                .await
                                .and_then(|mut r| r.pop().unwrap_or_else(|| Ok(0))),
                        );
                    }
                    results
                }
            };
            for (job, result) in group.into_iter().zip(results) {
                // The requester may have gone away; its events are stored all the same.
                let _ = job.done.send(result);
            }
        }
    });
    queue
}

/// One transaction over several requests. `Err` when the transaction itself failed.
async fn commit_group(pool: &AnyPool, group: &[EventJob]) -> StoreResult<Vec<StoreResult<u64>>> {
    let mut tx = pool.begin().await?;
    let mut results = Vec::with_capacity(group.len());
    for job in group {
        let written = write_events(
            &mut tx,
            &job.agent_id,
            &job.rows,
            job.status,
            job.received_at,
            true,
        );
        match written.await {
            Err(StoreError::Database(e)) => return Err(StoreError::Database(e)),
            result => results.push(result),
        }
    }
    tx.commit().await?;
    Ok(results)
}

/// Touches the agent, then inserts its events, skipping ids already stored.
///
/// `anonymous` writes `?` placeholders, for SQLite: numbered ones make sqlx ask SQLite for
/// each parameter's name, a linear search per parameter that took a fifth of the CPU time of
/// ingestion. PostgreSQL needs `$1, $2, ...`.
async fn write_events(
    tx: &mut Transaction<'_, Any>,
    agent_id: &str,
    events: &[EventRow],
    status: &str,
    received_at: i64,
    anonymous: bool,
) -> StoreResult<u64> {
    let missing = || format!("agent `{agent_id}` does not exist");
    // Touch the agent first: it fails on a deleted agent before any insert, and it takes
    // PostgreSQL's row lock so that a concurrent delete waits for this batch.
    let touched =
        sqlx::query("UPDATE agents SET status = $1, last_seen_at = $2 WHERE agent_id = $3")
            .bind(status)
            .bind(received_at)
            .bind(agent_id)
            .execute(&mut **tx)
            .await?;
    if touched.rows_affected() == 0 {
        return Err(StoreError::Missing(missing()));
    }
    let mut stored = 0;
    for chunk in events.chunks(ROWS_PER_INSERT) {
        let mut sql = String::from(
            "INSERT INTO events (agent_id, event_id, event_type, ts, received_at, tool, rule, \
             duration_ms, success, data, context) VALUES ",
        );
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            if anonymous {
                sql.push_str("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
            } else {
                sql.push_str(&placeholders(1 + i * BINDS_PER_ROW, BINDS_PER_ROW));
            }
        }
        sql.push_str(" ON CONFLICT (agent_id, event_id) DO NOTHING");
        let mut query = sqlx::query(&sql);
        for event in chunk {
            query = query
                .bind(agent_id)
                .bind(&event.event_id)
                .bind(event.event_type)
                .bind(event.ts)
                .bind(received_at)
                .bind(&event.tool)
                .bind(&event.rule)
                .bind(event.duration_ms)
                .bind(event.success.map(i64::from))
                .bind(&event.data)
                .bind(&event.context);
        }
        let done = query
            .execute(&mut **tx)
            .await
            .map_err(|e| super::constraint(e, || "event already stored".into(), missing))?;
        stored += done.rows_affected();
    }
    Ok(stored)
}

impl Store {
    /// Stores the events of one agent atomically, skipping ids already stored, and records
    /// what the agent reported last as its status. Returns how many were new. Answers only
    /// once the events are committed.
    pub async fn insert_events(
        &self,
        agent_id: &str,
        events: Vec<EventRow>,
        status: &'static str,
        received_at: i64,
    ) -> StoreResult<u64> {
        if let Some(queue) = &self.event_queue {
            let (done, answer) = oneshot::channel();
            let job = EventJob {
                agent_id: agent_id.to_string(),
                rows: events,
                status,
                received_at,
                done,
            };
            let gone = || StoreError::Database(sqlx::Error::PoolClosed);
            queue.send(job).await.map_err(|_| gone())?;
            return answer.await.map_err(|_| gone())?;
        }
        let mut tx = self.pool.begin().await?;
        let stored = write_events(&mut tx, agent_id, &events, status, received_at, false).await?;
        tx.commit().await?;
        Ok(stored)
    }

    /// Deletes events older than `before` (by their timestamp), a chunk per transaction so
    /// that ingestion is never held up for long behind a large purge.
    pub async fn prune_events(&self, before: i64) -> StoreResult<u64> {
        const CHUNK: i64 = 5_000;
        let mut deleted = 0;
        loop {
            let _gate = self.write_lock().await;
            let done = sqlx::query(
                "DELETE FROM events WHERE (agent_id, event_id) IN \
                 (SELECT agent_id, event_id FROM events WHERE ts < $1 LIMIT $2)",
            )
            .bind(before)
            .bind(CHUNK)
            .execute(&self.pool)
            .await?;
            deleted += done.rows_affected();
            if done.rows_affected() < CHUNK as u64 {
                return Ok(deleted);
            }
        }
    }

    pub async fn count_events(&self, agent_id: &str) -> StoreResult<u64> {
        use sqlx::Row;
        let row = sqlx::query("SELECT COUNT(*) AS n FROM events WHERE agent_id = $1")
            .bind(agent_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0))
    }
}
