//! Entry points for the fuzz targets in `fuzz/`, here so that their seed corpora also run as
//! ordinary tests (`tests/fuzz_seeds.rs`). Each must return normally on any input.

use std::sync::LazyLock;

use serde::de::IgnoredAny;

use crate::{Content, Decision, JsonError, Outcome, PolicySet, parse_policy};

/// Parses arbitrary bytes as a policy document and compiles it.
pub fn parse_and_compile(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(policy) = parse_policy("fuzz.yaml", text) {
        // A valid policy must compile on its own, and render back to a valid document.
        let json = serde_json::to_string(&policy).unwrap_or_default();
        let set = PolicySet::compile(vec![policy]);
        assert!(set.is_ok(), "a parsed policy failed to compile");
        assert!(
            parse_policy("again.json", &json).is_ok(),
            "a parsed policy does not round-trip: {json}"
        );
    }
}

fn shipped() -> PolicySet {
    let docs = [
        include_str!("../../../policies/production-safety-policy.yaml"),
        include_str!("../../../policies/secrets-and-pii.yaml"),
        include_str!("../../../policies/destructive-commands.yaml"),
    ];
    let policies = docs
        .iter()
        .filter_map(|d| parse_policy("shipped.yaml", d).ok())
        .collect();
    PolicySet::compile(policies).unwrap_or_else(|_| PolicySet::empty())
}

static SHIPPED: LazyLock<PolicySet> = LazyLock::new(shipped);

/// The same policies, made to normalize and search every string of a document on its own: the
/// reference that the whole-document search must agree with.
static SHIPPED_PER_STRING: LazyLock<PolicySet> = LazyLock::new(|| {
    let mut set = shipped();
    if let Some(p) = set.patterns.as_mut() {
        p.whole_document = false;
    }
    set
});

/// Evaluates arbitrary bytes as a call's arguments and as a tool's output, under the shipped
/// policies. The first byte picks the tool.
pub fn evaluate(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let tool = ["web_search", "memory_write", "shell", "file_reader"][usize::from(pick) % 4];
    let set = &*SHIPPED;
    let call = set.evaluate_call(tool, Content::Json(text));
    let reference = SHIPPED_PER_STRING.evaluate_call(tool, Content::Json(text));
    assert_eq!(
        summary(&call),
        summary(&reference),
        "the whole-document search disagrees with string-by-string: {text:?}"
    );
    // The scanner never refuses what serde_json accepts.
    if serde_json::from_str::<IgnoredAny>(text).is_ok() {
        assert!(
            call.is_ok(),
            "serde_json accepts what the scanner refuses: {text:?}"
        );
    }
    let _ = set.evaluate_output(tool, Content::Text(text));
    if let Ok(Some(redacted)) = set.redact_output(Content::Json(text)) {
        assert!(
            serde_json::from_str::<IgnoredAny>(&redacted).is_ok(),
            "redaction broke the JSON: {redacted}"
        );
    }
    let _ = set.redact_output(Content::Text(text));
}

/// A decision as an order-free summary: the outcome and the sorted violations.
fn summary(
    decision: &Result<Decision<'_>, JsonError>,
) -> Result<(Outcome, Vec<String>), JsonError> {
    let d = decision.as_ref().map_err(Clone::clone)?;
    let mut violations: Vec<String> = d.violations.iter().map(|v| format!("{v:?}")).collect();
    violations.sort();
    Ok((d.outcome, violations))
}
