//! Enforcement step: the call itself. Asks the engine whether `tool` may be called with these
//! arguments, and what the agent may see of `tools/list`.

use perfecx_policy::{Content, Decision, Outcome};
use serde_json::Value;

use super::calls::Tracker;
use super::denial::{PolicyDenied, Refusal, Unjudgeable};
use super::policies::Active;

pub enum CallVerdict {
    /// Forward the call as it is.
    Forward,
    /// Forward it with these arguments (sensitive data redacted).
    ForwardRedacted(String),
    Refuse(Refusal),
}

pub fn check_call(
    active: &Active,
    tracker: &Tracker,
    tool: &str,
    args: Content<'_>,
) -> CallVerdict {
    let decision = tracker
        .metrics()
        .time_evaluation(|| active.set.evaluate_call(tool, args));
    let decision = match decision {
        Ok(d) => d,
        Err(e) => {
            return CallVerdict::Refuse(
                Unjudgeable {
                    reason: format!("the arguments are {e}"),
                }
                .into(),
            );
        }
    };
    record(tracker, tool, &decision, "call");
    match decision.outcome {
        Outcome::Allow => CallVerdict::Forward,
        Outcome::Block => CallVerdict::Refuse(denied(&decision, false)),
        Outcome::Redact => match active.set.redact_call(args) {
            Ok(Some(redacted)) => CallVerdict::ForwardRedacted(redacted),
            Ok(None) => CallVerdict::Forward,
            Err(e) => CallVerdict::Refuse(
                Unjudgeable {
                    reason: format!("the arguments are {e}"),
                }
                .into(),
            ),
        },
    }
}

/// Counts, logs and reports every violation of a decision.
pub fn record(tracker: &Tracker, tool: &str, decision: &Decision<'_>, stage: &str) {
    for v in &decision.violations {
        // `v.matched` stays out of the event: for sensitive data it is a masked value, and even
        // masked, part of a secret.
        tracker.violation(
            tool,
            v.policy,
            v.rule.as_str(),
            v.action.as_str(),
            &v.detail,
        );
        tracing::warn!(
            tool,
            stage,
            policy = v.policy,
            rule = v.rule.as_str(),
            action = v.action.as_str(),
            detail = %v.detail,
            "policy violation"
        );
    }
}

/// The refusal for a blocked decision, naming the policy and rule that blocked it.
pub fn denied(decision: &Decision<'_>, output: bool) -> Refusal {
    match decision.blocking() {
        Some(v) => PolicyDenied {
            policy: v.policy.to_owned(),
            rule: v.rule.as_str(),
            detail: v.detail.clone(),
            output,
        }
        .into(),
        // A block always has a blocking violation; refuse anyway if not (fail closed).
        None => PolicyDenied {
            policy: "unknown".into(),
            rule: "unknown",
            detail: "blocked".into(),
            output,
        }
        .into(),
    }
}

/// Leaves out of a `tools/list` result's `tools` those that no call could use.
pub fn hide_forbidden_tools(active: &Active, tools: &mut Vec<Value>) {
    tools.retain(|t| {
        t.get("name")
            .and_then(Value::as_str)
            .is_some_and(|name| active.set.tool_allowed(name))
    });
}
