//! Event ingestion and retention.

use std::sync::Arc;

use sqlx::{Any, AnyPool, Row, Transaction};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Store, StoreError, StoreResult, placeholders, rollups};

/// One validated event, ready to store.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub event_id: String,
    pub event_type: &'static str,
    pub ts: i64,
    /// At most [`rollups::MAX_TOOL_CHARS`] characters.
    pub tool: Option<String>,
    pub rule: Option<String>,
    pub action: Option<String>,
    /// Clamped to `0..=`[`rollups::MAX_DURATION_MS`].
    pub duration_ms: Option<i64>,
    /// `false` for a failed call, `success: false` or `isError: true`.
    pub success: Option<bool>,
    pub data: String,
    pub context: String,
}

/// Values bound per event row.
const BINDS_PER_ROW: usize = 12;
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
    done: oneshot::Sender<StoreResult<Vec<EventRow>>>,
}

/// The rows at `new` (ascending), in order.
fn keep(rows: Vec<EventRow>, new: &[usize]) -> Vec<EventRow> {
    if new.len() == rows.len() {
        return rows;
    }
    let mut wanted = new.iter().peekable();
    rows.into_iter()
        .enumerate()
        .filter(|(i, _)| wanted.next_if_eq(&i).is_some())
        .map(|(_, row)| row)
        .collect()
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
                                .and_then(|mut r| r.pop().unwrap_or_else(|| Ok(Vec::new()))),
                        );
                    }
                    results
                }
            };
            for (job, result) in group.into_iter().zip(results) {
                // The requester may have gone away; its events are stored all the same.
                let _ = job.done.send(result.map(|new| keep(job.rows, &new)));
            }
        }
    });
    queue
}

/// One transaction over several requests, each answered with the positions of its new rows.
/// `Err` when the transaction itself failed.
async fn commit_group(
    pool: &AnyPool,
    group: &[EventJob],
) -> StoreResult<Vec<StoreResult<Vec<usize>>>> {
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

/// Touches the agent, then inserts its events, skipping ids already stored, and adds the new
/// ones to the rollups. Returns the positions of the new ones.
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
) -> StoreResult<Vec<usize>> {
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
    let mut new = Vec::with_capacity(events.len());
    for (number, chunk) in events.chunks(ROWS_PER_INSERT).enumerate() {
        let mut sql = String::from(
            "INSERT INTO events (agent_id, event_id, event_type, ts, received_at, tool, rule, \
             action, duration_ms, success, data, context) VALUES ",
        );
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            if anonymous {
                sql.push_str("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
            } else {
                sql.push_str(&placeholders(1 + i * BINDS_PER_ROW, BINDS_PER_ROW));
            }
        }
        sql.push_str(" ON CONFLICT (agent_id, event_id) DO NOTHING RETURNING event_id");
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
                .bind(&event.action)
                .bind(event.duration_ms)
                .bind(event.success.map(i64::from))
                .bind(&event.data)
                .bind(&event.context);
        }
        let inserted = query
            .fetch_all(&mut **tx)
            .await
            .map_err(|e| super::constraint(e, || "event already stored".into(), missing))?;
        let first = number * ROWS_PER_INSERT;
        if inserted.len() == chunk.len() {
            new.extend(first..first + chunk.len());
        } else {
            // Some were stored before (a resend), or twice in this batch: keep the first of
            // each id that this statement inserted.
            let mut ids = std::collections::HashSet::with_capacity(inserted.len());
            for row in &inserted {
                ids.insert(row.try_get::<String, _>("event_id")?);
            }
            for (i, event) in chunk.iter().enumerate() {
                if ids.remove(&event.event_id) {
                    new.push(first + i);
                }
            }
        }
    }
    let rows: Vec<&EventRow> = new.iter().filter_map(|i| events.get(*i)).collect();
    rollups::write(tx, agent_id, &rows, anonymous).await?;
    Ok(new)
}

impl Store {
    /// Stores the events of one agent atomically, skipping ids already stored, with their
    /// rollups, and records what the agent reported last as its status. Returns the events
    /// that were new, in order. Answers only once the events are committed.
    pub async fn insert_events(
        &self,
        agent_id: &str,
        events: Vec<EventRow>,
        status: &'static str,
        received_at: i64,
    ) -> StoreResult<Vec<EventRow>> {
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
        let new = write_events(&mut tx, agent_id, &events, status, received_at, false).await?;
        tx.commit().await?;
        Ok(keep(events, &new))
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

    /// Deletes rollups of minutes that ended by `before`, and anomalies detected before it.
    pub async fn prune_rollups_and_anomalies(&self, before: i64) -> StoreResult<u64> {
        let _gate = self.write_lock().await;
        let mut deleted = 0;
        for sql in [
            "DELETE FROM metric_minutes WHERE minute <= $1",
            "DELETE FROM metric_minutes_tools WHERE minute <= $1",
        ] {
            let done = sqlx::query(sql)
                .bind(before - 60_000)
                .execute(&self.pool)
                .await?;
            deleted += done.rows_affected();
        }
        let done = sqlx::query("DELETE FROM anomalies WHERE detected_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(deleted + done.rows_affected())
    }

    /// The `data` of the agent's events with these ids, in the order of `ids` (missing ones
    /// left out).
    pub async fn event_data(
        &self,
        agent_id: &str,
        ids: &[String],
    ) -> StoreResult<Vec<serde_json::Value>> {
        let mut found = std::collections::HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(ROWS_PER_INSERT) {
            let list: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
            let sql = format!(
                "SELECT event_id, data FROM events WHERE agent_id = $1 AND event_id IN ({})",
                list.join(", ")
            );
            let mut query = sqlx::query(&sql).bind(agent_id);
            for id in chunk {
                query = query.bind(id);
            }
            for row in query.fetch_all(&self.pool).await? {
                let data: String = row.try_get("data")?;
                let value = serde_json::from_str(&data).unwrap_or(serde_json::Value::Null);
                found.insert(row.try_get::<String, _>("event_id")?, value);
            }
        }
        Ok(ids.iter().filter_map(|id| found.remove(id)).collect())
    }

    pub async fn count_events(&self, agent_id: &str) -> StoreResult<u64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM events WHERE agent_id = $1")
            .bind(agent_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0))
    }
}
