//! Per-minute rollups, kept up to date in the transaction that stores the events, so that
//! metrics over any range read a row per minute (and per tool and minute) instead of every
//! event.
//!
//! Latencies are counted in a histogram with fixed, roughly log-spaced buckets (1, 2, 3, 5, 7,
//! 10, 15, 20, 30, 50, 70, 100 ms, ...): a percentile is estimated by spreading the durations
//! of the bucket that holds it evenly over the bucket, so the estimate always lies in the same
//! bucket as the true value (the nearest-rank percentile): bounds a factor of 1.4 to 2 apart.

use std::collections::BTreeMap;

use sqlx::{Any, Transaction};

use super::events::EventRow;
use super::{StoreResult, placeholders};

/// Upper bounds (exclusive) of the latency buckets, in milliseconds; the last bucket is open.
/// Migration 0002 spells the same bounds out for its backfill.
pub const LATENCY_BOUNDS_MS: [i64; 36] = [
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700, 1_000, 1_500, 2_000,
    3_000, 5_000, 7_000, 10_000, 15_000, 20_000, 30_000, 50_000, 70_000, 100_000, 150_000, 200_000,
    300_000, 500_000, 700_000, 1_000_000,
];
pub const BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// Durations are clamped to this at ingestion, so that no sum can overflow.
pub const MAX_DURATION_MS: i64 = 1_000_000_000;

/// Rollup keys hold a tool's first this many characters.
pub const MAX_TOOL_CHARS: usize = 200;

const MINUTE_MS: i64 = 60_000;

/// The rule types of the policy engine, in the order of [`Counts::by_rule`].
pub const RULES: [&str; 4] = [
    "tool_restriction",
    "execution_limit",
    "content_filter",
    "memory_protection",
];
/// Violation actions, in the order of [`Counts::by_action`].
pub const ACTIONS: [&str; 3] = ["blocked", "redacted", "alerted"];

/// The bucket that a duration falls in.
pub fn bucket_of(duration_ms: i64) -> usize {
    LATENCY_BOUNDS_MS.partition_point(|bound| *bound <= duration_ms)
}

/// The first millisecond of the minute holding `ms`.
pub fn minute_of(ms: i64) -> i64 {
    ms - ms.rem_euclid(MINUTE_MS)
}

/// The first `MAX_TOOL_CHARS` characters.
pub fn tool_key(tool: &str) -> &str {
    match tool.char_indices().nth(MAX_TOOL_CHARS) {
        Some((end, _)) => &tool[..end],
        None => tool,
    }
}

/// What tool executions and violations add up to, for one agent over some time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
    /// Tool executions that reported a duration, and the sum of those durations.
    pub timed: u64,
    pub latency_sum: i64,
    pub histogram: [u64; BUCKETS],
    pub violations: u64,
    pub by_rule: [u64; RULES.len()],
    pub by_action: [u64; ACTIONS.len()],
}

impl Default for Counts {
    fn default() -> Counts {
        Counts {
            requests: 0,
            errors: 0,
            timed: 0,
            latency_sum: 0,
            histogram: [0; BUCKETS],
            violations: 0,
            by_rule: [0; RULES.len()],
            by_action: [0; ACTIONS.len()],
        }
    }
}

/// The same per tool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ToolCounts {
    pub requests: u64,
    pub errors: u64,
    pub timed: u64,
    pub latency_sum: i64,
    pub violations: u64,
}

/// `n` events alike: their type, what they name, and (tool executions) the sum of their
/// durations when they reported one.
pub struct Alike<'a> {
    pub event_type: &'a str,
    pub tool: &'a str,
    pub rule: Option<&'a str>,
    pub action: Option<&'a str>,
    pub success: Option<bool>,
    /// The bucket of their durations, and the sum; `None` when they reported none.
    pub duration: Option<(usize, i64)>,
    pub n: u64,
}

/// Counts for an agent over some time, and per tool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub counts: Counts,
    pub tools: BTreeMap<String, ToolCounts>,
}

/// Whether metrics count events of this type.
pub fn counted(event_type: &str) -> bool {
    matches!(event_type, "tool_execution" | "policy_violation")
}

impl Totals {
    pub fn add(&mut self, e: &Alike<'_>) {
        if !counted(e.event_type) {
            return;
        }
        let tool = self.tools.entry(tool_key(e.tool).to_string()).or_default();
        add_to(&mut self.counts, tool, e);
    }

    pub fn merge(&mut self, other: Totals) {
        self.counts.merge(&other.counts);
        for (name, t) in other.tools {
            self.tools.entry(name).or_default().merge(&t);
        }
    }
}

fn add_to(c: &mut Counts, t: &mut ToolCounts, e: &Alike<'_>) {
    match e.event_type {
        "tool_execution" => {
            let failed = if e.success == Some(false) { e.n } else { 0 };
            c.requests += e.n;
            c.errors += failed;
            t.requests += e.n;
            t.errors += failed;
            if let Some((bucket, sum)) = e.duration {
                c.timed += e.n;
                c.latency_sum += sum;
                c.histogram[bucket.min(BUCKETS - 1)] += e.n;
                t.timed += e.n;
                t.latency_sum += sum;
            }
        }
        "policy_violation" => {
            c.violations += e.n;
            t.violations += e.n;
            if let Some(i) = RULES.iter().position(|r| Some(*r) == e.rule) {
                c.by_rule[i] += e.n;
            }
            if let Some(i) = ACTIONS.iter().position(|a| Some(*a) == e.action) {
                c.by_action[i] += e.n;
            }
        }
        _ => {}
    }
}

impl Counts {
    pub fn merge(&mut self, o: &Counts) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.timed += o.timed;
        self.latency_sum += o.latency_sum;
        for (a, b) in self.histogram.iter_mut().zip(o.histogram) {
            *a += b;
        }
        self.violations += o.violations;
        for (a, b) in self.by_rule.iter_mut().zip(o.by_rule) {
            *a += b;
        }
        for (a, b) in self.by_action.iter_mut().zip(o.by_action) {
            *a += b;
        }
    }

    /// The `q` quantile (0 to 1) of the durations, estimated from the histogram; 0 without any.
    pub fn percentile(&self, q: f64) -> f64 {
        let n: u64 = self.histogram.iter().sum();
        if n == 0 {
            return 0.0;
        }
        // The rank of the nearest-rank definition, 1-based.
        let rank = (q * n as f64).ceil().max(1.0);
        let mut below = 0u64;
        for (i, count) in self.histogram.iter().enumerate() {
            if *count == 0 {
                continue;
            }
            if (below + count) as f64 >= rank {
                let low = if i == 0 { 0 } else { LATENCY_BOUNDS_MS[i - 1] } as f64;
                let Some(high) = LATENCY_BOUNDS_MS.get(i) else {
                    // The open top bucket: its lower bound is all that is known.
                    return low;
                };
                // The k-th of `count` durations sits in the middle of its k-th share.
                let within = (rank - below as f64 - 0.5) / *count as f64;
                return low + (*high as f64 - low) * within;
            }
            below += count;
        }
        0.0
    }
}

impl ToolCounts {
    fn merge(&mut self, o: &ToolCounts) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.timed += o.timed;
        self.latency_sum += o.latency_sum;
        self.violations += o.violations;
    }
}

/// The columns of `metric_minutes` after `agent_id, minute`, in order.
pub fn minute_columns() -> Vec<String> {
    let mut columns: Vec<String> = ["requests", "errors", "timed", "latency_sum"]
        .iter()
        .map(|c| c.to_string())
        .collect();
    columns.extend((0..BUCKETS).map(|i| format!("h{i}")));
    columns.push("violations".into());
    columns.extend(RULES.iter().map(|r| format!("v_{r}")));
    columns.extend(ACTIONS.iter().map(|a| format!("a_{a}")));
    columns
}

/// The values of [`minute_columns`], in order.
pub fn minute_values(c: &Counts) -> Vec<i64> {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let mut values = vec![
        count(c.requests),
        count(c.errors),
        count(c.timed),
        c.latency_sum,
    ];
    values.extend(c.histogram.iter().map(|n| count(*n)));
    values.push(count(c.violations));
    values.extend(c.by_rule.iter().map(|n| count(*n)));
    values.extend(c.by_action.iter().map(|n| count(*n)));
    values
}

/// The inverse of [`minute_values`].
pub fn counts_from(values: &[i64]) -> Counts {
    let count = |i: usize| values.get(i).map_or(0, |v| u64::try_from(*v).unwrap_or(0));
    let mut c = Counts {
        requests: count(0),
        errors: count(1),
        timed: count(2),
        latency_sum: values.get(3).copied().unwrap_or(0),
        ..Counts::default()
    };
    let mut i = 4;
    for h in c.histogram.iter_mut() {
        *h = count(i);
        i += 1;
    }
    c.violations = count(i);
    i += 1;
    for v in c.by_rule.iter_mut() {
        *v = count(i);
        i += 1;
    }
    for a in c.by_action.iter_mut() {
        *a = count(i);
        i += 1;
    }
    c
}

const TOOL_COLUMNS: [&str; 5] = ["requests", "errors", "timed", "latency_sum", "violations"];

/// Adds the events to their minutes' rollups, within the transaction that stores them.
pub(super) async fn write(
    tx: &mut Transaction<'_, Any>,
    agent_id: &str,
    events: &[&EventRow],
    anonymous: bool,
) -> StoreResult<()> {
    let mut minutes: BTreeMap<i64, Totals> = BTreeMap::new();
    for e in events.iter().filter(|e| counted(e.event_type)) {
        let duration = e.duration_ms.map(|ms| (bucket_of(ms), ms));
        minutes.entry(minute_of(e.ts)).or_default().add(&Alike {
            event_type: e.event_type,
            tool: e.tool.as_deref().unwrap_or_default(),
            rule: e.rule.as_deref(),
            action: e.action.as_deref(),
            success: e.success,
            duration,
            n: 1,
        });
    }
    if minutes.is_empty() {
        return Ok(());
    }
    let columns = minute_columns();
    let rows: Vec<(i64, Vec<i64>)> = minutes
        .iter()
        .map(|(minute, t)| (*minute, minute_values(&t.counts)))
        .collect();
    upsert(
        tx,
        "metric_minutes",
        &["agent_id", "minute"],
        &columns,
        agent_id,
        rows.iter()
            .map(|(minute, values)| (*minute, None, values.as_slice())),
        anonymous,
    )
    .await?;
    let tool_rows: Vec<(i64, &str, [i64; 5])> = minutes
        .iter()
        .flat_map(|(minute, t)| {
            t.tools.iter().map(|(tool, c)| {
                (
                    *minute,
                    tool.as_str(),
                    [
                        i64::try_from(c.requests).unwrap_or(i64::MAX),
                        i64::try_from(c.errors).unwrap_or(i64::MAX),
                        i64::try_from(c.timed).unwrap_or(i64::MAX),
                        c.latency_sum,
                        i64::try_from(c.violations).unwrap_or(i64::MAX),
                    ],
                )
            })
        })
        .collect();
    let columns: Vec<String> = TOOL_COLUMNS.iter().map(|c| c.to_string()).collect();
    upsert(
        tx,
        "metric_minutes_tools",
        &["agent_id", "minute", "tool"],
        &columns,
        agent_id,
        tool_rows
            .iter()
            .map(|(minute, tool, values)| (*minute, Some(*tool), values.as_slice())),
        anonymous,
    )
    .await
}

/// `INSERT ... ON CONFLICT (key) DO UPDATE SET c = table.c + excluded.c` over rows of
/// `agent_id, minute, [tool,] values...`, in statements of at most `ROWS` rows.
async fn upsert<'r>(
    tx: &mut Transaction<'_, Any>,
    table: &str,
    key: &[&str],
    columns: &[String],
    agent_id: &str,
    rows: impl Iterator<Item = (i64, Option<&'r str>, &'r [i64])>,
    anonymous: bool,
) -> StoreResult<()> {
    const ROWS: usize = 100;
    let rows: Vec<_> = rows.collect();
    let width = key.len() + columns.len();
    let update = columns
        .iter()
        .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    for chunk in rows.chunks(ROWS) {
        let mut sql = format!(
            "INSERT INTO {table} ({}, {}) VALUES ",
            key.join(", "),
            columns.join(", ")
        );
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            if anonymous {
                sql.push('(');
                sql.push_str(&vec!["?"; width].join(", "));
                sql.push(')');
            } else {
                sql.push_str(&placeholders(1 + i * width, width));
            }
        }
        sql.push_str(&format!(
            " ON CONFLICT ({}) DO UPDATE SET {update}",
            key.join(", ")
        ));
        let mut query = sqlx::query(&sql);
        for (minute, tool, values) in chunk {
            query = query.bind(agent_id).bind(*minute);
            if let Some(tool) = tool {
                query = query.bind(*tool);
            }
            for v in *values {
                query = query.bind(*v);
            }
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_percentiles() {
        assert_eq!(bucket_of(-5), 0);
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 1);
        assert_eq!(bucket_of(2), 2);
        assert_eq!(bucket_of(99), 11);
        assert_eq!(bucket_of(100), 12);
        assert_eq!(bucket_of(999_999), BUCKETS - 2);
        assert_eq!(bucket_of(i64::MAX), BUCKETS - 1);

        let mut c = Counts::default();
        assert_eq!(c.percentile(0.5), 0.0);
        // 100 durations of 100..=199 ms: 50 in [100, 150), 50 in [150, 200).
        for ms in 100..200 {
            c.histogram[bucket_of(ms)] += 1;
        }
        assert_eq!(c.percentile(0.5), 149.5);
        assert_eq!(c.percentile(0.99), 198.5);
        assert_eq!(c.percentile(0.0), 100.5);
        c.histogram[BUCKETS - 1] += 1000;
        assert_eq!(c.percentile(0.99), 1_000_000.0);
    }

    #[test]
    fn columns_and_values_round_trip() {
        let mut c = Counts {
            requests: 9,
            errors: 2,
            timed: 7,
            latency_sum: 1234,
            violations: 4,
            by_rule: [1, 0, 2, 1],
            by_action: [3, 1, 0],
            ..Counts::default()
        };
        c.histogram[3] = 5;
        c.histogram[BUCKETS - 1] = 2;
        assert_eq!(minute_values(&c).len(), minute_columns().len());
        assert_eq!(counts_from(&minute_values(&c)), c);
    }

    #[test]
    fn tool_keys_are_bounded() {
        assert_eq!(tool_key("web_search"), "web_search");
        let long = "é".repeat(300);
        assert_eq!(tool_key(&long).chars().count(), MAX_TOOL_CHARS);
    }
}
