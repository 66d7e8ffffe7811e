//! API keys, stored as hashes.

use perfecx_api::{ApiKey, Scope};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreResult, constraint, now_ms, rfc3339};

pub struct KeyRecord {
    pub key_id: String,
    pub key_hash: String,
    pub scopes: Vec<Scope>,
}

fn scopes_from(text: &str) -> Vec<Scope> {
    text.split(',').filter_map(Scope::parse).collect()
}

fn scopes_to(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn key_from_row(row: &AnyRow) -> StoreResult<ApiKey> {
    let scopes: String = row.try_get("scopes")?;
    Ok(ApiKey {
        key_id: row.try_get("key_id")?,
        name: row.try_get("name")?,
        scopes: scopes_from(&scopes),
        created_at: rfc3339(row.try_get("created_at")?),
    })
}

impl Store {
    pub async fn insert_key(
        &self,
        key_id: &str,
        name: &str,
        key_hash: &str,
        scopes: &[Scope],
    ) -> StoreResult<ApiKey> {
        let now = now_ms();
        let _gate = self.write_lock().await;
        sqlx::query(
            "INSERT INTO api_keys (key_id, name, key_hash, scopes, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(key_id)
        .bind(name)
        .bind(key_hash)
        .bind(scopes_to(scopes))
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| constraint(e, || "this API key already exists".into(), String::new))?;
        Ok(ApiKey {
            key_id: key_id.to_string(),
            name: name.to_string(),
            scopes: scopes.to_vec(),
            created_at: rfc3339(now),
        })
    }

    pub async fn list_keys(&self) -> StoreResult<Vec<ApiKey>> {
        let rows = sqlx::query(
            "SELECT key_id, name, scopes, created_at FROM api_keys ORDER BY created_at, key_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    pub async fn delete_key(&self, key_id: &str) -> StoreResult<bool> {
        let _gate = self.write_lock().await;
        let done = sqlx::query("DELETE FROM api_keys WHERE key_id = $1")
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn key_by_hash(&self, key_hash: &str) -> StoreResult<Option<KeyRecord>> {
        let row = sqlx::query("SELECT key_id, key_hash, scopes FROM api_keys WHERE key_hash = $1")
            .bind(key_hash)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let scopes: String = row.try_get("scopes")?;
        Ok(Some(KeyRecord {
            key_id: row.try_get("key_id")?,
            key_hash: row.try_get("key_hash")?,
            scopes: scopes_from(&scopes),
        }))
    }

    pub async fn has_admin_key(&self) -> StoreResult<bool> {
        let keys = self.list_keys().await?;
        Ok(keys.iter().any(|k| k.scopes.contains(&Scope::Admin)))
    }
}
