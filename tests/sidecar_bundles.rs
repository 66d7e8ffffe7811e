//! End-to-end: the sidecar gets its agent's policy bundle from a real control plane (pushed over
//! the WebSocket, polled besides) and enforces it alongside the policy files, also across a
//! restart while the control plane is down.

mod common;

use common::control_plane::ControlPlane;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const AGENT: &str = "test-agent";
const LOCAL: &str =
    "name: local\nrules:\n  - type: tool_restriction\n    forbidden_tools: [shell]\n";

fn forbidding(tool: &str) -> Value {
    json!({"name": "central", "rules": [{"type": "tool_restriction", "forbidden_tools": [tool]}]})
}

async fn start(cp_base: &str, spool: &std::path::Path, mcp_url: &str, token: &str) -> Sidecar {
    start_polling_every(cp_base, spool, mcp_url, token, 100).await
}

async fn start_polling_every(
    cp_base: &str,
    spool: &std::path::Path,
    mcp_url: &str,
    token: &str,
    poll_ms: u64,
) -> Sidecar {
    let extra = format!(
        "control_plane:\n  url: {cp_base}\n  token_env: PERFECX_TEST_TOKEN_UNUSED\n  spool_dir: {}\n  bundle_poll_interval_ms: {poll_ms}\n",
        spool.display()
    );
    let token = token.to_owned();
    Sidecar::start_configured(
        &[("local.yaml", LOCAL)],
        &format!("  - name: tools\n    mcp_url: {mcp_url}\n"),
        &extra,
        move |c| c.control_plane.as_mut().unwrap().token = Some(token),
    )
    .await
}

/// Creates a policy in the control plane and applies it to the agent; its id.
async fn apply_to_agent(cp: &ControlPlane, document: Value) -> String {
    let created = cp
        .request(Method::POST, "/v1/policies", Some(document))
        .await;
    let policy_id = created["policy_id"].as_str().unwrap().to_owned();
    cp.request(
        Method::POST,
        &format!("/v1/agents/{AGENT}/policies"),
        Some(json!({"policy_ids": [policy_id]})),
    )
    .await;
    policy_id
}

async fn detach_from_agent(cp: &ControlPlane, policy_id: &str) {
    let path = format!("/v1/agents/{AGENT}/policies/{policy_id}");
    cp.request(Method::DELETE, &path, None).await;
}

/// Whether a call of `tool` is refused, and by which policy (the refusal's text).
async fn refusal(sidecar: &Sidecar, tool: &str, args: Value) -> Option<String> {
    let agent = client(&sidecar.mcp_url("tools")).await;
    let r = call(&agent, tool, args).await;
    agent.cancel().await.unwrap();
    is_error(&r).then(|| text(&r))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_bundle_is_enforced_with_the_files_and_kept_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cp.db");
    let spool = dir.path().join("spool");
    let cp = ControlPlane::start_on_free_port(&db).await;
    let (addr, base) = (cp.addr, cp.base.clone());
    let token = cp.register(AGENT).await;
    let policy_id = apply_to_agent(&cp, forbidding("echo")).await;

    let (mcp_url, mcp_ct) = mcp_server(true).await;
    let sidecar = start(&base, &spool, &mcp_url, &token).await;
    let echo = json!({"text": "hi"});
    eventually("the bundle's policy is enforced", || async {
        refusal(&sidecar, "echo", echo.clone())
            .await
            .is_some_and(|t| t.contains("policy `central`"))
    })
    .await;
    // The files still apply, and /policies tells the two sources apart.
    assert!(
        refusal(&sidecar, "shell", json!({"command": "ls"}))
            .await
            .is_some()
    );
    assert_eq!(
        refusal(&sidecar, "add", json!({"a": 1, "b": 1})).await,
        None
    );
    let (_, report) = sidecar.admin_get("/policies").await;
    let report: Value = serde_json::from_str(&report).unwrap();
    assert!(report["bundle_revision"].is_string(), "{report}");
    let central = report["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "central")
        .unwrap();
    assert_eq!(central["policy_id"], policy_id.as_str(), "{report}");

    // A restart while the control plane is down enforces the bundle kept on disk from the start.
    sidecar.stop().await;
    cp.stop().await;
    let sidecar = start(&base, &spool, &mcp_url, &token).await;
    let refused = refusal(&sidecar, "echo", echo.clone()).await;
    assert!(
        refused.is_some_and(|t| t.contains("policy `central`")),
        "the kept bundle applies at once"
    );

    // Back up: a change of the policy reaches the sidecar; detaching it lifts it.
    let cp = ControlPlane::start(TcpListener::bind(addr).await.unwrap(), &db).await;
    cp.request(
        Method::PUT,
        &format!("/v1/policies/{policy_id}"),
        Some(forbidding("add")),
    )
    .await;
    eventually("the updated policy is enforced", || async {
        refusal(&sidecar, "add", json!({"a": 1, "b": 1}))
            .await
            .is_some()
    })
    .await;
    assert_eq!(refusal(&sidecar, "echo", echo.clone()).await, None);
    detach_from_agent(&cp, &policy_id).await;
    eventually("the detached policy is lifted", || async {
        refusal(&sidecar, "add", json!({"a": 1, "b": 1}))
            .await
            .is_none()
    })
    .await;
    assert!(
        refusal(&sidecar, "shell", json!({"command": "ls"}))
            .await
            .is_some()
    );

    sidecar.stop().await;
    mcp_ct.cancel();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_change_is_pushed_at_once_not_at_the_next_poll() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start_on_free_port(&dir.path().join("cp.db")).await;
    let token = cp.register(AGENT).await;
    let (mcp_url, mcp_ct) = mcp_server(true).await;
    // The next poll is ten minutes away: only a push can deliver a change within the test.
    let spool = dir.path().join("spool");
    let sidecar = start_polling_every(&cp.base, &spool, &mcp_url, &token, 600_000).await;
    let echo = json!({"text": "hi"});
    assert_eq!(refusal(&sidecar, "echo", echo.clone()).await, None);

    let policy_id = apply_to_agent(&cp, forbidding("echo")).await;
    eventually("the pushed bundle is enforced", || async {
        refusal(&sidecar, "echo", echo.clone())
            .await
            .is_some_and(|t| t.contains("policy `central`"))
    })
    .await;
    let (_, metrics) = sidecar.admin_get("/metrics").await;
    assert_eq!(
        metric(&metrics, "perfecx_policy_bundle_socket_connected"),
        Some(1.0),
        "{metrics}"
    );
    // Kept on disk like a polled one, for a restart without the control plane.
    let kept = std::fs::read_to_string(spool.join("policy-bundle.json")).unwrap();
    assert!(kept.contains(&policy_id), "{kept}");

    detach_from_agent(&cp, &policy_id).await;
    eventually("the detached policy is lifted", || async {
        refusal(&sidecar, "echo", echo.clone()).await.is_none()
    })
    .await;

    // The control plane gone, the sidecar says so.
    cp.stop().await;
    eventually("the socket is reported down", || async {
        let (_, metrics) = sidecar.admin_get("/metrics").await;
        metric(&metrics, "perfecx_policy_bundle_socket_connected") == Some(0.0)
    })
    .await;
    sidecar.stop().await;
    mcp_ct.cancel();
}
