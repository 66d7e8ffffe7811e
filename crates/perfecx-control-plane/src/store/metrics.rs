//! Metrics over a time range: whole minutes from the rollups, the partial minutes at either
//! end from the events themselves, so that the answer is exact for any range and reads at
//! most a row per minute plus two minutes of events.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::rollups::{
    Alike, BUCKETS, LATENCY_BOUNDS_MS, ToolCounts, Totals, counts_from, minute_columns, minute_of,
};
use super::{Store, StoreResult};

const MINUTE_MS: i64 = 60_000;

fn count(row: &AnyRow, column: &str) -> StoreResult<u64> {
    let n: Option<i64> = row.try_get(column)?;
    Ok(n.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
}

/// `CASE WHEN duration_ms IS NULL THEN -1 WHEN duration_ms < 1 THEN 0 ... ELSE 36 END`.
fn bucket_sql() -> String {
    let mut sql = String::from("CASE WHEN duration_ms IS NULL THEN -1");
    for (i, bound) in LATENCY_BOUNDS_MS.iter().enumerate() {
        sql.push_str(&format!(" WHEN duration_ms < {bound} THEN {i}"));
    }
    sql.push_str(&format!(" ELSE {} END", BUCKETS - 1));
    sql
}

impl Store {
    /// What the agent's tool executions and violations in `[start, end)` (milliseconds) add
    /// up to, overall and per tool, read in one snapshot.
    pub async fn metric_totals(&self, agent_id: &str, start: i64, end: i64) -> StoreResult<Totals> {
        let mut totals = Totals::default();
        if start >= end {
            return Ok(totals);
        }
        let mut tx = self.pool.begin().await?;
        if self.is_postgres() {
            // PostgreSQL: one snapshot for the several statements below (SQLite's read
            // transaction is one already).
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *tx)
                .await?;
        }
        // Whole minutes: from the first minute that starts at or after `start` to the last
        // that ends at or before `end`.
        let first = minute_of(start + MINUTE_MS - 1);
        let last = minute_of(end);
        if first < last {
            totals.merge(rollup_totals(&mut tx, agent_id, first, last).await?);
            for (from, to) in [(start, first), (last, end)] {
                if from < to {
                    totals.merge(event_totals(&mut tx, agent_id, from, to).await?);
                }
            }
        } else {
            totals.merge(event_totals(&mut tx, agent_id, start, end).await?);
        }
        tx.commit().await?;
        Ok(totals)
    }

    /// The highest score of the agent's anomalies detected in `[start, end)`.
    pub async fn max_anomaly_score(
        &self,
        agent_id: &str,
        start: i64,
        end: i64,
    ) -> StoreResult<Option<f64>> {
        let row = sqlx::query(
            "SELECT CAST(MAX(score) AS DOUBLE PRECISION) AS score FROM anomalies \
             WHERE agent_id = $1 AND detected_at >= $2 AND detected_at < $3",
        )
        .bind(agent_id)
        .bind(start)
        .bind(end)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("score")?)
    }
}

/// The rollups of the minutes in `[first, last)`.
async fn rollup_totals(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    agent_id: &str,
    first: i64,
    last: i64,
) -> StoreResult<Totals> {
    let columns = minute_columns();
    let sums = columns
        .iter()
        .map(|c| format!("CAST(SUM({c}) AS BIGINT) AS {c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let row = sqlx::query(&format!(
        "SELECT {sums} FROM metric_minutes WHERE agent_id = $1 AND minute >= $2 AND minute < $3"
    ))
    .bind(agent_id)
    .bind(first)
    .bind(last)
    .fetch_one(&mut **tx)
    .await?;
    let mut values = Vec::with_capacity(columns.len());
    for c in &columns {
        values.push(row.try_get::<Option<i64>, _>(c.as_str())?.unwrap_or(0));
    }
    let mut totals = Totals {
        counts: counts_from(&values),
        ..Totals::default()
    };
    let rows = sqlx::query(
        "SELECT tool, CAST(SUM(requests) AS BIGINT) AS requests, \
           CAST(SUM(errors) AS BIGINT) AS errors, CAST(SUM(timed) AS BIGINT) AS timed, \
           CAST(SUM(latency_sum) AS BIGINT) AS latency_sum, \
           CAST(SUM(violations) AS BIGINT) AS violations \
         FROM metric_minutes_tools WHERE agent_id = $1 AND minute >= $2 AND minute < $3 \
         GROUP BY tool",
    )
    .bind(agent_id)
    .bind(first)
    .bind(last)
    .fetch_all(&mut **tx)
    .await?;
    for row in rows {
        let tool: String = row.try_get("tool")?;
        let counts = ToolCounts {
            requests: count(&row, "requests")?,
            errors: count(&row, "errors")?,
            timed: count(&row, "timed")?,
            latency_sum: row.try_get::<Option<i64>, _>("latency_sum")?.unwrap_or(0),
            violations: count(&row, "violations")?,
        };
        totals.tools.insert(tool, counts);
    }
    Ok(totals)
}

/// Counted from the events in `[from, to)`, grouped in SQL by everything that matters.
async fn event_totals(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    agent_id: &str,
    from: i64,
    to: i64,
) -> StoreResult<Totals> {
    let sql = format!(
        "SELECT COALESCE(tool, '') AS tool, event_type, rule, action, success, \
           {bucket} AS bucket, COUNT(*) AS n, CAST(SUM(duration_ms) AS BIGINT) AS total \
         FROM events WHERE agent_id = $1 AND ts >= $2 AND ts < $3 \
           AND event_type IN ('tool_execution', 'policy_violation') \
         GROUP BY 1, 2, 3, 4, 5, 6",
        bucket = bucket_sql()
    );
    let rows = sqlx::query(&sql)
        .bind(agent_id)
        .bind(from)
        .bind(to)
        .fetch_all(&mut **tx)
        .await?;
    let mut totals = Totals::default();
    for row in rows {
        let tool: String = row.try_get("tool")?;
        let event_type: String = row.try_get("event_type")?;
        let rule: Option<String> = row.try_get("rule")?;
        let action: Option<String> = row.try_get("action")?;
        let success: Option<i64> = row.try_get("success")?;
        let bucket: i64 = row.try_get("bucket")?;
        let total: Option<i64> = row.try_get("total")?;
        totals.add(&Alike {
            event_type: &event_type,
            tool: &tool,
            rule: rule.as_deref(),
            action: action.as_deref(),
            success: success.map(|s| s != 0),
            duration: usize::try_from(bucket)
                .ok()
                .map(|b| (b, total.unwrap_or(0))),
            n: count(&row, "n")?,
        });
    }
    Ok(totals)
}
