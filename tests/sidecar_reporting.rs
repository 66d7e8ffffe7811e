//! End-to-end: what the sidecar reports to a real control plane (the control-plane crate's
//! server on a SQLite file), over real sockets; what the control plane stored is read back.

mod common;

use std::collections::HashSet;
use std::path::Path;

use axum::routing::{get, post};
use common::control_plane::{self, ControlPlane, StoredEvent, stored_events};
use common::*;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Strict: blocks `shell`, `rm -rf` and cards or AWS keys in arguments, redacts them in output.
const STRICT: &str = r#"
name: safety
rules:
  - type: tool_restriction
    forbidden_tools: [shell]
  - type: content_filter
    forbidden_patterns: ["rm -rf"]
    sensitive_data_detection: true
    sensitive_data_types: [aws_access_key, credit_card]
"#;

/// Permissive: reports every kind of sensitive data and lets it through.
const AUDIT: &str = r#"
name: audit
enforcement: permissive
rules:
  - type: content_filter
    sensitive_data_detection: true
"#;

const AGENT: &str = "test-agent";
const SECRETS: [&str; 5] = [
    "AKIAIOSFODNN7EXAMPLE",
    "jane.doe@example.com",
    "jane.doe@acme.io",
    "4111 1111 1111 1111",
    "4111111111111111",
];

/// The `control_plane` section; the token itself is handed over in-process.
fn reporting(base: &str, spool: &Path) -> String {
    format!(
        "control_plane:\n  url: {base}\n  token_env: PERFECX_TEST_TOKEN_UNUSED\n  spool_dir: {}\n  flush_interval_ms: 100\n",
        spool.display()
    )
}

async fn start_sidecar(
    policies: &[(&str, &str)],
    upstreams: &str,
    extra: &str,
    token: &str,
) -> Sidecar {
    let token = token.to_owned();
    Sidecar::start_configured(policies, upstreams, extra, move |c| {
        c.control_plane.as_mut().unwrap().token = Some(token);
    })
    .await
}

async fn http_tool() -> (String, CancellationToken) {
    let router = axum::Router::new()
        .route(
            "/api/search",
            post(|body: String| async move { axum::Json(json!({"echo": body})) }),
        )
        .route(
            "/api/boom",
            get(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
        );
    let ct = CancellationToken::new();
    let url = serve(router, ct.clone()).await;
    (format!("{url}/api"), ct)
}

async fn post_json(url: &str, body: &str) -> u16 {
    reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn counter(metrics: &str, name: &str) -> f64 {
    metric(metrics, name).unwrap_or(0.0)
}

/// `(event_type, tool, policy, rule, action)`, sorted, for comparing whole sets of events.
fn shapes(events: &[StoredEvent]) -> Vec<(String, String, String, String, String)> {
    let mut out: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e.event_type.clone(),
                e.text("tool").to_owned(),
                e.text("policy").to_owned(),
                e.text("rule").to_owned(),
                e.text("action").to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

fn shape(
    kind: &str,
    tool: &str,
    policy: &str,
    rule: &str,
    action: &str,
) -> (String, String, String, String, String) {
    (
        kind.into(),
        tool.into(),
        policy.into(),
        rule.into(),
        action.into(),
    )
}

fn execution<'a>(events: &'a [StoredEvent], tool: &str, input_has: &str) -> &'a StoredEvent {
    events
        .iter()
        .find(|e| {
            e.event_type == "tool_execution"
                && e.text("tool") == tool
                && e.text("input").contains(input_has)
        })
        .unwrap_or_else(|| {
            panic!("no tool_execution of `{tool}` with `{input_has}` in {events:#?}")
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_and_violations_are_stored_once_without_sensitive_data() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start_on_free_port(&dir.path().join("cp.db")).await;
    let token = cp.register(AGENT).await;
    let (mcp_url, mcp_ct) = mcp_server(true).await;
    let (http_url, http_ct) = http_tool().await;
    let spool = dir.path().join("spool");
    let sidecar = start_sidecar(
        &[("safety.yaml", STRICT), ("audit.yaml", AUDIT)],
        &format!(
            "  - name: tools\n    mcp_url: {mcp_url}\n  - name: web\n    http_url: {http_url}\n"
        ),
        &reporting(&cp.base, &spool),
        &token,
    )
    .await;

    let client = client(&sidecar.mcp_url("tools")).await;
    let r = call(&client, "add", json!({"a": 2, "b": 3})).await;
    assert_eq!(text(&r), "5");
    assert!(is_error(
        &call(&client, "shell", json!({"command": "ls"})).await
    ));
    assert!(is_error(
        &call(&client, "echo", json!({"text": "please rm -rf /"})).await
    ));
    // AWS key redacted by the strict policy; the e-mail address only reported by the permissive
    // one, so the agent sees it, but the event must not carry it.
    let r = call(&client, "leak", json!({})).await;
    assert!(
        text(&r).contains("[REDACTED:aws_access_key]") && text(&r).contains("jane.doe@example.com"),
        "{}",
        text(&r)
    );
    let r = call(
        &client,
        "echo",
        json!({"text": "write to jane.doe@acme.io"}),
    )
    .await;
    assert_eq!(text(&r), "write to jane.doe@acme.io");
    assert!(is_error(&call(&client, "fail", json!({})).await));
    client.cancel().await.unwrap();

    assert_eq!(
        post_json(&sidecar.url("/tools/web/search"), r#"{"q":"rust"}"#).await,
        200
    );
    assert_eq!(
        reqwest::get(sidecar.url("/tools/web/boom"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        500
    );
    let card = r#"{"q":"pay with 4111 1111 1111 1111"}"#;
    assert_eq!(
        post_json(&sidecar.url("/tools/web/search"), card).await,
        403
    );

    let expected = vec![
        shape(
            "policy_violation",
            "echo",
            "audit",
            "content_filter",
            "alerted",
        ), // e-mail in the arguments
        shape(
            "policy_violation",
            "echo",
            "audit",
            "content_filter",
            "alerted",
        ), // and in the output
        shape(
            "policy_violation",
            "echo",
            "safety",
            "content_filter",
            "blocked",
        ), // rm -rf
        shape(
            "policy_violation",
            "leak",
            "audit",
            "content_filter",
            "alerted",
        ), // AWS key
        shape(
            "policy_violation",
            "leak",
            "audit",
            "content_filter",
            "alerted",
        ), // e-mail
        shape(
            "policy_violation",
            "leak",
            "safety",
            "content_filter",
            "redacted",
        ), // AWS key
        shape(
            "policy_violation",
            "shell",
            "safety",
            "tool_restriction",
            "blocked",
        ),
        shape(
            "policy_violation",
            "web",
            "audit",
            "content_filter",
            "alerted",
        ), // card
        shape(
            "policy_violation",
            "web",
            "safety",
            "content_filter",
            "blocked",
        ), // card
        shape("tool_execution", "add", "", "", ""),
        shape("tool_execution", "echo", "", "", ""),
        shape("tool_execution", "fail", "", "", ""),
        shape("tool_execution", "leak", "", "", ""),
        shape("tool_execution", "web", "", "", ""),
        shape("tool_execution", "web", "", "", ""),
    ];
    eventually("the control plane counts every event", || async {
        let m = cp.metrics(AGENT).await;
        m["total_requests"] == 6 && m["policy_violations"] == 9
    })
    .await;
    let m = cp.metrics(AGENT).await;
    assert_eq!(m["security_events"]["unauthorized_tool_access"], 1, "{m}");
    assert_eq!(m["security_events"]["suspicious_patterns"], 8, "{m}");
    assert!(
        (m["error_rate"].as_f64().unwrap() - 2.0 / 6.0).abs() < 1e-9,
        "{m}"
    );

    let metrics = sidecar.metrics().await;
    sidecar.stop().await;
    assert_eq!(
        counter(&metrics, "perfecx_events_sent_total"),
        15.0,
        "{metrics}"
    );
    assert!(
        !metrics.contains("perfecx_events_dropped_total{"),
        "{metrics}"
    );
    assert_eq!(counter(&metrics, "perfecx_events_spooled_total"), 0.0);

    let events = stored_events(&cp.db, AGENT).await;
    assert_eq!(shapes(&events), expected, "{events:#?}");
    let ids: HashSet<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids.len(), events.len());
    for e in &events {
        for secret in SECRETS {
            assert!(!e.raw.contains(secret), "`{secret}` reported in {e:#?}");
        }
    }

    let add = execution(&events, "add", "\"a\":2");
    assert_eq!(add.data["output"], "5");
    assert_eq!(add.data["success"], true);
    assert!(add.data["duration_ms"].is_u64(), "{add:#?}");
    let leak = execution(&events, "leak", "");
    assert_eq!(
        leak.data["output"],
        "key [REDACTED:aws_access_key], mail [REDACTED:email]"
    );
    let echo = execution(&events, "echo", "write to");
    assert!(echo.text("input").contains("[REDACTED:email]"), "{echo:#?}");
    assert_eq!(echo.data["output"], "write to [REDACTED:email]");
    assert_eq!(execution(&events, "fail", "").data["success"], false);
    let search = execution(&events, "web", "POST /search");
    assert!(
        search.text("input").contains(r#"{"q":"rust"}"#),
        "{search:#?}"
    );
    assert_eq!(search.data["success"], true);
    assert_eq!(
        execution(&events, "web", "GET /boom").data["success"],
        false
    );
    let shell = events.iter().find(|e| e.text("tool") == "shell").unwrap();
    assert_eq!(shell.text("detail"), "tool `shell` is forbidden");

    mcp_ct.cancel();
    http_ct.cancel();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_spool_while_the_control_plane_is_down_and_arrive_once_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cp.db");
    // Register, then take the control plane down: its port is closed from now on.
    let cp = ControlPlane::start_on_free_port(&db).await;
    let (addr, base) = (cp.addr, cp.base.clone());
    let token = cp.register(AGENT).await;
    cp.stop().await;

    let (mcp_url, mcp_ct) = mcp_server(true).await;
    let spool = dir.path().join("spool");
    let upstreams = format!("  - name: tools\n    mcp_url: {mcp_url}\n");
    let policies = [("safety.yaml", STRICT)];
    let first = start_sidecar(&policies, &upstreams, &reporting(&base, &spool), &token).await;
    let agent = client(&first.mcp_url("tools")).await;
    for i in 0..3 {
        let r = call(&agent, "add", json!({"a": i, "b": 1})).await;
        assert_eq!(
            text(&r),
            (i + 1).to_string(),
            "calls work while the control plane is down"
        );
    }
    assert!(is_error(
        &call(&agent, "shell", json!({"command": "ls"})).await
    ));
    agent.cancel().await.unwrap();
    eventually("the four events are spooled", || async {
        counter(&first.metrics().await, "perfecx_events_spooled_total") >= 4.0
    })
    .await;
    let metrics = first.metrics().await;
    assert_eq!(counter(&metrics, "perfecx_events_sent_total"), 0.0);
    assert!(
        counter(&metrics, "perfecx_event_spool_bytes") > 0.0,
        "{metrics}"
    );
    first.stop().await;
    let segments = std::fs::read_dir(&spool).unwrap().count();
    assert!(segments > 0, "the spool holds the events after a stop");

    // A new sidecar finds them, and spools its own behind them while the control plane is down.
    let second = start_sidecar(&policies, &upstreams, &reporting(&base, &spool), &token).await;
    let client = client(&second.mcp_url("tools")).await;
    assert_eq!(
        text(&call(&client, "add", json!({"a": 40, "b": 2})).await),
        "42"
    );
    client.cancel().await.unwrap();
    eventually("the new event is spooled too", || async {
        counter(&second.metrics().await, "perfecx_events_spooled_total") >= 1.0
    })
    .await;

    // The control plane comes back on the same port.
    let cp = ControlPlane::start(TcpListener::bind(addr).await.unwrap(), &db).await;
    eventually("every spooled event arrives", || async {
        let m = cp.metrics(AGENT).await;
        m["total_requests"] == 4 && m["policy_violations"] == 1
    })
    .await;
    eventually("the spool is emptied", || async {
        counter(&second.metrics().await, "perfecx_event_spool_bytes") == 0.0
    })
    .await;
    let metrics = second.metrics().await;
    second.stop().await;
    assert_eq!(
        counter(&metrics, "perfecx_events_sent_total"),
        5.0,
        "{metrics}"
    );
    assert!(
        !metrics.contains("perfecx_events_dropped_total{"),
        "{metrics}"
    );
    // Besides the events' segments, the spool directory keeps the last policy bundle, which the
    // control plane pushed when it came back.
    let left: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name != "policy-bundle.json")
        .collect();
    assert!(left.is_empty(), "delivered segments are deleted: {left:?}");

    let events = stored_events(&db, AGENT).await;
    assert_eq!(events.len(), 5, "each event once: {events:#?}");
    let ids: HashSet<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids.len(), 5);
    let m: Value = cp.metrics(AGENT).await;
    assert_eq!(m["total_requests"], 4, "{m}");
    mcp_ct.cancel();
    cp.stop().await;
}

#[test]
fn the_sidecar_refuses_to_start_without_its_token_and_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sidecar.yaml");
    let var = "PERFECX_TEST_AGENT_TOKEN_NOT_SET";
    std::fs::write(
        &config,
        format!(
            "agent_id: a1\nlisten: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\ncontrol_plane:\n  url: http://127.0.0.1:9\n  token_env: {var}\n"
        ),
    )
    .unwrap();
    let run = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_perfecx"));
        cmd.args(["sidecar", "--config"])
            .arg(&config)
            .env_remove(var);
        if let Some(t) = token {
            cmd.env(var, t);
        }
        cmd.output().unwrap()
    };
    for token in [None, Some("  ")] {
        let out = run(token);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(var), "{stderr}");
        assert!(stderr.contains("control_plane.token_env"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_delivered_is_counted_not_retried_for_ever() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start_on_free_port(&dir.path().join("cp.db")).await;
    cp.register(AGENT).await;
    let (mcp_url, mcp_ct) = mcp_server(true).await;
    let upstreams = format!("  - name: tools\n    mcp_url: {mcp_url}\n");
    let policies = [("safety.yaml", STRICT)];

    // A token the control plane does not know: 401, a permanent refusal.
    let spool = dir.path().join("spool-rejected");
    let sidecar = start_sidecar(
        &policies,
        &upstreams,
        &reporting(&cp.base, &spool),
        "agt_wrong",
    )
    .await;
    let agent = client(&sidecar.mcp_url("tools")).await;
    assert_eq!(
        text(&call(&agent, "add", json!({"a": 1, "b": 1})).await),
        "2"
    );
    agent.cancel().await.unwrap();
    eventually("the refused event is counted", || async {
        metric(
            &sidecar.metrics().await,
            r#"perfecx_events_dropped_total{reason="rejected"}"#,
        ) == Some(1.0)
    })
    .await;
    let metrics = sidecar.metrics().await;
    sidecar.stop().await;
    assert_eq!(
        counter(&metrics, "perfecx_events_spooled_total"),
        0.0,
        "not retried: {metrics}"
    );
    assert_eq!(counter(&metrics, "perfecx_events_sent_total"), 0.0);

    // The control plane down and a spool too small for anything: dropped, and counted.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let spool = dir.path().join("spool-full");
    let extra = format!("{}  spool_max_bytes: 10\n", reporting(&down, &spool));
    let sidecar = start_sidecar(&policies, &upstreams, &extra, "agt_unused").await;
    let agent = client(&sidecar.mcp_url("tools")).await;
    assert_eq!(
        text(&call(&agent, "add", json!({"a": 1, "b": 2})).await),
        "3"
    );
    agent.cancel().await.unwrap();
    eventually("the event that fits nowhere is counted", || async {
        metric(
            &sidecar.metrics().await,
            r#"perfecx_events_dropped_total{reason="spool_full"}"#,
        ) == Some(1.0)
    })
    .await;
    sidecar.stop().await;

    assert!(stored_events(&cp.db, AGENT).await.is_empty());
    mcp_ct.cancel();
    cp.stop().await;
}

/// `perfecx up` as a user runs it, on free ports: stopped (by its pid) when dropped.
struct Up {
    child: std::process::Child,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Up {
    fn start(dir: &Path) -> Up {
        use std::io::BufRead;
        let perfecx = env!("CARGO_BIN_EXE_perfecx");
        let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let config = dir.join("sidecar.yaml");
        std::fs::write(
            &config,
            format!(
                "agent_id: local-agent\nlisten: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\npolicy_dir: {}\nupstreams:\n  - name: demo\n    mcp_command: [{perfecx}, demo-tools]\n",
                policies.display()
            ),
        )
        .unwrap();
        let mut child = std::process::Command::new(perfecx)
            .args(["up", "--listen", "127.0.0.1:0", "--database"])
            .arg(format!("sqlite://{}", dir.join("up.db").display()))
            .arg("--sidecar-config")
            .arg(&config)
            .env("PERFECX_ADMIN_KEY", control_plane::ADMIN_KEY)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Up { child, stderr }
    }

    /// The URL after `label` in the banner, once it is printed.
    fn banner_url(&self, label: &str) -> Option<String> {
        let lines = self.stderr.lock().unwrap();
        let line = lines.iter().find(|l| l.trim_start().starts_with(label))?;
        let url = line.split_whitespace().find(|w| w.starts_with("http://"))?;
        Some(url.to_owned())
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perfecx_up_reports_to_its_own_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path());
    eventually("perfecx up prints where it listens", || async {
        up.banner_url("events").is_some()
    })
    .await;
    let (api, mcp) = (
        up.banner_url("control plane").unwrap(),
        up.banner_url("upstream").unwrap(),
    );
    let rpc = |body: Value| {
        let mcp = mcp.clone();
        async move {
            let res = reqwest::Client::new()
                .post(mcp)
                .header("accept", "application/json, text/event-stream")
                .json(&body)
                .send()
                .await
                .unwrap();
            res.json::<Value>().await.unwrap()
        }
    };
    rpc(json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}})).await;
    let allowed = rpc(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "calculator", "arguments": {"expression": "6 * 7"}}})).await;
    assert_eq!(allowed["result"]["content"][0]["text"], "42", "{allowed}");
    let blocked = rpc(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "system_command", "arguments": {"command": "ls"}}})).await;
    assert_eq!(blocked["result"]["isError"], true, "{blocked}");

    let metrics_url = format!("{}/agents/local-agent/metrics", api.trim_end_matches('/'));
    let metrics = || async {
        reqwest::Client::new()
            .get(&metrics_url)
            .bearer_auth(control_plane::ADMIN_KEY)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    eventually(
        "the control plane of perfecx up counts the calls",
        || async {
            let m = metrics().await;
            m["metrics"]["total_requests"] == 1
                && m["metrics"]["security_events"]["unauthorized_tool_access"]
                    .as_u64()
                    .is_some_and(|n| n >= 1)
        },
    )
    .await;

    // Stopped as Ctrl-C would: the sidecar first, then the control plane, and cleanly.
    let pid = nix::unistd::Pid::from_raw(up.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = up.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "perfecx up did not stop: {}",
            up.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}: {}", up.log());
}

/// tokio itself panics on such a value; the sidecar warns and uses one thread per CPU.
#[test]
fn a_worker_thread_count_that_is_not_a_number_is_a_warning_not_a_crash() {
    use std::io::{Read, Write};

    let dir = tempfile::tempdir().unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (listen, admin) = (free(), free());
    let config = dir.path().join("sidecar.yaml");
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    std::fs::write(
        &config,
        format!(
            "agent_id: a1\nlisten: {listen}\nadmin_listen: {admin}\npolicy_dir: {}\n",
            policies.display()
        ),
    )
    .unwrap();
    let mut sidecar = std::process::Command::new(env!("CARGO_BIN_EXE_perfecx"))
        .args(["sidecar", "--config"])
        .arg(&config)
        .env("TOKIO_WORKER_THREADS", "two")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ready = || -> Option<String> {
        let mut s = std::net::TcpStream::connect(admin).ok()?;
        s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).ok()?;
        Some(answer)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let answer = loop {
        match ready() {
            Some(answer) => break answer,
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            None => break String::new(),
        }
    };
    sidecar.kill().unwrap();
    let out = sidecar.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer:?}\n{stderr}");
    assert!(
        stderr.contains("TOKIO_WORKER_THREADS is not a positive number"),
        "{stderr}"
    );
}
