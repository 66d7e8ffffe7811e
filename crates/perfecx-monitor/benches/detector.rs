//! Throughput of anomaly detection, and its precision and recall, on generated traffic:
//! `cargo bench -p perfecx-monitor --bench detector`.

use std::time::Instant;

use perfecx_monitor::generator::generate;

fn main() {
    let traffic = generate(42, 8, 24 * 60, 100);
    let started = Instant::now();
    let found = traffic.detect();
    let elapsed = started.elapsed();
    let s = traffic.score(&found);
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
        s.recall,
        s.precision,
        s.false_alarm_rate
    );
}
