//! The WebSocket at `/agents/{agent_id}`: auth first, then bundles and violations.

mod common;

use std::time::Duration;

use common::{ADMIN_KEY, TestDb, TestServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

on_both_databases!(socket_pushes_bundles_and_violations);

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &TestServer, agent_id: &str, token: &str) -> Socket {
    let url = format!(
        "{}/agents/{agent_id}",
        server.base.replacen("http://", "ws://", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| unreachable!("connect: {e}"));
    let auth = json!({"type": "auth", "token": token}).to_string();
    socket
        .send(Message::text(auth))
        .await
        .unwrap_or_else(|e| unreachable!("send: {e}"));
    socket
}

/// The next JSON message, or `None` when the server closed the socket. The timeout only
/// keeps a broken server from hanging the suite.
async fn next(socket: &mut Socket) -> Option<Value> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .ok()??
            .ok()?;
        match message {
            Message::Text(text) => return serde_json::from_str(text.as_str()).ok(),
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

async fn socket_pushes_bundles_and_violations(db: TestDb) {
    let server = TestServer::start(&db).await;
    let token = server.register("my-agent-001").await;
    let other = server.register("other").await;

    // The agent's sidecar connects with its token and gets its bundle at once.
    let mut socket = connect(&server, "my-agent-001", &token).await;
    let first = next(&mut socket).await.unwrap_or_default();
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
    let pushed = next(&mut socket).await.unwrap_or_default();
    assert_eq!(pushed["type"], "policy_bundle", "{pushed}");
    assert_eq!(
        pushed["data"]["policies"][0]["policy_id"],
        policy_id.as_str()
    );
    let bundle = server
        .get("/v1/agents/my-agent-001/policy-bundle", &token)
        .await;
    assert_eq!(pushed["data"]["revision"], bundle.body["revision"]);

    // A reported violation reaches the watchers.
    let violation = json!({"tool": "system_command", "policy": "no-shell", "rule": "tool_restriction", "action": "blocked"});
    server
        .post("/v1/agents/my-agent-001/events", &token, json!({"events": [{"event_type": "custom"}, {"event_type": "policy_violation", "data": violation}]}))
        .await;
    let message = next(&mut socket).await.unwrap_or_default();
    assert_eq!(
        message,
        json!({"type": "policy_violation", "data": violation})
    );

    // Another agent's token, or a bad first message, is refused.
    let mut refused = connect(&server, "my-agent-001", &other).await;
    assert_eq!(next(&mut refused).await, None);
    let mut refused = connect(&server, "my-agent-001", "pfx_wrong").await;
    assert_eq!(next(&mut refused).await, None);
    // An API key with read may watch.
    let mut operator = connect(&server, "my-agent-001", ADMIN_KEY).await;
    assert_eq!(
        next(&mut operator).await.unwrap_or_default()["type"],
        "policy_bundle"
    );

    // Deleting the agent closes its sockets.
    server.delete("/v1/agents/my-agent-001", ADMIN_KEY).await;
    assert_eq!(next(&mut socket).await, None);
    assert_eq!(next(&mut operator).await, None);
    server.stop().await;
}
