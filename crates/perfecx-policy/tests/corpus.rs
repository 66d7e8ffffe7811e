//! The shipped policies and their suites (`policies/*.test.yaml`), run through the library: the
//! same corpus that CI runs through `perfecx policy test`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::Path;

use perfecx_policy::suite::Suite;
use perfecx_policy::{Policy, parse_policy};

#[test]
fn shipped_suites_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    let is_suite = |p: &Path| name(p).ends_with(".test.yaml");
    let policies: Vec<Policy> = entries
        .iter()
        .filter(|p| !is_suite(p) && name(p).ends_with(".yaml"))
        .map(|p| {
            parse_policy(&name(p), &fs::read_to_string(p).unwrap())
                .unwrap_or_else(|d| panic!("{d}"))
        })
        .collect();
    assert!(
        policies.len() >= 3,
        "the reference policy and two packs ship"
    );

    let mut cases = 0;
    for path in entries.iter().filter(|p| is_suite(p)) {
        let text = fs::read_to_string(path).unwrap();
        let suite = Suite::parse(&name(path), &text).unwrap_or_else(|d| panic!("{d}"));
        for result in suite
            .run(&name(path), &policies)
            .unwrap_or_else(|d| panic!("{d}"))
        {
            assert!(
                result.passed,
                "{}: {}: {:?} {:?}",
                name(path),
                result.name,
                result.failure,
                result.violations
            );
            cases += 1;
        }
    }
    assert!(cases >= 30, "only {cases} cases ran");
}

#[test]
fn a_wrong_expectation_fails() {
    let policy = parse_policy(
        "p.yaml",
        "name: p\nrules:\n  - type: content_filter\n    forbidden_patterns: [rm -rf]\n",
    )
    .unwrap();
    let suite = Suite::parse(
        "s.test.yaml",
        "cases:\n  - name: wrong\n    call: { tool: t, args: { c: 'rm -rf /' } }\n    expect: { decision: allow }\n  - name: wrong rule\n    call: { tool: t, args: { c: 'rm -rf /' } }\n    expect: { decision: block, rule: tool_restriction }\n",
    )
    .unwrap();
    let results = suite.run("s.test.yaml", &[policy]).unwrap();
    assert_eq!(
        results[0].failure.as_deref(),
        Some("expected `allow`, got `block`")
    );
    assert_eq!(
        results[1].failure.as_deref(),
        Some("expected a violation of a `tool_restriction` rule, none was reported")
    );
}

#[test]
fn malformed_suites_are_refused_with_their_location() {
    let e = Suite::parse(
        "s.test.yaml",
        "cases:\n  - name: x\n    call: { tool: t }\n    expect: { decision: maybe }\n",
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("s.test.yaml:4:"), "{msg}");
    assert!(msg.contains("maybe"), "{msg}");
    let e = Suite::parse(
        "s.test.yaml",
        "cases:\n  - name: x\n    expect: { decision: allow }\n",
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("needs exactly one of `call` and `output`")
    );
}
