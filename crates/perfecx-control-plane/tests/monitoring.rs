//! Metrics and anomalies counted from stored events, retention, and the control plane's own
//! `/metrics`, OpenAPI document, rate limits and error answers.

mod common;

use std::time::Duration;

use common::{ADMIN_KEY, TestDb, TestServer};
use perfecx_control_plane::config::Retention;
use perfecx_control_plane::store::Store;
use perfecx_control_plane::{Limit, SqliteSync};
use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::Connection;

on_both_databases!(
    metrics_from_events,
    rate_limits_with_headers,
    service_endpoints_and_errors,
    retention_prunes
);

fn at(minute: u32, second: u32) -> String {
    format!("2024-01-15T09:{minute:02}:{second:02}Z")
}

async fn metrics_from_events(db: TestDb) {
    let server = TestServer::start(&db).await;
    let token = server.register("my-agent-001").await;
    let mut events = Vec::new();
    for (i, (duration, success)) in [(100, true), (200, true), (300, false), (400, true)]
        .into_iter()
        .enumerate()
    {
        events.push(
            json!({"event_type": "tool_execution", "timestamp": at(10, i as u32),
            "data": {"tool": "web_search", "duration_ms": duration, "success": success}}),
        );
    }
    for rule in [
        "tool_restriction",
        "content_filter",
        "content_filter",
        "memory_protection",
    ] {
        events.push(
            json!({"event_type": "policy_violation", "timestamp": at(20, 0),
            "data": {"tool": "shell", "policy": "p", "rule": rule, "action": "blocked"}}),
        );
    }
    // Outside the range below: not counted.
    events.push(json!({"event_type": "tool_execution", "timestamp": "2024-01-15T11:00:00Z", "data": {"duration_ms": 9999}}));
    server.ingest("my-agent-001", &token, events).await;

    let path =
        "/v1/agents/my-agent-001/metrics?start=2024-01-15T09:00:00Z&end=2024-01-15T10:00:00Z";
    let reply = server.get(path, ADMIN_KEY).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        reply.body,
        json!({
            "agent_id": "my-agent-001",
            "time_range": {"start": "2024-01-15T09:00:00Z", "end": "2024-01-15T10:00:00Z"},
            "metrics": {
                "total_requests": 4, "average_response_time_ms": 250.0, "error_rate": 0.25,
                "anomaly_score": 0.0, "policy_violations": 4,
                "security_events": {"memory_tampering_attempts": 1, "unauthorized_tool_access": 1, "suspicious_patterns": 2},
                // 100 ms in [100, 150), 200 in [200, 300), 300 and 400 in [300, 500).
                "latency_percentiles_ms": {"p50": 250.0, "p95": 450.0, "p99": 450.0},
                "violations_by_rule": {"tool_restriction": 1, "execution_limit": 0, "content_filter": 2, "memory_protection": 1},
                "violations_by_action": {"blocked": 4, "redacted": 0, "alerted": 0},
                "tools": {
                    "shell": {"requests": 0, "errors": 0, "average_response_time_ms": 0.0, "policy_violations": 4},
                    "web_search": {"requests": 4, "errors": 1, "average_response_time_ms": 250.0, "policy_violations": 0}
                }
            }
        })
    );
    assert_eq!(reply.header("x-ratelimit-limit"), Some("1000"));
    // The default range is the last hour.
    let recent = server
        .get("/v1/agents/my-agent-001/metrics", ADMIN_KEY)
        .await;
    assert_eq!(recent.body["metrics"]["total_requests"], 0);
    assert!(recent.body["time_range"]["start"].is_string());

    for (query, field) in [
        ("start=yesterday", "start"),
        ("end=2024-13-01T00:00:00Z", "end"),
        (
            "start=2024-01-15T10:00:00Z&end=2024-01-15T09:00:00Z",
            "start",
        ),
        ("window=1h", "window"),
    ] {
        let reply = server
            .get(
                &format!("/v1/agents/my-agent-001/metrics?{query}"),
                ADMIN_KEY,
            )
            .await;
        assert!(reply.error(400, "bad_request").contains(field), "{query}");
    }
    server
        .get("/v1/agents/ghost/metrics", ADMIN_KEY)
        .await
        .error(404, "not_found");

    let anomalies = server
        .get("/v1/agents/my-agent-001/anomalies", ADMIN_KEY)
        .await;
    assert_eq!(anomalies.status, StatusCode::OK);
    assert_eq!(
        anomalies.body,
        json!({"anomalies": [], "total": 0, "limit": 20, "offset": 0})
    );
    server
        .get("/v1/agents/ghost/anomalies", ADMIN_KEY)
        .await
        .error(404, "not_found");
    server
        .get("/v1/agents/my-agent-001/anomalies?limit=0", ADMIN_KEY)
        .await
        .error(400, "bad_request");
    server.stop().await;
}

async fn rate_limits_with_headers(db: TestDb) {
    let server = TestServer::start_with(&db, |config| {
        let hour = Duration::from_secs(3600);
        config.rate_limits.registration = Limit::new(2, hour);
        config.rate_limits.events = Limit::new(5, hour);
        config.rate_limits.metrics = Limit::new(1, hour);
        config.rate_limits.policies = Limit::new(1, hour);
    })
    .await;
    // Registration: 2 per hour per key.
    let first = server
        .post(
            "/v1/agents",
            ADMIN_KEY,
            json!({"agent_id": "a1", "name": "a"}),
        )
        .await;
    assert_eq!(first.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(first.header("x-ratelimit-remaining"), Some("1"));
    let token = first.body["registration_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    server
        .post("/v1/agents", ADMIN_KEY, json!({"name": "b"}))
        .await;
    let refused = server
        .post("/v1/agents", ADMIN_KEY, json!({"name": "c"}))
        .await;
    assert!(refused.error(429, "rate_limited").contains("registration"));
    assert_eq!(refused.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(refused.header("x-ratelimit-remaining"), Some("0"));
    let retry: u64 = refused
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!((1..=3600).contains(&retry), "retry-after {retry}");
    let reset: u64 = refused
        .header("x-ratelimit-reset")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(reset > 1_700_000_000, "reset {reset}");
    // Another key has its own quota.
    let other = server.key(&["write"]).await;
    assert_eq!(
        server
            .post("/v1/agents", &other, json!({"name": "d"}))
            .await
            .status,
        StatusCode::CREATED
    );

    // Events count one by one; a refused batch takes nothing.
    let batch = |n: usize| json!({"events": vec![json!({"event_type": "custom"}); n]});
    let reply = server.post("/v1/agents/a1/events", &token, batch(3)).await;
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("2"));
    let reply = server.post("/v1/agents/a1/events", &token, batch(3)).await;
    reply.error(429, "rate_limited");
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("2"));
    let reply = server.post("/v1/agents/a1/events", &token, batch(2)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("0"));

    // Metrics and policies.
    assert_eq!(
        server.get("/v1/agents/a1/metrics", ADMIN_KEY).await.status,
        StatusCode::OK
    );
    server
        .get("/v1/agents/a1/anomalies", ADMIN_KEY)
        .await
        .error(429, "rate_limited");
    let policy =
        json!({"name": "p", "rules": [{"type": "tool_restriction", "forbidden_tools": ["x"]}]});
    assert_eq!(
        server
            .post("/v1/policies", ADMIN_KEY, policy.clone())
            .await
            .status,
        StatusCode::CREATED
    );
    server
        .post("/v1/policies", ADMIN_KEY, json!({"name": "q"}))
        .await
        .error(429, "rate_limited");

    // Refusals are counted for Prometheus.
    let scrape = server.call(Method::GET, "/metrics", None, None).await;
    let text = scrape.body.as_str().unwrap_or_default().to_string();
    for line in [
        "perfecx_cp_rate_limited_total{class=\"registration\"} 1",
        "perfecx_cp_rate_limited_total{class=\"events\"} 1",
        "perfecx_cp_rate_limited_total{class=\"metrics\"} 1",
        "perfecx_cp_rate_limited_total{class=\"policies\"} 1",
        "perfecx_cp_events_accepted_total 5",
    ] {
        assert!(text.contains(line), "missing {line} in:\n{text}");
    }
    server.stop().await;
}

async fn service_endpoints_and_errors(db: TestDb) {
    let server = TestServer::start(&db).await;
    let token = server.register("my-agent-001").await;
    server
        .post(
            "/v1/agents/my-agent-001/events",
            &token,
            json!({"event_type": "custom"}),
        )
        .await;

    // OpenAPI 3.1, generated from the handlers.
    let doc = server
        .call(Method::GET, "/v1/openapi.json", None, None)
        .await;
    assert_eq!(doc.status, StatusCode::OK);
    assert!(
        doc.body["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc.body["openapi"]
    );
    for path in [
        "/v1/agents",
        "/v1/agents/{agent_id}",
        "/v1/agents/{agent_id}/events",
        "/v1/policies",
        "/v1/agents/{agent_id}/metrics",
        "/v1/agents/{agent_id}/anomalies",
        "/v1/api-keys",
        "/v1/agents/{agent_id}/policy-bundle",
    ] {
        assert!(
            doc.body["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(
        doc.body["components"]["schemas"]
            .get("RegisterAgentRequest")
            .is_some()
    );
    // The monitoring shapes and parameters.
    let schemas = &doc.body["components"]["schemas"];
    for (schema, property) in [
        ("Anomaly", "severity"),
        ("Anomaly", "evidence"),
        ("Metrics", "latency_percentiles_ms"),
        ("Metrics", "violations_by_action"),
        ("Metrics", "tools"),
        ("ToolMetrics", "requests"),
    ] {
        assert!(
            schemas[schema]["properties"].get(property).is_some(),
            "{schema}.{property} missing from the OpenAPI document"
        );
    }
    assert_eq!(
        schemas["Severity"]["enum"],
        json!(["low", "medium", "high", "critical"])
    );
    let parameters: Vec<&str> =
        doc.body["paths"]["/v1/agents/{agent_id}/anomalies"]["get"]["parameters"]
            .as_array()
            .map(|list| list.iter().filter_map(|p| p["name"].as_str()).collect())
            .unwrap_or_default();
    for name in [
        "start",
        "end",
        "severity",
        "min_severity",
        "limit",
        "offset",
    ] {
        assert!(
            parameters.contains(&name),
            "{name} missing from {parameters:?}"
        );
    }

    // Prometheus: requests by route template and status.
    let scrape = server.call(Method::GET, "/metrics", None, None).await;
    let text = scrape.body.as_str().unwrap_or_default().to_string();
    assert!(
        text.contains("perfecx_cp_http_requests_total{method=\"POST\",route=\"/v1/agents/{agent_id}/events\",status=\"202\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("perfecx_cp_events_accepted_total 1"),
        "{text}"
    );

    // 404 and 405 with the API's body.
    server
        .get("/v1/nothing", ADMIN_KEY)
        .await
        .error(404, "not_found");
    server
        .call(Method::PATCH, "/v1/agents", Some(ADMIN_KEY), None)
        .await
        .error(405, "method_not_allowed");

    // 500 says nothing of its cause.
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&server.db_url)
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    sqlx::query("DROP TABLE anomalies")
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    conn.close().await.unwrap_or_else(|e| unreachable!("{e}"));
    let reply = server
        .get("/v1/agents/my-agent-001/anomalies", ADMIN_KEY)
        .await;
    let message = reply.error(500, "internal");
    assert!(
        !message.contains("anomalies") && !message.to_lowercase().contains("table"),
        "{message}"
    );
    server.stop().await;
}

async fn retention_prunes(db: TestDb) {
    let server = TestServer::start(&db).await;
    let token = server.register("my-agent-001").await;
    let old = json!({"event_type": "tool_execution", "timestamp": "2020-01-01T00:00:00Z"});
    let new = json!({"event_type": "tool_execution"});
    server
        .post(
            "/v1/agents/my-agent-001/events",
            &token,
            json!({"events": [old, new]}),
        )
        .await;
    let store = Store::connect(&server.db_url, SqliteSync::Full)
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    assert_eq!(store.count_events("my-agent-001").await.ok(), Some(2));
    let retention = Retention {
        events: Duration::from_secs(86_400),
        inactive_after: Duration::ZERO,
        interval: Duration::from_secs(60),
    };
    perfecx_control_plane::retention::prune_once(&store, &retention).await;
    assert_eq!(store.count_events("my-agent-001").await.ok(), Some(1));
    let agent = server.get("/v1/agents/my-agent-001", ADMIN_KEY).await;
    assert_eq!(agent.body["status"], "inactive");
    store.close().await;
    server.stop().await;
}

on_both_databases!(keys_create_command);

/// `perfecx keys create` mints a working key straight into the database.
async fn keys_create_command(db: TestDb) {
    let server = TestServer::start(&db).await;
    let args = perfecx_control_plane::KeysCreateArgs {
        database: db.url.clone(),
        name: "from-cli".into(),
        scopes: vec![perfecx_api::Scope::Read, perfecx_api::Scope::Write],
    };
    assert!(perfecx_control_plane::keys_create(args).await.is_ok());
    let keys = server.get("/v1/api-keys", ADMIN_KEY).await;
    let minted = keys.body["api_keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["name"] == "from-cli").cloned());
    assert_eq!(
        minted.map(|k| k["scopes"].clone()),
        Some(json!(["read", "write"]))
    );
    let bad = perfecx_control_plane::KeysCreateArgs {
        database: db.url.clone(),
        name: " ".into(),
        scopes: vec![],
    };
    assert!(perfecx_control_plane::keys_create(bad).await.is_err());
    server.stop().await;
}
