//! Precision and recall of the detector on generated traffic with labelled anomalies.
//!
//! Target (issue 5): recall of at least 0.9, with at most 5% false alarms. A detection is true
//! when an injected anomaly of the same agent and kind spans the minute it concerns (or the
//! minute before, for bucket anomalies reported at the minute's end); a false alarm is any other.
//! "At most 5% false alarms" is held in both of its readings: at most 5% of the alarms are
//! false (precision at least 0.95), and at most 0.05 false alarms per agent-minute.

use perfecx_monitor::generator::{Label, generate};

#[test]
fn recall_and_false_alarms_meet_the_targets() {
    let mut totals = (0.0, 0.0, 0.0);
    let seeds = [1u64, 2, 3];
    for seed in seeds {
        let traffic = generate(seed, 4, 8 * 60, 24);
        assert!(
            traffic.labels.len() >= 80,
            "{} labels",
            traffic.labels.len()
        );
        let found = traffic.detect();
        let s = traffic.score(&found);
        eprintln!(
            "seed {seed}: {} labels, {} detections, recall {:.3}, precision {:.3}, false alarms {:.4} per agent-minute",
            traffic.labels.len(),
            found.len(),
            s.recall,
            s.precision,
            s.false_alarm_rate
        );
        for kind in [
            "call_rate_spike",
            "latency_spike",
            "error_rate_spike",
            "violation_burst",
            "new_tool",
            "rare_transition",
        ] {
            let labels: Vec<&Label> = traffic
                .labels
                .iter()
                .filter(|l| l.kind.as_str() == kind)
                .collect();
            let hit = labels
                .iter()
                .filter(|l| found.iter().any(|(ag, a)| l.matches(*ag, a)))
                .count();
            let false_alarms = found
                .iter()
                .filter(|(ag, a)| {
                    a.kind.as_str() == kind && !traffic.labels.iter().any(|l| l.matches(*ag, a))
                })
                .count();
            eprintln!(
                "  {kind:17} found {hit}/{} labels, {false_alarms} false alarms",
                labels.len()
            );
        }
        totals = (
            totals.0 + s.recall,
            totals.1 + s.precision,
            totals.2 + s.false_alarm_rate,
        );
    }
    let n = seeds.len() as f64;
    let (recall, precision, false_alarms) = (totals.0 / n, totals.1 / n, totals.2 / n);
    eprintln!("mean: recall {recall:.3}, precision {precision:.3}, false alarms {false_alarms:.4}");
    assert!(recall >= 0.9, "recall {recall:.3}");
    assert!(false_alarms <= 0.05, "false alarm rate {false_alarms:.4}");
    assert!(precision >= 0.95, "precision {precision:.3}");
}

#[test]
fn the_generator_is_deterministic() {
    let a = generate(7, 2, 120, 4);
    let b = generate(7, 2, 120, 4);
    assert_eq!(a.events, b.events);
    assert_eq!(a.labels, b.labels);
    assert_ne!(a.events, generate(8, 2, 120, 4).events);
}
