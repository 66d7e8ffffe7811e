//! Policies, their versions, and which agents they apply to.

use perfecx_api::PolicyRecord;
use serde_json::Value;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, StoreResult, constraint, now_ms, rfc3339};

/// A policy document that the engine accepted.
pub struct NewPolicy {
    pub name: String,
    /// The engine's normalized JSON of the policy.
    pub document: String,
    /// The body as the author sent it (YAML or JSON), kept for the record.
    pub source: String,
}

/// A stored policy as the API shows it, with its document for bundles.
pub struct StoredPolicy {
    pub record: PolicyRecord,
    pub document: Value,
}

const POLICY_COLUMNS: &str = "policy_id, name, version, document, created_at, updated_at";

fn policy_from_row(row: &AnyRow) -> StoreResult<StoredPolicy> {
    let text: String = row.try_get("document")?;
    let document: Value = serde_json::from_str(&text)
        .map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))?;
    let field = |name: &str| document.get(name).cloned();
    let record = PolicyRecord {
        policy_id: row.try_get("policy_id")?,
        name: row.try_get("name")?,
        description: field("description").and_then(|v| v.as_str().map(str::to_string)),
        enforcement: field("enforcement")
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        rules: match field("rules") {
            Some(Value::Array(rules)) => rules,
            _ => Vec::new(),
        },
        version: row.try_get("version")?,
        created_at: rfc3339(row.try_get("created_at")?),
        updated_at: rfc3339(row.try_get("updated_at")?),
    };
    Ok(StoredPolicy { record, document })
}

fn duplicate_name(name: &str) -> impl FnOnce() -> String + '_ {
    move || format!("a policy named `{name}` already exists")
}

impl Store {
    pub async fn insert_policy(
        &self,
        policy_id: &str,
        policy: &NewPolicy,
    ) -> StoreResult<StoredPolicy> {
        let now = now_ms();
        let _gate = self.write_lock().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO policies (policy_id, name, version, document, source, created_at, updated_at) \
             VALUES ($1, $2, 1, $3, $4, $5, $5)",
        )
        .bind(policy_id)
        .bind(&policy.name)
        .bind(&policy.document)
        .bind(&policy.source)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| constraint(e, duplicate_name(&policy.name), String::new))?;
        record_version(&mut tx, policy_id, 1, policy, now).await?;
        tx.commit().await?;
        self.get_policy(policy_id)
            .await?
            .ok_or_else(|| StoreError::Missing(format!("policy `{policy_id}` vanished")))
    }

    pub async fn get_policy(&self, policy_id: &str) -> StoreResult<Option<StoredPolicy>> {
        let sql = format!("SELECT {POLICY_COLUMNS} FROM policies WHERE policy_id = $1");
        let row = sqlx::query(&sql)
            .bind(policy_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(policy_from_row).transpose()
    }

    pub async fn list_policies(
        &self,
        limit: u32,
        offset: u64,
    ) -> StoreResult<(Vec<PolicyRecord>, u64)> {
        let total: i64 = sqlx::query("SELECT COUNT(*) AS n FROM policies")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        let sql = format!("SELECT {POLICY_COLUMNS} FROM policies ORDER BY name LIMIT $1 OFFSET $2");
        let rows = sqlx::query(&sql)
            .bind(i64::from(limit))
            .bind(i64::try_from(offset).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        let policies = rows
            .iter()
            .map(|row| policy_from_row(row).map(|p| p.record))
            .collect::<StoreResult<Vec<_>>>()?;
        Ok((policies, u64::try_from(total).unwrap_or(0)))
    }

    /// Replaces the document as a new version; `None` when there is no such policy.
    pub async fn update_policy(
        &self,
        policy_id: &str,
        policy: &NewPolicy,
    ) -> StoreResult<Option<StoredPolicy>> {
        let now = now_ms();
        {
            let _gate = self.write_lock().await;
            let mut tx = self.pool.begin().await?;
            let row = sqlx::query("SELECT version FROM policies WHERE policy_id = $1")
                .bind(policy_id)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(row) = row else { return Ok(None) };
            let version: i64 = row.try_get::<i64, _>("version")? + 1;
            sqlx::query(
                "UPDATE policies SET name = $1, version = $2, document = $3, source = $4, \
                 updated_at = $5 WHERE policy_id = $6",
            )
            .bind(&policy.name)
            .bind(version)
            .bind(&policy.document)
            .bind(&policy.source)
            .bind(now)
            .bind(policy_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| constraint(e, duplicate_name(&policy.name), String::new))?;
            record_version(&mut tx, policy_id, version, policy, now).await?;
            tx.commit().await?;
        }
        self.get_policy(policy_id).await
    }

    pub async fn delete_policy(&self, policy_id: &str) -> StoreResult<bool> {
        let _gate = self.write_lock().await;
        let done = sqlx::query("DELETE FROM policies WHERE policy_id = $1")
            .bind(policy_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Attaches policies to an agent; those already attached stay as they are.
    pub async fn attach_policies(&self, agent_id: &str, policy_ids: &[String]) -> StoreResult<()> {
        let now = now_ms();
        let _gate = self.write_lock().await;
        let mut tx = self.pool.begin().await?;
        for policy_id in policy_ids {
            sqlx::query(
                "INSERT INTO agent_policies (agent_id, policy_id, applied_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (agent_id, policy_id) DO NOTHING",
            )
            .bind(agent_id)
            .bind(policy_id)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                constraint(e, String::new, || {
                    format!("agent `{agent_id}` or policy `{policy_id}` no longer exists")
                })
            })?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn detach_policy(&self, agent_id: &str, policy_id: &str) -> StoreResult<bool> {
        let _gate = self.write_lock().await;
        let done = sqlx::query("DELETE FROM agent_policies WHERE agent_id = $1 AND policy_id = $2")
            .bind(agent_id)
            .bind(policy_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The agents a policy is applied to.
    pub async fn agents_with_policy(&self, policy_id: &str) -> StoreResult<Vec<String>> {
        let rows = sqlx::query(
            "SELECT agent_id FROM agent_policies WHERE policy_id = $1 ORDER BY agent_id",
        )
        .bind(policy_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok(row.try_get("agent_id")?))
            .collect()
    }

    /// The policies applied to an agent, by name.
    pub async fn agent_policies(&self, agent_id: &str) -> StoreResult<Vec<StoredPolicy>> {
        let sql = format!(
            "SELECT {} FROM policies p JOIN agent_policies a ON a.policy_id = p.policy_id \
             WHERE a.agent_id = $1 ORDER BY p.name",
            POLICY_COLUMNS
                .split(", ")
                .map(|c| format!("p.{c} AS {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let rows = sqlx::query(&sql)
            .bind(agent_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(policy_from_row).collect()
    }
}

async fn record_version(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    policy_id: &str,
    version: i64,
    policy: &NewPolicy,
    now: i64,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO policy_versions (policy_id, version, document, source, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(policy_id)
    .bind(version)
    .bind(&policy.document)
    .bind(&policy.source)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
