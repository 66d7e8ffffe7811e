//! Acknowledged writes survive kill -9: a control plane in a child process accepts events,
//! is killed with SIGKILL, and a new one on the same database finds every acknowledged event.
//!
//! The child is this test binary again, running `child_server` with the database in its
//! environment, so no other binary is needed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{ADMIN_KEY, TestDb, TestServer};
use perfecx_control_plane::{Config, SqliteSync, run, store::Store};
use reqwest::StatusCode;
use serde_json::json;

const CHILD_DB: &str = "PERFECX_DURABILITY_CHILD_DB";

/// Serves forever when started by `acknowledged_events_survive_kill`; passes at once otherwise.
#[test]
fn child_server() {
    let Ok(url) = std::env::var(CHILD_DB) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| unreachable!("{e}"));
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        let address = listener
            .local_addr()
            .unwrap_or_else(|e| unreachable!("{e}"));
        let mut config = Config::new(url);
        config.admin_key = Some(ADMIN_KEY.into());
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "LISTENING {address}");
        let _ = std::io::stdout().flush();
        let _ = run(listener, config, std::future::pending()).await;
    });
}

on_both_databases!(acknowledged_events_survive_kill);

async fn acknowledged_events_survive_kill(db: TestDb) {
    let exe = std::env::current_exe().unwrap_or_else(|e| unreachable!("{e}"));
    let mut child = Command::new(exe)
        .args(["child_server", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB, &db.url)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| unreachable!("spawn: {e}"));
    let stdout = child
        .stdout
        .take()
        .unwrap_or_else(|| unreachable!("no stdout"));
    let address = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            // libtest may print `test child_server ... ` before it on the same line.
            .find_map(|line| {
                line.split("LISTENING ")
                    .nth(1)
                    .map(|a| a.trim().to_string())
            })
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| unreachable!("the child never listened"));

    let client = reqwest::Client::new();
    let base = format!("http://{address}");
    let reply = client
        .post(format!("{base}/v1/agents"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"agent_id": "durable", "name": "durable"}))
        .send()
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    assert_eq!(reply.status(), StatusCode::CREATED);
    let mut acknowledged = 0;
    for _ in 0..20 {
        let events: Vec<_> = (0..50)
            .map(|_| json!({"event_type": "tool_execution"}))
            .collect();
        let reply = client
            .post(format!("{base}/v1/agents/durable/events"))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"events": events}))
            .send()
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(reply.status(), StatusCode::ACCEPTED);
        acknowledged += 50;
    }
    // SIGKILL: no shutdown, no checkpoint, no flush.
    child.kill().unwrap_or_else(|e| unreachable!("kill: {e}"));
    let _ = child.wait();

    let store = Store::connect(&db.url, SqliteSync::Full)
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    assert_eq!(store.count_events("durable").await.ok(), Some(acknowledged));
    store.close().await;
    // And a new server serves them.
    let server = TestServer::start(&db).await;
    assert_eq!(
        server.get("/v1/agents/durable", ADMIN_KEY).await.body["status"],
        "active"
    );
    server.stop().await;
}
