//! The agent registry.

use perfecx_api::{Agent, AgentStatus, UpdateAgentRequest};
use serde_json::{Map, Value};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, StoreResult, constraint, now_ms, rfc3339};

pub struct NewAgent {
    pub agent_id: String,
    pub name: String,
    pub framework: Option<String>,
    pub version: Option<String>,
    pub capabilities: Vec<String>,
    pub metadata: Map<String, Value>,
    pub token_hash: String,
}

const AGENT_COLUMNS: &str = "agent_id, name, framework, version, capabilities, metadata, status, \
                             created_at, updated_at, last_seen_at";

fn agent_from_row(row: &AnyRow) -> StoreResult<Agent> {
    let status: String = row.try_get("status")?;
    let capabilities: String = row.try_get("capabilities")?;
    let metadata: String = row.try_get("metadata")?;
    let decode = |e: serde_json::Error| StoreError::Database(sqlx::Error::Decode(Box::new(e)));
    Ok(Agent {
        agent_id: row.try_get("agent_id")?,
        name: row.try_get("name")?,
        framework: row.try_get("framework")?,
        version: row.try_get("version")?,
        capabilities: serde_json::from_str(&capabilities).map_err(decode)?,
        metadata: serde_json::from_str(&metadata).map_err(decode)?,
        status: AgentStatus::parse(&status).unwrap_or(AgentStatus::Error),
        created_at: rfc3339(row.try_get("created_at")?),
        updated_at: rfc3339(row.try_get("updated_at")?),
        last_seen_at: row.try_get::<Option<i64>, _>("last_seen_at")?.map(rfc3339),
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Database(sqlx::Error::Encode(Box::new(e))))
}

impl Store {
    /// Registers an agent as `inactive` until its first event. Returns its creation time.
    pub async fn insert_agent(&self, agent: &NewAgent) -> StoreResult<i64> {
        let now = now_ms();
        let _gate = self.write_lock().await;
        sqlx::query(
            "INSERT INTO agents (agent_id, name, framework, version, capabilities, metadata, \
             status, token_hash, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'inactive', $7, $8, $8)",
        )
        .bind(&agent.agent_id)
        .bind(&agent.name)
        .bind(&agent.framework)
        .bind(&agent.version)
        .bind(to_json(&agent.capabilities)?)
        .bind(to_json(&agent.metadata)?)
        .bind(&agent.token_hash)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            constraint(
                e,
                || format!("agent `{}` already exists", agent.agent_id),
                || format!("agent `{}` refers to a missing row", agent.agent_id),
            )
        })?;
        Ok(now)
    }

    pub async fn get_agent(&self, agent_id: &str) -> StoreResult<Option<Agent>> {
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = $1");
        let row = sqlx::query(&sql)
            .bind(agent_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    pub async fn agent_exists(&self, agent_id: &str) -> StoreResult<bool> {
        let row = sqlx::query("SELECT 1 FROM agents WHERE agent_id = $1")
            .bind(agent_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// Agents ordered by id, and how many match the filters in all.
    pub async fn list_agents(
        &self,
        status: Option<AgentStatus>,
        framework: Option<&str>,
        limit: u32,
        offset: u64,
    ) -> StoreResult<(Vec<Agent>, u64)> {
        let mut filters = Vec::new();
        let mut binds: Vec<String> = Vec::new();
        if let Some(status) = status {
            binds.push(status.as_str().to_string());
            filters.push(format!("status = ${}", binds.len()));
        }
        if let Some(framework) = framework {
            binds.push(framework.to_string());
            filters.push(format!("framework = ${}", binds.len()));
        }
        let filter = if filters.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", filters.join(" AND "))
        };
        let count_sql = format!("SELECT COUNT(*) AS n FROM agents{filter}");
        let mut count = sqlx::query(&count_sql);
        for bind in &binds {
            count = count.bind(bind);
        }
        let total: i64 = count.fetch_one(&self.pool).await?.try_get("n")?;
        let n = binds.len();
        let list_sql = format!(
            "SELECT {AGENT_COLUMNS} FROM agents{filter} ORDER BY agent_id LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let mut list = sqlx::query(&list_sql);
        for bind in &binds {
            list = list.bind(bind);
        }
        let rows = list
            .bind(i64::from(limit))
            .bind(i64::try_from(offset).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        let agents = rows
            .iter()
            .map(agent_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok((agents, u64::try_from(total).unwrap_or(0)))
    }

    /// Applies the given fields; `None` when there is no such agent.
    pub async fn update_agent(
        &self,
        agent_id: &str,
        update: UpdateAgentRequest,
    ) -> StoreResult<Option<Agent>> {
        let _gate = self.write_lock().await;
        let mut tx = self.pool.begin().await?;
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = $1");
        let Some(row) = sqlx::query(&sql)
            .bind(agent_id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let mut agent = agent_from_row(&row)?;
        let now = now_ms();
        if let Some(name) = update.name {
            agent.name = name;
        }
        if update.framework.is_some() {
            agent.framework = update.framework;
        }
        if update.version.is_some() {
            agent.version = update.version;
        }
        if let Some(capabilities) = update.capabilities {
            agent.capabilities = capabilities;
        }
        if let Some(metadata) = update.metadata {
            agent.metadata = metadata;
        }
        if let Some(status) = update.status {
            agent.status = status;
        }
        agent.updated_at = rfc3339(now);
        sqlx::query(
            "UPDATE agents SET name = $1, framework = $2, version = $3, capabilities = $4, \
             metadata = $5, status = $6, updated_at = $7 WHERE agent_id = $8",
        )
        .bind(&agent.name)
        .bind(&agent.framework)
        .bind(&agent.version)
        .bind(to_json(&agent.capabilities)?)
        .bind(to_json(&agent.metadata)?)
        .bind(agent.status.as_str())
        .bind(now)
        .bind(agent_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(agent))
    }

    /// Removes the agent with its token, events, anomalies and policy attachments.
    pub async fn delete_agent(&self, agent_id: &str) -> StoreResult<bool> {
        let _gate = self.write_lock().await;
        let done = sqlx::query("DELETE FROM agents WHERE agent_id = $1")
            .bind(agent_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Replaces an agent's registration token (given by its hash): the old one stops working.
    /// `false` when there is no such agent.
    pub async fn set_agent_token_hash(
        &self,
        agent_id: &str,
        token_hash: &str,
    ) -> StoreResult<bool> {
        let _gate = self.write_lock().await;
        let done =
            sqlx::query("UPDATE agents SET token_hash = $1, updated_at = $2 WHERE agent_id = $3")
                .bind(token_hash)
                .bind(now_ms())
                .bind(agent_id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The agent whose registration token hashes to `token_hash`, with the stored hash.
    pub async fn agent_by_token_hash(
        &self,
        token_hash: &str,
    ) -> StoreResult<Option<(String, String)>> {
        let row = sqlx::query("SELECT agent_id, token_hash FROM agents WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => Ok(Some((row.try_get("agent_id")?, row.try_get("token_hash")?))),
            None => Ok(None),
        }
    }

    /// Marks agents that have reported nothing since `before` as inactive.
    pub async fn mark_idle_agents_inactive(&self, before: i64) -> StoreResult<u64> {
        let _gate = self.write_lock().await;
        let done = sqlx::query(
            "UPDATE agents SET status = 'inactive' \
             WHERE status = 'active' AND last_seen_at IS NOT NULL AND last_seen_at < $1",
        )
        .bind(before)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
