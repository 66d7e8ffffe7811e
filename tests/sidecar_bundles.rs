//! End-to-end: the sidecar gets its agent's policy bundle from a real control plane (pushed over
//! the WebSocket, polled besides) and enforces it alongside the policy files, also across a
//! restart while the control plane is down; and, against a hand-made control plane, that a socket
//! that fell behind has the bundle fetched at once.

mod common;

use common::control_plane::ControlPlane;
use common::*;
use reqwest::Method;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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

/// A control plane of the test's own: the bundle route answers `bundle`, and each socket, once
/// its client has authenticated, sends whatever arrives on `say`.
struct HandMade {
    base: String,
    bundle: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
    say: tokio::sync::broadcast::Sender<String>,
}

impl HandMade {
    async fn start(bundle: Value) -> HandMade {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let bundle = Arc::new(Mutex::new(bundle));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (say, _) = tokio::sync::broadcast::channel(16);
        let app = {
            let (bundle, fetches) = (bundle.clone(), fetches.clone());
            axum::Router::new().route(
                &format!("/v1/agents/{AGENT}/policy-bundle"),
                axum::routing::get(move || {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    let body = bundle.lock().unwrap().clone();
                    async move { axum::Json(body) }
                }),
            )
        };
        let said = say.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                // The socket's upgrade request is told apart by its path, left unread.
                let mut head = [0u8; 64];
                let n = stream.peek(&mut head).await.unwrap_or(0);
                if head[..n].starts_with(format!("GET /agents/{AGENT}").as_bytes()) {
                    tokio::spawn(socket(stream, said.subscribe()));
                } else {
                    let service = hyper_util::service::TowerToHyperService::new(app.clone());
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                    );
                }
            }
        });
        HandMade {
            base,
            bundle,
            fetches,
            say,
        }
    }
}

async fn socket(stream: tokio::net::TcpStream, mut say: tokio::sync::broadcast::Receiver<String>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    match ws.next().await {
        Some(Ok(Message::Text(auth))) if auth.contains("\"auth\"") => {}
        other => panic!("the sidecar did not authenticate first: {other:?}"),
    }
    while let Ok(text) = say.recv().await {
        if ws.send(Message::text(text)).await.is_err() {
            return;
        }
    }
}

fn bundle(revision: &str, policies: Vec<Value>) -> Value {
    let policies: Vec<Value> = policies
        .into_iter()
        .enumerate()
        .map(|(i, document)| json!({"policy_id": format!("pol_{i}"), "version": 1, "document": document}))
        .collect();
    json!({"agent_id": AGENT, "revision": revision, "policies": policies})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_fell_behind_has_the_bundle_fetched_at_once() {
    let cp = HandMade::start(bundle("r1", vec![])).await;
    let dir = tempfile::tempdir().unwrap();
    let (mcp_url, mcp_ct) = mcp_server(true).await;
    // The next poll is ten minutes away: only the socket can bring the change within the test.
    let sidecar = start_polling_every(
        &cp.base,
        &dir.path().join("spool"),
        &mcp_url,
        "agt_x",
        600_000,
    )
    .await;
    eventually("the socket is open", || async {
        cp.say.receiver_count() > 0
    })
    .await;
    let echo = json!({"text": "hi"});
    assert_eq!(refusal(&sidecar, "echo", echo.clone()).await, None);
    let fetched = cp.fetches.load(Ordering::SeqCst);
    assert!(fetched >= 1, "the bundle is fetched at start");

    // The bundle changes, and its push is among the messages the socket missed.
    *cp.bundle.lock().unwrap() = bundle("r2", vec![forbidding("echo")]);
    cp.say
        .send(r#"{"type":"lagged","data":{"dropped":3}}"#.to_owned())
        .unwrap();
    eventually("the bundle is fetched and enforced", || async {
        refusal(&sidecar, "echo", echo.clone())
            .await
            .is_some_and(|t| t.contains("policy `central`"))
    })
    .await;
    assert_eq!(cp.fetches.load(Ordering::SeqCst), fetched + 1);

    sidecar.stop().await;
    mcp_ct.cancel();
}
