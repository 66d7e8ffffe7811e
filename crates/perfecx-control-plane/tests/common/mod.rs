//! A real control plane on port 0 over a real database, and a small HTTP client for it.
//!
//! SQLite runs on a file in a temporary directory. PostgreSQL runs when
//! `PERFECX_TEST_DATABASE_URL` is set, each test in a schema of its own, dropped afterwards;
//! when the variable is unset the PostgreSQL half says so on stderr and passes.

#![allow(dead_code)]

use std::time::Duration;

use perfecx_control_plane::{Config, run};
use reqwest::{Method, StatusCode, header::HeaderMap};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const ADMIN_KEY: &str = "pfx_test_admin_key_0123456789abcdef";
pub const PG_ENV: &str = "PERFECX_TEST_DATABASE_URL";

pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("tempdir: {e}"));
        let url = format!("sqlite://{}/cp.db", dir.path().display());
        TestDb {
            url,
            _dir: Some(dir),
            pg: None,
        }
    }

    /// `None`, after saying so, when no PostgreSQL is configured.
    pub async fn postgres(test: &str) -> Option<TestDb> {
        let Ok(base) = std::env::var(PG_ENV) else {
            // Written to the stderr handle, not with eprintln!, which libtest would capture
            // and hide for a passing test: a skip must be visible.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED the PostgreSQL half of `{test}`: {PG_ENV} is unset"
            );
            return None;
        };
        let schema = format!("perfecx_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&base)
            .await
            .unwrap_or_else(|e| unreachable!("cannot connect to {base}: {e}"));
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| unreachable!("create schema: {e}"));
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
        Some(TestDb {
            url,
            _dir: None,
            pg: Some((base, schema)),
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((base, schema)) = self.pg.take() else {
            return;
        };
        // Drop runs inside the test's runtime: clean up from a thread with its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&base).await {
                        let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                        let _ = sqlx::query(&sql).execute(&mut conn).await;
                    }
                });
            }
        });
        let _ = cleanup.join();
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
    pub headers: HeaderMap,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The error body's message, after checking the error body's shape and code.
    pub fn error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.body);
        assert_eq!(self.body["error"]["code"], code, "body: {}", self.body);
        self.body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub db_url: String,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(db: &TestDb) -> TestServer {
        TestServer::start_with(db, |_| {}).await
    }

    pub async fn start_with(db: &TestDb, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config::new(db.url.clone());
        config.admin_key = Some(ADMIN_KEY.to_string());
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| unreachable!("bind: {e}"));
        let address = listener
            .local_addr()
            .unwrap_or_else(|e| unreachable!("address: {e}"));
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(run(listener, config, async {
            let _ = rx.await;
        }));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_else(|e| unreachable!("client: {e}"));
        TestServer {
            base: format!("http://{address}"),
            client,
            db_url: db.url.clone(),
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| unreachable!("request failed: {e}"));
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply {
            status,
            body,
            headers,
        }
    }

    pub async fn get(&self, path: &str, key: &str) -> Reply {
        self.call(Method::GET, path, Some(key), None).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Some(key), Some(body)).await
    }

    pub async fn put(&self, path: &str, key: &str, body: Value) -> Reply {
        self.call(Method::PUT, path, Some(key), Some(body)).await
    }

    pub async fn delete(&self, path: &str, key: &str) -> Reply {
        self.call(Method::DELETE, path, Some(key), None).await
    }

    /// Sends `events` as one batch for `agent_id` and checks that they are accepted.
    pub async fn ingest(&self, agent_id: &str, key: &str, events: Vec<Value>) {
        let path = format!("/v1/agents/{agent_id}/events");
        let reply = self.post(&path, key, json!({ "events": events })).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    }

    /// Registers an agent and returns its token.
    pub async fn register(&self, agent_id: &str) -> String {
        let reply = self
            .post(
                "/v1/agents",
                ADMIN_KEY,
                serde_json::json!({"agent_id": agent_id, "name": agent_id}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        reply.body["registration_token"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Mints an API key with the given scopes and returns it.
    pub async fn key(&self, scopes: &[&str]) -> String {
        let reply = self
            .post(
                "/v1/api-keys",
                ADMIN_KEY,
                serde_json::json!({"name": "test", "scopes": scopes}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        reply.body["key"].as_str().unwrap_or_default().to_string()
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            match handle.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => unreachable!("server failed: {e}"),
                Err(e) => unreachable!("server task failed: {e}"),
            }
        }
    }
}

/// Runs `$scenario(db)` once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! on_both_databases {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$scenario($crate::common::TestDb::sqlite()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(db) = $crate::common::TestDb::postgres(stringify!($scenario)).await {
                    super::$scenario(db).await;
                }
            }
        }
    )*};
}

impl TestServer {
    /// Announces a body of `length` bytes without sending it: the server must refuse it from
    /// the headers alone. Returns the status code.
    pub async fn announce_body(&self, path: &str, key: &str, length: usize) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = self.base.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .unwrap_or_else(|e| unreachable!("connect: {e}"));
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        );
        stream
            .write_all(head.as_bytes())
            .await
            .unwrap_or_else(|e| unreachable!("write: {e}"));
        let mut answer = vec![0; 1024];
        let n = stream
            .read(&mut answer)
            .await
            .unwrap_or_else(|e| unreachable!("read: {e}"));
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(text.contains("\"payload_too_large\""), "{text}");
        text.split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

/// A WebSocket client of `/agents/{agent_id}`.
pub mod ws {
    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use serde_json::{Value, json};
    use tokio_tungstenite::tungstenite::Message;

    use super::TestServer;

    pub type Socket = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    /// What the server sent.
    #[derive(Debug, PartialEq)]
    pub enum Frame {
        Json(Value),
        Ping,
        /// The close frame's code and reason, or `None` when the connection just ended.
        Closed(Option<(u16, String)>),
    }

    /// Connects without authenticating.
    pub async fn open(server: &TestServer, agent_id: &str) -> Socket {
        let url = format!(
            "{}/agents/{agent_id}",
            server.base.replacen("http://", "ws://", 1)
        );
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| unreachable!("connect: {e}"));
        socket
    }

    pub async fn send_text(socket: &mut Socket, text: String) {
        socket
            .send(Message::text(text))
            .await
            .unwrap_or_else(|e| unreachable!("send: {e}"));
    }

    /// Connects and sends the auth message.
    pub async fn connect(server: &TestServer, agent_id: &str, token: &str) -> Socket {
        let mut socket = open(server, agent_id).await;
        send_text(
            &mut socket,
            json!({"type": "auth", "token": token}).to_string(),
        )
        .await;
        socket
    }

    /// How long a test waits for what it expects before it fails: only so that a broken
    /// server cannot hang the suite.
    const PATIENCE: Duration = Duration::from_secs(30);

    /// The next frame.
    pub async fn frame(socket: &mut Socket) -> Frame {
        tokio::time::timeout(PATIENCE, next_frame(socket))
            .await
            .unwrap_or_else(|_| unreachable!("no frame from the server in {PATIENCE:?}"))
    }

    async fn next_frame(socket: &mut Socket) -> Frame {
        loop {
            match socket.next().await {
                None | Some(Err(_)) => return Frame::Closed(None),
                Some(Ok(Message::Text(text))) => {
                    return Frame::Json(
                        serde_json::from_str(text.as_str())
                            .unwrap_or_else(|e| unreachable!("not JSON: {e}: {text}")),
                    );
                }
                Some(Ok(Message::Ping(_))) => return Frame::Ping,
                Some(Ok(Message::Close(frame))) => {
                    return Frame::Closed(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next JSON message, or `None` once the server closed the socket.
    pub async fn next(socket: &mut Socket) -> Option<Value> {
        next_of_any(socket, None).await
    }

    /// The next message of type `kind`, skipping others (metrics updates, say); `None` once
    /// the server closed the socket.
    pub async fn next_of(socket: &mut Socket, kind: &str) -> Option<Value> {
        next_of_any(socket, Some(kind)).await
    }

    async fn next_of_any(socket: &mut Socket, kind: Option<&str>) -> Option<Value> {
        let wanted = async {
            loop {
                match next_frame(socket).await {
                    Frame::Json(value) if kind.is_none_or(|k| value["type"] == k) => {
                        return Some(value);
                    }
                    Frame::Json(_) | Frame::Ping => continue,
                    Frame::Closed(_) => return None,
                }
            }
        };
        tokio::time::timeout(PATIENCE, wanted)
            .await
            .unwrap_or_else(|_| unreachable!("no {kind:?} message from the server in {PATIENCE:?}"))
    }

    /// Reads until the server closes: its close code and reason.
    pub async fn closed(socket: &mut Socket) -> Option<(u16, String)> {
        let closing = async {
            loop {
                if let Frame::Closed(frame) = next_frame(socket).await {
                    return frame;
                }
            }
        };
        tokio::time::timeout(PATIENCE, closing)
            .await
            .unwrap_or_else(|_| unreachable!("the server did not close the socket in {PATIENCE:?}"))
    }
}
