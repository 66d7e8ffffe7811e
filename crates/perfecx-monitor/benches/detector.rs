//! Throughput of anomaly detection, and its precision and recall, on generated traffic:
//! `cargo bench -p perfecx-monitor --bench detector`.

use std::time::Instant;

use perfecx_monitor::generator::{Event, generate};
use perfecx_monitor::{AgentDetector, Config, Signal};

fn main() {
    let traffic = generate(42, 8, 24 * 60, 100);
    let mut detectors: Vec<AgentDetector> = (0..traffic.agents)
        .map(|_| AgentDetector::new(Config::default()))
        .collect();
    let started = Instant::now();
    let mut found = Vec::new();
    for e in &traffic.events {
        let signal = match e {
            Event::Call {
                at_ms,
                tool,
                duration_ms,
                success,
                ..
            } => Signal::Call {
                at_ms: *at_ms,
                tool,
                duration_ms: *duration_ms,
                success: *success,
            },
            Event::Violation { at_ms, .. } => Signal::Violation { at_ms: *at_ms },
        };
        found.extend(
            detectors[e.agent()]
                .observe(signal)
                .into_iter()
                .map(|a| (e.agent(), a)),
        );
    }
    let elapsed = started.elapsed();
    let hit = |agent: usize, a: &perfecx_monitor::Anomaly| {
        let minute = (a.detected_at_ms - 1).div_euclid(60_000);
        traffic.labels.iter().any(|l| {
            l.agent == agent
                && l.kind == a.kind
                && minute >= l.start_minute
                && minute < l.end_minute
        })
    };
    let true_positives = found.iter().filter(|(ag, a)| hit(*ag, a)).count();
    let detected = traffic
        .labels
        .iter()
        .filter(|l| {
            found.iter().any(|(ag, a)| {
                let minute = (a.detected_at_ms - 1).div_euclid(60_000);
                *ag == l.agent
                    && a.kind == l.kind
                    && minute >= l.start_minute
                    && minute < l.end_minute
            })
        })
        .count();
    println!(
        "{} events from {} agents over {} minutes in {:.1} ms: {:.0} events/s",
        traffic.events.len(),
        traffic.agents,
        traffic.minutes,
        elapsed.as_secs_f64() * 1e3,
        traffic.events.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "{} labelled anomalies, {} detections: recall {:.3}, precision {:.3}, false alarms {:.4} per agent-minute",
        traffic.labels.len(),
        found.len(),
        detected as f64 / traffic.labels.len() as f64,
        true_positives as f64 / found.len().max(1) as f64,
        (found.len() - true_positives) as f64 / (traffic.agents as f64 * traffic.minutes as f64)
    );
}
