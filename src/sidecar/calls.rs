//! Book-keeping for the tool calls of one request: which responses the sidecar waits for, and
//! one tracing span, metric, log line and reported event per tool call and per violation.
//! Calls still open when the request ends (the upstream hung up, a deadline) are counted as
//! errors.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use perfecx_policy::PolicySet;

use super::denial::Refusal;
use super::events::{self, Checked, Execution, Record};
use super::metrics::Metrics;
use super::report::Reporter;
use super::rescue;

pub struct Call {
    pub tool: String,
    /// The arguments were redacted on the way in.
    pub redacted: bool,
    /// The arguments as forwarded, for the event ([`Tracker::capture`]).
    input: Option<String>,
    started: Instant,
    span: tracing::Span,
}

impl Call {
    /// Runs `f` inside the call's span (for the output filter's logs).
    pub fn in_span<R>(&self, f: impl FnOnce() -> R) -> R {
        self.span.in_scope(f)
    }
}

/// What an open request (with an id) in flight is.
pub enum Pending {
    Call(Call),
    List,
    Other,
}

pub struct Tracker {
    upstream: Arc<str>,
    metrics: Arc<Metrics>,
    /// Present when events are reported to a control plane.
    reporter: Option<Reporter>,
    pending: HashMap<String, Pending>,
    /// Requests asked on an earlier stream of the session, neither calls nor tool lists, whose
    /// answers this resumed stream may carry ([`super::unanswered`]).
    resumed: Vec<String>,
    /// A permissive `max_execution_time_ms`: calls that take longer are reported, not cut.
    alert_after: Option<(std::time::Duration, String)>,
}

/// A call's end as counted.
pub struct Finish<'a> {
    /// allowed, blocked or redacted.
    pub decision: &'a str,
    pub error: bool,
    /// What the agent got, for the event ([`Tracker::capture`]).
    pub output: Option<String>,
}

impl Tracker {
    pub fn new(upstream: Arc<str>, metrics: Arc<Metrics>, reporter: Option<Reporter>) -> Tracker {
        Tracker {
            upstream,
            metrics,
            reporter,
            pending: HashMap::new(),
            resumed: Vec::new(),
            alert_after: None,
        }
    }

    /// Whether events are reported: without it, there is nothing to capture.
    pub fn reporting(&self) -> bool {
        self.reporter.is_some()
    }

    /// `text` made fit for an event ([`events::capture`]); `None` when nothing is reported, so
    /// that a sidecar without a control plane does no work for it.
    pub fn capture(
        &self,
        set: Option<&PolicySet>,
        text: &str,
        json: bool,
        checked: Checked,
    ) -> Option<String> {
        self.reporter
            .as_ref()
            .map(|_| events::capture(set, text, json, checked))
    }

    /// The output of an MCP `tools/call` result, made fit for an event.
    pub fn capture_mcp_output(&self, set: Option<&PolicySet>, result: &str) -> Option<String> {
        self.reporter.as_ref().map(|_| {
            let (text, json) = events::mcp_output(result);
            events::capture(set, &text, json, Checked::Yes)
        })
    }

    /// Counts, logs and reports one violation.
    pub fn violation(
        &self,
        tool: &str,
        policy: &str,
        rule: &'static str,
        action: &'static str,
        detail: &str,
    ) {
        self.metrics.violation(policy, rule);
        if let Some(reporter) = &self.reporter {
            reporter.record(Record::Violation(events::Violation {
                at: SystemTime::now(),
                upstream: self.upstream.clone(),
                tool: tool.to_owned(),
                policy: policy.to_owned(),
                rule,
                action,
                detail: detail.to_owned(),
            }));
        }
    }

    /// Reports calls slower than a permissive policy's `max_execution_time_ms`.
    pub fn alert_after(&mut self, active: &super::policies::Active) {
        self.alert_after = active
            .set
            .limits()
            .max_execution_time_ms
            .as_ref()
            .filter(|l| l.enforcement == perfecx_policy::Enforcement::Permissive)
            .map(|l| (std::time::Duration::from_millis(l.value), l.policy.clone()));
    }

    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The span of a call of `tool`: judge the call inside it so that its violations are
    /// logged with the call.
    pub fn span(&self, tool: &str) -> tracing::Span {
        call_span(&self.upstream, tool)
    }

    /// A call forwarded to the tool, with its arguments as captured for the event.
    pub fn start_call(
        &mut self,
        id: String,
        tool: &str,
        redacted: bool,
        span: tracing::Span,
        input: Option<String>,
    ) {
        self.pending.insert(
            id,
            Pending::Call(Call {
                tool: tool.to_owned(),
                redacted,
                input,
                started: Instant::now(),
                span,
            }),
        );
    }

    pub fn start(&mut self, id: String, what: Pending) {
        self.pending.insert(id, what);
    }

    pub fn take(&mut self, id: &str) -> Option<Pending> {
        self.pending.remove(id)
    }

    /// Expects on this stream the answers to `ids`, requests of an earlier stream that are
    /// neither calls nor tool lists.
    pub fn expect_resumed(&mut self, ids: Vec<String>) {
        self.resumed = ids;
    }

    /// Whether `id` is one of [`Tracker::expect_resumed`]'s, which it stops being.
    pub fn take_resumed(&mut self, id: &str) -> bool {
        let found = self.resumed.iter().position(|r| r == id);
        found.map(|i| self.resumed.swap_remove(i)).is_some()
    }

    /// The open requests, each with whether it is neither a call nor a tool list.
    pub fn open_requests(&self) -> Vec<(String, bool)> {
        self.pending
            .iter()
            .map(|(id, p)| (id.clone(), matches!(p, Pending::Other)))
            .collect()
    }

    /// Whether `id` is an open call or tool list: one whose answer is judged.
    pub fn judges(&self, id: &str) -> bool {
        matches!(self.pending.get(id), Some(Pending::Call(_) | Pending::List))
    }

    pub fn has_calls(&self) -> bool {
        self.pending.values().any(|p| matches!(p, Pending::Call(_)))
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether a request with this id is already open.
    pub fn is_open(&self, id: &str) -> bool {
        self.pending.contains_key(id)
    }

    /// A call the sidecar answered itself: it never reached the tool.
    pub fn refused(&self, tool: &str, refusal: &Refusal, span: tracing::Span) {
        span.record("decision", "blocked");
        span.record("duration_ms", 0u64);
        let _g = span.enter();
        self.metrics.call(&self.upstream, tool, "blocked");
        tracing::info!(reason = %refusal, "tool call refused");
    }

    /// Counts a call that got its answer.
    pub fn finish(&self, call: Call, finish: Finish<'_>) {
        let elapsed = call.started.elapsed();
        self.metrics
            .call(&self.upstream, &call.tool, finish.decision);
        if finish.error {
            self.metrics.error(&self.upstream, &call.tool);
        }
        self.metrics
            .tool_call_duration
            .with_label_values(&[&self.upstream])
            .observe(elapsed.as_secs_f64());
        call.span.record("decision", finish.decision);
        call.span.record(
            "duration_ms",
            elapsed.as_millis().min(u64::MAX as u128) as u64,
        );
        call.span.record("error", finish.error);
        let _g = call.span.enter();
        let duration_ms = elapsed.as_millis().min(u64::MAX as u128) as u64;
        if let Some(reporter) = &self.reporter {
            reporter.record(Record::Execution(Execution {
                at: SystemTime::now(),
                upstream: self.upstream.clone(),
                tool: call.tool.clone(),
                input: call.input.unwrap_or_default(),
                output: finish.output.unwrap_or_default(),
                duration_ms,
                success: !finish.error,
            }));
        }
        if let Some((limit, policy)) = &self.alert_after {
            if elapsed > *limit {
                let limit_ms = limit.as_millis() as u64;
                self.violation(
                    &call.tool,
                    policy,
                    "execution_limit",
                    "alerted",
                    &format!("the tool took {duration_ms} ms, over the limit of {limit_ms} ms"),
                );
                tracing::warn!(
                    policy = %policy,
                    rule = "execution_limit",
                    action = "alerted",
                    limit_ms,
                    "the tool took longer than the permissive limit"
                );
            }
        }
        tracing::info!("tool call");
    }

    /// Answers every open request with `refusal`, as JSON-RPC messages (an `isError` result for
    /// a call cut off by its deadline, a JSON-RPC error otherwise), and counts the calls among
    /// them as errors.
    pub fn fail_all(&mut self, refusal: &Refusal) -> Vec<String> {
        let mut answers = Vec::with_capacity(self.pending.len());
        for (id, p) in std::mem::take(&mut self.pending) {
            match p {
                Pending::Call(call) => {
                    answers.push(match refusal {
                        // No tool ran to produce a result: a server error, as the MCP spec
                        // has it, not a tool result the model would take for the tool's.
                        Refusal::Upstream(_) => rescue::request_error(Some(&id), refusal),
                        _ => rescue::tool_call_answer(&id, refusal),
                    });
                    if let Refusal::Deadline(d) = refusal {
                        // The call reached the tool and was cut off: an execution that failed,
                        // and a violation of the limit.
                        self.violation(
                            &call.tool,
                            &d.policy,
                            "execution_limit",
                            "blocked",
                            &format!("the tool did not answer within {} ms", d.limit_ms),
                        );
                    }
                    let decision = if call.redacted { "redacted" } else { "allowed" };
                    let output = self.reporter.as_ref().map(|_| refusal.to_string());
                    self.finish(
                        call,
                        Finish {
                            decision,
                            error: true,
                            output,
                        },
                    );
                }
                Pending::List | Pending::Other => {
                    answers.push(rescue::request_error(Some(&id), refusal));
                }
            }
        }
        answers
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        for (_, p) in std::mem::take(&mut self.pending) {
            if let Pending::Call(call) = p {
                let decision = if call.redacted { "redacted" } else { "allowed" };
                let output = self
                    .reporter
                    .as_ref()
                    .map(|_| "the request ended before the tool answered".to_owned());
                self.finish(
                    call,
                    Finish {
                        decision,
                        error: true,
                        output,
                    },
                );
            }
        }
    }
}

fn call_span(upstream: &str, tool: &str) -> tracing::Span {
    tracing::info_span!(
        "tool_call",
        upstream,
        tool,
        decision = tracing::field::Empty,
        duration_ms = tracing::field::Empty,
        error = tracing::field::Empty,
    )
}
