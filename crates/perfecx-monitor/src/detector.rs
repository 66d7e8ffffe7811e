//! One agent's baseline, learnt as its signals stream in, and the departures from it.

use std::collections::{HashMap, HashSet, VecDeque};

pub use perfecx_api::Severity;
use serde::Serialize;
use serde_json::json;

/// What the detector is fed, in time order (milliseconds since the epoch).
#[derive(Debug, Clone, Copy)]
pub enum Signal<'a> {
    /// A tool call that reached the tool; `duration_ms` when the call reported one.
    Call {
        at_ms: i64,
        tool: &'a str,
        duration_ms: Option<f64>,
        success: bool,
    },
    /// A policy violation (the call may not have reached the tool).
    Violation { at_ms: i64 },
}

impl Signal<'_> {
    fn at_ms(&self) -> i64 {
        match self {
            Signal::Call { at_ms, .. } | Signal::Violation { at_ms } => *at_ms,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    CallRateSpike,
    LatencySpike,
    ErrorRateSpike,
    ViolationBurst,
    NewTool,
    RareTransition,
}

impl AnomalyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::CallRateSpike => "call_rate_spike",
            AnomalyKind::LatencySpike => "latency_spike",
            AnomalyKind::ErrorRateSpike => "error_rate_spike",
            AnomalyKind::ViolationBurst => "violation_burst",
            AnomalyKind::NewTool => "new_tool",
            AnomalyKind::RareTransition => "rare_transition",
        }
    }
}

/// How serious an anomaly of `score` is.
fn severity_of(score: f64) -> Severity {
    match score {
        s if s >= 0.85 => Severity::Critical,
        s if s >= 0.65 => Severity::High,
        s if s >= 0.45 => Severity::Medium,
        _ => Severity::Low,
    }
}

/// One departure from the baseline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Anomaly {
    #[serde(rename = "type")]
    pub kind: AnomalyKind,
    pub severity: Severity,
    /// In [0, 1]: how far from the baseline, on a scale shared by every kind.
    pub score: f64,
    pub description: String,
    /// When it was seen: the end of the minute it concerns, or the call.
    pub detected_at_ms: i64,
    /// Baseline against observed.
    pub evidence: serde_json::Value,
}

/// Tuning; the defaults are what the accuracy test measures.
#[derive(Debug, Clone)]
pub struct Config {
    /// The width of one bucket of the rate, latency, error and violation series.
    pub bucket_ms: i64,
    /// Buckets seen before anything is reported; at least half of them must have held a
    /// signal, so that a silence is not taken for a baseline.
    pub warmup_buckets: usize,
    /// Buckets the baseline looks back over.
    pub history_buckets: usize,
    /// How many robust standard deviations make a spike.
    pub threshold: f64,
    /// Departures from a tool seen before a transition out of it, never taken in all of
    /// them, is reported as rare.
    pub min_transitions: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            bucket_ms: 60_000,
            warmup_buckets: 30,
            history_buckets: 120,
            threshold: 5.0,
            min_transitions: 500,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    calls: u64,
    errors: u64,
    /// Calls that reported a duration, and the sum of those durations.
    timed: u64,
    latency_sum: f64,
    violations: u64,
}

/// The streaming detector for one agent.
#[derive(Debug)]
pub struct AgentDetector {
    cfg: Config,
    history: VecDeque<Bucket>,
    current: Bucket,
    current_start: Option<i64>,
    buckets_seen: usize,
    /// Buckets closed that held a signal.
    active_buckets: usize,
    tools: HashSet<String>,
    transitions: HashMap<(String, String), u64>,
    out_of: HashMap<String, u64>,
    last_tool: Option<String>,
}

impl AgentDetector {
    pub fn new(cfg: Config) -> AgentDetector {
        AgentDetector {
            cfg,
            history: VecDeque::new(),
            current: Bucket::default(),
            current_start: None,
            buckets_seen: 0,
            active_buckets: 0,
            tools: HashSet::new(),
            transitions: HashMap::new(),
            out_of: HashMap::new(),
            last_tool: None,
        }
    }

    fn warm(&self) -> bool {
        self.buckets_seen >= self.cfg.warmup_buckets
            && self.active_buckets >= self.cfg.warmup_buckets / 2
    }

    /// Feeds one signal; returns the anomalies it (or the buckets it closes) reveals.
    ///
    /// Signals should come in time order. One older than the open bucket (its minute was
    /// judged already) is ignored rather than counted in a minute it does not belong to: a
    /// backlog replayed after an outage must not look like a burst.
    pub fn observe(&mut self, signal: Signal<'_>) -> Vec<Anomaly> {
        if self
            .current_start
            .is_some_and(|start| signal.at_ms() < start)
        {
            return Vec::new();
        }
        let mut found = self.advance(signal.at_ms());
        match signal {
            Signal::Violation { .. } => self.current.violations += 1,
            Signal::Call {
                at_ms,
                tool,
                duration_ms,
                success,
            } => {
                self.current.calls += 1;
                self.current.errors += u64::from(!success);
                if let Some(ms) = duration_ms.filter(|ms| ms.is_finite()) {
                    self.current.timed += 1;
                    self.current.latency_sum += ms.max(0.0);
                }
                self.learn_sequence(at_ms, tool, &mut found);
            }
        }
        found
    }

    /// Closes every bucket that ended before `now_ms`, as time passes with no signal.
    pub fn flush(&mut self, now_ms: i64) -> Vec<Anomaly> {
        self.advance(now_ms)
    }

    fn advance(&mut self, now_ms: i64) -> Vec<Anomaly> {
        let mut found = Vec::new();
        let start = *self
            .current_start
            .get_or_insert(now_ms - now_ms.rem_euclid(self.cfg.bucket_ms));
        let mut start = start;
        // Bounded: a long silence closes at most a history's worth of empty buckets.
        let mut closed = 0;
        while now_ms >= start + self.cfg.bucket_ms {
            if closed < self.cfg.history_buckets {
                let end = start + self.cfg.bucket_ms;
                self.close_bucket(end, &mut found);
                closed += 1;
            }
            start += self.cfg.bucket_ms;
            if closed >= self.cfg.history_buckets {
                start = now_ms - now_ms.rem_euclid(self.cfg.bucket_ms);
            }
        }
        self.current_start = Some(start);
        found
    }

    fn close_bucket(&mut self, end_ms: i64, found: &mut Vec<Anomaly>) {
        let b = std::mem::take(&mut self.current);
        if self.warm() && self.history.len() >= self.cfg.warmup_buckets / 2 {
            self.judge_bucket(&b, end_ms, found);
        }
        self.history.push_back(b);
        if self.history.len() > self.cfg.history_buckets {
            self.history.pop_front();
        }
        self.buckets_seen += 1;
        self.active_buckets += usize::from(b.calls + b.violations > 0);
    }

    fn judge_bucket(&self, b: &Bucket, at: i64, found: &mut Vec<Anomaly>) {
        let t = self.cfg.threshold;
        let rates: Vec<f64> = self.history.iter().map(|h| h.calls as f64).collect();
        let (rate_med, rate_mad) = median_mad(&rates);
        // Counts are Poisson-noisy at least: the spread never falls below the square root.
        let rate_sd = (1.4826 * rate_mad).max(rate_med.sqrt()).max(1.0);
        let z = (b.calls as f64 - rate_med) / rate_sd;
        if z > t && b.calls >= 5 {
            found.push(anomaly(
                AnomalyKind::CallRateSpike,
                z,
                t,
                at,
                format!("{} tool calls in one minute, against a usual {rate_med:.0}", b.calls),
                json!({"baseline_calls_per_minute": rate_med, "observed_calls_per_minute": b.calls}),
            ));
        }

        let means: Vec<f64> = self
            .history
            .iter()
            .filter(|h| h.timed > 0)
            .map(|h| h.latency_sum / h.timed as f64)
            .collect();
        if b.timed >= 3 && means.len() >= 5 {
            let (lat_med, lat_mad) = median_mad(&means);
            let lat_sd = (1.4826 * lat_mad).max(0.1 * lat_med).max(1.0);
            let observed = b.latency_sum / b.timed as f64;
            let z = (observed - lat_med) / lat_sd;
            if z > t {
                found.push(anomaly(
                    AnomalyKind::LatencySpike,
                    z,
                    t,
                    at,
                    format!("tool calls took {observed:.0} ms on average, against a usual {lat_med:.0} ms"),
                    json!({"baseline_latency_ms": lat_med, "observed_latency_ms": observed}),
                ));
            }
        }

        let (calls, errors) = self
            .history
            .iter()
            .fold((0u64, 0u64), |(c, e), h| (c + h.calls, e + h.errors));
        if b.calls >= 5 && b.errors >= 3 {
            // Binomial spread around the pooled error rate, with a prior of one error in a hundred
            // calls so that a spotless history does not make one error an anomaly.
            let p0 = (errors as f64 + 1.0) / (calls as f64 + 100.0);
            let n = b.calls as f64;
            let sd = (n * p0 * (1.0 - p0)).sqrt().max(1.0);
            let z = (b.errors as f64 - n * p0) / sd;
            if z > t {
                let rate = b.errors as f64 / n;
                found.push(anomaly(
                    AnomalyKind::ErrorRateSpike,
                    z,
                    t,
                    at,
                    format!("{:.0}% of tool calls failed, against a usual {:.1}%", rate * 100.0, p0 * 100.0),
                    json!({"baseline_error_rate": p0, "observed_error_rate": rate, "errors": b.errors, "calls": b.calls}),
                ));
            }
        }

        let violations: Vec<f64> = self.history.iter().map(|h| h.violations as f64).collect();
        let (v_med, v_mad) = median_mad(&violations);
        let v_mean = violations.iter().sum::<f64>() / violations.len().max(1) as f64;
        let v_sd = (1.4826 * v_mad).max(v_mean.sqrt()).max(1.0);
        let z = (b.violations as f64 - v_med.max(v_mean)) / v_sd;
        if z > t && b.violations >= 3 {
            found.push(anomaly(
                AnomalyKind::ViolationBurst,
                z,
                t,
                at,
                format!("{} policy violations in one minute, against a usual {v_mean:.1}", b.violations),
                json!({"baseline_violations_per_minute": v_mean, "observed_violations_per_minute": b.violations}),
            ));
        }
    }

    fn learn_sequence(&mut self, at: i64, tool: &str, found: &mut Vec<Anomaly>) {
        let warm = self.warm();
        let new_tool = !self.tools.contains(tool);
        if new_tool {
            if warm {
                found.push(Anomaly {
                    kind: AnomalyKind::NewTool,
                    severity: Severity::Medium,
                    score: 0.6,
                    description: format!("first call of tool `{tool}`, never used before"),
                    detected_at_ms: at,
                    evidence: json!({"known_tools": self.tools.len(), "tool": tool}),
                });
            }
            self.tools.insert(tool.to_owned());
        }
        if let Some(prev) = self.last_tool.take() {
            let out = self.out_of.get(&prev).copied().unwrap_or(0);
            let key = (prev, tool.to_owned());
            let seen = self.transitions.get(&key).copied().unwrap_or(0);
            // A transition into a new tool is part of the new-tool anomaly, not another one.
            // Never taken in at least `min_transitions` departures from `prev`: with 500, a
            // transition that the agent takes even one time in 170 had a 5% chance to stay
            // unseen. Taken once already, it is part of the agent's repertoire.
            if warm && !new_tool && seen == 0 && out >= self.cfg.min_transitions {
                // The more departures without it, the more surprising: 0.5 at the minimum,
                // approaching 0.8.
                let score = 0.8 - 0.3 * self.cfg.min_transitions as f64 / out as f64;
                found.push(Anomaly {
                    kind: AnomalyKind::RareTransition,
                    severity: severity_of(score),
                    score,
                    description: format!(
                        "`{}` called right after `{}`, which never happened in {out} calls after it",
                        key.1, key.0
                    ),
                    detected_at_ms: at,
                    evidence: json!({"from": key.0, "to": key.1, "baseline_probability": 0.0, "transitions_seen": 0, "transitions_out": out}),
                });
            }
            *self.transitions.entry(key.clone()).or_insert(0) += 1;
            *self.out_of.entry(key.0).or_insert(0) += 1;
        }
        self.last_tool = Some(tool.to_owned());
    }
}

fn anomaly(
    kind: AnomalyKind,
    z: f64,
    threshold: f64,
    at: i64,
    description: String,
    evidence: serde_json::Value,
) -> Anomaly {
    // At the threshold a score of 0.5, rising towards 1 as the departure grows.
    let score = (1.0 - 0.5 * (-(z - threshold) / threshold).exp()).clamp(0.0, 1.0);
    let mut evidence = evidence;
    evidence["z_score"] = json!(z);
    Anomaly {
        kind,
        severity: severity_of(score),
        score,
        description,
        detected_at_ms: at,
        evidence,
    }
}

/// The median and the median absolute deviation.
fn median_mad(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let med = median(&mut xs.to_vec());
    let mut dev: Vec<f64> = xs.iter().map(|x| (x - med).abs()).collect();
    (med, median(&mut dev))
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(
        d: &mut AgentDetector,
        minute: i64,
        calls: u64,
        latency: f64,
        errors: u64,
        tool: &str,
    ) -> Vec<Anomaly> {
        let mut out = Vec::new();
        for i in 0..calls {
            let at = minute * 60_000 + (i as i64 * 59_000 / calls.max(1) as i64);
            out.extend(d.observe(Signal::Call {
                at_ms: at,
                tool,
                duration_ms: Some(latency),
                success: i >= errors,
            }));
        }
        out
    }

    fn steady(d: &mut AgentDetector, minutes: std::ops::Range<i64>) {
        for m in minutes {
            let calls = 20 + (m % 5) as u64;
            let found = feed(
                d,
                m,
                calls,
                100.0 + (m % 7) as f64 * 5.0,
                u64::from(m % 10 == 0),
                "search",
            );
            assert!(found.is_empty(), "minute {m}: {found:?}");
        }
    }

    #[test]
    fn nothing_is_reported_during_warm_up() {
        let mut d = AgentDetector::new(Config::default());
        assert!(feed(&mut d, 0, 500, 5000.0, 400, "a").is_empty());
        assert!(feed(&mut d, 1, 1, 1.0, 0, "b").is_empty());
        assert!(d.flush(10 * 60_000).is_empty());
    }

    #[test]
    fn spikes_in_rate_latency_and_errors_are_flagged_once_warm() {
        let mut d = AgentDetector::new(Config::default());
        steady(&mut d, 0..60);
        feed(&mut d, 60, 150, 105.0, 0, "search");
        let found = d.flush(61 * 60_000);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].kind, AnomalyKind::CallRateSpike);
        assert!(found[0].score > 0.5 && found[0].score <= 1.0);
        assert_eq!(found[0].evidence["observed_calls_per_minute"], 150);

        steady(&mut d, 61..70);
        feed(&mut d, 70, 22, 900.0, 0, "search");
        let found = d.flush(71 * 60_000);
        assert_eq!(
            found.iter().map(|a| a.kind).collect::<Vec<_>>(),
            vec![AnomalyKind::LatencySpike]
        );

        steady(&mut d, 71..80);
        feed(&mut d, 80, 22, 100.0, 12, "search");
        let found = d.flush(81 * 60_000);
        assert_eq!(
            found.iter().map(|a| a.kind).collect::<Vec<_>>(),
            vec![AnomalyKind::ErrorRateSpike]
        );
    }

    #[test]
    fn a_new_tool_is_flagged_once() {
        let mut d = AgentDetector::new(Config::default());
        steady(&mut d, 0..40);
        let found = feed(&mut d, 40, 2, 100.0, 0, "exfiltrate");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, AnomalyKind::NewTool);
        assert!(found[0].description.contains("`exfiltrate`"));
    }

    #[test]
    fn violation_bursts_are_flagged() {
        let mut d = AgentDetector::new(Config::default());
        steady(&mut d, 0..40);
        for i in 0..10 {
            assert!(
                d.observe(Signal::Violation {
                    at_ms: 40 * 60_000 + i
                })
                .is_empty()
            );
        }
        let found = d.flush(41 * 60_000);
        assert_eq!(
            found.iter().map(|a| a.kind).collect::<Vec<_>>(),
            vec![AnomalyKind::ViolationBurst]
        );
    }

    #[test]
    fn a_silence_is_no_baseline() {
        let mut d = AgentDetector::new(Config::default());
        feed(&mut d, 0, 4, 100.0, 0, "search");
        // Two hours later: many minutes have passed, but only one of them held anything.
        assert!(feed(&mut d, 120, 200, 5000.0, 150, "exfiltrate").is_empty());
        assert!(d.flush(121 * 60_000).is_empty());
    }

    #[test]
    fn long_silences_are_bounded_work() {
        let mut d = AgentDetector::new(Config::default());
        steady(&mut d, 0..40);
        // A year without signals closes at most a history's worth of buckets.
        let _ = d.flush(40 * 60_000 + 365 * 24 * 3_600_000);
        assert!(d.history.len() <= Config::default().history_buckets);
    }

    #[test]
    fn a_replayed_backlog_is_not_a_burst() {
        let mut d = AgentDetector::new(Config::default());
        steady(&mut d, 0..40);
        let _ = d.flush(50 * 60_000);
        // An hour-old backlog arrives: it belongs to minutes already judged.
        for i in 0..500 {
            let late = Signal::Call {
                at_ms: 20 * 60_000 + i,
                tool: "search",
                duration_ms: Some(100.0),
                success: true,
            };
            assert!(d.observe(late).is_empty());
        }
        assert!(d.flush(51 * 60_000).is_empty());
    }

    #[test]
    fn calls_without_a_duration_leave_latency_alone() {
        let mut d = AgentDetector::new(Config::default());
        steady(&mut d, 0..40);
        for i in 0..22 {
            let untimed = Signal::Call {
                at_ms: 40 * 60_000 + i * 1000,
                tool: "search",
                duration_ms: None,
                success: true,
            };
            assert!(d.observe(untimed).is_empty());
        }
        feed(&mut d, 40, 3, 110.0, 0, "search");
        assert!(d.flush(41 * 60_000).is_empty());
        feed(&mut d, 41, 22, 2000.0, 0, "search");
        let found = d.flush(42 * 60_000);
        assert_eq!(
            found.iter().map(|a| a.kind).collect::<Vec<_>>(),
            vec![AnomalyKind::LatencySpike]
        );
    }

    #[test]
    fn a_transition_never_taken_is_flagged_once() {
        let mut d = AgentDetector::new(Config::default());
        let call = |at_ms, tool| Signal::Call {
            at_ms,
            tool,
            duration_ms: Some(100.0),
            success: true,
        };
        // `plan` and `search` alternate: 660 departures from each, never one to itself.
        for i in 0..1320 {
            let tool = if i % 2 == 0 { "plan" } else { "search" };
            assert!(d.observe(call(i * 2_500, tool)).is_empty());
        }
        // The last call was `search`: `search` again is new.
        let at = 1320 * 2_500;
        let found = d.observe(call(at, "search"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].kind, AnomalyKind::RareTransition);
        assert_eq!(found[0].evidence["transitions_out"], 659);
        assert!((0.5..0.8).contains(&found[0].score));
        // Taken once, it is known.
        assert!(d.observe(call(at + 1, "plan")).is_empty());
        assert!(d.observe(call(at + 2, "search")).is_empty());
        assert!(d.observe(call(at + 3, "search")).is_empty());
    }
}
