//! Enforcement step: what comes back. Sensitive data in a tool's result is redacted before the
//! agent sees it; a result that breaks a strict content filter is replaced by an error.

use perfecx_policy::{Content, Outcome};
use serde_json::Value;

use super::calls::Tracker;
use super::denial::{Refusal, UpstreamFailed};
use super::policies::Active;
use super::policy_check::{denied, record};

pub enum OutputVerdict {
    Pass,
    /// The output with sensitive data replaced (same kind: JSON stays valid JSON).
    Redacted(String),
    Refuse(Refusal),
}

pub fn check_output(
    active: &Active,
    tracker: &Tracker,
    tool: &str,
    output: Content<'_>,
) -> OutputVerdict {
    let upstream = tracker.upstream();
    let decision = tracker
        .metrics()
        .time_evaluation(|| active.set.evaluate_output(tool, output));
    let decision = match decision {
        Ok(d) => d,
        // Output that cannot be inspected is not shown (fail closed).
        Err(e) => {
            return OutputVerdict::Refuse(
                UpstreamFailed {
                    upstream: upstream.to_owned(),
                    reason: format!("the tool's output is {e}"),
                }
                .into(),
            );
        }
    };
    record(tracker, tool, &decision, "output");
    match decision.outcome {
        Outcome::Allow => OutputVerdict::Pass,
        Outcome::Block => OutputVerdict::Refuse(denied(&decision, true)),
        Outcome::Redact => match active.set.redact_output(output) {
            Ok(Some(text)) => OutputVerdict::Redacted(text),
            Ok(None) => OutputVerdict::Pass,
            Err(e) => OutputVerdict::Refuse(
                UpstreamFailed {
                    upstream: upstream.to_owned(),
                    reason: format!("the tool's output is {e}"),
                }
                .into(),
            ),
        },
    }
}

/// Judges each entry of a tool list as output: its title, description and schemas go into the
/// model's context as a tool's result does. Sensitive data is redacted; an entry that a strict
/// content filter withholds is left out of the list, and so is one whose name redaction would
/// change (it could not be called by it).
pub fn judge_tools(active: &Active, tracker: &Tracker, tools: &mut Vec<Value>) {
    tools.retain_mut(|tool| {
        let name = tool.get("name").and_then(Value::as_str).unwrap_or("").to_owned();
        let text = tool.to_string();
        let refusal = match check_output(active, tracker, &name, Content::Json(&text)) {
            OutputVerdict::Pass => return true,
            OutputVerdict::Redacted(redacted) => match serde_json::from_str::<Value>(&redacted) {
                Ok(value) if value.get("name").and_then(Value::as_str) == Some(&name) => {
                    *tool = value;
                    return true;
                }
                _ => "its name would be redacted".to_owned(),
            },
            OutputVerdict::Refuse(refusal) => refusal.to_string(),
        };
        tracing::warn!(upstream = %tracker.upstream(), tool = %name, error = %refusal, "a tool left out of the tool list");
        false
    });
}
