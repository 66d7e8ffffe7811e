//! Behavioural anomaly detection for agents, pure and streaming.
//!
//! An [`AgentDetector`] learns one agent's baseline from the tool calls and violations its
//! sidecar reports — call rate, latency, error rate and violations per minute (median and MAD
//! over a sliding history, robust to the spikes it looks for), the tools it uses and the
//! tool-to-tool transitions between them — and reports what departs from it as an [`Anomaly`]
//! with a score in [0, 1], a severity, a sentence and the evidence (baseline against observed).
//! Nothing is reported during a warm-up period.
//!
//! [`generator`] makes realistic traffic for a few agents with labelled anomalies injected, so
//! that precision and recall can be measured (`tests/accuracy.rs`).

mod detector;
pub mod generator;

pub use detector::{AgentDetector, Anomaly, AnomalyKind, Config, Severity, Signal};
