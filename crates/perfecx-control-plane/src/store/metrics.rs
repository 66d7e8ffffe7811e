//! Counts over stored events and anomalies, for the metrics and anomalies endpoints.

use perfecx_api::Anomaly;
use sqlx::Row;

use super::{Store, StoreResult, rfc3339};

/// What the events of one agent in a time range add up to.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EventCounts {
    pub tool_executions: u64,
    pub failed_tool_executions: u64,
    pub average_duration_ms: Option<f64>,
    pub policy_violations: u64,
    pub tool_restriction_violations: u64,
    pub content_filter_violations: u64,
    pub memory_protection_violations: u64,
    pub max_anomaly_score: Option<f64>,
}

fn count(row: &sqlx::any::AnyRow, column: &str) -> StoreResult<u64> {
    Ok(u64::try_from(row.try_get::<i64, _>(column)?).unwrap_or(0))
}

impl Store {
    /// Counts over `[start, end)` in milliseconds.
    pub async fn event_counts(
        &self,
        agent_id: &str,
        start: i64,
        end: i64,
    ) -> StoreResult<EventCounts> {
        // COUNT(CASE ...) rather than FILTER or SUM: portable, and always an integer.
        let row = sqlx::query(
            "SELECT \
               COUNT(CASE WHEN event_type = 'tool_execution' THEN 1 END) AS tool_executions, \
               COUNT(CASE WHEN event_type = 'tool_execution' AND success = 0 THEN 1 END) AS failed, \
               CAST(AVG(CASE WHEN event_type = 'tool_execution' THEN duration_ms END) \
                    AS DOUBLE PRECISION) AS average_duration, \
               COUNT(CASE WHEN event_type = 'policy_violation' THEN 1 END) AS violations, \
               COUNT(CASE WHEN event_type = 'policy_violation' AND rule = 'tool_restriction' \
                     THEN 1 END) AS tool_restriction, \
               COUNT(CASE WHEN event_type = 'policy_violation' AND rule = 'content_filter' \
                     THEN 1 END) AS content_filter, \
               COUNT(CASE WHEN event_type = 'policy_violation' AND rule = 'memory_protection' \
                     THEN 1 END) AS memory_protection \
             FROM events WHERE agent_id = $1 AND ts >= $2 AND ts < $3",
        )
        .bind(agent_id)
        .bind(start)
        .bind(end)
        .fetch_one(&self.pool)
        .await?;
        let anomaly = sqlx::query(
            "SELECT CAST(MAX(score) AS DOUBLE PRECISION) AS score FROM anomalies \
             WHERE agent_id = $1 AND detected_at >= $2 AND detected_at < $3",
        )
        .bind(agent_id)
        .bind(start)
        .bind(end)
        .fetch_one(&self.pool)
        .await?;
        Ok(EventCounts {
            tool_executions: count(&row, "tool_executions")?,
            failed_tool_executions: count(&row, "failed")?,
            average_duration_ms: row.try_get("average_duration")?,
            policy_violations: count(&row, "violations")?,
            tool_restriction_violations: count(&row, "tool_restriction")?,
            content_filter_violations: count(&row, "content_filter")?,
            memory_protection_violations: count(&row, "memory_protection")?,
            max_anomaly_score: anomaly.try_get("score")?,
        })
    }

    /// Anomalies of one agent, newest first, and their total.
    pub async fn list_anomalies(
        &self,
        agent_id: &str,
        limit: u32,
        offset: u64,
    ) -> StoreResult<(Vec<Anomaly>, u64)> {
        let total: i64 = sqlx::query("SELECT COUNT(*) AS n FROM anomalies WHERE agent_id = $1")
            .bind(agent_id)
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        let rows = sqlx::query(
            "SELECT anomaly_id, anomaly_type, score, description, details, detected_at \
             FROM anomalies WHERE agent_id = $1 \
             ORDER BY detected_at DESC, anomaly_id LIMIT $2 OFFSET $3",
        )
        .bind(agent_id)
        .bind(i64::from(limit))
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let mut anomalies = Vec::with_capacity(rows.len());
        for row in rows {
            let details: String = row.try_get("details")?;
            anomalies.push(Anomaly {
                anomaly_id: row.try_get("anomaly_id")?,
                agent_id: agent_id.to_string(),
                anomaly_type: row.try_get("anomaly_type")?,
                score: row.try_get("score")?,
                description: row.try_get("description")?,
                detected_at: rfc3339(row.try_get("detected_at")?),
                details: serde_json::from_str(&details).unwrap_or(serde_json::Value::Null),
            });
        }
        Ok((anomalies, u64::try_from(total).unwrap_or(0)))
    }
}
