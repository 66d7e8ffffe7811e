//! Two control-plane replicas on one PostgreSQL: what one accepts reaches the WebSocket clients
//! of the other within a second (LISTEN/NOTIFY), and no client hears anything twice.

mod common;

use std::time::{Duration, Instant};

use common::{ADMIN_KEY, TestDb, TestServer, ws};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Settles a socket: its bundle and its first metrics update (the only one in this test).
async fn settled(server: &TestServer, agent_id: &str, token: &str) -> ws::Socket {
    let mut socket = ws::connect(server, agent_id, token).await;
    assert!(ws::next_of(&mut socket, "policy_bundle").await.is_some());
    assert!(ws::next_of(&mut socket, "metrics_update").await.is_some());
    socket
}

fn violation(n: u64) -> Value {
    json!({"event_type": "policy_violation",
        "data": {"tool": "system_command", "policy": "p", "rule": "tool_restriction", "action": "blocked", "n": n}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_relay_over_postgres() {
    let Some(db) = TestDb::postgres("replicas_relay_over_postgres").await else {
        return;
    };
    let quiet = |config: &mut perfecx_control_plane::Config| {
        config.websocket.metrics_interval = Duration::from_secs(3600);
    };
    let a = TestServer::start_with(&db, quiet).await;
    let token = a.register("my-agent-001").await;
    let b = TestServer::start_with(&db, quiet).await;
    assert_eq!(
        b.get("/v1/agents/my-agent-001", ADMIN_KEY).await.status,
        StatusCode::OK
    );
    let mut on_a = settled(&a, "my-agent-001", ADMIN_KEY).await;
    let mut on_b = settled(&b, "my-agent-001", &token).await;

    // An event accepted by A reaches B's client within a second, from a quiet start.
    let path = "/v1/agents/my-agent-001/events";
    let started = Instant::now();
    let reply = a.post(path, &token, violation(1)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    let heard = ws::next_of(&mut on_b, "policy_violation").await;
    let elapsed = started.elapsed();
    assert_eq!(heard.map(|m| m["data"]["n"].clone()), Some(json!(1)));
    assert!(
        elapsed < Duration::from_secs(1),
        "B's client heard A's event after {elapsed:?}"
    );
    eprintln!("replica B's client heard A's event {elapsed:?} after it was posted");
    // A's own client hears it once: A skips its own notification.
    let heard = ws::next_of(&mut on_a, "policy_violation").await;
    assert_eq!(heard.map(|m| m["data"]["n"].clone()), Some(json!(1)));
    // And the other way round.
    b.post(path, &token, violation(2)).await;
    for socket in [&mut on_a, &mut on_b] {
        let heard = ws::next_of(socket, "policy_violation").await;
        assert_eq!(heard.map(|m| m["data"]["n"].clone()), Some(json!(2)));
    }

    // A policy applied through A reaches B's client (the sidecar) as a new bundle.
    let policy = json!({"name": "no-shell", "rules": [{"type": "tool_restriction", "forbidden_tools": ["system_command"]}]});
    let created = a.post("/v1/policies", ADMIN_KEY, policy).await;
    let policy_id = created.body["policy_id"].clone();
    a.post(
        "/v1/agents/my-agent-001/policies",
        ADMIN_KEY,
        json!({"policy_ids": [policy_id]}),
    )
    .await;
    let bundle = ws::next_of(&mut on_b, "policy_bundle").await;
    assert_eq!(
        bundle.map(|m| m["data"]["policies"][0]["policy_id"].clone()),
        Some(policy_id)
    );

    // An anomaly that A detects is stored once and reaches B's client. Another agent (the
    // first one's detector has moved on to the present): forty minutes of steady use of two
    // tools, then a tool never used before.
    let second = a.register("agent-two").await;
    let mut watching_two = settled(&b, "agent-two", ADMIN_KEY).await;
    let t0 = 1_705_305_600_000i64;
    let mut events: Vec<Value> = (0..800)
        .map(|i| {
            let at = chrono::DateTime::from_timestamp_millis(t0 + i * 3_000).unwrap_or_default();
            json!({"event_type": "tool_execution", "timestamp": at.to_rfc3339(),
                "data": {"tool": if i % 2 == 0 { "web_search" } else { "summarize" }, "duration_ms": 120, "success": true}})
        })
        .collect();
    let at = chrono::DateTime::from_timestamp_millis(t0 + 800 * 3_000).unwrap_or_default();
    events.push(
        json!({"event_type": "tool_execution", "timestamp": at.to_rfc3339(),
        "data": {"tool": "export_all_records", "duration_ms": 120, "success": true}}),
    );
    a.ingest("agent-two", &second, events).await;
    let found = ws::next_of(&mut watching_two, "anomaly_detected")
        .await
        .unwrap_or_default();
    assert_eq!(found["data"]["type"], "new_tool", "{found}");
    assert!(
        found["data"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("`export_all_records`")),
        "{found}"
    );
    let listed = b.get("/v1/agents/agent-two/anomalies", ADMIN_KEY).await;
    assert_eq!(listed.body["total"], 1, "{}", listed.body);
    assert_eq!(
        listed.body["anomalies"][0]["anomaly_id"],
        found["data"]["anomaly_id"]
    );

    // Deleting the agent through A closes B's sockets.
    a.delete("/v1/agents/my-agent-001", ADMIN_KEY).await;
    let closed = Some((1000, "the agent was deleted".to_string()));
    assert_eq!(ws::closed(&mut on_b).await, closed);
    assert_eq!(ws::closed(&mut on_a).await, closed);
    a.stop().await;
    b.stop().await;
}
