//! The WebSocket at `/agents/{agent_id}` with a real client: auth first (and its failures),
//! policy bundles, violations, metrics updates, pings, a slow reader, agent deletion.

mod common;

use std::time::Duration;

use common::ws::{self, Frame};
use common::{ADMIN_KEY, TestDb, TestServer};
use perfecx_api::MetricsResponse;
use serde_json::{Value, json};

on_both_databases!(
    socket_pushes_bundles_and_violations,
    socket_refuses_without_auth,
    socket_sends_metrics_updates_and_pings,
    socket_sends_only_the_types_subscribed_to,
    slow_reader_loses_oldest_messages_and_is_told
);

/// RFC 1006's "policy violation" close code.
const POLICY: u16 = 1008;

async fn socket_pushes_bundles_and_violations(db: TestDb) {
    let server = TestServer::start(&db).await;
    let token = server.register("my-agent-001").await;

    // The agent's sidecar connects with its token and gets its bundle at once.
    let mut socket = ws::connect(&server, "my-agent-001", &token).await;
    let first = ws::next(&mut socket).await.unwrap_or_default();
    assert_eq!(first["type"], "policy_bundle", "{first}");
    assert_eq!(first["data"]["policies"], json!([]));

    // Applying a policy pushes the new bundle.
    let policy = json!({"name": "no-shell", "rules": [{"type": "tool_restriction", "forbidden_tools": ["system_command"]}]});
    let created = server.post("/v1/policies", ADMIN_KEY, policy).await;
    let policy_id = created.body["policy_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let applied = server
        .post(
            "/v1/agents/my-agent-001/policies",
            ADMIN_KEY,
            json!({"policy_ids": [policy_id]}),
        )
        .await;
    assert_eq!(applied.status, reqwest::StatusCode::OK, "{}", applied.body);
    let pushed = ws::next_of(&mut socket, "policy_bundle")
        .await
        .unwrap_or_default();
    assert_eq!(
        pushed["data"]["policies"][0]["policy_id"],
        policy_id.as_str()
    );
    let bundle = server
        .get("/v1/agents/my-agent-001/policy-bundle", &token)
        .await;
    assert_eq!(pushed["data"]["revision"], bundle.body["revision"]);

    // A reported violation reaches the watchers, once: a resend is not sent again.
    let violation = json!({"tool": "system_command", "policy": "no-shell", "rule": "tool_restriction", "action": "blocked"});
    let event = json!({"event_id": uuid::Uuid::new_v4(), "event_type": "policy_violation", "data": violation});
    let path = "/v1/agents/my-agent-001/events";
    server
        .post(
            path,
            &token,
            json!({"events": [{"event_type": "custom"}, event]}),
        )
        .await;
    let message = ws::next_of(&mut socket, "policy_violation").await;
    assert_eq!(
        message,
        Some(json!({"type": "policy_violation", "data": violation}))
    );
    server.post(path, &token, event.clone()).await;
    let second = json!({"tool": "x", "rule": "content_filter", "action": "alerted"});
    server
        .post(
            path,
            &token,
            json!({"event_type": "policy_violation", "data": second}),
        )
        .await;
    let message = ws::next_of(&mut socket, "policy_violation").await;
    assert_eq!(message.map(|m| m["data"].clone()), Some(second));

    // An API key with read may watch.
    let mut operator = ws::connect(&server, "my-agent-001", ADMIN_KEY).await;
    assert_eq!(
        ws::next(&mut operator).await.unwrap_or_default()["type"],
        "policy_bundle"
    );

    // Deleting the agent closes its sockets, with a reason.
    server.delete("/v1/agents/my-agent-001", ADMIN_KEY).await;
    let closed = Some((1000, "the agent was deleted".to_string()));
    assert_eq!(ws::closed(&mut socket).await, closed);
    assert_eq!(ws::closed(&mut operator).await, closed);
    server.stop().await;
}

async fn socket_refuses_without_auth(db: TestDb) {
    let server = TestServer::start_with(&db, |config| {
        config.websocket.auth_timeout = Duration::from_millis(300);
    })
    .await;
    server.register("my-agent-001").await;
    let other = server.register("other").await;

    // Another agent's token, an unknown token.
    for token in [other.as_str(), "agt_0123456789abcdef", "pfx_wrong"] {
        let mut refused = ws::connect(&server, "my-agent-001", token).await;
        assert_eq!(
            ws::closed(&mut refused).await,
            Some((POLICY, "not allowed to watch this agent".into())),
            "{token}"
        );
    }
    // A first message that is not an auth message.
    let mut refused = ws::open(&server, "my-agent-001").await;
    ws::send_text(&mut refused, json!({"type": "hello"}).to_string()).await;
    let (code, reason) = ws::closed(&mut refused).await.unwrap_or_default();
    assert_eq!(code, POLICY);
    assert!(
        reason.starts_with("the first message must be {\"type\":\"auth\""),
        "{reason}"
    );
    // No message at all within the auth timeout.
    let mut silent = ws::open(&server, "my-agent-001").await;
    assert_eq!(
        ws::closed(&mut silent).await,
        Some((POLICY, "no auth message in time".into()))
    );
    // An unknown agent, with a key that could watch it.
    let mut ghost = ws::connect(&server, "ghost", ADMIN_KEY).await;
    assert_eq!(
        ws::closed(&mut ghost).await,
        Some((POLICY, "no such agent".into()))
    );
    server.stop().await;
}

async fn socket_sends_only_the_types_subscribed_to(db: TestDb) {
    let server = TestServer::start_with(&db, |config| {
        config.websocket.metrics_interval = Duration::from_millis(20);
    })
    .await;
    let token = server.register("my-agent-001").await;
    // As the sidecar asks: its bundles and nothing else.
    let mut socket = ws::open(&server, "my-agent-001").await;
    let auth = json!({"type": "auth", "token": token, "subscribe": ["policy_bundle"]});
    ws::send_text(&mut socket, auth.to_string()).await;
    assert_eq!(
        ws::next(&mut socket).await.unwrap_or_default()["type"],
        "policy_bundle"
    );

    // A violation and many metrics intervals go by; then a new bundle.
    let violation = json!({"tool": "shell", "rule": "tool_restriction", "action": "blocked"});
    let event = json!({"event_type": "policy_violation", "data": violation});
    server.ingest("my-agent-001", &token, vec![event]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let policy = json!({"name": "no-shell", "rules": [{"type": "tool_restriction", "forbidden_tools": ["shell"]}]});
    let created = server.post("/v1/policies", ADMIN_KEY, policy).await;
    let attach = json!({"policy_ids": [created.body["policy_id"]]});
    server
        .post("/v1/agents/my-agent-001/policies", ADMIN_KEY, attach)
        .await;
    // The very next message is that bundle: nothing else was sent in between.
    let next = ws::next(&mut socket).await.unwrap_or_default();
    assert_eq!(next["type"], "policy_bundle", "{next}");
    assert_eq!(next["data"]["policies"][0]["document"]["name"], "no-shell");

    // A type that does not exist is refused, with the reason.
    let mut refused = ws::open(&server, "my-agent-001").await;
    let auth = json!({"type": "auth", "token": token, "subscribe": ["gossip"]});
    ws::send_text(&mut refused, auth.to_string()).await;
    let (code, reason) = ws::closed(&mut refused).await.unwrap_or_default();
    assert_eq!(code, POLICY);
    assert!(reason.contains("unknown variant `gossip`"), "{reason}");
    // Shutting the server down closes the socket, so that a client goes elsewhere at once.
    server.stop().await;
    assert_eq!(
        ws::closed(&mut socket).await,
        Some((1001, "the control plane is shutting down".into()))
    );
}

async fn socket_sends_metrics_updates_and_pings(db: TestDb) {
    let server = TestServer::start_with(&db, |config| {
        config.websocket.metrics_interval = Duration::from_millis(100);
        config.websocket.ping_interval = Duration::from_millis(50);
    })
    .await;
    let token = server.register("my-agent-001").await;
    let mut socket = ws::connect(&server, "my-agent-001", ADMIN_KEY).await;
    assert_eq!(
        ws::next(&mut socket).await.unwrap_or_default()["type"],
        "policy_bundle"
    );
    // The first update comes at once: nothing yet.
    let update = ws::next_of(&mut socket, "metrics_update")
        .await
        .unwrap_or_default();
    let update: MetricsResponse = serde_json::from_value(update["data"].clone())
        .unwrap_or_else(|e| unreachable!("not the metrics shape: {e}"));
    assert_eq!(update.agent_id, "my-agent-001");
    assert_eq!(update.metrics.total_requests, 0);

    let events: Vec<Value> = (0..10)
        .map(|i| json!({"event_type": "tool_execution", "data": {"tool": "web_search", "duration_ms": 100 * (i + 1), "success": i != 3}}))
        .collect();
    server.ingest("my-agent-001", &token, events).await;
    // A later update has them, as the metrics endpoint counts them.
    let update = loop {
        let message = ws::next_of(&mut socket, "metrics_update")
            .await
            .unwrap_or_default();
        if message["data"]["metrics"]["total_requests"] != 0 {
            break message["data"].clone();
        }
    };
    let range = &update["time_range"];
    let path = format!(
        "/v1/agents/my-agent-001/metrics?start={}&end={}",
        range["start"].as_str().unwrap_or_default(),
        range["end"].as_str().unwrap_or_default()
    );
    let reply = server.get(&path, ADMIN_KEY).await;
    assert_eq!(reply.body, update);
    assert_eq!(update["metrics"]["total_requests"], 10);
    assert_eq!(update["metrics"]["error_rate"], 0.1);
    assert_eq!(update["metrics"]["average_response_time_ms"], 550.0);

    // Idle, the socket is pinged (and the client's pongs keep it open).
    let mut pings = 0;
    while pings < 3 {
        match ws::frame(&mut socket).await {
            Frame::Ping => pings += 1,
            Frame::Json(_) => {}
            Frame::Closed(frame) => unreachable!("closed: {frame:?}"),
        }
    }
    server.stop().await;
}

async fn slow_reader_loses_oldest_messages_and_is_told(db: TestDb) {
    let server = TestServer::start_with(&db, |config| {
        config.websocket.buffer = 8;
        config.websocket.metrics_interval = Duration::from_secs(3600);
    })
    .await;
    let token = server.register("my-agent-001").await;
    let mut socket = ws::connect(&server, "my-agent-001", &token).await;
    assert_eq!(
        ws::next_of(&mut socket, "policy_bundle")
            .await
            .unwrap_or_default()["type"],
        "policy_bundle"
    );
    // The client stops reading. 1,200 violations of 16 KiB each are far more than the
    // socket buffers hold, and ingestion does not wait for the client: every request is
    // answered while it reads nothing.
    let detail = "x".repeat(16 * 1024);
    let mut sent = 0u64;
    for batch in 0..3 {
        let events: Vec<Value> = (0..400)
            .map(|i| json!({"event_type": "policy_violation", "data": {"tool": "shell", "rule": "tool_restriction", "action": "blocked", "n": batch * 400 + i, "detail": detail}}))
            .collect();
        server.ingest("my-agent-001", &token, events).await;
        sent += 400;
    }
    // Now it reads: messages in order, with gaps that `lagged` accounts for exactly.
    let mut received = 0u64;
    let mut dropped = 0u64;
    let mut last = -1i64;
    let mut lags = 0;
    while received + dropped < sent {
        let message = ws::next(&mut socket).await.unwrap_or_default();
        match message["type"].as_str() {
            Some("policy_violation") => {
                let n = message["data"]["n"].as_i64().unwrap_or(-1);
                assert!(n > last, "{n} after {last}");
                last = n;
                received += 1;
            }
            Some("lagged") => {
                let n = message["data"]["dropped"].as_u64().unwrap_or(0);
                assert!(n > 0);
                dropped += n;
                lags += 1;
            }
            Some("metrics_update") => {}
            other => unreachable!("unexpected {other:?}"),
        }
    }
    assert_eq!(received + dropped, sent);
    assert!(lags >= 1 && dropped > 0, "nothing was dropped");
    // The newest messages are the ones kept.
    assert_eq!(last, 1199);
    let scrape = server
        .call(reqwest::Method::GET, "/metrics", None, None)
        .await;
    let text = scrape.body.as_str().unwrap_or_default().to_string();
    assert!(
        text.contains(&format!(
            "perfecx_cp_websocket_messages_dropped_total {dropped}"
        )),
        "{text}"
    );
    server.stop().await;
}
