//! Detected anomalies: stored by the replica that detected them, listed with filters.

use perfecx_api::{Anomaly, Severity};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreResult, constraint, rfc3339};

/// An anomaly to store.
#[derive(Debug, Clone)]
pub struct NewAnomaly {
    pub anomaly_id: String,
    pub anomaly_type: &'static str,
    pub severity: Severity,
    pub score: f64,
    pub description: String,
    pub detected_at: i64,
    pub evidence: serde_json::Value,
}

impl NewAnomaly {
    pub fn to_api(&self, agent_id: &str) -> Anomaly {
        Anomaly {
            anomaly_id: self.anomaly_id.clone(),
            agent_id: agent_id.to_string(),
            anomaly_type: self.anomaly_type.to_string(),
            severity: self.severity,
            score: self.score,
            description: self.description.clone(),
            detected_at: rfc3339(self.detected_at),
            evidence: self.evidence.clone(),
        }
    }
}

/// Which anomalies to list: detected in `[start, end)`, of one of `severities` (any when
/// empty).
#[derive(Debug, Clone, Default)]
pub struct AnomalyFilter {
    pub start: Option<i64>,
    pub end: Option<i64>,
    pub severities: Vec<Severity>,
}

const COLUMNS: &str =
    "anomaly_id, agent_id, anomaly_type, severity, score, description, evidence, detected_at";

fn anomaly_from_row(row: &AnyRow) -> StoreResult<Anomaly> {
    let evidence: String = row.try_get("evidence")?;
    let severity: String = row.try_get("severity")?;
    Ok(Anomaly {
        anomaly_id: row.try_get("anomaly_id")?,
        agent_id: row.try_get("agent_id")?,
        anomaly_type: row.try_get("anomaly_type")?,
        severity: Severity::parse(&severity).unwrap_or(Severity::Low),
        score: row.try_get("score")?,
        description: row.try_get("description")?,
        detected_at: rfc3339(row.try_get("detected_at")?),
        evidence: serde_json::from_str(&evidence).unwrap_or(serde_json::Value::Null),
    })
}

impl Store {
    pub async fn insert_anomalies(
        &self,
        agent_id: &str,
        anomalies: &[NewAnomaly],
    ) -> StoreResult<()> {
        let _gate = self.write_lock().await;
        let mut tx = self.pool.begin().await?;
        for a in anomalies {
            sqlx::query(&format!(
                "INSERT INTO anomalies ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ))
            .bind(&a.anomaly_id)
            .bind(agent_id)
            .bind(a.anomaly_type)
            .bind(a.severity.as_str())
            .bind(a.score)
            .bind(&a.description)
            .bind(a.evidence.to_string())
            .bind(a.detected_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                constraint(
                    e,
                    || format!("anomaly `{}` already stored", a.anomaly_id),
                    || format!("agent `{agent_id}` does not exist"),
                )
            })?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The agent's anomalies that pass `filter`, newest first, and how many pass it.
    pub async fn list_anomalies(
        &self,
        agent_id: &str,
        filter: &AnomalyFilter,
        limit: u32,
        offset: u64,
    ) -> StoreResult<(Vec<Anomaly>, u64)> {
        let mut conditions = String::from("agent_id = $1");
        let mut next = 2;
        let mut placeholder = || {
            next += 1;
            format!("${}", next - 1)
        };
        if filter.start.is_some() {
            conditions.push_str(&format!(" AND detected_at >= {}", placeholder()));
        }
        if filter.end.is_some() {
            conditions.push_str(&format!(" AND detected_at < {}", placeholder()));
        }
        if !filter.severities.is_empty() {
            let list: Vec<String> = filter.severities.iter().map(|_| placeholder()).collect();
            conditions.push_str(&format!(" AND severity IN ({})", list.join(", ")));
        }
        let (limit_at, offset_at) = (placeholder(), placeholder());
        let count_sql = format!("SELECT COUNT(*) AS n FROM anomalies WHERE {conditions}");
        let list_sql = format!(
            "SELECT {COLUMNS} FROM anomalies WHERE {conditions} \
             ORDER BY detected_at DESC, anomaly_id LIMIT {limit_at} OFFSET {offset_at}"
        );
        macro_rules! bind_filter {
            ($query:expr) => {{
                let mut query = $query.bind(agent_id);
                if let Some(start) = filter.start {
                    query = query.bind(start);
                }
                if let Some(end) = filter.end {
                    query = query.bind(end);
                }
                for severity in &filter.severities {
                    query = query.bind(severity.as_str());
                }
                query
            }};
        }
        let total: i64 = bind_filter!(sqlx::query(&count_sql))
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        let rows = bind_filter!(sqlx::query(&list_sql))
            .bind(i64::from(limit))
            .bind(i64::try_from(offset).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        let anomalies = rows
            .iter()
            .map(anomaly_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok((anomalies, u64::try_from(total).unwrap_or(0)))
    }

    /// The agent's anomalies with these ids, oldest first.
    pub async fn anomalies_by_id(
        &self,
        agent_id: &str,
        ids: &[String],
    ) -> StoreResult<Vec<Anomaly>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let list: Vec<String> = (0..ids.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!(
            "SELECT {COLUMNS} FROM anomalies WHERE agent_id = $1 AND anomaly_id IN ({}) \
             ORDER BY detected_at, anomaly_id",
            list.join(", ")
        );
        let mut query = sqlx::query(&sql).bind(agent_id);
        for id in ids {
            query = query.bind(id);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(anomaly_from_row).collect()
    }
}
