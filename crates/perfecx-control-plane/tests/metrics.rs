//! Metrics from the per-minute rollups against a brute-force count over the same events: 50,000
//! events through the ingestion endpoint, over three hours, read back over ranges that fall on
//! minute boundaries and ranges that do not. Then the migration's backfill rebuilds the rollups
//! from the events, and must reach the same figures.

mod common;

use std::collections::BTreeMap;

use common::{ADMIN_KEY, TestDb, TestServer};
use perfecx_control_plane::store::rollups::{LATENCY_BOUNDS_MS, bucket_of};
use perfecx_monitor::generator::Rng;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection;

on_both_databases!(metrics_match_a_brute_force_count);

const EVENTS: usize = 50_000;
const BATCH: usize = 1_000;
/// 2024-01-15T08:00:00Z.
const T0: i64 = 1_705_305_600_000;
const MINUTE: i64 = 60_000;
const SPAN: i64 = 180 * MINUTE;

const TOOLS: [&str; 6] = [
    "web_search",
    "calculator",
    "file_reader",
    "sql_query",
    "memory_write",
    "send_email",
];
const RULES: [&str; 5] = [
    "tool_restriction",
    "execution_limit",
    "content_filter",
    "memory_protection",
    "custom_rule",
];
const ACTIONS: [&str; 3] = ["blocked", "redacted", "alerted"];

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn pick<'a>(rng: &mut Rng, items: &[&'a str]) -> &'a str {
    items[(rng.next_u64() % items.len() as u64) as usize]
}

/// One event as sent, with its time.
struct Sent {
    ts: i64,
    body: Value,
}

/// Tool executions (some failed, some `isError`, some without a duration or a tool),
/// violations of every rule and action (and of none), and events that metrics ignore.
fn traffic() -> Vec<Sent> {
    let mut rng = Rng::new(5);
    (0..EVENTS)
        .map(|_| {
            let ts = T0 + (rng.next_u64() % SPAN as u64) as i64;
            let u = rng.unit();
            let mut data = serde_json::Map::new();
            let event_type = if u < 0.83 {
                if rng.unit() > 0.02 {
                    data.insert("tool".into(), json!(pick(&mut rng, &TOOLS)));
                }
                if rng.unit() > 0.05 {
                    // Log-uniform from 0 to about 200 s, across most buckets.
                    let ms = (rng.unit() * 12.2).exp() - 1.0;
                    data.insert("duration_ms".into(), json!(ms.round() as i64));
                }
                let v = rng.unit();
                if v < 0.04 {
                    data.insert("success".into(), json!(false));
                } else if v < 0.06 {
                    data.insert("success".into(), json!(true));
                    data.insert("isError".into(), json!(true));
                } else if v < 0.98 {
                    data.insert("success".into(), json!(true));
                }
                "tool_execution"
            } else if u < 0.98 {
                data.insert("tool".into(), json!(pick(&mut rng, &TOOLS)));
                if rng.unit() > 0.03 {
                    data.insert("rule".into(), json!(pick(&mut rng, &RULES)));
                }
                if rng.unit() > 0.03 {
                    data.insert("action".into(), json!(pick(&mut rng, &ACTIONS)));
                }
                "policy_violation"
            } else {
                data.insert("tool".into(), json!("web_search"));
                data.insert("duration_ms".into(), json!(5));
                "llm_call"
            };
            let body = json!({
                "event_id": uuid::Uuid::from_u64_pair(rng.next_u64(), rng.next_u64()),
                "event_type": event_type,
                "timestamp": rfc3339(ts),
                "data": data,
            });
            Sent { ts, body }
        })
        .collect()
}

#[derive(Debug, Default, PartialEq)]
struct Tool {
    requests: u64,
    errors: u64,
    timed: u64,
    latency_sum: i64,
    violations: u64,
}

/// The metrics of `[start, end)` counted event by event; latency percentiles are checked
/// separately against `durations`.
fn brute_force(events: &[Sent], start: i64, end: i64) -> (Value, Vec<i64>) {
    let (mut requests, mut errors, mut violations) = (0u64, 0u64, 0u64);
    let mut durations = Vec::new();
    let mut by_rule: BTreeMap<&str, u64> = RULES[..4].iter().map(|r| (*r, 0)).collect();
    let mut by_action: BTreeMap<&str, u64> = ACTIONS.iter().map(|a| (*a, 0)).collect();
    let mut tools: BTreeMap<String, Tool> = BTreeMap::new();
    for e in events.iter().filter(|e| (start..end).contains(&e.ts)) {
        let data = &e.body["data"];
        let tool = tools
            .entry(data["tool"].as_str().unwrap_or_default().to_string())
            .or_default();
        match e.body["event_type"].as_str() {
            Some("tool_execution") => {
                requests += 1;
                tool.requests += 1;
                if data["success"] == false || data["isError"] == true {
                    errors += 1;
                    tool.errors += 1;
                }
                if let Some(ms) = data["duration_ms"].as_i64() {
                    durations.push(ms);
                    tool.timed += 1;
                    tool.latency_sum += ms;
                }
            }
            Some("policy_violation") => {
                violations += 1;
                tool.violations += 1;
                if let Some(n) = data["rule"].as_str().and_then(|r| by_rule.get_mut(r)) {
                    *n += 1;
                }
                if let Some(n) = data["action"].as_str().and_then(|a| by_action.get_mut(a)) {
                    *n += 1;
                }
            }
            _ => {}
        }
    }
    let mean = |sum: i64, n: u64| if n == 0 { 0.0 } else { sum as f64 / n as f64 };
    let sum: i64 = durations.iter().sum();
    let tools: serde_json::Map<String, Value> = tools
        .into_iter()
        .filter(|(_, t)| t.requests + t.violations > 0)
        .map(|(name, t)| {
            let value = json!({"requests": t.requests, "errors": t.errors,
                "average_response_time_ms": mean(t.latency_sum, t.timed), "policy_violations": t.violations});
            (name, value)
        })
        .collect();
    let metrics = json!({
        "total_requests": requests,
        "average_response_time_ms": mean(sum, durations.len() as u64),
        "error_rate": if requests == 0 { 0.0 } else { errors as f64 / requests as f64 },
        "policy_violations": violations,
        "security_events": {
            "memory_tampering_attempts": by_rule["memory_protection"],
            "unauthorized_tool_access": by_rule["tool_restriction"],
            "suspicious_patterns": by_rule["content_filter"],
        },
        "violations_by_rule": by_rule,
        "violations_by_action": by_action,
        "tools": tools,
    });
    durations.sort_unstable();
    (metrics, durations)
}

/// Floats equal to 1e-9 relative, everything else exactly.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// The bucket bounds `[low, high)` around a duration.
fn bucket_bounds(ms: i64) -> (f64, f64) {
    let i = bucket_of(ms);
    let low = if i == 0 { 0 } else { LATENCY_BOUNDS_MS[i - 1] };
    let high = LATENCY_BOUNDS_MS.get(i).copied().unwrap_or(i64::MAX);
    (low as f64, high as f64)
}

async fn check_ranges(server: &TestServer, events: &[Sent]) {
    let ranges = [
        (T0, T0 + SPAN),
        (T0 + 30 * MINUTE, T0 + 150 * MINUTE),
        (T0 + 17 * MINUTE + 23_456, T0 + 122 * MINUTE + 11_789),
        (T0 + 60 * MINUTE + 10_500, T0 + 60 * MINUTE + 50_250),
        (T0 + 119 * MINUTE + 30_000, T0 + 120 * MINUTE + 30_000),
        (T0 + 60 * MINUTE, T0 + 105 * MINUTE + 30_500),
        (T0 - 60 * MINUTE, T0),
    ];
    for (start, end) in ranges {
        let path = format!(
            "/v1/agents/a1/metrics?start={}&end={}",
            rfc3339(start),
            rfc3339(end)
        );
        let reply = server.get(&path, ADMIN_KEY).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let mut got = reply.body["metrics"].clone();
        let percentiles = got
            .as_object_mut()
            .and_then(|m| m.remove("latency_percentiles_ms"))
            .unwrap_or_default();
        // The anomaly score is the anomalies test's business: detection runs in the
        // background, on events that arrive here in no time order.
        let score = got
            .as_object_mut()
            .and_then(|m| m.remove("anomaly_score"))
            .and_then(|s| s.as_f64())
            .unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&score), "{score}");
        let (expected, durations) = brute_force(events, start, end);
        assert!(
            same(&got, &expected),
            "range {} .. {}:\n got {got}\n expected {expected}",
            rfc3339(start),
            rfc3339(end)
        );
        // Each estimate lies in the bucket of the true (nearest-rank) percentile.
        for (name, q) in [("p50", 0.50), ("p95", 0.95), ("p99", 0.99)] {
            let estimate = percentiles[name].as_f64().unwrap_or(-1.0);
            if durations.is_empty() {
                assert_eq!(estimate, 0.0);
                continue;
            }
            let rank = ((q * durations.len() as f64).ceil() as usize).max(1);
            let exact = durations[rank - 1];
            let (low, high) = bucket_bounds(exact);
            assert!(
                low <= estimate && estimate < high,
                "{name}: {estimate} for {exact} ms, outside [{low}, {high})"
            );
        }
    }
}

async fn metrics_match_a_brute_force_count(db: TestDb) {
    let server = TestServer::start_with(&db, |config| {
        config.rate_limits.events =
            perfecx_control_plane::Limit::new(0, std::time::Duration::from_secs(60));
    })
    .await;
    let token = server.register("a1").await;
    let events = traffic();
    for chunk in events.chunks(BATCH) {
        let batch: Vec<&Value> = chunk.iter().map(|e| &e.body).collect();
        let reply = server
            .post("/v1/agents/a1/events", &token, json!({"events": batch}))
            .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
        assert_eq!(reply.body["stored"], chunk.len());
    }
    check_ranges(&server, &events).await;

    // A resend is recognised and counted once.
    let batch: Vec<&Value> = events[..BATCH].iter().map(|e| &e.body).collect();
    let reply = server
        .post("/v1/agents/a1/events", &token, json!({"events": batch}))
        .await;
    assert_eq!(reply.body["duplicates"], BATCH);
    check_ranges(&server, &events).await;

    // The migration's backfill, run over these events, rebuilds the same rollups.
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&server.db_url)
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    let migration = include_str!("../migrations/0002_monitoring.sql");
    let backfill = migration
        .split_once("-- BACKFILL")
        .and_then(|(_, rest)| rest.split_once('\n'))
        .map(|(_, statements)| statements)
        .unwrap_or_default();
    let statements: Vec<&str> = backfill
        .split(';')
        .map(|s| s.trim())
        .filter(|s| s.contains("INSERT"))
        .collect();
    assert_eq!(statements.len(), 2);
    for sql in [
        "DELETE FROM metric_minutes",
        "DELETE FROM metric_minutes_tools",
    ]
    .into_iter()
    .chain(statements)
    {
        sqlx::query(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| unreachable!("{sql}: {e}"));
    }
    conn.close().await.unwrap_or_else(|e| unreachable!("{e}"));
    check_ranges(&server, &events).await;
    server.stop().await;
}
