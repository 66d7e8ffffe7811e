//! A real control plane (the control-plane crate's server) on a SQLite file, for the tests of
//! what the sidecar reports.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::{PATIENCE, Running};

pub const ADMIN_KEY: &str = "pfx_test_admin_key_0123456789abcdef";

pub struct ControlPlane {
    pub addr: SocketAddr,
    pub base: String,
    pub db: PathBuf,
    running: Running<anyhow::Error>,
}

impl ControlPlane {
    /// A control plane on a free port of 127.0.0.1, storing into `db`.
    pub async fn start_on_free_port(db: &Path) -> ControlPlane {
        ControlPlane::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), db).await
    }

    /// Serves on `listener` over the SQLite file `db` (created if missing), with [`ADMIN_KEY`].
    pub async fn start(listener: TcpListener, db: &Path) -> ControlPlane {
        let addr = listener.local_addr().unwrap();
        let mut config = perfecx_control_plane::Config::new(format!("sqlite://{}", db.display()));
        config.admin_key = Some(ADMIN_KEY.into());
        let running = Running::spawn("control plane", |shutdown| {
            perfecx_control_plane::run(listener, config, shutdown)
        });
        ControlPlane {
            addr,
            base: format!("http://{addr}"),
            db: db.to_owned(),
            running,
        }
    }

    /// An admin request; the answer's JSON (`null` when empty), after checking it succeeded.
    pub async fn request(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(ADMIN_KEY)
            .timeout(PATIENCE);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let text = res.text().await.unwrap();
        let body: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        };
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }

    /// Registers `agent_id`; returns its `agt_` registration token.
    pub async fn register(&self, agent_id: &str) -> String {
        let body = json!({"agent_id": agent_id, "name": "reporting test agent"});
        let answer = self
            .request(reqwest::Method::POST, "/v1/agents", Some(body))
            .await;
        answer["registration_token"].as_str().unwrap().to_owned()
    }

    /// The `metrics` object of `GET /v1/agents/{agent_id}/metrics` (the last hour).
    pub async fn metrics(&self, agent_id: &str) -> Value {
        let path = format!("/v1/agents/{agent_id}/metrics");
        self.request(reqwest::Method::GET, &path, None).await["metrics"].clone()
    }

    pub async fn stop(self) {
        self.running.stop().await
    }
}

/// One stored event, as the control plane's `events` table holds it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub event_id: String,
    pub event_type: String,
    pub data: Value,
    /// `data` and `context` as stored, for looking for what must not be there.
    pub raw: String,
}

impl StoredEvent {
    pub fn text(&self, key: &str) -> &str {
        self.data[key].as_str().unwrap_or("")
    }
}

/// Every event stored for `agent_id`, read from the database itself: the API has no endpoint
/// that lists events.
pub async fn stored_events(db: &Path, agent_id: &str) -> Vec<StoredEvent> {
    use sqlx::Row;
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let rows = sqlx::query(
        "SELECT event_id, event_type, data, context FROM events WHERE agent_id = ? ORDER BY ts",
    )
    .bind(agent_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows.iter()
        .map(|row| {
            let data: String = row.get("data");
            let context: String = row.get("context");
            StoredEvent {
                event_id: row.get("event_id"),
                event_type: row.get("event_type"),
                data: serde_json::from_str(&data).unwrap(),
                raw: format!("{data} {context}"),
            }
        })
        .collect()
}
