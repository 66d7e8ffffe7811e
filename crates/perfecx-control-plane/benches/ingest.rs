//! Event ingestion over real HTTP: several senders, each an agent posting batches of 100
//! events, against a control plane on SQLite (a temporary file) and on PostgreSQL.
//!
//! `cargo bench -p perfecx-control-plane --bench ingest`
//!
//! PostgreSQL runs when `PERFECX_TEST_DATABASE_URL` is set (in a schema of its own, dropped
//! afterwards). `PERFECX_BENCH_SENDERS` and `PERFECX_BENCH_BATCHES` (per sender) change the
//! load; `PERFECX_BENCH_SYNC=normal` measures SQLite with `synchronous=NORMAL`.

use std::time::{Duration, Instant};

use perfecx_control_plane::{Config, Limit, SqliteSync, run};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::net::TcpListener;

const ADMIN_KEY: &str = "pfx_bench_admin_key_0123456789abcdef";
const BATCH: usize = 100;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn batch(sender: usize, number: usize) -> Value {
    let events: Vec<Value> = (0..BATCH)
        .map(|i| {
            json!({
                "event_id": uuid::Uuid::new_v4(),
                "event_type": if i % 10 == 9 { "policy_violation" } else { "tool_execution" },
                "data": {
                    "tool": "web_search", "input": format!("query {sender}-{number}-{i}"),
                    "output": "Found 5 relevant articles...", "duration_ms": 100 + i, "success": i % 7 != 0
                },
                "context": {"session_id": format!("sess_{sender}"), "user_id": "user_456"}
            })
        })
        .collect();
    json!({ "events": events })
}

async fn measure(label: &str, database_url: &str, sync: SqliteSync) -> anyhow::Result<()> {
    let senders = setting("PERFECX_BENCH_SENDERS", 8);
    let batches = setting("PERFECX_BENCH_BATCHES", 50);
    let mut config = Config::new(database_url);
    config.admin_key = Some(ADMIN_KEY.into());
    config.sqlite_sync = sync;
    config.rate_limits.events = Limit::new(0, Duration::from_secs(60));
    config.rate_limits.registration = Limit::new(0, Duration::from_secs(60));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(listener, config, async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();

    let mut tokens = Vec::new();
    for sender in 0..senders {
        let reply: Value = client
            .post(format!("{base}/v1/agents"))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"agent_id": format!("bench-{sender}"), "name": "bench"}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        tokens.push(
            reply["registration_token"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    // Bodies are built before the clock starts: the client's JSON work is not the server's.
    let bodies: Vec<Vec<Vec<u8>>> = (0..senders)
        .map(|s| {
            (0..batches)
                .map(|b| serde_json::to_vec(&batch(s, b)).unwrap_or_default())
                .collect()
        })
        .collect();

    let started = Instant::now();
    let mut tasks = Vec::new();
    for (sender, (token, bodies)) in tokens.into_iter().zip(bodies).enumerate() {
        let client = client.clone();
        let url = format!("{base}/v1/agents/bench-{sender}/events");
        tasks.push(tokio::spawn(async move {
            for body in bodies {
                client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?
                    .error_for_status()?;
            }
            Ok::<_, reqwest::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let events = senders * batches * BATCH;
    println!(
        "{label}: {events} events in {:.2} s = {:.0} events/s ({senders} senders, batches of {BATCH})",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64()
    );
    let _ = stop.send(());
    server.await??;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let sync = match std::env::var("PERFECX_BENCH_SYNC").as_deref() {
        Ok("normal") => SqliteSync::Normal,
        _ => SqliteSync::Full,
    };
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}/bench.db", dir.path().display());
    measure(&format!("sqlite (synchronous={sync:?})"), &url, sync).await?;

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
            let result = measure("postgres", &url, SqliteSync::Full).await;
            sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(&mut conn)
                .await?;
            result?;
        }
    }
    Ok(())
}
