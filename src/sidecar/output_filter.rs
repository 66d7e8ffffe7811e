//! Enforcement step: what comes back. Sensitive data in a tool's result is redacted before the
//! agent sees it; a result that breaks a strict content filter is replaced by an error.

use perfecx_policy::{Content, Outcome};

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
