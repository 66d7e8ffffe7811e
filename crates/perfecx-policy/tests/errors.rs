//! Policy errors as authors see them: located, with the field path, rendered.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use perfecx_policy::{PolicySet, parse_policy};

/// The rendered diagnostics of a document that must be refused.
fn errors(text: &str) -> String {
    match parse_policy("p.yaml", text) {
        Ok(p) => panic!("accepted: {p:?}"),
        Err(d) => d.to_string(),
    }
}

#[test]
fn unknown_field_is_located_and_suggested() {
    let text = "name: a\nrules:\n  - type: tool_restriction\n    allowed_toolz: [web_search]\n";
    assert_eq!(
        errors(text),
        "error: unknown field `allowed_toolz` in a `tool_restriction` rule\n \
         --> p.yaml:4:5 (rules[0].allowed_toolz)\n  |\n\
         4 |     allowed_toolz: [web_search]\n  |     ^^^^^^^^^^^^^\n  \
         = help: did you mean `allowed_tools`?\n\n\
         error: a `tool_restriction` rule restricts nothing\n \
         --> p.yaml:3:5 (rules[0])\n  |\n\
         3 |   - type: tool_restriction\n  |     ^^^^^^^^^^^^^^^^^^^^^^\n  \
         = help: give `allowed_tools`, `forbidden_tools` or both"
    );
}

#[test]
fn unknown_rule_type_lists_the_known_ones() {
    let e = errors("name: a\nrules:\n  - type: rate_limit\n");
    assert!(
        e.starts_with("error: unknown rule type `rate_limit`\n --> p.yaml:3:11 (rules[0].type)"),
        "{e}"
    );
    assert!(e.contains(
        "help: expected one of `tool_restriction`, `execution_limit`, `content_filter`, `memory_protection`"
    ));
}

#[test]
fn wrong_types_say_what_was_expected() {
    let e = errors("name: a\nrules:\n  - type: execution_limit\n    max_memory_mb: \"512\"\n");
    assert!(
        e.starts_with(
            "error: expected a whole number of megabytes, found a string\n --> p.yaml:4:20"
        ),
        "{e}"
    );
    let e = errors("name: 7\nrules: []\n");
    assert!(e.contains("expected a string, found an integer"), "{e}");
    assert!(e.contains("help: put the value in quotes"), "{e}");
    let e = errors("name: a\nrules: {}\n");
    assert!(
        e.contains("expected a list, found a mapping\n --> p.yaml:2:8 (rules)"),
        "{e}"
    );
    let e = errors("- a\n- b\n");
    assert!(
        e.starts_with("error: expected a mapping, found a list\n --> p.yaml:1:1"),
        "{e}"
    );
}

#[test]
fn negative_and_zero_limits_are_refused() {
    let e = errors("name: a\nrules:\n  - type: execution_limit\n    max_execution_time_ms: -5\n");
    assert!(e.starts_with("error: a limit must not be negative, found `-5`\n --> p.yaml:4:28 (rules[0].max_execution_time_ms)"), "{e}");
    let e = errors("name: a\nrules:\n  - type: execution_limit\n    max_memory_mb: 0\n");
    assert!(e.contains("a limit of `0` would refuse every call"), "{e}");
}

#[test]
fn empty_and_duplicate_names_and_patterns_are_refused() {
    let e = errors(
        "name: '  '\nrules:\n  - type: content_filter\n    forbidden_patterns: ['', a, a, \"\\u200b\"]\n",
    );
    assert!(
        e.contains("error: a policy name must not be empty\n --> p.yaml:1:7 (name)"),
        "{e}"
    );
    assert!(
        e.contains(
            "error: pattern must not be empty\n --> p.yaml:4:26 (rules[0].forbidden_patterns[0])"
        ),
        "{e}"
    );
    assert!(
        e.contains(
            "error: duplicate pattern `a`\n --> p.yaml:4:33 (rules[0].forbidden_patterns[2])"
        ),
        "{e}"
    );
    assert!(
        e.contains("the pattern `\\u{200b}` is empty once normalized"),
        "{e}"
    );
}

#[test]
fn missing_fields_are_named() {
    assert!(
        errors("rules:\n  - type: content_filter\n    forbidden_patterns: [x]\n")
            .contains("missing field `name`")
    );
    assert!(errors("name: a\n").contains("missing field `rules`"));
    assert!(
        errors("name: a\nrules:\n  - forbidden_tools: [x]\n")
            .contains("missing field `type` in a rule")
    );
    assert!(errors("name: a\nrules: []\n").contains("a policy needs at least one rule"));
    assert!(errors("").contains("the document is empty"));
}

#[test]
fn json_documents_get_the_same_checks_and_locations() {
    let e = errors(
        r#"{"name": "a", "rules": [{"type": "tool_restriction", "forbidden_tools": ["x", "x"]}], "extra": 1}"#,
    );
    assert!(
        e.contains("error: unknown field `extra` in a policy\n --> p.yaml:1:87 (extra)"),
        "{e}"
    );
    assert!(
        e.contains(
            "error: duplicate tool name `x`\n --> p.yaml:1:79 (rules[0].forbidden_tools[1])"
        ),
        "{e}"
    );
}

#[test]
fn syntax_errors_and_abuse_are_refused_cleanly() {
    assert!(errors("name: a\nrules: [\n").contains("invalid YAML or JSON"));
    assert!(errors("name: a\nname: b\nrules: []\n").contains("invalid YAML or JSON"));
    assert!(errors("name: a\n---\nname: b\n").contains("a file holds one policy"));
    let deep = format!(
        "name: a\nrules: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let e = errors(&deep);
    assert!(e.contains("recursion limit exceeded"), "{e}");
    assert!(
        e.lines().all(|l| l.chars().count() < 120),
        "the excerpt is cut to a window: {e}"
    );
    let deep = format!("name: a\nrules: {}{}\n", "[".repeat(20), "]".repeat(20));
    assert!(errors(&deep).contains("nested more than 16 levels deep"));
    let huge = format!(
        "name: a\ndescription: '{}'\nrules: []\n",
        "x".repeat(2 << 20)
    );
    assert!(errors(&huge).contains("more than the limit"));
}

#[test]
fn invalid_allowlist_patterns_are_refused() {
    let e = errors(
        "name: a\nrules:\n  - type: content_filter\n    sensitive_data_detection: true\n    allowlist_patterns: ['(x']\n",
    );
    assert!(
        e.contains("error: invalid regular expression `(x`: unclosed group\n --> p.yaml:5:26"),
        "{e}"
    );
}

#[test]
fn duplicate_policy_names_across_documents_are_refused() {
    let a = parse_policy(
        "a.yaml",
        "name: same\nrules:\n  - type: execution_limit\n    max_memory_mb: 1\n",
    )
    .unwrap();
    let b = parse_policy(
        "b.yaml",
        "# b\nname: same\nrules:\n  - type: execution_limit\n    max_memory_mb: 2\n",
    )
    .unwrap();
    let e = PolicySet::compile(vec![a, b]).unwrap_err().to_string();
    assert_eq!(
        e,
        "error: duplicate policy name `same`\n --> b.yaml:2:7 (name)\n  = help: `same` is already defined at a.yaml:1; policy names must be unique"
    );
}

#[test]
fn the_reference_policy_parses_and_serializes_back_to_its_json() {
    let text = r#"{ "name": "production-safety-policy", "description": "Safety policy for production agents", "rules": [ { "type": "tool_restriction", "allowed_tools": ["web_search", "calculator", "file_reader"], "forbidden_tools": ["code_executor", "system_command"] }, { "type": "execution_limit", "max_execution_time_ms": 300000, "max_memory_mb": 512 }, { "type": "content_filter", "forbidden_patterns": ["rm -rf", "DROP TABLE", "DELETE FROM"], "sensitive_data_detection": true } ], "enforcement": "strict" }"#;
    let p = parse_policy("reference.json", text).unwrap();
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["name"], "production-safety-policy");
    assert_eq!(json["enforcement"], "strict");
    assert_eq!(json["rules"][0]["allowed_tools"][2], "file_reader");
    assert_eq!(json["rules"][1]["max_execution_time_ms"], 300000);
    assert_eq!(json["rules"][2]["forbidden_patterns"][1], "DROP TABLE");
    // What it serializes to parses again to the same policy.
    let again = parse_policy("again.json", &json.to_string()).unwrap();
    assert_eq!(again.rules, p.rules);
}
