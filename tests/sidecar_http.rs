//! End-to-end: plain HTTP tools at `/tools/{name}/...` against a small upstream.

mod common;

use std::time::Duration;

use axum::routing::{get, post};
use common::*;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

async fn tool_server() -> (String, CancellationToken) {
    let router =
        axum::Router::new()
            .route(
                "/api/search",
                post(|body: String| async move { axum::Json(json!({"echo": body})) }),
            )
            .route(
                "/api/search",
                get(|uri: axum::http::Uri| async move {
                    format!("query {}", uri.query().unwrap_or(""))
                }),
            )
            .route(
                "/api/leak",
                get(|| async { axum::Json(json!({"key": "AKIAIOSFODNN7EXAMPLE", "ok": true})) }),
            )
            .route("/api/", get(|| async { "index" }))
            // JSON under another label: the agent may parse it all the same.
            .route(
                "/api/nan",
                get(|| async {
                    (
                        [("content-type", "application/json")],
                        "\u{feff}{\"score\":NaN,\"mail\":\"jane.doe@acme-corp.io\"}",
                    )
                }),
            )
            .route(
                "/api/plain-json",
                get(|| async { r#"{"key":"\u0041KIAIOSFODNN7EXAMPLE"}"# }),
            )
            .route(
                "/api/moved",
                get(|| async {
                    (
                        axum::http::StatusCode::TEMPORARY_REDIRECT,
                        [("location", "http://127.0.0.1:1/elsewhere")],
                        "moved",
                    )
                }),
            )
            .route("/api/huge", get(|| async { "y".repeat(8192) }))
            // Labelled compressed although nobody asked: the agent would decode what the
            // sidecar never read (these bytes pass for deflate data written in ASCII).
            .route(
                "/api/zipped",
                get(|| async { ([("content-encoding", "deflate")], "x1Y2z3w4") }),
            )
            .route(
                "/api/empty",
                get(|| async { ([("content-type", "application/json")], "") }),
            )
            .route(
                "/api/pause",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "paused"
                }),
            )
            .route(
                "/api/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    "late"
                }),
            );
    let ct = CancellationToken::new();
    let url = serve(router, ct.clone()).await;
    (format!("{url}/api"), ct)
}

/// The test tool as `web` behind a sidecar with the `safety` policy and `extra` configuration.
async fn web_sidecar(extra: &str) -> (Sidecar, CancellationToken) {
    let (url, ct) = tool_server().await;
    let sidecar = Sidecar::start_with(
        &[("safety.yaml", SAFETY)],
        &format!("  - name: web\n    http_url: {url}\n"),
        extra,
    )
    .await;
    (sidecar, ct)
}

const LIMITS: &str =
    "name: limits\nrules:\n  - type: execution_limit\n    max_execution_time_ms: 500\n";

async fn send(method: reqwest::Method, url: &str, body: Option<String>) -> (u16, String) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_tools_are_judged_both_ways() {
    let (url, ct) = tool_server().await;
    let sidecar = Sidecar::start_with(
        &[("safety.yaml", SAFETY), ("limits.yaml", LIMITS)],
        &format!("  - name: web\n    http_url: {url}\n  - name: shell\n    http_url: {url}\n"),
        "max_body_bytes: 2048",
    )
    .await;
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;

    let (status, body) = send(
        post.clone(),
        &sidecar.url("/tools/web/search"),
        Some(r#"{"q":"rust"}"#.into()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("rust"));

    let (status, body) = send(
        get.clone(),
        &sidecar.url("/tools/web/search?q=rust%20book"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "query q=rust%20book");

    // Blocked by content, in the body and in the query: 403 with a JSON error.
    let (status, body) = send(
        post.clone(),
        &sidecar.url("/tools/web/search"),
        Some(r#"{"q":"DROP  table users"}"#.into()),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["policy"], "safety");
    assert_eq!(err["error"]["rule"], "content_filter");
    let (status, _) = send(
        get.clone(),
        &sidecar.url("/tools/web/search?q=rm%20-rf%20%2F"),
        None,
    )
    .await;
    assert_eq!(status, 403);

    // Blocked by tool name.
    let (status, body) = send(get.clone(), &sidecar.url("/tools/shell/search"), None).await;
    assert_eq!(status, 403);
    assert!(body.contains("tool_restriction"), "{body}");

    // Output redacted, JSON kept valid.
    let (status, body) = send(get.clone(), &sidecar.url("/tools/web/leak"), None).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["key"], "[REDACTED:aws_access_key]");
    assert_eq!(v["ok"], true);

    // Deadline: 504.
    let (status, body) = send(get.clone(), &sidecar.url("/tools/web/slow"), None).await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("deadline_exceeded"), "{body}");

    // Over the cap: 413.
    let big = json!({"q": "x".repeat(4096)}).to_string();
    let (status, _) = send(post.clone(), &sidecar.url("/tools/web/search"), Some(big)).await;
    assert_eq!(status, 413);

    // A response over the cap: the tool failed, 502.
    let (status, body) = send(get.clone(), &sidecar.url("/tools/web/huge"), None).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("larger than the limit of 2048 bytes"),
        "{body}"
    );

    // Invalid UTF-8: 400.
    let res = reqwest::Client::new()
        .post(sidecar.url("/tools/web/search"))
        .body(vec![0xffu8, 0x00])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 400);

    let m = sidecar.metrics().await;
    assert!(
        metric(
            &m,
            r#"perfecx_tool_calls_total{decision="allowed",tool="web",upstream="web"}"#
        )
        .is_some(),
        "{m}"
    );
    assert!(
        metric(
            &m,
            r#"perfecx_tool_calls_total{decision="redacted",tool="web",upstream="web"}"#
        )
        .is_some(),
        "{m}"
    );
    assert!(
        metric(
            &m,
            r#"perfecx_tool_calls_total{decision="blocked",tool="web",upstream="web"}"#
        )
        .is_some(),
        "{m}"
    );
    sidecar.stop().await;
    ct.cancel();
}

/// Sensitive data in a call is redacted rather than blocked.
const REDACT: &str = "name: pii\nenforcement: strict\nrules:\n  - type: content_filter\n    sensitive_data_detection: true\n    sensitive_data_action: redact\n";

/// `+` and `%XX` as an agent's HTTP library writes arguments (`params=`, `data=`): judged as the
/// tool will read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_and_form_encoded_arguments_are_judged_as_the_tool_reads_them() {
    let (url, ct) = tool_server().await;
    let upstream = format!("  - name: web\n    http_url: {url}\n");
    let client = reqwest::Client::new();
    let call = |sidecar: &Sidecar, query: &str, form: Option<&'static str>| {
        let url = sidecar.url(&format!("/tools/web/search{query}"));
        let req = match form {
            Some(body) => client
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body),
            None => client.get(url),
        };
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    };

    let sidecar = Sidecar::start(&[("safety.yaml", SAFETY)], &upstream).await;
    for (query, form, found) in [
        (
            "?q=DROP+TABLE+users",
            None,
            "forbidden pattern `DROP TABLE`",
        ),
        ("", Some("q=rm+-rf+%2F"), "forbidden pattern `rm -rf`"),
        (
            "?to=jane.doe%40acme-corp.io",
            None,
            "sensitive data (email)",
        ),
        (
            "",
            Some("to=jane.doe%40acme-corp.io"),
            "sensitive data (email)",
        ),
    ] {
        let (status, body) = call(&sidecar, query, form).await;
        assert_eq!(status, 403, "{query} {form:?}: {body}");
        assert!(body.contains(found), "{query} {form:?}: {body}");
    }
    // Ordinary forms go through untouched.
    let (status, body) = call(&sidecar, "", Some("q=rust+books&n=3")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("q=rust+books&n=3"), "{body}");
    sidecar.stop().await;

    // Where sensitive data is redacted: not in a URL or a form, whose values are encoded; a
    // JSON string is redacted whole, the value's place in it being encoded too.
    let sidecar = Sidecar::start(&[("pii.yaml", REDACT)], &upstream).await;
    let (status, body) = call(&sidecar, "?to=jane.doe%40acme-corp.io", None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("the URL carries sensitive data"), "{body}");
    let (status, body) = call(&sidecar, "", Some("to=jane.doe%40acme-corp.io")).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("the form body carries sensitive data"),
        "{body}"
    );
    let (status, body) = send(
        reqwest::Method::POST,
        &sidecar.url("/tools/web/search"),
        Some(r#"{"to":"jane.doe%40acme-corp.io","q":"rust"}"#.into()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("acme-corp"), "{body}");
    assert!(body.contains(r#"\"to\":\"[REDACTED:email]\""#), "{body}");
    sidecar.stop().await;
    ct.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_tools_fail_closed() {
    let (url, ct) = tool_server().await;
    let sidecar = Sidecar::start(&[], &format!("  - name: web\n    http_url: {url}\n")).await;
    let (status, body) = send(
        reqwest::Method::GET,
        &sidecar.url("/tools/web/search"),
        None,
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no_policy"), "{body}");
    assert_eq!(sidecar.admin_get("/readyz").await.0, 503);
    sidecar.stop().await;
    ct.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permissive_deadline_reports_instead_of_cutting() {
    let (url, ct) = tool_server().await;
    let permissive = "name: watch\nenforcement: permissive\nrules:\n  - type: execution_limit\n    max_execution_time_ms: 100\n";
    let sidecar = Sidecar::start(
        &[("watch.yaml", permissive)],
        &format!("  - name: web\n    http_url: {url}\n"),
    )
    .await;
    let (status, body) = send(reqwest::Method::GET, &sidecar.url("/tools/web/pause"), None).await;
    assert_eq!((status, body.as_str()), (200, "paused"));
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"perfecx_policy_violations_total{policy="watch",rule="execution_limit"}"#
        ),
        Some(1.0),
        "{m}"
    );
    sidecar.stop().await;
    ct.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies_are_refused_both_ways() {
    let (sidecar, ct) = web_sidecar("").await;
    let client = reqwest::Client::new();
    let post = |coding: &'static str| {
        client
            .post(sidecar.url("/tools/web/search"))
            .header("content-type", "application/json")
            .header("content-encoding", coding)
            .body(r#"{"q":"rust"}"#)
            .send()
    };

    // A compressed request cannot be judged: 415, and which coding is accepted.
    let res = post("gzip").await.unwrap();
    assert_eq!(res.status(), 415);
    assert_eq!(res.headers()["accept-encoding"], "identity");
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["code"], "unsupported_encoding", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Content-Encoding: gzip"),
        "{err}"
    );
    // `identity` is no coding at all.
    let res = post("identity").await.unwrap();
    assert_eq!(res.status(), 200);

    // A compressed answer cannot be inspected: the tool failed, the bytes stay out.
    let (status, body) = send(
        reqwest::Method::GET,
        &sidecar.url("/tools/web/zipped"),
        None,
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert!(!body.contains("x1Y2z3w4"), "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["code"], "upstream_failed", "{err}");
    assert!(body.contains("Content-Encoding: deflate"), "{body}");

    let m = sidecar.metrics().await;
    assert!(
        metric(
            &m,
            r#"perfecx_tool_call_errors_total{tool="web",upstream="web"}"#
        )
        .is_some(),
        "{m}"
    );
    sidecar.stop().await;
    ct.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_that_could_leave_the_tool_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (sidecar, ct) = web_sidecar("").await;
    // Dot segments, as clients that do not resolve them send them.
    let base = sidecar.url("");
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    for path in [
        "/tools/web/../shell/run",
        "/tools/web/%2e%2e/shell",
        "/tools/web/a%2f..%2fx",
    ] {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("segment"), "{path}: {answer}");
    }

    // A redirect would take the agent past the sidecar.
    let res = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(sidecar.url("/tools/web/moved"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    assert!(res.headers().get("location").is_none());
    let body = res.text().await.unwrap();
    assert!(body.contains("redirected (307"), "{body}");
    sidecar.stop().await;
    ct.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_under_another_label_is_judged_as_json() {
    let (sidecar, ct) = web_sidecar("").await;
    let client = reqwest::Client::new();
    let post = |body: String, label: Option<&'static str>| {
        let mut req = client.post(sidecar.url("/tools/web/search")).body(body);
        if let Some(label) = label {
            req = req.header("content-type", label);
        }
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    };
    // Escapes a text search would not see through, at any depth.
    let deep = format!("{}\"r\\u006d -rf /\"{}", "[".repeat(500), "]".repeat(500));
    for (body, label) in [
        (
            r#"{"sql":"DROP\u0020TABLE users"}"#.to_owned(),
            Some("text/plain"),
        ),
        (r#"{"sql":"DROP\u0020TABLE users"}"#.to_owned(), None),
        (
            r#"["r\u006d -rf /"]"#.to_owned(),
            Some("application/problem+json"),
        ),
        (deep, None),
        // Form-labelled: the tool may read it as JSON all the same.
        (
            r#"{"cmd":"r\u006d -rf /"}"#.to_owned(),
            Some("application/x-www-form-urlencoded"),
        ),
        // With a number Python's reader takes and JSON has not.
        (
            r#"{"v":NaN,"cmd":"r\u006d -rf /"}"#.to_owned(),
            Some("text/plain"),
        ),
        // Labelled JSON too.
        (
            r#"{"v":NaN,"cmd":"r\u006d -rf /"}"#.to_owned(),
            Some("application/json"),
        ),
        // After a byte-order mark, which JSON readers skip.
        (
            "\u{feff}{\"cmd\":\"r\\u006d -rf /\"}".to_owned(),
            Some("text/plain"),
        ),
    ] {
        let (status, answer) = post(body.clone(), label).await;
        assert_eq!(status, 403, "{body:.80} as {label:?}: {answer}");
    }
    // Python's JSON passes when there is nothing in it.
    let (status, answer) = post(r#"{"v":NaN}"#.into(), Some("application/json")).await;
    assert_eq!(status, 200, "{answer}");
    // Text that only looks like JSON at first is judged as text.
    let (status, answer) = post("{name} says hi".into(), Some("text/plain")).await;
    assert_eq!(status, 200, "{answer}");

    // Python's JSON from a tool is read too: here it would need redacting, which its numbers
    // do not allow, so it is withheld.
    let (status, body) = send(reqwest::Method::GET, &sidecar.url("/tools/web/nan"), None).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("cannot be redacted"), "{body}");
    // The output too: a key written with an escape is still found and redacted.
    let (status, body) = send(
        reqwest::Method::GET,
        &sidecar.url("/tools/web/plain-json"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("[REDACTED:aws_access_key]"), "{body}");
    sidecar.stop().await;
    ct.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_json_output_passes() {
    let (sidecar, ct) = web_sidecar("").await;
    let (status, body) = send(reqwest::Method::GET, &sidecar.url("/tools/web/empty"), None).await;
    assert_eq!((status, body.as_str()), (200, ""));
    // HEAD: the tool answers JSON headers and no body.
    let (status, body) = send(reqwest::Method::HEAD, &sidecar.url("/tools/web/leak"), None).await;
    assert_eq!((status, body.as_str()), (200, ""));
    sidecar.stop().await;
    ct.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailing_slash_reaches_the_base_path() {
    let (sidecar, ct) = web_sidecar("").await;
    // The fast path, and the router (HEAD, an escaped name).
    let (status, body) = send(reqwest::Method::GET, &sidecar.url("/tools/web/"), None).await;
    assert_eq!((status, body.as_str()), (200, "index"));
    let (status, body) = send(reqwest::Method::GET, &sidecar.url("/tools/w%65b/"), None).await;
    assert_eq!((status, body.as_str()), (200, "index"));
    let (status, _) = send(reqwest::Method::HEAD, &sidecar.url("/tools/web/"), None).await;
    assert_eq!(status, 200);
    sidecar.stop().await;
    ct.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_cap_is_counted_as_blocked() {
    let (sidecar, ct) = web_sidecar("max_body_bytes: 2048").await;
    let big = json!({"q": "x".repeat(4096)}).to_string();
    let (status, _) = send(
        reqwest::Method::POST,
        &sidecar.url("/tools/web/search"),
        Some(big),
    )
    .await;
    assert_eq!(status, 413);
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"perfecx_tool_calls_total{decision="blocked",tool="web",upstream="web"}"#
        ),
        Some(1.0),
        "{m}"
    );
    sidecar.stop().await;
    ct.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_length_over_the_cap_is_refused_before_the_upload() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (sidecar, ct) = web_sidecar("max_body_bytes: 2048").await;
    // The fast path, and the router (an escaped name).
    for path in ["/tools/web/search", "/tools/w%65b/search"] {
        let mut conn = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
             content-length: 10000000\r\nexpect: 100-continue\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        // No body is sent: the answer must come without it.
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        let got = String::from_utf8_lossy(&got);
        assert!(read.is_ok(), "no answer without the body: {got:?}");
        assert!(got.starts_with("HTTP/1.1 413"), "{path}: {got:?}");
    }
    sidecar.stop().await;
    ct.cancel();
}
