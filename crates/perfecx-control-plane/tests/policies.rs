//! Policies, their application to agents, and the bundle a sidecar fetches.

mod common;

use common::{ADMIN_KEY, TestDb, TestServer};
use reqwest::StatusCode;
use serde_json::json;

on_both_databases!(policies_lifecycle, policies_applied_and_bundled);

const SAFETY_YAML: &str = r#"
name: production-safety-policy
description: Safety policy for production agents
enforcement: strict
rules:
  - type: tool_restriction
    allowed_tools: [web_search, calculator, file_reader]
    forbidden_tools: [code_executor, system_command]
  - type: execution_limit
    max_execution_time_ms: 300000
    max_memory_mb: 512
  - type: content_filter
    forbidden_patterns: ["rm -rf", "DROP TABLE", "DELETE FROM"]
    sensitive_data_detection: true
"#;

async fn post_text(
    server: &TestServer,
    path: &str,
    body: &str,
    content_type: &str,
) -> common::Reply {
    let request = server
        .client
        .post(format!("{}{path}", server.base))
        .bearer_auth(ADMIN_KEY)
        .header("content-type", content_type)
        .body(body.to_string());
    server.send(request).await
}

async fn policies_lifecycle(db: TestDb) {
    let server = TestServer::start(&db).await;
    // YAML, as authors write it.
    let created = post_text(&server, "/v1/policies", SAFETY_YAML, "application/yaml").await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["policy_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(id.starts_with("pol_"), "{id}");
    assert_eq!(created.body["name"], "production-safety-policy");
    assert_eq!(created.body["version"], 1);
    assert_eq!(created.body["enforcement"], "strict");
    assert_eq!(created.body["rules"][0]["type"], "tool_restriction");
    assert_eq!(
        created.body["rules"][2]["forbidden_patterns"][1],
        "DROP TABLE"
    );

    // JSON, as the API reference shows it.
    let json_policy = json!({
        "name": "no-shell", "enforcement": "permissive",
        "rules": [{"type": "tool_restriction", "forbidden_tools": ["system_command"]}]
    });
    let second = server
        .post("/v1/policies", ADMIN_KEY, json_policy.clone())
        .await;
    assert_eq!(second.status, StatusCode::CREATED, "{}", second.body);
    let second_id = second.body["policy_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // The engine's precise error is the 400's message.
    let bad = "name: broken\nrules:\n  - type: tool_restriction\n    forbiden_tools: [x]\n";
    let reply = post_text(&server, "/v1/policies", bad, "application/yaml").await;
    let message = reply.error(400, "bad_request");
    let expected = perfecx_policy::parse_policy("request body", bad)
        .err()
        .map(|d| d.to_string())
        .unwrap_or_default();
    assert!(!expected.is_empty());
    assert_eq!(message, expected);
    assert!(message.contains("forbiden_tools"), "{message}");
    let reply = post_text(&server, "/v1/policies", "rules: []\n", "application/yaml").await;
    reply.error(400, "bad_request");
    let reply = post_text(&server, "/v1/policies", "{\"name\": ", "application/json").await;
    reply.error(400, "bad_request");
    let too_long = perfecx_policy::MAX_DOCUMENT_BYTES + 1;
    assert_eq!(
        server
            .announce_body("/v1/policies", ADMIN_KEY, too_long)
            .await,
        413
    );

    // Names are unique.
    let reply = server.post("/v1/policies", ADMIN_KEY, json_policy).await;
    assert!(reply.error(409, "conflict").contains("no-shell"));

    // Read, list.
    let one = server.get(&format!("/v1/policies/{id}"), ADMIN_KEY).await;
    assert_eq!(
        one.body["description"],
        "Safety policy for production agents"
    );
    server
        .get("/v1/policies/pol_missing", ADMIN_KEY)
        .await
        .error(404, "not_found");
    let list = server.get("/v1/policies?limit=1", ADMIN_KEY).await;
    assert_eq!(list.body["total"], 2);
    assert_eq!(list.body["policies"].as_array().map(Vec::len), Some(1));
    assert_eq!(list.body["policies"][0]["name"], "no-shell");
    server
        .get("/v1/policies?limit=500", ADMIN_KEY)
        .await
        .error(400, "bad_request");

    // Update makes a new version; a taken name is a conflict; a bad document changes nothing.
    let v2 = SAFETY_YAML.replace("enforcement: strict", "enforcement: permissive");
    let request = server
        .client
        .put(format!("{}/v1/policies/{id}", server.base))
        .bearer_auth(ADMIN_KEY)
        .body(v2);
    let updated = server.send(request).await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    assert_eq!(updated.body["version"], 2);
    assert_eq!(updated.body["enforcement"], "permissive");
    let rename = json!({"name": "production-safety-policy", "rules": [{"type": "tool_restriction", "forbidden_tools": ["x"]}]});
    let reply = server
        .put(&format!("/v1/policies/{second_id}"), ADMIN_KEY, rename)
        .await;
    reply.error(409, "conflict");
    let reply = server
        .put(
            &format!("/v1/policies/{id}"),
            ADMIN_KEY,
            json!({"name": "x", "rules": [{"type": "teleport"}]}),
        )
        .await;
    assert!(reply.error(400, "bad_request").contains("teleport"));
    assert_eq!(
        server
            .get(&format!("/v1/policies/{id}"), ADMIN_KEY)
            .await
            .body["version"],
        2
    );
    server
        .put(
            "/v1/policies/pol_missing",
            ADMIN_KEY,
            json!({"name": "y", "rules": [{"type": "tool_restriction", "forbidden_tools": ["x"]}]}),
        )
        .await
        .error(404, "not_found");

    // Delete.
    assert_eq!(
        server
            .delete(&format!("/v1/policies/{second_id}"), ADMIN_KEY)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    server
        .get(&format!("/v1/policies/{second_id}"), ADMIN_KEY)
        .await
        .error(404, "not_found");
    server
        .delete(&format!("/v1/policies/{second_id}"), ADMIN_KEY)
        .await
        .error(404, "not_found");
    server.stop().await;
}

async fn policies_applied_and_bundled(db: TestDb) {
    let server = TestServer::start(&db).await;
    let token = server.register("my-agent-001").await;
    let other = server.register("other-agent").await;
    let created = post_text(&server, "/v1/policies", SAFETY_YAML, "application/yaml").await;
    let safety = created.body["policy_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let created = server
        .post("/v1/policies", ADMIN_KEY, json!({"name": "memory", "rules": [{"type": "memory_protection", "tools": ["memory_*"]}]}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let memory = created.body["policy_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let path = "/v1/agents/my-agent-001/policies";

    // The bundle of an agent with no policy is empty but has a revision.
    let empty = server
        .get("/v1/agents/my-agent-001/policy-bundle", &token)
        .await;
    assert_eq!(empty.status, StatusCode::OK);
    assert_eq!(empty.body["policies"], json!([]));
    let empty_etag = empty.header("etag").unwrap_or_default().to_string();

    // Apply.
    let applied = server
        .post(path, ADMIN_KEY, json!({"policy_ids": [safety]}))
        .await;
    assert_eq!(applied.status, StatusCode::OK, "{}", applied.body);
    assert_eq!(applied.body["policies"][0]["policy_id"], safety.as_str());
    let applied = server
        .post(path, ADMIN_KEY, json!({"policy_ids": [memory, safety]}))
        .await;
    assert_eq!(applied.body["policies"].as_array().map(Vec::len), Some(2));
    let reply = server
        .post(path, ADMIN_KEY, json!({"policy_ids": ["pol_missing"]}))
        .await;
    assert!(reply.error(404, "not_found").contains("pol_missing"));
    server
        .post(path, ADMIN_KEY, json!({"policy_ids": []}))
        .await
        .error(400, "bad_request");
    let reply = server
        .post(path, ADMIN_KEY, json!({"policies": [safety]}))
        .await;
    assert!(reply.error(400, "bad_request").contains("policies"));
    server
        .post(
            "/v1/agents/ghost/policies",
            ADMIN_KEY,
            json!({"policy_ids": [safety]}),
        )
        .await
        .error(404, "not_found");
    let listed = server.get(path, &token).await;
    assert_eq!(listed.body["policies"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        server
            .get("/v1/agents/other-agent/policies", &other)
            .await
            .body["policies"],
        json!([])
    );

    // The bundle: readable by the agent's token, cached by ETag.
    let bundle = server
        .get("/v1/agents/my-agent-001/policy-bundle", &token)
        .await;
    assert_eq!(bundle.status, StatusCode::OK);
    let etag = bundle.header("etag").unwrap_or_default().to_string();
    assert_ne!(etag, empty_etag);
    assert_eq!(
        etag,
        format!(
            "\"{}\"",
            bundle.body["revision"].as_str().unwrap_or_default()
        )
    );
    let documents = bundle.body["policies"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(documents.len(), 2);
    // Each document reads back through the engine and the set compiles.
    let policies: Vec<_> = documents
        .iter()
        .filter_map(|p| perfecx_policy::parse_policy("bundle", &p["document"].to_string()).ok())
        .collect();
    assert_eq!(policies.len(), 2);
    assert!(perfecx_policy::PolicySet::compile(policies).is_ok());
    let cached = server
        .send(
            server
                .client
                .get(format!(
                    "{}/v1/agents/my-agent-001/policy-bundle",
                    server.base
                ))
                .bearer_auth(&token)
                .header("if-none-match", &etag),
        )
        .await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
    assert_eq!(cached.header("etag"), Some(etag.as_str()));

    // A new version of an applied policy changes the bundle.
    let v2 = SAFETY_YAML.replace("max_memory_mb: 512", "max_memory_mb: 256");
    let request = server
        .client
        .put(format!("{}/v1/policies/{safety}", server.base))
        .bearer_auth(ADMIN_KEY)
        .body(v2);
    assert_eq!(server.send(request).await.status, StatusCode::OK);
    let changed = server
        .send(
            server
                .client
                .get(format!(
                    "{}/v1/agents/my-agent-001/policy-bundle",
                    server.base
                ))
                .bearer_auth(&token)
                .header("if-none-match", &etag),
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK);
    assert_ne!(changed.header("etag"), Some(etag.as_str()));

    // Detach.
    let one = format!("{path}/{memory}");
    assert_eq!(
        server.delete(&one, ADMIN_KEY).await.status,
        StatusCode::NO_CONTENT
    );
    server.delete(&one, ADMIN_KEY).await.error(404, "not_found");
    assert_eq!(
        server.get(path, ADMIN_KEY).await.body["policies"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    server.delete(&one, &token).await.error(403, "forbidden");
    // Deleting a policy detaches it everywhere.
    assert_eq!(
        server
            .delete(&format!("/v1/policies/{safety}"), ADMIN_KEY)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        server.get(path, ADMIN_KEY).await.body["policies"],
        json!([])
    );
    server.stop().await;
}
