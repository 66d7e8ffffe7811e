//! Prometheus metrics. The names are a contract with the dashboards (DESIGN.md, "The sidecar").

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Tool names come from the agent: cap their length so a hostile agent cannot grow label values
/// without bound.
const MAX_LABEL_LEN: usize = 64;

pub struct Metrics {
    registry: Registry,
    /// `{upstream, tool, decision}`; decision is allowed, blocked or redacted.
    pub tool_calls: IntCounterVec,
    /// `{upstream, tool}`: calls whose result was an error (`isError: true`, an HTTP error
    /// status, a deadline or a broken upstream).
    pub tool_call_errors: IntCounterVec,
    /// `{policy, rule}`.
    pub violations: IntCounterVec,
    /// `{upstream}`: from the request's arrival to the end of the tool's answer.
    pub tool_call_duration: HistogramVec,
    pub evaluation_duration: Histogram,
    /// `{result}`: success or failure.
    pub reloads: IntCounterVec,
    /// 1 when the newest policy files are the loaded ones, 0 while they could not be loaded.
    pub synchronized: IntGauge,
    /// Events the control plane accepted (stored, or recognised as a resend).
    pub events_sent: IntCounter,
    /// Events written to the spool (the control plane unreachable, or the queue behind).
    pub events_spooled: IntCounter,
    /// `{reason}`: events lost: queue_full, spool_full, spool_failed, rejected (a 4xx from the
    /// control plane), unreadable (a damaged spool record).
    pub events_dropped: IntCounterVec,
    /// Events in memory that are neither sent nor spooled yet.
    pub event_queue_depth: IntGauge,
    /// Bytes in the spool.
    pub event_spool_bytes: IntGauge,
    /// 1 while the control plane's WebSocket pushes policy bundles, 0 while only polling can.
    pub bundle_socket: IntGauge,
}

impl Metrics {
    /// Runs one policy evaluation, recording how long it took.
    pub fn time_evaluation<T>(&self, evaluate: impl FnOnce() -> T) -> T {
        let started = std::time::Instant::now();
        let result = evaluate();
        self.evaluation_duration
            .observe(started.elapsed().as_secs_f64());
        result
    }

    pub fn new() -> Metrics {
        let registry = Registry::new();
        let tool_calls = IntCounterVec::new(
            Opts::new(
                "perfecx_tool_calls_total",
                "Tool calls by upstream, tool and decision",
            ),
            &["upstream", "tool", "decision"],
        )
        .expect("valid metric");
        let tool_call_errors = IntCounterVec::new(
            Opts::new(
                "perfecx_tool_call_errors_total",
                "Tool calls that ended in an error (isError, HTTP error, deadline, upstream failure)",
            ),
            &["upstream", "tool"],
        )
        .expect("valid metric");
        let violations = IntCounterVec::new(
            Opts::new(
                "perfecx_policy_violations_total",
                "Policy violations by policy and rule",
            ),
            &["policy", "rule"],
        )
        .expect("valid metric");
        let tool_call_duration = HistogramVec::new(
            HistogramOpts::new(
                "perfecx_tool_call_duration_seconds",
                "Duration of forwarded tool calls, as seen by the agent",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0,
            ]),
            &["upstream"],
        )
        .expect("valid metric");
        let evaluation_duration = Histogram::with_opts(
            HistogramOpts::new(
                "perfecx_policy_evaluation_duration_seconds",
                "Time spent evaluating policies for one call or output",
            )
            .buckets(vec![
                0.000_001, 0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5,
                0.001, 0.005, 0.01, 0.05,
            ]),
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new("perfecx_policy_reloads_total", "Policy reloads by result"),
            &["result"],
        )
        .expect("valid metric");
        let synchronized = IntGauge::new(
            "perfecx_policy_synchronized",
            "1 when the newest policy files are loaded, 0 while they could not be",
        )
        .expect("valid metric");
        let events_sent = IntCounter::new(
            "perfecx_events_sent_total",
            "Events the control plane accepted (stored, or recognised as a resend)",
        )
        .expect("valid metric");
        let events_spooled = IntCounter::new(
            "perfecx_events_spooled_total",
            "Events written to the spool while the control plane was unreachable or behind",
        )
        .expect("valid metric");
        let events_dropped = IntCounterVec::new(
            Opts::new(
                "perfecx_events_dropped_total",
                "Events lost, by reason (queue_full, spool_full, spool_failed, rejected, unreadable)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let event_queue_depth = IntGauge::new(
            "perfecx_event_queue_depth",
            "Events in memory, neither sent nor spooled yet",
        )
        .expect("valid metric");
        let event_spool_bytes =
            IntGauge::new("perfecx_event_spool_bytes", "Bytes of events in the spool")
                .expect("valid metric");
        let bundle_socket = IntGauge::new(
            "perfecx_policy_bundle_socket_connected",
            "1 while the control plane's WebSocket pushes policy bundles, 0 while only polling can",
        )
        .expect("valid metric");
        for c in [
            Box::new(tool_calls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(tool_call_errors.clone()),
            Box::new(violations.clone()),
            Box::new(tool_call_duration.clone()),
            Box::new(evaluation_duration.clone()),
            Box::new(reloads.clone()),
            Box::new(synchronized.clone()),
            Box::new(events_sent.clone()),
            Box::new(events_spooled.clone()),
            Box::new(events_dropped.clone()),
            Box::new(event_queue_depth.clone()),
            Box::new(event_spool_bytes.clone()),
            Box::new(bundle_socket.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            tool_calls,
            tool_call_errors,
            violations,
            tool_call_duration,
            evaluation_duration,
            reloads,
            synchronized,
            events_sent,
            events_spooled,
            events_dropped,
            event_queue_depth,
            event_spool_bytes,
            bundle_socket,
        }
    }

    pub fn events_dropped(&self, reason: &str, count: usize) {
        self.events_dropped
            .with_label_values(&[reason])
            .inc_by(count as u64);
    }

    pub fn call(&self, upstream: &str, tool: &str, decision: &str) {
        self.tool_calls
            .with_label_values(&[upstream, label(tool), decision])
            .inc();
    }

    pub fn error(&self, upstream: &str, tool: &str) {
        self.tool_call_errors
            .with_label_values(&[upstream, label(tool)])
            .inc();
    }

    pub fn violation(&self, policy: &str, rule: &str) {
        self.violations.with_label_values(&[policy, rule]).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn label(tool: &str) -> &str {
    if tool.len() <= MAX_LABEL_LEN {
        return tool;
    }
    let mut end = MAX_LABEL_LEN;
    while !tool.is_char_boundary(end) {
        end -= 1;
    }
    &tool[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_contract_names() {
        let m = Metrics::new();
        m.call("u", "t", "allowed");
        m.violation("p", "tool_restriction");
        m.reloads.with_label_values(&["success"]).inc();
        m.tool_call_duration.with_label_values(&["u"]).observe(0.1);
        m.evaluation_duration.observe(0.000_01);
        m.error("u", "t");
        let text = m.render();
        for name in [
            "perfecx_tool_calls_total{decision=\"allowed\",tool=\"t\",upstream=\"u\"} 1",
            "perfecx_policy_violations_total{policy=\"p\",rule=\"tool_restriction\"} 1",
            "perfecx_tool_call_duration_seconds_bucket",
            "perfecx_policy_evaluation_duration_seconds_bucket",
            "perfecx_policy_reloads_total{result=\"success\"} 1",
            "perfecx_policy_synchronized 0",
            "perfecx_tool_call_errors_total",
            "perfecx_events_sent_total 0",
            "perfecx_events_spooled_total 0",
            "perfecx_event_queue_depth 0",
            "perfecx_event_spool_bytes 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn long_tool_names_are_cut_on_a_char_boundary() {
        let name = "é".repeat(100);
        assert!(label(&name).len() <= MAX_LABEL_LEN);
    }
}
