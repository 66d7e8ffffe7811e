//! Event ingestion and retention.

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

const EVENT_WIDTH: usize = 12;
/// Rows per INSERT, well under SQLite's and PostgreSQL's bound-parameter limits.
const ROWS_PER_INSERT: usize = 250;

impl Store {
    /// Stores the events of one agent in one transaction, skipping ids already stored, and
    /// records what the agent reported last as its status. Returns how many were new.
    pub async fn insert_events(
        &self,
        agent_id: &str,
        events: &[EventRow],
        status: &str,
        received_at: i64,
    ) -> StoreResult<u64> {
        let missing = || format!("agent `{agent_id}` does not exist");
        let _gate = self.write_lock().await;
        let mut tx = self.pool.begin().await?;
        // Touch the agent first: it fails on a deleted agent before any insert, and it takes
        // PostgreSQL's row lock so that a concurrent delete waits for this batch.
        let touched =
            sqlx::query("UPDATE agents SET status = $1, last_seen_at = $2 WHERE agent_id = $3")
                .bind(status)
                .bind(received_at)
                .bind(agent_id)
                .execute(&mut *tx)
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
                // The agent id is the same for every row: bound once as $1.
                let row = placeholders(2 + i * (EVENT_WIDTH - 2), EVENT_WIDTH - 2);
                sql.push_str(&row.replacen('(', "($1, ", 1));
            }
            sql.push_str(" ON CONFLICT (agent_id, event_id) DO NOTHING");
            let mut query = sqlx::query(&sql).bind(agent_id);
            for event in chunk {
                query = query
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
            stored += query
                .execute(&mut *tx)
                .await
                .map_err(|e| super::constraint(e, || "event already stored".into(), missing))?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(stored)
    }

    /// Deletes events older than `before` (by their timestamp).
    pub async fn prune_events(&self, before: i64) -> StoreResult<u64> {
        let _gate = self.write_lock().await;
        let done = sqlx::query("DELETE FROM events WHERE ts < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
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
