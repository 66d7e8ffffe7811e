//! Entry points for the fuzz targets in `fuzz/`, here so that their seed corpora also run as
//! ordinary tests (`tests/fuzz_seeds.rs`). Each must return normally on any input.

use std::sync::LazyLock;

use serde::de::IgnoredAny;

use crate::{Content, PolicySet, parse_policy};

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

static SHIPPED: LazyLock<PolicySet> = LazyLock::new(|| {
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
