//! Anomaly detection through ingestion: generated traffic with injected, labelled anomalies is
//! posted as events; the control plane must find what the detector finds when the same traffic
//! is replayed to it directly, store it, send it to watchers, list it with filters and pages,
//! and report the highest score in the metrics.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{ADMIN_KEY, TestDb, TestServer, ws};
use perfecx_monitor::generator::{Event, Traffic, generate};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_databases!(
    anomalies_are_detected_stored_and_listed,
    a_spike_is_reported_when_the_agent_falls_silent
);

/// 2024-01-15T00:00:00Z: the generator's minute 0.
const T0: i64 = 1_705_276_800_000;

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// The traffic as the control plane stores it: durations in whole milliseconds.
fn rounded(mut traffic: Traffic) -> Traffic {
    for e in &mut traffic.events {
        if let Event::Call { duration_ms, .. } = e {
            *duration_ms = duration_ms.round();
        }
    }
    traffic
}

/// The event as a sidecar would report it, with an id of its own.
fn body(number: usize, e: &Event) -> Value {
    let mut body = match e {
        Event::Call {
            at_ms,
            tool,
            duration_ms,
            success,
            ..
        } => json!({
            "event_type": "tool_execution", "timestamp": rfc3339(T0 + at_ms),
            "data": {"tool": tool, "duration_ms": *duration_ms as i64, "success": success}
        }),
        Event::Violation { at_ms, .. } => json!({
            "event_type": "policy_violation", "timestamp": rfc3339(T0 + at_ms),
            "data": {"tool": "system_command", "policy": "p", "rule": "tool_restriction", "action": "blocked"}
        }),
    };
    body["event_id"] = json!(uuid::Uuid::from_u64_pair(11, number as u64));
    body
}

/// `(type, detected_at)` of each anomaly of a list.
fn keys(anomalies: &Value) -> BTreeSet<(String, String)> {
    anomalies
        .as_array()
        .map(|list| {
            list.iter()
                .map(|a| {
                    (
                        a["type"].as_str().unwrap_or_default().to_string(),
                        a["detected_at"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn anomalies_are_detected_stored_and_listed(db: TestDb) {
    let server = TestServer::start_with(&db, |config| {
        config.rate_limits.events = perfecx_control_plane::Limit::new(0, Duration::from_secs(60));
        config.rate_limits.metrics = perfecx_control_plane::Limit::new(0, Duration::from_secs(60));
        config.websocket.metrics_interval = Duration::from_secs(3600);
        // Minutes are judged as the events move past them, never by the clock: however slowly
        // this machine posts them, the result is the same.
        config.detection.lateness = Duration::from_secs(86_400);
    })
    .await;
    let token = server.register("a1").await;
    let mut socket = ws::connect(&server, "a1", ADMIN_KEY).await;
    assert!(ws::next_of(&mut socket, "policy_bundle").await.is_some());

    // Five hours of one agent, eight anomalies injected after the first hour.
    let traffic = rounded(generate(11, 1, 300, 8));
    let last_at = traffic.events.iter().map(Event::at_ms).max().unwrap_or(0);
    // What the detector finds on this traffic, but for the last minute's figures: those
    // are judged once the minute is over, by the clock, long after this test.
    let expected: BTreeSet<(String, String)> = traffic
        .detect()
        .into_iter()
        .filter(|(_, a)| a.detected_at_ms <= last_at)
        .map(|(_, a)| (a.kind.as_str().to_string(), rfc3339(T0 + a.detected_at_ms)))
        .collect();
    assert_eq!(traffic.labels.len(), 8);
    assert!(expected.len() >= 8, "{expected:?}");
    let bodies: Vec<Value> = traffic
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| body(i, e))
        .collect();
    for batch in bodies.chunks(1000) {
        let reply = server
            .post("/v1/agents/a1/events", &token, json!({"events": batch}))
            .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    }

    // Detection runs in the background: wait until it has stored as many as expected.
    let list = |query: &str| format!("/v1/agents/a1/anomalies?limit=100{query}");
    let mut waited = 0;
    let all = loop {
        let reply = server.get(&list(""), ADMIN_KEY).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        if reply.body["total"].as_u64() >= Some(expected.len() as u64) {
            break reply.body;
        }
        waited += 1;
        assert!(
            waited < 600,
            "only {} anomalies after a minute",
            reply.body["total"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(keys(&all["anomalies"]), expected);
    let anomalies = all["anomalies"].as_array().cloned().unwrap_or_default();
    // Every injected anomaly is among them.
    for label in &traffic.labels {
        let minute = |a: &Value| {
            let at =
                chrono::DateTime::parse_from_rfc3339(a["detected_at"].as_str().unwrap_or_default())
                    .map(|t| t.timestamp_millis())
                    .unwrap_or(0);
            (at - T0 - 1).div_euclid(60_000)
        };
        assert!(
            anomalies.iter().any(|a| a["type"] == label.kind.as_str()
                && (label.start_minute..label.end_minute).contains(&minute(a))),
            "{label:?} not found"
        );
    }
    // Each with its severity, score, words and evidence; newest first.
    for a in &anomalies {
        assert!(
            ["low", "medium", "high", "critical"]
                .contains(&a["severity"].as_str().unwrap_or_default()),
            "{a}"
        );
        assert!(
            (0.0..=1.0).contains(&a["score"].as_f64().unwrap_or(-1.0)),
            "{a}"
        );
        assert!(
            a["description"].as_str().is_some_and(|d| d.len() > 10),
            "{a}"
        );
        assert!(a["evidence"].is_object(), "{a}");
        assert_eq!(a["agent_id"], "a1");
        assert!(
            a["anomaly_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("anm_"))
        );
    }
    let times: Vec<&str> = anomalies
        .iter()
        .map(|a| a["detected_at"].as_str().unwrap_or_default())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");

    // The watcher got each of them as it was found.
    let mut seen = BTreeSet::new();
    while seen.len() < anomalies.len() {
        let message = ws::next_of(&mut socket, "anomaly_detected")
            .await
            .unwrap_or_default();
        seen.insert(
            message["data"]["anomaly_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    let stored: BTreeSet<String> = anomalies
        .iter()
        .map(|a| a["anomaly_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(seen, stored);

    // Filters: exact severity, minimum severity, time range; pages.
    for level in ["low", "medium", "high", "critical"] {
        let reply = server
            .get(&list(&format!("&severity={level}")), ADMIN_KEY)
            .await;
        let n = anomalies.iter().filter(|a| a["severity"] == level).count();
        assert_eq!(reply.body["total"], n, "{level}");
        assert!(
            reply.body["anomalies"]
                .as_array()
                .is_some_and(|l| l.iter().all(|a| a["severity"] == level))
        );
    }
    let reply = server.get(&list("&min_severity=high"), ADMIN_KEY).await;
    let n = anomalies
        .iter()
        .filter(|a| a["severity"] == "high" || a["severity"] == "critical")
        .count();
    assert_eq!(reply.body["total"], n);
    let reply = server.get(&list("&severity=low,critical"), ADMIN_KEY).await;
    let n = anomalies
        .iter()
        .filter(|a| a["severity"] == "low" || a["severity"] == "critical")
        .count();
    assert_eq!(reply.body["total"], n);
    let (start, end) = (rfc3339(T0 + 120 * 60_000), rfc3339(T0 + 240 * 60_000));
    let reply = server
        .get(&list(&format!("&start={start}&end={end}")), ADMIN_KEY)
        .await;
    let inside: Vec<&Value> = anomalies
        .iter()
        .filter(|a| {
            let at = a["detected_at"].as_str().unwrap_or_default();
            *at >= *start.as_str() && *at < *end.as_str()
        })
        .collect();
    assert_eq!(reply.body["total"], inside.len());
    assert_eq!(
        reply.body["anomalies"].as_array().map(Vec::len),
        Some(inside.len())
    );
    let mut paged = Vec::new();
    for offset in (0..anomalies.len()).step_by(3) {
        let reply = server
            .get(
                &format!("/v1/agents/a1/anomalies?limit=3&offset={offset}"),
                ADMIN_KEY,
            )
            .await;
        assert_eq!(reply.body["total"], anomalies.len());
        assert_eq!(
            (reply.body["limit"].clone(), reply.body["offset"].clone()),
            (json!(3), json!(offset))
        );
        paged.extend(
            reply.body["anomalies"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        );
    }
    assert_eq!(paged, anomalies);
    for (query, field) in [
        ("severity=severe", "severity"),
        ("min_severity=HIGH", "min_severity"),
        ("severity=low&min_severity=high", "exclude"),
        (
            "start=2024-01-16T00:00:00Z&end=2024-01-15T00:00:00Z",
            "start",
        ),
        ("end=soon", "end"),
        ("limit=500", "limit"),
        ("offset=-1", "offset"),
        ("level=high", "level"),
    ] {
        let reply = server
            .get(&format!("/v1/agents/a1/anomalies?{query}"), ADMIN_KEY)
            .await;
        assert!(reply.error(400, "bad_request").contains(field), "{query}");
    }

    // The metrics' anomaly score is the highest score in the range.
    let max = anomalies
        .iter()
        .filter_map(|a| a["score"].as_f64())
        .fold(0.0, f64::max);
    let metrics = |start: i64, end: i64| {
        format!(
            "/v1/agents/a1/metrics?start={}&end={}",
            rfc3339(T0 + start * 60_000),
            rfc3339(T0 + end * 60_000)
        )
    };
    let reply = server.get(&metrics(0, 300), ADMIN_KEY).await;
    assert_eq!(reply.body["metrics"]["anomaly_score"], max);
    // Nothing is reported in the warm-up.
    let reply = server.get(&metrics(0, 30), ADMIN_KEY).await;
    assert_eq!(reply.body["metrics"]["anomaly_score"], 0.0);

    // A resend is stored once, and not fed to the detector again.
    let reply = server
        .post(
            "/v1/agents/a1/events",
            &token,
            json!({"events": bodies[..1000]}),
        )
        .await;
    assert_eq!(reply.body["stored"], 0);
    let reply = server.get(&list(""), ADMIN_KEY).await;
    assert_eq!(reply.body["total"], anomalies.len());
    server.stop().await;
}

/// The last minute before a silence is judged by the clock: its burst of violations is
/// reported though no later event closes the minute.
async fn a_spike_is_reported_when_the_agent_falls_silent(db: TestDb) {
    let server = TestServer::start_with(&db, |config| {
        config.websocket.metrics_interval = Duration::from_secs(3600);
        config.detection.tick = Duration::from_millis(50);
        config.detection.lateness = Duration::ZERO;
    })
    .await;
    let token = server.register("a1").await;
    let mut socket = ws::connect(&server, "a1", ADMIN_KEY).await;
    assert!(ws::next_of(&mut socket, "policy_bundle").await.is_some());
    // 35 quiet minutes (20 calls each, a violation now and then), then 12 violations in the
    // 36th, whose last event comes 59 s into it.
    let mut events = Vec::new();
    for minute in 0..36 {
        for i in 0..20 {
            let at = T0 + minute * 60_000 + i * 2_900;
            events.push(
                json!({"event_type": "tool_execution", "timestamp": rfc3339(at),
                "data": {"tool": "web_search", "duration_ms": 200, "success": true}}),
            );
        }
        let violations = if minute == 35 {
            12
        } else {
            i64::from(minute % 10 == 0)
        };
        for v in 0..violations {
            events.push(json!({"event_type": "policy_violation", "timestamp": rfc3339(T0 + minute * 60_000 + 30_000 + v),
                "data": {"tool": "shell", "rule": "tool_restriction", "action": "blocked"}}));
        }
    }
    events.push(
        json!({"event_type": "tool_execution", "timestamp": rfc3339(T0 + 35 * 60_000 + 59_000),
        "data": {"tool": "web_search", "duration_ms": 200, "success": true}}),
    );
    server.ingest("a1", &token, events).await;
    let found = ws::next_of(&mut socket, "anomaly_detected")
        .await
        .unwrap_or_default();
    assert_eq!(found["data"]["type"], "violation_burst", "{found}");
    assert_eq!(found["data"]["detected_at"], rfc3339(T0 + 36 * 60_000));
    assert_eq!(
        found["data"]["evidence"]["observed_violations_per_minute"],
        12
    );
    server.stop().await;
}
