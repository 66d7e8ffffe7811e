//! Behavioural anomaly detection wired into ingestion: one `perfecx_monitor` detector per
//! agent, fed with the tool executions and violations that this replica stores (new ones
//! only, not resends), in one background task so that detection never holds up a request.
//! What it finds is stored in `anomalies`, sent to the agent's watchers and announced to the
//! other replicas.
//!
//! Detectors live in this process: a restart, or an agent's events spread over several
//! replicas, starts (or splits) its baseline. The detector's clock is the events' timestamps;
//! between events it runs on with the wall clock, so that a minute is judged even when the
//! agent falls silent after it (`DetectionSettings::lateness` after its end).

use std::collections::HashMap;
use std::time::Duration;

use perfecx_api::ServerMessage;
use perfecx_monitor::{AgentDetector, Signal};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::DetectionSettings;
use crate::relay::Note;
use crate::state::AppState;
use crate::store::{EventRow, NewAnomaly, StoreError};

/// What the detector needs of one stored event.
#[derive(Debug)]
struct Observed {
    at_ms: i64,
    /// `None` for a violation.
    call: Option<Call>,
}

#[derive(Debug)]
struct Call {
    tool: String,
    duration_ms: Option<f64>,
    success: bool,
}

enum Input {
    Events {
        agent_id: String,
        events: Vec<Observed>,
    },
    Forget(String),
}

/// The handle that ingestion feeds.
#[derive(Clone)]
pub struct Monitor {
    inputs: mpsc::Sender<Input>,
}

/// The receiving end, to be run with [`Detection::run`].
pub struct Detection {
    inputs: mpsc::Receiver<Input>,
}

pub fn channel() -> (Monitor, Detection) {
    let (inputs, receiver) = mpsc::channel(1024);
    (Monitor { inputs }, Detection { inputs: receiver })
}

impl Monitor {
    /// Feeds the newly stored events of one agent, in time order.
    pub async fn observe(&self, agent_id: &str, rows: &[EventRow]) {
        let mut events: Vec<Observed> = rows
            .iter()
            .filter_map(|row| match row.event_type {
                "tool_execution" => Some(Observed {
                    at_ms: row.ts,
                    call: Some(Call {
                        tool: row.tool.clone().unwrap_or_else(|| "(unnamed)".into()),
                        duration_ms: row.duration_ms.map(|ms| ms as f64),
                        success: row.success != Some(false),
                    }),
                }),
                "policy_violation" => Some(Observed {
                    at_ms: row.ts,
                    call: None,
                }),
                _ => None,
            })
            .collect();
        if events.is_empty() {
            return;
        }
        events.sort_by_key(|e| e.at_ms);
        let input = Input::Events {
            agent_id: agent_id.to_string(),
            events,
        };
        // Only fails once the task has stopped, at shutdown.
        let _ = self.inputs.send(input).await;
    }

    /// Drops a deleted agent's baseline.
    pub async fn forget(&self, agent_id: &str) {
        let _ = self.inputs.send(Input::Forget(agent_id.to_string())).await;
    }
}

struct Watched {
    detector: AgentDetector,
    /// The latest event time fed, and when (wall clock) it was fed.
    latest_ms: i64,
    heard: Instant,
}

impl Watched {
    /// The detector's clock now: the latest event time, run on by the wall clock since.
    fn now_ms(&self, now: Instant) -> i64 {
        let since = i64::try_from(now.duration_since(self.heard).as_millis()).unwrap_or(i64::MAX);
        self.latest_ms.saturating_add(since)
    }
}

impl Detection {
    pub async fn run(mut self, state: AppState, settings: DetectionSettings) {
        let config = perfecx_monitor::Config::default();
        // A detector that heard nothing for its whole history knows nothing useful any more:
        // it is dropped, and the agent starts a new warm-up when it comes back.
        let forget_after = Duration::from_millis(
            u64::try_from(config.bucket_ms).unwrap_or(60_000)
                * u64::try_from(config.history_buckets).unwrap_or(120),
        );
        let lateness = i64::try_from(settings.lateness.as_millis()).unwrap_or(i64::MAX);
        let mut agents: HashMap<String, Watched> = HashMap::new();
        let mut tick = tokio::time::interval(settings.tick.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                input = self.inputs.recv() => match input {
                    None => return,
                    Some(Input::Forget(agent_id)) => {
                        agents.remove(&agent_id);
                    }
                    Some(Input::Events { agent_id, events }) => {
                        let watched = agents.entry(agent_id.clone()).or_insert_with(|| Watched {
                            detector: AgentDetector::new(config.clone()),
                            latest_ms: i64::MIN,
                            heard: Instant::now(),
                        });
                        let mut found = Vec::new();
                        for e in &events {
                            found.extend(watched.detector.observe(signal(e)));
                            watched.latest_ms = watched.latest_ms.max(e.at_ms);
                        }
                        watched.heard = Instant::now();
                        if !found.is_empty() && !report(&state, &agent_id, found).await {
                            agents.remove(&agent_id);
                        }
                    }
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    agents.retain(|_, w| now.duration_since(w.heard) < forget_after);
                    let mut reports = Vec::new();
                    for (agent_id, watched) in agents.iter_mut() {
                        let found = watched.detector.flush(watched.now_ms(now).saturating_sub(lateness));
                        if !found.is_empty() {
                            reports.push((agent_id.clone(), found));
                        }
                    }
                    for (agent_id, found) in reports {
                        if !report(&state, &agent_id, found).await {
                            agents.remove(&agent_id);
                        }
                    }
                }
            }
        }
    }
}

fn signal(e: &Observed) -> Signal<'_> {
    match &e.call {
        Some(call) => Signal::Call {
            at_ms: e.at_ms,
            tool: &call.tool,
            duration_ms: call.duration_ms,
            success: call.success,
        },
        None => Signal::Violation { at_ms: e.at_ms },
    }
}

/// Stores, sends and announces what was found; `false` when the agent is gone.
async fn report(state: &AppState, agent_id: &str, found: Vec<perfecx_monitor::Anomaly>) -> bool {
    let anomalies: Vec<NewAnomaly> = found
        .into_iter()
        .map(|a| NewAnomaly {
            anomaly_id: format!("anm_{}", uuid::Uuid::new_v4().simple()),
            anomaly_type: a.kind.as_str(),
            severity: a.severity,
            score: a.score,
            description: a.description,
            detected_at: a.detected_at_ms,
            evidence: a.evidence,
        })
        .collect();
    match state.store().insert_anomalies(agent_id, &anomalies).await {
        Ok(()) => {}
        Err(StoreError::Missing(_)) => return false,
        Err(e) => {
            tracing::warn!(agent_id, error = %e, "cannot store anomalies");
            return true;
        }
    }
    state
        .telemetry()
        .anomalies_detected
        .inc_by(anomalies.len() as u64);
    for a in &anomalies {
        tracing::info!(
            agent_id,
            anomaly_type = a.anomaly_type,
            severity = a.severity.as_str(),
            score = a.score,
            "{}",
            a.description
        );
        state
            .hub()
            .publish(agent_id, ServerMessage::AnomalyDetected(a.to_api(agent_id)));
    }
    state
        .announce(Note::Anomalies {
            agent_id: agent_id.to_string(),
            anomaly_ids: anomalies.into_iter().map(|a| a.anomaly_id).collect(),
        })
        .await;
    true
}
