//! The whole API over real HTTP, on SQLite and on PostgreSQL.

mod common;

use common::{ADMIN_KEY, TestDb, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::json;

on_both_databases!(
    agents_lifecycle,
    keys_scopes_and_tokens,
    events_idempotent_and_validated
);

async fn agents_lifecycle(db: TestDb) {
    let server = TestServer::start(&db).await;
    let reply = server
        .post(
            "/v1/agents",
            ADMIN_KEY,
            json!({
                "agent_id": "my-agent-001", "name": "Customer Support Agent", "framework": "langchain",
                "version": "1.0.0", "capabilities": ["chat", "tool_use", "memory"],
                "metadata": {"team": "support", "environment": "production"}
            }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.body["agent_id"], "my-agent-001");
    let token = reply.body["registration_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(token.starts_with("agt_"), "{token}");
    assert!(
        reply.body["monitoring_endpoint"]
            .as_str()
            .is_some_and(|e| e.starts_with("ws://") && e.ends_with("/agents/my-agent-001")),
        "{}",
        reply.body
    );
    assert!(
        reply.body["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );

    // Duplicates, bad ids and bad bodies.
    let again = server
        .post(
            "/v1/agents",
            ADMIN_KEY,
            json!({"agent_id": "my-agent-001", "name": "x"}),
        )
        .await;
    assert!(again.error(409, "conflict").contains("my-agent-001"));
    for bad in ["has space", "slash/", "", &"x".repeat(129)] {
        let reply = server
            .post(
                "/v1/agents",
                ADMIN_KEY,
                json!({"agent_id": bad, "name": "x"}),
            )
            .await;
        assert!(
            reply.error(400, "bad_request").contains("agent_id"),
            "{}",
            reply.body
        );
    }
    let reply = server
        .post("/v1/agents", ADMIN_KEY, json!({"agent_id": "a1"}))
        .await;
    assert!(reply.error(400, "bad_request").contains("name"));
    let reply = server
        .post("/v1/agents", ADMIN_KEY, json!({"name": "x", "nmae": "y"}))
        .await;
    assert!(reply.error(400, "bad_request").contains("nmae"));
    let reply = server
        .post(
            "/v1/agents",
            ADMIN_KEY,
            json!({"name": "x", "capabilities": "chat"}),
        )
        .await;
    assert!(reply.error(400, "bad_request").contains("capabilities"));
    let reply = server
        .send(
            server
                .client
                .post(format!("{}/v1/agents", server.base))
                .bearer_auth(ADMIN_KEY)
                .body("{not json"),
        )
        .await;
    let m = reply.error(400, "bad_request");
    assert!(m.contains("JSON"), "{m}");

    // A generated id.
    let reply = server
        .post(
            "/v1/agents",
            ADMIN_KEY,
            json!({"name": "crew", "framework": "crewai"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let generated = reply.body["agent_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        perfecx_api::validate_agent_id(&generated).is_ok(),
        "{generated}"
    );

    // Listing, filters and pages.
    for i in 0..3 {
        server.register(&format!("lc-{i}")).await;
    }
    let all = server.get("/v1/agents", ADMIN_KEY).await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(all.body["total"], 5);
    assert_eq!(all.body["limit"], 20);
    assert_eq!(all.body["offset"], 0);
    let page = server.get("/v1/agents?limit=2&offset=1", ADMIN_KEY).await;
    assert_eq!(page.body["agents"].as_array().map(Vec::len), Some(2));
    assert_eq!(page.body["total"], 5);
    let crew = server.get("/v1/agents?framework=crewai", ADMIN_KEY).await;
    assert_eq!(crew.body["total"], 1);
    assert_eq!(crew.body["agents"][0]["agent_id"], generated.as_str());
    let inactive = server.get("/v1/agents?status=inactive", ADMIN_KEY).await;
    assert_eq!(
        inactive.body["total"], 5,
        "new agents are inactive until they report"
    );
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=x", "limit"),
        ("status=busy", "status"),
        ("colour=red", "colour"),
    ] {
        let reply = server.get(&format!("/v1/agents?{query}"), ADMIN_KEY).await;
        assert!(
            reply.error(400, "bad_request").contains(field),
            "{query}: {}",
            reply.body
        );
    }

    // Get, update, delete.
    let one = server.get("/v1/agents/my-agent-001", ADMIN_KEY).await;
    assert_eq!(one.body["name"], "Customer Support Agent");
    assert_eq!(one.body["metadata"]["team"], "support");
    assert_eq!(one.body["status"], "inactive");
    let missing = server.get("/v1/agents/nobody", ADMIN_KEY).await;
    assert!(missing.error(404, "not_found").contains("nobody"));
    let updated = server
        .put(
            "/v1/agents/my-agent-001",
            ADMIN_KEY,
            json!({"version": "1.1.0", "metadata": {"team": "ops"}}),
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    assert_eq!(updated.body["version"], "1.1.0");
    assert_eq!(updated.body["name"], "Customer Support Agent");
    assert_eq!(
        server.get("/v1/agents/my-agent-001", ADMIN_KEY).await.body["metadata"]["team"],
        "ops"
    );
    let reply = server
        .put(
            "/v1/agents/my-agent-001",
            ADMIN_KEY,
            json!({"status": "sleeping"}),
        )
        .await;
    assert!(reply.error(400, "bad_request").contains("status"));
    let reply = server
        .put("/v1/agents/nobody", ADMIN_KEY, json!({"name": "n"}))
        .await;
    reply.error(404, "not_found");

    let event = json!({"event_type": "custom"});
    assert_eq!(
        server
            .post("/v1/agents/my-agent-001/events", &token, event.clone())
            .await
            .status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        server
            .delete("/v1/agents/my-agent-001", ADMIN_KEY)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    server
        .delete("/v1/agents/my-agent-001", ADMIN_KEY)
        .await
        .error(404, "not_found");
    server
        .get("/v1/agents/my-agent-001", ADMIN_KEY)
        .await
        .error(404, "not_found");
    // The token of a deleted agent stops working, even if the id is registered again.
    server
        .post("/v1/agents/my-agent-001/events", &token, event.clone())
        .await
        .error(401, "unauthorized");
    server.register("my-agent-001").await;
    server
        .post("/v1/agents/my-agent-001/events", &token, event)
        .await
        .error(401, "unauthorized");
    server.stop().await;
}

async fn keys_scopes_and_tokens(db: TestDb) {
    let server = TestServer::start(&db).await;
    let read = server.key(&["read"]).await;
    let write = server.key(&["write"]).await;
    let token = server.register("agent-a").await;
    server.register("agent-b").await;

    // 401: no key, a malformed header, an unknown key, an unknown agent token.
    let reply = server.call(Method::GET, "/v1/agents", None, None).await;
    assert!(reply.error(401, "unauthorized").contains("Authorization"));
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    let reply = server
        .send(
            server
                .client
                .get(format!("{}/v1/agents", server.base))
                .header("authorization", "Basic abc"),
        )
        .await;
    reply.error(401, "unauthorized");
    server
        .get("/v1/agents", "pfx_wrong")
        .await
        .error(401, "unauthorized");
    server
        .get("/v1/agents", "agt_wrong")
        .await
        .error(401, "unauthorized");

    // Scopes: read < write < admin.
    let event = json!({"event_type": "custom"});
    let new_agent = json!({"name": "n"});
    assert_eq!(server.get("/v1/agents", &read).await.status, StatusCode::OK);
    let m = server
        .post("/v1/agents", &read, new_agent.clone())
        .await
        .error(403, "forbidden");
    assert!(m.contains("write"), "{m}");
    server
        .post("/v1/agents/agent-a/events", &read, event.clone())
        .await
        .error(403, "forbidden");
    server
        .get("/v1/api-keys", &read)
        .await
        .error(403, "forbidden");
    assert_eq!(
        server.get("/v1/agents", &write).await.status,
        StatusCode::OK
    );
    assert_eq!(
        server
            .post("/v1/agents", &write, new_agent.clone())
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        server
            .post("/v1/agents/agent-b/events", &write, event.clone())
            .await
            .status,
        StatusCode::ACCEPTED
    );
    let m = server
        .get("/v1/api-keys", &write)
        .await
        .error(403, "forbidden");
    assert!(m.contains("admin"), "{m}");
    server
        .post(
            "/v1/api-keys",
            &write,
            json!({"name": "x", "scopes": ["read"]}),
        )
        .await
        .error(403, "forbidden");

    // An agent token: its own events and policies, nothing else.
    assert_eq!(
        server
            .post("/v1/agents/agent-a/events", &token, event.clone())
            .await
            .status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        server
            .get("/v1/agents/agent-a/policy-bundle", &token)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        server
            .get("/v1/agents/agent-a/policies", &token)
            .await
            .status,
        StatusCode::OK
    );
    let m = server
        .post("/v1/agents/agent-b/events", &token, event.clone())
        .await
        .error(403, "forbidden");
    assert!(m.contains("agent-a") && m.contains("agent-b"), "{m}");
    server
        .get("/v1/agents/agent-b/policy-bundle", &token)
        .await
        .error(403, "forbidden");
    server
        .get("/v1/agents", &token)
        .await
        .error(403, "forbidden");
    server
        .get("/v1/agents/agent-a", &token)
        .await
        .error(403, "forbidden");
    server
        .get("/v1/agents/agent-a/metrics", &token)
        .await
        .error(403, "forbidden");
    server
        .post("/v1/agents", &token, new_agent)
        .await
        .error(403, "forbidden");
    server
        .get("/v1/api-keys", &token)
        .await
        .error(403, "forbidden");

    // Keys: listed without secrets, validated, revoked.
    let listed = server.get("/v1/api-keys", ADMIN_KEY).await;
    assert_eq!(listed.status, StatusCode::OK);
    let keys = listed.body["api_keys"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(keys.len(), 3);
    assert!(
        !listed.body.to_string().contains(&read),
        "a listing must not show keys"
    );
    assert!(keys.iter().all(|k| k.get("key").is_none()));
    let reply = server
        .post(
            "/v1/api-keys",
            ADMIN_KEY,
            json!({"name": "x", "scopes": ["root"]}),
        )
        .await;
    assert!(reply.error(400, "bad_request").contains("scopes"));
    let reply = server
        .post(
            "/v1/api-keys",
            ADMIN_KEY,
            json!({"name": "x", "scopes": []}),
        )
        .await;
    assert!(reply.error(400, "bad_request").contains("scopes"));
    let reply = server
        .post(
            "/v1/api-keys",
            ADMIN_KEY,
            json!({"name": " ", "scopes": ["read"]}),
        )
        .await;
    assert!(reply.error(400, "bad_request").contains("name"));
    let created = server
        .post(
            "/v1/api-keys",
            ADMIN_KEY,
            json!({"name": "ci", "scopes": ["admin", "read"]}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.body["scopes"], json!(["read", "admin"]));
    let new_admin = created.body["key"].as_str().unwrap_or_default().to_string();
    let key_id = created.body["key_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        server.get("/v1/api-keys", &new_admin).await.status,
        StatusCode::OK
    );
    assert_eq!(
        server
            .delete(&format!("/v1/api-keys/{key_id}"), ADMIN_KEY)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    server
        .get("/v1/api-keys", &new_admin)
        .await
        .error(401, "unauthorized");
    server
        .delete(&format!("/v1/api-keys/{key_id}"), ADMIN_KEY)
        .await
        .error(404, "not_found");
    server.stop().await;
}

async fn events_idempotent_and_validated(db: TestDb) {
    let server = TestServer::start(&db).await;
    let token = server.register("my-agent-001").await;
    let path = "/v1/agents/my-agent-001/events";
    let event = json!({
        "event_id": "6f1c1e9e-3b0a-4c55-9a43-0d8f5f0f5a01",
        "event_type": "tool_execution", "timestamp": "2024-01-15T10:35:00Z",
        "data": {"tool": "web_search", "input": "latest AI security news", "output": "Found 5 relevant articles...", "duration_ms": 1250, "success": true},
        "context": {"session_id": "sess_123", "user_id": "user_456"}
    });
    let reply = server.post(path, &token, event.clone()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    assert_eq!(
        reply.body,
        json!({"received": 1, "stored": 1, "duplicates": 0})
    );
    assert_eq!(reply.header("x-ratelimit-limit"), Some("10000"));
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("9999"));
    // The same event again is recognised, alone or in a batch.
    let reply = server.post(path, &token, event.clone()).await;
    assert_eq!(
        reply.body,
        json!({"received": 1, "stored": 0, "duplicates": 1})
    );
    let batch = json!({"events": [event, {"event_type": "llm_call"}, {"event_type": "memory_access", "data": {"key": "k"}}]});
    let reply = server.post(path, &token, batch).await;
    assert_eq!(
        reply.body,
        json!({"received": 3, "stored": 2, "duplicates": 1})
    );
    let agent = server.get("/v1/agents/my-agent-001", ADMIN_KEY).await;
    assert_eq!(agent.body["status"], "active");
    assert!(agent.body["last_seen_at"].is_string());
    server
        .post(
            path,
            &token,
            json!({"event_type": "error", "data": {"message": "boom"}}),
        )
        .await;
    assert_eq!(
        server.get("/v1/agents/my-agent-001", ADMIN_KEY).await.body["status"],
        "error"
    );

    // Validation names the field.
    let cases = [
        (json!({"event_type": "tool_call"}), "event_type"),
        (
            json!({"events": [{"event_type": "custom"}, {"event_type": "nope"}]}),
            "events[1].event_type",
        ),
        (
            json!({"event_type": "custom", "timestamp": "yesterday"}),
            "timestamp",
        ),
        (
            json!({"events": [{"event_type": "custom", "timestamp": "2024-13-01T00:00:00Z"}]}),
            "events[0].timestamp",
        ),
        (
            json!({"event_type": "custom", "event_id": "not-a-uuid"}),
            "event_id",
        ),
        (json!({"event_type": "custom", "data": [1, 2]}), "data"),
        (json!({"data": {}}), "event_type"),
        (json!({"events": []}), "events"),
        (json!({"events": [], "extra": 1}), "extra"),
        (json!([1, 2]), "JSON"),
    ];
    for (body, field) in cases {
        let reply = server.post(path, &token, body.clone()).await;
        let message = reply.error(400, "bad_request");
        assert!(message.contains(field), "{body}: {message}");
    }

    // Size caps.
    let many: Vec<_> = (0..1001).map(|_| json!({"event_type": "custom"})).collect();
    let reply = server.post(path, &token, json!({"events": many})).await;
    assert!(reply.error(413, "payload_too_large").contains("1000"));
    let big = "x".repeat(70 * 1024);
    let reply = server.post(path, &token, json!({"events": [{"event_type": "custom"}, {"event_type": "custom", "data": {"blob": big}}]})).await;
    assert!(reply.error(413, "payload_too_large").contains("events[1]"));
    assert_eq!(
        server.announce_body(path, &token, 17 * 1024 * 1024).await,
        413
    );
    assert_eq!(
        server
            .announce_body("/v1/agents", ADMIN_KEY, 2 * 1024 * 1024)
            .await,
        413
    );

    // An API key may send for any agent that exists.
    let reply = server
        .post(
            "/v1/agents/ghost/events",
            ADMIN_KEY,
            json!({"event_type": "custom"}),
        )
        .await;
    assert!(reply.error(404, "not_found").contains("ghost"));
    server.stop().await;
}
