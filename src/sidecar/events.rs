//! The events the sidecar reports (DESIGN.md, "The sidecar"): a `tool_execution` for every
//! call that reached the tool, a `policy_violation` for every violation.
//!
//! The request path builds a [`Record`]: its texts are already cut to size and stripped of
//! sensitive data ([`capture`]), so nothing large or secret is queued. The reporter's task turns
//! it into the API's [`NewEvent`], giving it the `event_id` that makes a resend harmless.

use std::sync::Arc;
use std::time::SystemTime;

use perfecx_api::{EventType, NewEvent};
use perfecx_policy::{Content, PolicySet};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::time::rfc3339;

/// Input and output are cut to this many bytes (plus a note saying how long they were).
pub const MAX_TEXT_BYTES: usize = 4 * 1024;
/// Tool and policy names come from the agent or the policy author: cut them too.
const MAX_NAME_BYTES: usize = 256;
const MAX_DETAIL_BYTES: usize = 1024;

/// What the request path hands to the reporter.
#[derive(Debug)]
pub enum Record {
    Execution(Execution),
    Violation(Violation),
}

/// A call that reached the tool, and how it ended.
#[derive(Debug)]
pub struct Execution {
    pub at: SystemTime,
    pub upstream: Arc<str>,
    pub tool: String,
    /// From [`capture`].
    pub input: String,
    /// From [`capture`].
    pub output: String,
    pub duration_ms: u64,
    pub success: bool,
}

/// One rule a call or an output broke.
#[derive(Debug)]
pub struct Violation {
    pub at: SystemTime,
    pub upstream: Arc<str>,
    pub tool: String,
    pub policy: String,
    /// The rule type: tool_restriction, content_filter, execution_limit, memory_protection.
    pub rule: &'static str,
    /// blocked, redacted or alerted.
    pub action: &'static str,
    pub detail: String,
}

impl Record {
    /// The event to send, with a fresh `event_id`.
    pub fn into_event(self) -> NewEvent {
        let (event_type, at, upstream, data) = match self {
            Record::Execution(e) => {
                let mut data = Map::new();
                data.insert("tool".into(), cut(&e.tool, MAX_NAME_BYTES).into());
                data.insert("input".into(), e.input.into());
                data.insert("output".into(), e.output.into());
                data.insert("duration_ms".into(), e.duration_ms.into());
                data.insert("success".into(), e.success.into());
                (EventType::ToolExecution, e.at, e.upstream, data)
            }
            Record::Violation(v) => {
                let mut data = Map::new();
                data.insert("tool".into(), cut(&v.tool, MAX_NAME_BYTES).into());
                data.insert("policy".into(), cut(&v.policy, MAX_NAME_BYTES).into());
                data.insert("rule".into(), v.rule.into());
                data.insert("action".into(), v.action.into());
                data.insert("detail".into(), cut(&v.detail, MAX_DETAIL_BYTES).into());
                (EventType::PolicyViolation, v.at, v.upstream, data)
            }
        };
        let mut context = Map::new();
        context.insert("upstream".into(), Value::String(upstream.to_string()));
        NewEvent {
            event_id: Some(uuid::Uuid::new_v4()),
            event_type,
            timestamp: Some(rfc3339(at)),
            data,
            context,
        }
    }
}

/// Whether the enforcing filters have seen a text (and so blocked or redacted what strict
/// policies catch in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    Yes,
    No,
}

/// `text` as it may leave the sidecar in an event: without the sensitive data that any policy
/// detects, and cut to [`MAX_TEXT_BYTES`].
///
/// Text that passed the strict filters holds nothing they detect, so only permissive filters
/// (which report but let data through) or a text no filter saw call for another scan. That scan
/// covers the whole text before the cut: cut first, a secret across the cut might no longer be
/// recognised and its first half would be sent.
pub fn capture(set: Option<&PolicySet>, text: &str, json: bool, checked: Checked) -> String {
    let Some(set) = set else {
        return cut(text, MAX_TEXT_BYTES);
    };
    if checked == Checked::Yes && !set.reports_sensitive_data_unredacted() {
        return cut(text, MAX_TEXT_BYTES);
    }
    let content = if json {
        Content::Json(text)
    } else {
        Content::Text(text)
    };
    let redacted = match set.redact_for_report(content) {
        Ok(r) => r,
        // Not the JSON it claimed to be: scanned as text instead.
        Err(_) if json => match set.redact_for_report(Content::Text(text)) {
            Ok(r) => r,
            Err(_) => return WITHHELD.into(),
        },
        Err(_) => return WITHHELD.into(),
    };
    match redacted {
        Some(r) => cut(&r, MAX_TEXT_BYTES),
        None => cut(text, MAX_TEXT_BYTES),
    }
}

const WITHHELD: &str = "[withheld: could not be checked for sensitive data]";

/// The text an MCP `CallToolResult` shows (its text items, one per line), or the result's JSON
/// when it holds anything else. The flag says whether the text is JSON.
pub fn mcp_output(result: &str) -> (String, bool) {
    #[derive(Deserialize)]
    struct CallToolResult {
        content: Vec<Item>,
    }
    #[derive(Deserialize)]
    struct Item {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        text: Option<String>,
    }
    let texts = serde_json::from_str::<CallToolResult>(result)
        .ok()
        .filter(|r| {
            !r.content.is_empty()
                && r.content
                    .iter()
                    .all(|i| i.kind == "text" && i.text.is_some())
        })
        .map(|r| {
            r.content
                .into_iter()
                .filter_map(|i| i.text)
                .collect::<Vec<_>>()
                .join("\n")
        });
    match texts {
        Some(t) => (t, false),
        None => (result.to_owned(), true),
    }
}

/// `text` cut on a character boundary to about `max` bytes, with a note of its full length.
pub fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let note = format!("… [truncated: {} bytes in all]", text.len());
    let mut end = max.saturating_sub(note.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + note.len());
    out.push_str(&text[..end]);
    out.push_str(&note);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(doc: &str) -> PolicySet {
        PolicySet::compile(vec![perfecx_policy::parse_policy("p.yaml", doc).unwrap()]).unwrap()
    }

    #[test]
    fn texts_are_cut_on_character_boundaries() {
        assert_eq!(cut("short", 10), "short");
        let long = "é".repeat(5000);
        let c = cut(&long, MAX_TEXT_BYTES);
        assert!(c.len() <= MAX_TEXT_BYTES, "{}", c.len());
        assert!(c.ends_with("[truncated: 10000 bytes in all]"), "{c}");
    }

    #[test]
    fn sensitive_data_is_redacted_before_the_cut() {
        let permissive = set(
            "name: audit\nenforcement: permissive\nrules:\n  - type: content_filter\n    sensitive_data_detection: true\n",
        );
        let strict =
            set("name: s\nrules:\n  - type: content_filter\n    sensitive_data_detection: true\n");
        let text = format!("{} card 4111 1111 1111 1111", "x ".repeat(2022));
        // The card straddles the cut: it is redacted as a whole first.
        let c = capture(Some(&permissive), &text, false, Checked::Yes);
        assert!(!c.contains("4111"), "{c}");
        // Strict filters already redacted what passed them; text they did not see is scanned.
        let e = capture(Some(&strict), "mail jane@acme.io", false, Checked::Yes);
        assert_eq!(e, "mail jane@acme.io");
        let e = capture(Some(&strict), "mail jane@acme.io", false, Checked::No);
        assert_eq!(e, "mail [REDACTED:email]");
        let j = capture(Some(&strict), "{not json jane@acme.io", true, Checked::No);
        assert_eq!(j, "{not json [REDACTED:email]");
    }

    #[test]
    fn mcp_results_show_their_text() {
        let (t, json) =
            mcp_output(r#"{"content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}"#);
        assert_eq!((t.as_str(), json), ("a\nb", false));
        let raw = r#"{"content":[{"type":"image","data":"..."}]}"#;
        assert_eq!(mcp_output(raw), (raw.to_owned(), true));
    }

    #[test]
    fn events_have_the_reference_shape() {
        let e = Record::Violation(Violation {
            at: SystemTime::UNIX_EPOCH,
            upstream: Arc::from("demo"),
            tool: "shell".into(),
            policy: "safety".into(),
            rule: "tool_restriction",
            action: "blocked",
            detail: "tool `shell` is forbidden".into(),
        })
        .into_event();
        assert!(e.event_id.is_some());
        assert_eq!(e.event_type, EventType::PolicyViolation);
        assert_eq!(e.timestamp.as_deref(), Some("1970-01-01T00:00:00.000Z"));
        assert_eq!(e.data["rule"], "tool_restriction");
        assert_eq!(e.context["upstream"], "demo");
    }
}
