//! Realistic traffic for a few agents, with labelled anomalies injected: the ground truth that
//! the detector's precision and recall are measured on.
//!
//! Each agent has its own tools, a Markov chain of tool-to-tool transitions (some transitions
//! never happen), a call rate that drifts through the day, log-normal latencies per tool, a small
//! error rate and the odd policy violation. Anomalies are injected into chosen minutes after a
//! warm-up hour.

use crate::detector::{AgentDetector, Anomaly, AnomalyKind, Config, Signal};

/// One generated signal, owned.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Call {
        agent: usize,
        at_ms: i64,
        tool: String,
        duration_ms: f64,
        success: bool,
    },
    Violation {
        agent: usize,
        at_ms: i64,
    },
}

impl Event {
    pub fn agent(&self) -> usize {
        match self {
            Event::Call { agent, .. } | Event::Violation { agent, .. } => *agent,
        }
    }

    pub fn at_ms(&self) -> i64 {
        match self {
            Event::Call { at_ms, .. } | Event::Violation { at_ms, .. } => *at_ms,
        }
    }

    /// What a detector is fed for this event.
    pub fn signal(&self) -> Signal<'_> {
        match self {
            Event::Call {
                at_ms,
                tool,
                duration_ms,
                success,
                ..
            } => Signal::Call {
                at_ms: *at_ms,
                tool,
                duration_ms: Some(*duration_ms),
                success: *success,
            },
            Event::Violation { at_ms, .. } => Signal::Violation { at_ms: *at_ms },
        }
    }
}

/// An injected anomaly: which agent, what, and the minutes it spans (end exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label {
    pub agent: usize,
    pub kind: AnomalyKind,
    pub start_minute: i64,
    pub end_minute: i64,
}

impl Label {
    /// Whether `anomaly`, detected for `agent`, is this injected anomaly. A minute's anomaly is
    /// reported at the minute's end, the next one's first millisecond: it counts for the minute
    /// before.
    pub fn matches(&self, agent: usize, anomaly: &Anomaly) -> bool {
        let minute = (anomaly.detected_at_ms - 1).div_euclid(60_000);
        self.agent == agent
            && self.kind == anomaly.kind
            && (self.start_minute..self.end_minute).contains(&minute)
    }
}

/// Generated traffic, in time order, and its labels.
#[derive(Debug, Clone)]
pub struct Traffic {
    pub events: Vec<Event>,
    pub labels: Vec<Label>,
    pub minutes: i64,
    pub agents: usize,
}

impl Traffic {
    /// Replays the traffic through one detector per agent (default configuration); returns
    /// every anomaly with its agent, in order.
    pub fn detect(&self) -> Vec<(usize, Anomaly)> {
        let mut detectors: Vec<AgentDetector> = (0..self.agents)
            .map(|_| AgentDetector::new(Config::default()))
            .collect();
        let mut found = Vec::new();
        for e in &self.events {
            let agent = e.agent();
            found.extend(
                detectors[agent]
                    .observe(e.signal())
                    .into_iter()
                    .map(|a| (agent, a)),
            );
        }
        for (agent, d) in detectors.iter_mut().enumerate() {
            found.extend(
                d.flush(self.minutes * 60_000)
                    .into_iter()
                    .map(|a| (agent, a)),
            );
        }
        found
    }

    /// Recall, precision, and false alarms per agent-minute of `found` against the labels.
    pub fn score(&self, found: &[(usize, Anomaly)]) -> Score {
        let detected = self
            .labels
            .iter()
            .filter(|l| found.iter().any(|(agent, a)| l.matches(*agent, a)))
            .count();
        let false_alarms = found
            .iter()
            .filter(|(agent, a)| !self.labels.iter().any(|l| l.matches(*agent, a)))
            .count();
        let clean_minutes = self.agents as f64 * self.minutes as f64 - self.labels.len() as f64;
        Score {
            recall: detected as f64 / self.labels.len().max(1) as f64,
            precision: (found.len() - false_alarms) as f64 / found.len().max(1) as f64,
            false_alarm_rate: false_alarms as f64 / clean_minutes.max(1.0),
        }
    }
}

/// How well detections match the labels.
#[derive(Debug, Clone, Copy)]
pub struct Score {
    pub recall: f64,
    pub precision: f64,
    /// False alarms per agent-minute that held no injected anomaly.
    pub false_alarm_rate: f64,
}

/// A small deterministic generator (xorshift64*), so a seed always gives the same traffic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-12), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    fn poisson(&mut self, lambda: f64) -> u64 {
        if lambda > 30.0 {
            return (lambda + lambda.sqrt() * self.normal()).round().max(0.0) as u64;
        }
        let limit = (-lambda).exp();
        let (mut k, mut p) = (0, 1.0);
        loop {
            p *= self.unit();
            if p <= limit {
                return k;
            }
            k += 1;
        }
    }
}

struct Agent {
    tools: Vec<String>,
    /// Cumulative transition probabilities per tool.
    chain: Vec<Vec<f64>>,
    /// Pairs (from, to) the chain never takes.
    never: Vec<(usize, usize)>,
    rate: f64,
    latency_ms: Vec<f64>,
    error_rate: f64,
}

const TOOL_NAMES: &[&str] = &[
    "web_search",
    "fetch_page",
    "summarize",
    "calculator",
    "file_reader",
    "sql_query",
    "send_email",
    "calendar_lookup",
    "crm_lookup",
    "vector_search",
    "translate",
    "memory_write",
];

fn make_agent(rng: &mut Rng) -> Agent {
    let n = 5 + rng.below(4);
    let mut names: Vec<&str> = TOOL_NAMES.to_vec();
    let mut tools = Vec::with_capacity(n);
    for _ in 0..n {
        tools.push(names.remove(rng.below(names.len())).to_owned());
    }
    let mut chain = Vec::with_capacity(n);
    let mut never = Vec::new();
    for from in 0..n {
        // Two or three habitual successors, a little weight on most others, none on some.
        let mut w: Vec<f64> = (0..n)
            .map(|_| if rng.unit() < 0.25 { 0.0 } else { 0.02 })
            .collect();
        for _ in 0..2 + rng.below(2) {
            w[rng.below(n)] += 1.0;
        }
        let total: f64 = w.iter().sum();
        let mut acc = 0.0;
        chain.push(
            w.iter()
                .map(|x| {
                    acc += x / total;
                    acc
                })
                .collect(),
        );
        never.extend((0..n).filter(|&to| w[to] == 0.0).map(|to| (from, to)));
    }
    Agent {
        latency_ms: (0..n).map(|_| 40.0 + rng.unit() * 700.0).collect(),
        tools,
        chain,
        never,
        rate: 15.0 + rng.unit() * 45.0,
        error_rate: 0.005 + rng.unit() * 0.02,
    }
}

/// Rare transitions are injected only after this many minutes.
pub const SEQUENCE_WARMUP_MINUTES: i64 = 180;

/// Generates `minutes` of traffic for `agents` agents, injecting `anomalies_per_agent` labelled
/// anomalies into each after the first hour (rare transitions after [`SEQUENCE_WARMUP_MINUTES`]),
/// at least ten minutes apart.
pub fn generate(seed: u64, agents: usize, minutes: i64, anomalies_per_agent: usize) -> Traffic {
    let mut rng = Rng::new(seed);
    let mut events = Vec::new();
    let mut labels = Vec::new();
    const KINDS: [AnomalyKind; 6] = [
        AnomalyKind::CallRateSpike,
        AnomalyKind::LatencySpike,
        AnomalyKind::ErrorRateSpike,
        AnomalyKind::ViolationBurst,
        AnomalyKind::NewTool,
        AnomalyKind::RareTransition,
    ];
    for a in 0..agents {
        let agent = make_agent(&mut rng);
        let mut plan: Vec<(i64, AnomalyKind)> = Vec::new();
        let slots = ((minutes - 60) / 10).max(1);
        let mut free: Vec<i64> = (0..slots).map(|s| 60 + s * 10 + 2).collect();
        for i in 0..anomalies_per_agent.min(free.len()) {
            let kind = KINDS[(a + i) % KINDS.len()];
            // Transitions need more history than rates: a tool must have been left often
            // before a transition out of it can be called rare.
            let earliest = if kind == AnomalyKind::RareTransition {
                SEQUENCE_WARMUP_MINUTES
            } else {
                60
            };
            let Some(slot) = free
                .iter()
                .position(|m| *m >= earliest)
                .map(|p| p + rng.below(free.len() - p))
            else {
                continue;
            };
            plan.push((free.remove(slot), kind));
        }
        let mut last = 0usize;
        let mut visits = vec![0u64; agent.tools.len()];
        let mut never = agent.never.clone();
        for minute in 0..minutes {
            let injected = plan
                .iter()
                .find(|(m, _)| *m == minute)
                .map(|(_, k)| *k)
                // Each never-taken pair is used once; when they run out there is nothing to inject.
                .filter(|k| *k != AnomalyKind::RareTransition || !never.is_empty());
            if let Some(kind) = injected {
                labels.push(Label {
                    agent: a,
                    kind,
                    start_minute: minute,
                    end_minute: minute + 1,
                });
            }
            // Diurnal drift, gentle within an hour.
            let daily = 1.0 + 0.3 * (minute as f64 / 1440.0 * 2.0 * std::f64::consts::PI).sin();
            let mut rate = agent.rate * daily;
            if injected == Some(AnomalyKind::CallRateSpike) {
                rate *= 5.0;
            }
            let calls = rng.poisson(rate);
            for i in 0..calls {
                let at_ms = minute * 60_000 + (i as i64 * 60_000) / (calls as i64 + 1);
                let u = rng.unit();
                let mut next = agent.chain[last].iter().position(|c| u < *c).unwrap_or(0);
                let mut tool = agent.tools[next].clone();
                if injected == Some(AnomalyKind::RareTransition) && i == calls / 2 {
                    // Leave the busiest tool for one it never leads to (each pair once).
                    let busiest = never
                        .iter()
                        .enumerate()
                        .max_by_key(|(_, (from, _))| visits[*from])
                        .map(|(i, _)| i);
                    if let Some(pair) = busiest {
                        let (from, to) = never.remove(pair);
                        events.push(call(&mut rng, &agent, a, at_ms, from, false));
                        next = to;
                        tool = agent.tools[to].clone();
                    }
                }
                if injected == Some(AnomalyKind::NewTool) && i == calls / 2 {
                    tool = format!("export_records_{minute}");
                }
                let slow = injected == Some(AnomalyKind::LatencySpike);
                let failing = injected == Some(AnomalyKind::ErrorRateSpike);
                let mut e = call(&mut rng, &agent, a, at_ms, next, slow);
                if let Event::Call {
                    tool: t, success, ..
                } = &mut e
                {
                    *t = tool;
                    if failing {
                        *success = rng.unit() >= 0.5;
                    }
                }
                events.push(e);
                visits[next] += 1;
                last = next;
            }
            let violations = if injected == Some(AnomalyKind::ViolationBurst) {
                12
            } else {
                rng.poisson(0.05)
            };
            for v in 0..violations {
                events.push(Event::Violation {
                    agent: a,
                    at_ms: minute * 60_000 + 30_000 + v as i64,
                });
            }
        }
    }
    events.sort_by_key(Event::at_ms);
    Traffic {
        events,
        labels,
        minutes,
        agents,
    }
}

fn call(rng: &mut Rng, agent: &Agent, a: usize, at_ms: i64, tool: usize, slow: bool) -> Event {
    let median = agent.latency_ms[tool] * if slow { 6.0 } else { 1.0 };
    Event::Call {
        agent: a,
        at_ms,
        tool: agent.tools[tool].clone(),
        duration_ms: median * (0.35 * rng.normal()).exp(),
        success: rng.unit() >= agent.error_rate,
    }
}
