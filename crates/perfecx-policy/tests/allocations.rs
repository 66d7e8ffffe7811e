//! The allow path allocates nothing: counted with a global allocator that tallies allocations.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use perfecx_policy::{Content, Outcome, PolicySet, parse_policy};

fn reference_set() -> PolicySet {
    let text = include_str!("../../../policies/production-safety-policy.yaml");
    PolicySet::compile(vec![parse_policy("p.yaml", text).unwrap()]).unwrap()
}

fn count(f: impl FnMut()) -> u64 {
    allocation_counter::measure(f).count_total
}

#[test]
fn tool_restriction_and_limits_allocate_nothing() {
    let set = PolicySet::compile(vec![
        parse_policy(
            "p.yaml",
            "name: p\nrules:\n  - type: tool_restriction\n    allowed_tools: [web_search, 'calc_*']\n    forbidden_tools: [shell]\n  - type: execution_limit\n    max_execution_time_ms: 1000\n",
        )
        .unwrap(),
    ])
    .unwrap();
    let n = count(|| {
        let d = set
            .evaluate_call("calc_add", Content::Json(r#"{"a":1,"b":2}"#))
            .unwrap();
        assert_eq!(d.outcome, Outcome::Allow);
        assert_eq!(
            d.limits.max_execution_time_ms.as_ref().map(|l| l.value),
            Some(1000)
        );
    });
    assert_eq!(n, 0);
}

#[test]
fn scanning_allowed_content_allocates_nothing_once_warm() {
    let set = reference_set();
    let ascii = serde_json::json!({
        "query": "latest AI security news ".repeat(40),
        "filters": {"lang": "en", "max": 10, "tags": ["a", "b", "c"], "score": 0.75, "big": 1.5e300},
    })
    .to_string();
    let unicode = r#"{"q": "Ｃａｆé\u200b  naïve\tdéjà vu, 東京の天気 %41"}"#;
    for args in [ascii.as_str(), unicode] {
        let call = || {
            let d = set
                .evaluate_call("web_search", Content::Json(args))
                .unwrap();
            assert_eq!(d.outcome, Outcome::Allow, "{:?}", d.violations);
        };
        call(); // warm the per-thread buffers and the regex caches
        assert_eq!(count(call), 0, "allocations while scanning {args}");
    }
}
