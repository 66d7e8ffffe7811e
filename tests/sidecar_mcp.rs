//! End-to-end: an rmcp client calls rmcp tools through the sidecar over real sockets.

mod common;

use common::*;
use serde_json::json;

async fn through_sidecar(json_response: bool) {
    let (upstream, ct) = mcp_server(json_response).await;
    let sidecar = Sidecar::start(
        &[("safety.yaml", SAFETY)],
        &format!("  - name: tools\n    mcp_url: {upstream}\n"),
    )
    .await;
    let client = client(&sidecar.mcp_url("tools")).await;

    // tools/list hides the forbidden tool.
    let tools = client.list_all_tools().await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| &*t.name).collect();
    assert!(
        names.contains(&"add") && names.contains(&"echo"),
        "{names:?}"
    );
    assert!(!names.contains(&"shell"), "shell must be hidden: {names:?}");

    // Allowed.
    let r = call(&client, "add", json!({"a": 1, "b": 2})).await;
    assert!(!is_error(&r), "{r:?}");
    assert_eq!(text(&r), "3");

    // Forbidden tool: answered by the sidecar, naming policy and rule.
    let r = call(&client, "shell", json!({"command": "ls"})).await;
    assert!(is_error(&r));
    let t = text(&r);
    assert!(
        t.contains("`safety`") && t.contains("tool_restriction"),
        "{t}"
    );

    // Forbidden content, disguised: case, spacing and a zero-width character.
    let r = call(&client, "echo", json!({"text": "please RM \u{200B} -RF /"})).await;
    assert!(is_error(&r), "evasion must be caught: {r:?}");
    assert!(text(&r).contains("content_filter"), "{}", text(&r));

    // Sensitive data in the output is redacted before the agent sees it.
    let r = call(&client, "leak", json!({})).await;
    let t = text(&r);
    assert!(!t.contains("AKIAIOSFODNN7EXAMPLE"), "{t}");
    assert!(!t.contains("jane.doe@example.com"), "{t}");
    assert!(t.contains("[REDACTED:aws_access_key]"), "{t}");

    // The metrics saw it all.
    let m = sidecar.metrics().await;
    let allowed = r#"perfecx_tool_calls_total{decision="allowed",tool="add",upstream="tools"}"#;
    let blocked = r#"perfecx_tool_calls_total{decision="blocked",tool="shell",upstream="tools"}"#;
    let redacted = r#"perfecx_tool_calls_total{decision="redacted",tool="leak",upstream="tools"}"#;
    assert_eq!(metric(&m, allowed), Some(1.0), "{m}");
    assert_eq!(metric(&m, blocked), Some(1.0), "{m}");
    assert_eq!(metric(&m, redacted), Some(1.0), "{m}");
    assert!(
        metric(
            &m,
            r#"perfecx_policy_violations_total{policy="safety",rule="tool_restriction"}"#
        )
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
    assert_eq!(metric(&m, "perfecx_policy_synchronized"), Some(1.0));

    client.cancel().await.unwrap();
    sidecar.stop().await;
    ct.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_answers_are_judged() {
    through_sidecar(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_answers_are_judged_event_by_event() {
    through_sidecar(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tool_meets_the_deadline() {
    let (upstream, ct) = mcp_server(false).await;
    let policy = r#"
name: limits
rules:
  - type: execution_limit
    max_execution_time_ms: 300
"#;
    let sidecar = Sidecar::start(
        &[("limits.yaml", policy)],
        &format!("  - name: tools\n    mcp_url: {upstream}\n"),
    )
    .await;
    let client = client(&sidecar.mcp_url("tools")).await;
    let r = call(&client, "slow", json!({"ms": 10})).await;
    assert_eq!(text(&r), "done");
    let r = call(&client, "slow", json!({"ms": 5000})).await;
    assert!(is_error(&r));
    assert!(text(&r).contains("within 300 ms"), "{}", text(&r));
    let m = sidecar.metrics().await;
    assert!(
        metric(
            &m,
            r#"perfecx_policy_violations_total{policy="limits",rule="execution_limit"}"#
        )
        .is_some(),
        "{m}"
    );
    assert!(
        metric(
            &m,
            r#"perfecx_tool_call_errors_total{tool="slow",upstream="tools"}"#
        )
        .is_some()
    );
    client.cancel().await.unwrap();
    sidecar.stop().await;
    ct.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_valid_policies_calls_are_refused_until_they_are_fixed() {
    let (upstream, ct) = mcp_server(true).await;
    let sidecar = Sidecar::start(
        &[(
            "broken.yaml",
            "name: broken\nrules:\n  - type: no_such_rule\n",
        )],
        &format!("  - name: tools\n    mcp_url: {upstream}\n"),
    )
    .await;
    assert_eq!(sidecar.admin_get("/healthz").await.0, 200);
    let (status, body) = sidecar.admin_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    let (_, report) = sidecar.admin_get("/policies").await;
    assert!(
        report.contains("broken.yaml"),
        "the error names the file: {report}"
    );
    assert!(report.contains("no_such_rule"), "{report}");

    let client = client(&sidecar.mcp_url("tools")).await;
    let r = call(&client, "add", json!({"a": 1, "b": 2})).await;
    assert!(is_error(&r));
    assert!(text(&r).contains("no valid policy set"), "{}", text(&r));
    assert_eq!(
        metric(&sidecar.metrics().await, "perfecx_policy_synchronized"),
        Some(0.0)
    );

    // Fixing the file lets calls through, without a restart.
    write_policy(&sidecar.policy_dir, "broken.yaml", SAFETY);
    eventually("the fixed policy is loaded", || async {
        sidecar.admin_get("/readyz").await.0 == 200
    })
    .await;
    let r = call(&client, "add", json!({"a": 1, "b": 2})).await;
    assert_eq!(text(&r), "3");
    client.cancel().await.unwrap();
    sidecar.stop().await;
    ct.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_reload_and_a_bad_file_keeps_the_last_good_set() {
    let (upstream, ct) = mcp_server(true).await;
    let sidecar = Sidecar::start(
        &[("safety.yaml", SAFETY)],
        &format!("  - name: tools\n    mcp_url: {upstream}\n"),
    )
    .await;
    let client = client(&sidecar.mcp_url("tools")).await;
    assert_eq!(
        text(&call(&client, "add", json!({"a": 2, "b": 2})).await),
        "4"
    );

    // A new file takes effect.
    let no_add = "name: no-add\nrules:\n  - type: tool_restriction\n    forbidden_tools: [add]\n";
    write_policy(&sidecar.policy_dir, "no-add.yaml", no_add);
    eventually("add is forbidden", || async {
        is_error(&call(&client, "add", json!({"a": 2, "b": 2})).await)
    })
    .await;

    // A bad file is reported and changes nothing.
    write_policy(
        &sidecar.policy_dir,
        "no-add.yaml",
        "name: no-add\nrules: [oops\n",
    );
    eventually("the bad file is reported", || async {
        metric(&sidecar.metrics().await, "perfecx_policy_synchronized") == Some(0.0)
    })
    .await;
    let (_, report) = sidecar.admin_get("/policies").await;
    assert!(report.contains("no-add.yaml"), "{report}");
    let r = call(&client, "add", json!({"a": 2, "b": 2})).await;
    assert!(is_error(&r), "the last good set still forbids add");
    assert!(text(&r).contains("`no-add`"), "{}", text(&r));
    let m = sidecar.metrics().await;
    assert!(
        metric(&m, r#"perfecx_policy_reloads_total{result="failure"}"#).is_some(),
        "{m}"
    );

    // Removing it goes back to the first set.
    std::fs::remove_file(sidecar.policy_dir.join("no-add.yaml")).unwrap();
    eventually("add is allowed again", || async {
        !is_error(&call(&client, "add", json!({"a": 2, "b": 2})).await)
    })
    .await;
    assert_eq!(
        metric(&sidecar.metrics().await, "perfecx_policy_synchronized"),
        Some(1.0)
    );
    client.cancel().await.unwrap();
    sidecar.stop().await;
    ct.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_server_over_stdio_is_spawned_served_and_restarted() {
    let exe = stdio_server_path();
    let memory = "name: memory\nrules:\n  - type: execution_limit\n    max_memory_mb: 2048\n";
    let sidecar = Sidecar::start(
        &[("safety.yaml", SAFETY), ("memory.yaml", memory)],
        &format!("  - name: local\n    mcp_command: [{}]\n", exe.display()),
    )
    .await;
    let client = client(&sidecar.mcp_url("local")).await;
    let names: Vec<String> = client
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    assert!(names.contains(&"add".to_owned()) && !names.contains(&"shell".to_owned()));
    assert_eq!(
        text(&call(&client, "add", json!({"a": 40, "b": 2})).await),
        "42"
    );
    assert!(is_error(
        &call(&client, "shell", json!({"command": "ls"})).await
    ));
    let t = text(&call(&client, "leak", json!({})).await);
    assert!(t.contains("[REDACTED:aws_access_key]"), "{t}");
    // The agent's `notifications/initialized` reached the process (servers act on it: roots,
    // tools that depend on the client's capabilities).
    assert_eq!(text(&call(&client, "initialized", json!({})).await), "told");

    // The process dies with the call in flight: that call gets an error, the next one a new
    // process (the session carries on).
    let first_pid = text(&call(&client, "pid", json!({})).await);
    // It runs under the address-space limit of max_memory_mb, in its own process group.
    let limits = std::fs::read_to_string(format!("/proc/{first_pid}/limits")).unwrap();
    let address_space = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))
        .unwrap();
    assert!(
        address_space.contains(&(2048u64 << 20).to_string()),
        "{address_space}"
    );
    let stat = std::fs::read_to_string(format!("/proc/{first_pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        fields[2], first_pid,
        "the process leads its own group: {stat}"
    );
    let crashed = client
        .call_tool(rmcp::model::CallToolRequestParams::new("crash"))
        .await;
    match crashed {
        Ok(r) => assert!(is_error(&r), "{r:?}"),
        Err(e) => assert!(e.to_string().contains("exited"), "{e}"),
    }
    let start = std::time::Instant::now();
    let second_pid = loop {
        assert!(start.elapsed() < PATIENCE, "the process was not restarted");
        if let Ok(r) = client
            .call_tool(rmcp::model::CallToolRequestParams::new("pid"))
            .await
        {
            if !is_error(&r) {
                break text(&r);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_ne!(first_pid, second_pid);
    // The restarted process was initialized and told so by the replay.
    assert_eq!(text(&call(&client, "initialized", json!({})).await), "told");
    let pid: i32 = second_pid.parse().unwrap();
    client.cancel().await.unwrap();
    sidecar.stop().await;
    // Killed with the sidecar.
    eventually("the tool process is gone", || async move {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    })
    .await;
}

/// The `mcp_test_server` example, built once per test binary: `cargo test --test ...` and
/// runners that build only tests (nextest) leave it missing or stale, and a stale one would test
/// old tools without a word.
fn stdio_server_path() -> std::path::PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join("mcp_test_server");
    BUILT.call_once(|| {
        let mut build = std::process::Command::new(env!("CARGO"));
        build
            .args(["build", "--quiet", "--example", "mcp_test_server"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        assert!(
            build.status().unwrap().success(),
            "building mcp_test_server failed"
        );
    });
    assert!(path.exists(), "{} is missing", path.display());
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_fails_while_policies_reload() {
    let (upstream, ct) = mcp_server(true).await;
    let sidecar = Sidecar::start(
        &[("safety.yaml", SAFETY)],
        &format!("  - name: tools\n    mcp_url: {upstream}\n"),
    )
    .await;
    let client = client(&sidecar.mcp_url("tools")).await;
    let dir = sidecar.policy_dir.clone();
    let writer = tokio::spawn(async move {
        for i in 0..20 {
            let text = format!(
                "name: churn\nrules:\n  - type: content_filter\n    forbidden_patterns: [\"word{i}\"]\n"
            );
            write_policy(&dir, "churn.yaml", &text);
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
    });
    let mut calls = 0;
    while !writer.is_finished() || calls < 20 {
        let r = call(&client, "add", json!({"a": calls, "b": 1})).await;
        assert!(!is_error(&r), "call {calls} failed during a reload: {r:?}");
        assert_eq!(text(&r), (calls + 1).to_string());
        calls += 1;
    }
    writer.await.unwrap();
    client.cancel().await.unwrap();
    sidecar.stop().await;
    ct.cancel();
}

/// Posts one JSON-RPC message as an agent that takes JSON or an event stream; returns the
/// answer's content type and body.
async fn post_mcp(url: &str, msg: serde_json::Value) -> (String, String) {
    post_mcp_in(url, None, msg).await
}

/// Posts one JSON-RPC message, in `session` if given, as an agent that takes JSON or an event
/// stream; returns the answer (its body unread).
async fn send_mcp(url: &str, session: Option<&str>, msg: serde_json::Value) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if let Some(session) = session {
        req = req.header("mcp-session-id", session);
    }
    req.body(msg.to_string()).send().await.unwrap()
}

/// [`post_mcp`] in `session`.
async fn post_mcp_in(url: &str, session: Option<&str>, msg: serde_json::Value) -> (String, String) {
    let res = send_mcp(url, session, msg).await;
    let ty = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (ty, res.text().await.unwrap())
}

/// The JSON messages of an event-stream body, in order (events without data left out).
fn stream_messages(body: &str) -> Vec<serde_json::Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect()
}

/// A sidecar running the test server over stdio as `local`, initialized over raw HTTP; and the
/// URL to post MCP messages to.
async fn initialized_stdio_sidecar() -> (Sidecar, String) {
    let (sidecar, url) = stdio_sidecar().await;
    post_mcp(&url, initialize_as("raw")).await;
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    post_mcp(&url, note).await;
    (sidecar, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_of_a_stdio_server_reaches_the_agent_that_asked_for_it() {
    let (sidecar, url) = initialized_stdio_sidecar().await;

    // Two agents share the process and happen to pick the same request id and progress token:
    // each gets its own progress, with its own token, on the stream that answers its POST,
    // before the result (official SDK clients open no GET stream without a session id).
    let ask = || {
        let msg = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
            "name": "progress", "arguments": {}, "_meta": {"progressToken": "mine"}}});
        post_mcp(&url, msg)
    };
    let (a, b) = tokio::join!(ask(), ask());
    for (ty, body) in [a, b] {
        assert!(ty.starts_with("text/event-stream"), "{ty}: {body}");
        let msgs = stream_messages(&body);
        let progress: Vec<_> = msgs
            .iter()
            .filter(|m| m["method"] == "notifications/progress")
            .collect();
        assert_eq!(progress.len(), 3, "{body}");
        for (i, p) in progress.iter().enumerate() {
            assert_eq!(p["params"]["progressToken"], "mine", "{body}");
            assert_eq!(p["params"]["progress"], json!((i + 1) as f64), "{body}");
        }
        let last = msgs.last().unwrap();
        assert_eq!(last["id"], 7, "{body}");
        assert_eq!(last["result"]["content"][0]["text"], "done", "{body}");
    }

    // Without a progress token the answer stays plain JSON.
    let msg = json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {
        "name": "add", "arguments": {"a": 1, "b": 2}}});
    let (ty, body) = post_mcp(&url, msg).await;
    assert!(ty.starts_with("application/json"), "{ty}: {body}");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_reaches_only_the_request_it_names() {
    let (sidecar, url) = initialized_stdio_sidecar().await;
    let slow = |id: u64| {
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
            "name": "slow", "arguments": {"ms": 1500}}});
        tokio::spawn(post_mcp_owned(url.clone(), msg))
    };
    let cancel = |id: u64| {
        post_mcp(
            &url,
            json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                "params": {"requestId": id}}),
        )
    };

    // The process numbers requests 1, 2, ... in its own way: another agent cancelling its own
    // requests, long finished, must not stop this agent's request 7, whatever its number there.
    let call = slow(7);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for id in (1..=20).filter(|&id| id != 7) {
        cancel(id).await;
    }
    let answered = tokio::time::timeout(PATIENCE, call).await;
    let (_, body) = answered.expect("the request was cancelled").unwrap();
    assert!(body.contains("\"done\""), "{body}");

    // The agent cancelling its own request 8 stops it: the server does not answer a cancelled
    // request, so no "done" comes once the tool would have finished.
    let call = slow(8);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    cancel(8).await;
    let answered = tokio::time::timeout(std::time::Duration::from_millis(3000), call).await;
    if let Ok(answer) = answered {
        let (_, body) = answer.unwrap();
        assert!(!body.contains("\"done\""), "{body}");
    }
    sidecar.stop().await;
}

async fn post_mcp_owned(url: String, msg: serde_json::Value) -> (String, String) {
    post_mcp(&url, msg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_in_different_sessions_cancel_only_their_own_requests() {
    let (sidecar, url) = initialized_stdio_sidecar().await;
    // Each agent gets a session id of its own from `initialize`.
    let mut sessions = Vec::new();
    for name in ["a", "b"] {
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": name, "version": "1"}}});
        let res = send_mcp(&url, None, init).await;
        let id = res.headers().get("mcp-session-id").expect("a session id");
        sessions.push(id.to_str().unwrap().to_owned());
    }
    assert_ne!(sessions[0], sessions[1]);

    // Both agents have a request 9 in flight; the first cancels its own.
    let slow = |session: String| {
        let msg = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
            "name": "slow", "arguments": {"ms": 3000}}});
        let url = url.clone();
        tokio::spawn(async move { post_mcp_in(&url, Some(&session), msg).await })
    };
    let (a, b) = (slow(sessions[0].clone()), slow(sessions[1].clone()));
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": {"requestId": 9}});
    post_mcp_in(&url, Some(&sessions[0]), cancel).await;
    let (_, b) = tokio::time::timeout(PATIENCE, b).await.unwrap().unwrap();
    assert!(b.contains("\"done\""), "{b}");
    if let Ok(a) = tokio::time::timeout(std::time::Duration::from_millis(1000), a).await {
        let (_, a) = a.unwrap();
        assert!(!a.contains("\"done\""), "{a}");
    }

    // A session holds nothing to end: the process is shared.
    let res = reqwest::Client::new()
        .delete(&url)
        .header("mcp-session-id", &sessions[0])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    let add = json!({"jsonrpc": "2.0", "id": 10, "method": "tools/call", "params": {
        "name": "add", "arguments": {"a": 1, "b": 2}}});
    let (_, body) = post_mcp_in(&url, Some(&sessions[1]), add).await;
    assert!(body.contains("\"3\""), "{body}");
    sidecar.stop().await;
}

/// Posts `msg` and returns its answer, which must begin, as an event stream, while the call runs.
async fn event_stream_answer(url: &str, msg: serde_json::Value) -> reqwest::Response {
    let res = tokio::time::timeout(PATIENCE, send_mcp(url, None, msg))
        .await
        .expect("the answer begins while the call runs");
    let ty = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ty.starts_with("text/event-stream"), "{ty}");
    res
}

/// Reads the event stream `res` into `body` up to the server's `roots/list` request; returns it.
async fn read_until_roots_question(
    res: &mut reqwest::Response,
    body: &mut String,
) -> serde_json::Value {
    loop {
        let chunk = tokio::time::timeout(PATIENCE, res.chunk())
            .await
            .expect("the server's question comes")
            .unwrap()
            .expect("the stream is still open");
        body.push_str(std::str::from_utf8(&chunk).unwrap());
        if let Some(q) = stream_messages(body)
            .into_iter()
            .find(|m| m["method"] == "roots/list")
        {
            return q;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_servers_own_messages_reach_the_agent_whose_call_waits() {
    let (sidecar, url) = initialized_stdio_sidecar().await;
    // The server logs and asks for the roots while the call runs: both come on the stream that
    // answers the call, and the agent's answer to the question reaches the server.
    let call = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {
        "name": "roots", "arguments": {}}});
    let mut res = event_stream_answer(&url, call).await;
    let mut body = String::new();
    let question = read_until_roots_question(&mut res, &mut body).await;
    let log = &stream_messages(&body)[0];
    assert_eq!(log["method"], "notifications/message", "{body}");
    assert_eq!(log["params"]["data"], "asking for roots", "{body}");

    let reply = json!({"jsonrpc": "2.0", "id": question["id"], "result": {
        "roots": [{"uri": "file:///srv", "name": "srv"}]}});
    let (_, accepted) = post_mcp(&url, reply).await;
    assert_eq!(accepted, "");
    let rest = tokio::time::timeout(PATIENCE, res.text())
        .await
        .expect("the call is answered")
        .unwrap();
    let msgs = stream_messages(&rest);
    let last = msgs.last().expect("the answer");
    assert_eq!(last["id"], 5, "{rest}");
    assert_eq!(last["result"]["content"][0]["text"], "1 roots", "{rest}");
    sidecar.stop().await;
}

/// Posts a call as an agent that takes only JSON; returns the answer's body.
async fn post_json_only(url: String, msg: serde_json::Value) -> String {
    let res = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(msg.to_string())
        .send()
        .await
        .unwrap();
    res.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_servers_question_goes_to_no_other_agent() {
    let (sidecar, url) = initialized_stdio_sidecar().await;
    // Agent B waits for a slow call, and could take an event stream.
    let slow = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "slow", "arguments": {"ms": 2000}}});
    let b = tokio::spawn(post_mcp_owned(url.clone(), slow));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Agent A, which takes only JSON, calls a tool that asks for roots: two calls wait, so the
    // question cannot be told to belong to either, and goes to neither's answer.
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "roots", "arguments": {}}});
    let a = tokio::spawn(post_json_only(url.clone(), call));
    let (ty, body) = tokio::time::timeout(PATIENCE, b).await.unwrap().unwrap();
    assert!(ty.starts_with("application/json"), "{ty}: {body}");
    assert!(
        !body.contains("roots/list"),
        "agent B got agent A's question: {body}"
    );
    assert!(body.contains("\"done\""), "{body}");
    // Nobody could hear the question: the server is told so in time, and A's call ends.
    let a = tokio::time::timeout(PATIENCE, a).await.unwrap().unwrap();
    assert!(
        a.contains("no roots") && a.contains("no agent can answer"),
        "{a}"
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_gets_the_question_asked_while_its_requests_are_written() {
    let (sidecar, url) = initialized_stdio_sidecar().await;
    // The first call asks at once, while the sidecar still writes the other 299.
    let mut batch = vec![
        json!({"jsonrpc": "2.0", "id": 0, "method": "tools/call", "params": {
        "name": "roots", "arguments": {}}}),
    ];
    for i in 1..300 {
        batch.push(
            json!({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {
            "name": "add", "arguments": {"a": i, "b": 1}}}),
        );
    }
    let mut res = event_stream_answer(&url, json!(batch)).await;
    let mut body = String::new();
    let question = read_until_roots_question(&mut res, &mut body).await;
    assert_eq!(
        stream_messages(&body)[0]["method"],
        "notifications/message",
        "{body}"
    );
    let reply = json!({"jsonrpc": "2.0", "id": question["id"], "result": {"roots": []}});
    post_mcp(&url, reply).await;
    let rest = tokio::time::timeout(PATIENCE, res.text())
        .await
        .unwrap()
        .unwrap();
    body.push_str(&rest);
    let answers: Vec<_> = stream_messages(&body)
        .into_iter()
        .filter(|m| m.get("result").is_some())
        .collect();
    assert_eq!(answers.len(), 300, "{body}");
    assert_eq!(
        answers[0]["result"]["content"][0]["text"], "0 roots",
        "{body}"
    );
    sidecar.stop().await;
}

/// Opens the GET stream of the server's own messages, as an agent, and reads its opening.
async fn open_get_stream(url: &str) -> reqwest::Response {
    resume_get_stream(url, None).await.0
}

/// Opens the GET stream of the server's own messages, resuming after the event `last` if given.
/// Returns it with what it opened with, up to its priming event (an id, no data).
async fn resume_get_stream(url: &str, last: Option<u64>) -> (reqwest::Response, String) {
    let mut req = reqwest::Client::new()
        .get(url)
        .header("accept", "text/event-stream");
    if let Some(last) = last {
        req = req.header("last-event-id", last.to_string());
    }
    let mut res = req.send().await.unwrap();
    assert_eq!(res.status(), 200);
    let mut opening = String::new();
    while !opening.contains("\ndata: \n\n") {
        let chunk = tokio::time::timeout(PATIENCE, res.chunk())
            .await
            .expect("the stream opens")
            .unwrap()
            .expect("the stream is still open");
        opening.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    (res, opening)
}

/// The id of the priming event (an id, no data) that an event stream opened with.
fn priming_id(opening: &str) -> u64 {
    let event = opening
        .trim_end_matches('\n')
        .rsplit("\n\n")
        .next()
        .unwrap();
    assert!(event.ends_with("\ndata: "), "{opening}");
    let id = event.lines().find_map(|l| l.strip_prefix("id: "));
    id.unwrap_or_else(|| panic!("no id: {opening}"))
        .parse()
        .unwrap()
}

/// The id of the event of an event-stream body that carries the message `method`.
fn event_id_of(body: &str, method: &str) -> u64 {
    let event = body
        .split("\n\n")
        .find(|e| e.contains(&format!("\"method\":\"{method}\"")))
        .unwrap_or_else(|| panic!("no {method} in {body}"));
    let id = event.lines().find_map(|l| l.strip_prefix("id: "));
    id.unwrap_or_else(|| panic!("no id: {event}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_tool_list_reaches_every_agent_not_only_the_caller() {
    let (sidecar, url) = initialized_stdio_sidecar().await;
    // Another agent listens on its GET stream.
    let mut listening = open_get_stream(&url).await;
    let call = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "changed", "arguments": {}}});
    let (ty, body) = post_mcp(&url, call).await;
    assert!(ty.starts_with("application/json"), "{ty}: {body}");
    assert!(!body.contains("list_changed"), "{body}");
    let chunk = tokio::time::timeout(PATIENCE, listening.chunk())
        .await
        .expect("the GET stream hears of it")
        .unwrap()
        .unwrap();
    let heard = std::str::from_utf8(&chunk).unwrap();
    assert!(
        heard.contains("notifications/tools/list_changed"),
        "{heard}"
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_nobody_could_hear_waits_for_a_get_stream_for_a_while() {
    let (sidecar, url) = initialized_stdio_sidecar().await;
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "roots", "arguments": {}}});
    // No agent listens: the server gets an error rather than waiting for ever.
    let body = tokio::time::timeout(PATIENCE, post_json_only(url.clone(), call.clone()))
        .await
        .expect("the call ends");
    assert!(
        body.contains("no roots") && body.contains("no agent can answer"),
        "{body}"
    );

    // An agent that opens its GET stream a little later still gets the question.
    let asked = tokio::spawn(post_json_only(url.clone(), call));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (_listening, opening) = resume_get_stream(&url, None).await;
    let question = &stream_messages(&opening)[0];
    assert_eq!(question["method"], "roots/list", "{opening}");
    let reply = json!({"jsonrpc": "2.0", "id": question["id"], "result": {
        "roots": [{"uri": "file:///srv", "name": "srv"}]}});
    post_mcp(&url, reply).await;
    let body = tokio::time::timeout(PATIENCE, asked)
        .await
        .unwrap()
        .unwrap();
    assert!(body.contains("1 roots"), "{body}");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_tokens_of_an_agent_that_takes_only_json_reach_no_one() {
    let (sidecar, url) = initialized_stdio_sidecar().await;
    // Agent X waits for a slow call, with a progress token, on an event stream.
    let slow = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "slow", "arguments": {"ms": 1500}, "_meta": {"progressToken": "x"}}});
    let x = tokio::spawn(post_mcp_owned(url.clone(), slow));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Agent J, which takes only JSON, asks for progress under tokens that may be the numbers the
    // process knows X's request by.
    let batch: Vec<_> = (1..=20)
        .map(|token| {
            json!({"jsonrpc": "2.0", "id": token, "method": "tools/call", "params": {
                "name": "progress", "arguments": {}, "_meta": {"progressToken": token}}})
        })
        .collect();
    let j = tokio::time::timeout(PATIENCE, post_json_only(url.clone(), json!(batch)))
        .await
        .expect("J is answered");
    assert!(!j.contains("notifications/progress"), "{j}");
    let (_, x) = tokio::time::timeout(PATIENCE, x).await.unwrap().unwrap();
    assert!(
        !x.contains("notifications/progress"),
        "X got J's progress: {x}"
    );
    assert!(x.contains("\"done\""), "{x}");
    sidecar.stop().await;
}

/// An `initialize` as the agent `client` sends it.
fn initialize_as(client: &str) -> serde_json::Value {
    json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": client, "version": "1"}}})
}

/// A sidecar running the test server over stdio as `local`, not yet initialized; and the URL to
/// post MCP messages to.
async fn stdio_sidecar() -> (Sidecar, String) {
    let exe = stdio_server_path();
    let sidecar = Sidecar::start(
        &[("safety.yaml", SAFETY)],
        &format!("  - name: local\n    mcp_command: [{}]\n", exe.display()),
    )
    .await;
    let url = sidecar.mcp_url("local");
    (sidecar, url)
}

/// Tells the test server behind `url` that the agent is initialized; then says how many times
/// it was asked to initialize.
async fn initializations_once_initialized(url: &str) -> String {
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    post_mcp(url, note).await;
    initializations(url).await
}

/// How many times the test server behind `url` was asked to initialize.
async fn initializations(url: &str) -> String {
    let call = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
        "name": "initializations", "arguments": {}}});
    let (_, body) = post_mcp(url, call).await;
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    answer["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_owned()
}

/// Whom the test server says it answered, in the instructions of an `initialize` answer.
fn answered_for(answer: &str) -> String {
    let answer: serde_json::Value = serde_json::from_str(answer).unwrap();
    let instructions = answer["result"]["instructions"].as_str();
    instructions
        .unwrap_or_else(|| panic!("{answer}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_that_initialize_at_once_initialize_the_stdio_server_once() {
    let (sidecar, url) = stdio_sidecar().await;
    // The server takes a second to answer the first agent; the second comes meanwhile and gets
    // the first's answer.
    let first = tokio::spawn(post_mcp_owned(url.clone(), initialize_as("slow")));
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let (_, second) = post_mcp(&url, initialize_as("quick")).await;
    let (_, first) = tokio::time::timeout(PATIENCE, first)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answered_for(&first), "answered for slow");
    assert_eq!(answered_for(&second), "answered for slow");
    assert_eq!(initializations_once_initialized(&url).await, "1");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initialize_whose_agent_hung_up_still_answers_the_next_agent() {
    let (sidecar, url) = stdio_sidecar().await;
    // The first agent gives up before the server answers (after a second).
    let gave_up = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(initialize_as("slow").to_string())
        .timeout(std::time::Duration::from_millis(500))
        .send()
        .await;
    assert!(gave_up.is_err(), "{gave_up:?}");
    // The next agent comes while the server still works on the first's: it gets that answer.
    let (_, answer) = post_mcp(&url, initialize_as("next")).await;
    assert_eq!(answered_for(&answer), "answered for slow");
    assert_eq!(initializations_once_initialized(&url).await, "1");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_waiting_to_initialize_a_stdio_server_that_dies_is_told_so() {
    let (sidecar, url) = stdio_sidecar().await;
    // The server exits while it initializes for the first agent; the second waits meanwhile.
    let first = tokio::spawn(post_mcp_owned(url.clone(), initialize_as("fatal")));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let second = tokio::time::timeout(PATIENCE, post_mcp(&url, initialize_as("next")))
        .await
        .expect("the waiting agent is answered");
    assert!(second.1.contains("exited"), "{second:?}");
    let (_, first) = tokio::time::timeout(PATIENCE, first)
        .await
        .unwrap()
        .unwrap();
    assert!(first.contains("exited before answering"), "{first}");
    // The restarted server is initialized by the next agent.
    let (_, third) = post_mcp(&url, initialize_as("third")).await;
    assert_eq!(answered_for(&third), "answered for third");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_stream_that_resumes_gets_the_questions_it_missed() {
    let (sidecar, url) = initialized_stdio_sidecar().await;
    let (mut first, opening) = resume_get_stream(&url, None).await;
    let primed = priming_id(&opening);
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "roots", "arguments": {}}});
    // An agent that takes only JSON: the question goes to the GET stream.
    let asked = tokio::spawn(post_json_only(url.clone(), call));
    let mut heard = String::new();
    let question = read_until_roots_question(&mut first, &mut heard).await;
    let event = event_id_of(&heard, "roots/list");
    assert!(event > primed, "{primed} then {heard}");
    // The stream breaks (say, before the question got through); the agent resumes from the
    // last event it got, the priming one.
    drop(first);
    let (mut resumed, opening) = resume_get_stream(&url, Some(primed)).await;
    assert_eq!(event_id_of(&opening, "roots/list"), event);
    assert_eq!(stream_messages(&opening), std::slice::from_ref(&question));
    assert!(priming_id(&opening) >= event, "{opening}");
    // Resumed from the question's own event, a stream does not get it again.
    let (_, opening) = resume_get_stream(&url, Some(event)).await;
    assert!(stream_messages(&opening).is_empty(), "{opening}");

    let reply = json!({"jsonrpc": "2.0", "id": question["id"], "result": {
        "roots": [{"uri": "file:///srv", "name": "srv"}]}});
    post_mcp(&url, reply.clone()).await;
    // Another agent that heard the question and answers it too is not heard by the server.
    let (_, accepted) = post_mcp(&url, reply).await;
    assert_eq!(accepted, "");
    let body = tokio::time::timeout(PATIENCE, asked)
        .await
        .unwrap()
        .unwrap();
    assert!(body.contains("1 roots"), "{body}");
    // Answered, the question is not given to a stream that resumes from before it.
    let (_, opening) = resume_get_stream(&url, Some(primed)).await;
    assert!(stream_messages(&opening).is_empty(), "{opening}");
    // Nor sent again on the stream that was open.
    let nothing = tokio::time::timeout(std::time::Duration::from_millis(300), resumed.chunk());
    assert!(nothing.await.is_err());
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_server_that_gives_up_on_its_question_says_so_where_it_asked() {
    let (sidecar, url) = initialized_stdio_sidecar().await;
    // Another agent listens on its GET stream: the cancellation is not for it.
    let mut listening = open_get_stream(&url).await;
    let call = json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {
        "name": "impatient", "arguments": {}}});
    let mut res = event_stream_answer(&url, call).await;
    let mut body = String::new();
    let question = read_until_roots_question(&mut res, &mut body).await;
    let rest = tokio::time::timeout(PATIENCE, res.text())
        .await
        .expect("the call is answered")
        .unwrap();
    let msgs = stream_messages(&rest);
    assert_eq!(msgs[0]["method"], "notifications/cancelled", "{rest}");
    assert_eq!(msgs[0]["params"]["requestId"], question["id"], "{rest}");
    let last = msgs.last().unwrap();
    assert_eq!(last["id"], 4, "{rest}");
    let text = last["result"]["content"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("gave up"), "{rest}");
    // Answered late, the question is not the process's any more: the answer goes nowhere.
    let reply = json!({"jsonrpc": "2.0", "id": question["id"], "result": {"roots": []}});
    let (_, accepted) = post_mcp(&url, reply).await;
    assert_eq!(accepted, "");
    let heard =
        tokio::time::timeout(std::time::Duration::from_millis(300), listening.chunk()).await;
    assert!(heard.is_err(), "the GET stream heard {heard:?}");
    sidecar.stop().await;
}
