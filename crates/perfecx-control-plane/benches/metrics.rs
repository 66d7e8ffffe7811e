//! `GET /v1/agents/{agent_id}/metrics` over 24 hours of an agent that reported ten million
//! events, on SQLite and on PostgreSQL.
//!
//! `cargo bench -p perfecx-control-plane --bench metrics`
//!
//! The 1,438 whole minutes inside the range are written straight into the rollup tables, as
//! ingestion would have left them (6,950 events a minute over eight tools); the minutes at
//! either end, which the range only partly covers, get their 7,000 events each through the
//! ingestion endpoint, so that the query reads them from the events table as it must. Four
//! other agents with the same rollups share the tables. The time is the whole HTTP request,
//! client and server in one process, over `PERFECX_BENCH_RUNS` (100) requests.

use std::time::{Duration, Instant};

use perfecx_control_plane::store::rollups::{BUCKETS, Counts, minute_columns, minute_values};
use perfecx_control_plane::{Config, Limit, run};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::net::TcpListener;

const ADMIN_KEY: &str = "pfx_bench_admin_key_0123456789abcdef";
/// 2024-01-15T00:00:00Z.
const T0: i64 = 1_705_276_800_000;
const MINUTE: i64 = 60_000;
const DAY_MINUTES: i64 = 1_440;
const PER_MINUTE: u64 = 6_950;
const TOOLS: [&str; 8] = [
    "web_search",
    "fetch_page",
    "summarize",
    "calculator",
    "file_reader",
    "sql_query",
    "send_email",
    "memory_write",
];

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// One minute of a busy agent: 93% tool executions over a spread of latencies, 2% of them
/// failed, 7% violations.
fn busy_minute(minute: i64) -> Counts {
    let violations = PER_MINUTE * 7 / 100;
    let requests = PER_MINUTE - violations;
    let mut c = Counts {
        requests,
        errors: requests / 50,
        timed: requests,
        violations,
        by_rule: [violations / 4; 4],
        by_action: [
            violations / 2,
            violations / 4,
            violations - violations / 2 - violations / 4,
        ],
        ..Counts::default()
    };
    // Latencies around 100 ms to 1 s, shifting a little from minute to minute.
    let mut left = requests;
    for (i, bucket) in (10..24).enumerate() {
        let n = (requests / 14 + (minute as u64 + i as u64) % 7).min(left);
        c.histogram[bucket.min(BUCKETS - 1)] = n;
        left -= n;
    }
    c.histogram[15] += left;
    c.latency_sum = i64::try_from(requests).unwrap_or(0) * 240;
    c
}

async fn fill_rollups(url: &str, agents: &[String]) -> anyhow::Result<()> {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await?;
    let columns = minute_columns();
    let width = 2 + columns.len();
    let mut tx = conn.begin().await?;
    for agent in agents {
        for chunk in (1..DAY_MINUTES).collect::<Vec<_>>().chunks(50) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|r| {
                    let list: Vec<String> = (0..width)
                        .map(|c| format!("${}", r * width + c + 1))
                        .collect();
                    format!("({})", list.join(", "))
                })
                .collect();
            let sql = format!(
                "INSERT INTO metric_minutes (agent_id, minute, {}) VALUES {}",
                columns.join(", "),
                rows.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for minute in chunk {
                query = query.bind(agent.as_str()).bind(T0 + minute * MINUTE);
                for v in minute_values(&busy_minute(*minute)) {
                    query = query.bind(v);
                }
            }
            query.execute(&mut *tx).await?;
            let rows: Vec<String> = (0..chunk.len() * TOOLS.len())
                .map(|r| {
                    let list: Vec<String> = (0..8).map(|c| format!("${}", r * 8 + c + 1)).collect();
                    format!("({})", list.join(", "))
                })
                .collect();
            let sql = format!(
                "INSERT INTO metric_minutes_tools (agent_id, minute, tool, requests, errors, \
                 timed, latency_sum, violations) VALUES {}",
                rows.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for minute in chunk {
                let c = busy_minute(*minute);
                let share = |n: u64| i64::try_from(n / TOOLS.len() as u64).unwrap_or(0);
                for tool in TOOLS {
                    query = query
                        .bind(agent.as_str())
                        .bind(T0 + minute * MINUTE)
                        .bind(tool)
                        .bind(share(c.requests))
                        .bind(share(c.errors))
                        .bind(share(c.timed))
                        .bind(c.latency_sum / TOOLS.len() as i64)
                        .bind(share(c.violations));
                }
            }
            query.execute(&mut *tx).await?;
        }
    }
    tx.commit().await?;
    conn.close().await?;
    Ok(())
}

/// 7,000 events spread over the minute starting at `start`, through the API.
async fn post_minute(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    start: i64,
) -> anyhow::Result<()> {
    for batch in 0..7 {
        let events: Vec<Value> = (0..1000)
            .map(|i| {
                let n = batch * 1000 + i;
                let ts = start + n * MINUTE / 7000;
                json!({"event_type": if n % 14 == 0 { "policy_violation" } else { "tool_execution" },
                    "timestamp": rfc3339(ts),
                    "data": {"tool": TOOLS[(n % 8) as usize], "duration_ms": 50 + n % 900,
                        "success": n % 50 != 0, "rule": "content_filter", "action": "blocked"}})
            })
            .collect();
        client
            .post(format!("{base}/v1/agents/busy/events"))
            .bearer_auth(token)
            .json(&json!({ "events": events }))
            .send()
            .await?
            .error_for_status()?;
    }
    Ok(())
}

async fn measure(label: &str, url: &str) -> anyhow::Result<()> {
    let runs = std::env::var("PERFECX_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100usize);
    let mut config = Config::new(url);
    config.admin_key = Some(ADMIN_KEY.into());
    config.rate_limits.events = Limit::new(0, Duration::from_secs(60));
    config.rate_limits.metrics = Limit::new(0, Duration::from_secs(60));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(listener, config, async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let mut agents = Vec::new();
    let mut token = String::new();
    for agent in ["busy", "other-1", "other-2", "other-3", "other-4"] {
        let reply: Value = client
            .post(format!("{base}/v1/agents"))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"agent_id": agent, "name": agent}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if agent == "busy" {
            token = reply["registration_token"]
                .as_str()
                .unwrap_or_default()
                .to_string();
        }
        agents.push(agent.to_string());
    }
    let filling = Instant::now();
    fill_rollups(url, &agents).await?;
    post_minute(&client, &base, &token, T0).await?;
    post_minute(&client, &base, &token, T0 + DAY_MINUTES * MINUTE).await?;
    println!(
        "{label}: rollups of {} events for `busy` (and 4 other agents) ready in {:.1} s",
        (DAY_MINUTES - 1) as u64 * PER_MINUTE + 14_000,
        filling.elapsed().as_secs_f64()
    );

    // 24 hours that start and end half-way through a minute, and 24 whole hours.
    let ranges = [
        (
            "24 h, unaligned",
            T0 + 30_500,
            T0 + DAY_MINUTES * MINUTE + 30_500,
        ),
        (
            "24 h, whole minutes",
            T0 + MINUTE,
            T0 + DAY_MINUTES * MINUTE,
        ),
    ];
    for (name, start, end) in ranges {
        let url = format!(
            "{base}/v1/agents/busy/metrics?start={}&end={}",
            rfc3339(start),
            rfc3339(end)
        );
        let mut times = Vec::with_capacity(runs);
        let mut total = Value::Null;
        for _ in 0..runs {
            let started = Instant::now();
            let reply: Value = client
                .get(&url)
                .bearer_auth(ADMIN_KEY)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            times.push(started.elapsed());
            total = reply["metrics"]["total_requests"].clone();
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{label}: {name}: total_requests {total}; median {:.1} ms, p95 {:.1} ms, max {:.1} ms over {runs} requests",
            ms(times[runs / 2]),
            ms(times[runs * 95 / 100]),
            ms(times[runs - 1])
        );
    }
    let _ = stop.send(());
    server.await??;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}/bench.db", dir.path().display());
    measure("sqlite", &url).await?;
    match std::env::var("PERFECX_TEST_DATABASE_URL") {
        Err(_) => println!("postgres: skipped, PERFECX_TEST_DATABASE_URL is unset"),
        Ok(base) => {
            let schema = format!("perfecx_bench_{}", uuid::Uuid::new_v4().simple());
            let mut conn = sqlx::PgConnection::connect(&base).await?;
            sqlx::query(&format!("CREATE SCHEMA {schema}"))
                .execute(&mut conn)
                .await?;
            let separator = if base.contains('?') { '&' } else { '?' };
            let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
            let result = measure("postgres", &url).await;
            sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(&mut conn)
                .await?;
            result?;
        }
    }
    Ok(())
}
