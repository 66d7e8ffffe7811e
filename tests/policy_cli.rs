//! `perfecx policy lint | test | explain`, run as a user runs them: the real binary, real files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

fn perfecx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_perfecx"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the perfecx binary runs")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

fn write(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).unwrap();
}

#[test]
fn lint_accepts_the_shipped_policies_with_a_summary() {
    let o = perfecx(&["policy", "lint", "policies"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.starts_with("ok: 3 policies in 3 files; "), "{out}");
    assert!(
        out.contains("tool_restriction") && out.contains("forbidden patterns"),
        "{out}"
    );
}

#[test]
fn lint_reports_every_problem_located_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        "name: a\nrules:\n  - type: tool_restriction\n    allowed_toolz: [x]\n",
    );
    write(
        dir.path(),
        "b.json",
        r#"{"name": "b", "rules": [{"type": "execution_limit", "max_memory_mb": -1}]}"#,
    );
    write(
        dir.path(),
        "ok.yaml",
        "name: ok\nrules:\n  - type: execution_limit\n    max_memory_mb: 1\n",
    );
    let o = perfecx(&["policy", "lint", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(err.contains("a.yaml:4:5 (rules[0].allowed_toolz)"), "{err}");
    assert!(err.contains("help: did you mean `allowed_tools`?"), "{err}");
    assert!(
        err.contains("b.json:1:70 (rules[0].max_memory_mb)"),
        "{err}"
    );
    assert!(err.contains("error: 3 problems in 2 files"), "{err}");

    let o = perfecx(&[
        "policy",
        "lint",
        "--format",
        "json",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["problems"][0]["path"], "rules[0].allowed_toolz");
    assert_eq!(v["problems"][0]["line"], 4);
}

#[test]
fn lint_refuses_duplicate_names_across_files() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["a.yaml", "b.yaml"] {
        write(
            dir.path(),
            f,
            "name: same\nrules:\n  - type: execution_limit\n    max_memory_mb: 1\n",
        );
    }
    let o = perfecx(&["policy", "lint", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("duplicate policy name `same`"));
}

#[test]
fn test_runs_the_shipped_suites() {
    let o = perfecx(&["policy", "test", "policies"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stdout));
    let out = text(&o.stdout);
    assert!(
        out.contains("  pass  rm -rf in arguments is blocked"),
        "{out}"
    );
    let last = out.lines().last().unwrap();
    assert!(last.ends_with("passed, 0 failed"), "{last}");
}

#[test]
fn test_reports_failures_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "p.yaml",
        "name: p\nrules:\n  - type: content_filter\n    forbidden_patterns: [rm -rf]\n",
    );
    write(
        dir.path(),
        "p.test.yaml",
        "cases:\n  - name: right\n    call: { tool: t, args: { c: 'rm -rf /' } }\n    expect: { decision: block }\n  - name: wrong\n    call: { tool: t, args: { c: 'ls' } }\n    expect: { decision: block }\n",
    );
    let o = perfecx(&["policy", "test", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o.stdout);
    assert!(
        out.contains("  FAIL  wrong: expected `block`, got `allow`"),
        "{out}"
    );
    assert!(out.ends_with("1 passed, 1 failed\n"), "{out}");

    let o = perfecx(&[
        "policy",
        "test",
        "--format",
        "json",
        dir.path().to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["passed"].as_u64(), v["failed"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(v["suites"][0]["cases"][1]["passed"], false);
}

#[test]
fn explain_shows_the_decision_and_its_reasons() {
    let o = perfecx(&[
        "policy",
        "explain",
        "--policy",
        "policies/production-safety-policy.yaml",
        "--tool",
        "web_search",
        "--args",
        r#"{"q": "DROP\u0020TABLE users"}"#,
    ]);
    assert_eq!(o.status.code(), Some(3), "blocked calls exit 3");
    let out = text(&o.stdout);
    assert!(out.starts_with("call of `web_search`: block\n"), "{out}");
    assert!(
        out.contains("blocked by policy `production-safety-policy` (strict), rule 2 `content_filter`: forbidden pattern `DROP TABLE` in the arguments"),
        "{out}"
    );
    assert!(
        out.contains("limit max_execution_time_ms = 300000"),
        "{out}"
    );

    let o = perfecx(&[
        "policy",
        "explain",
        "--policy",
        "policies",
        "--tool",
        "web_search",
        "--args",
        r#"{"q": "weather"}"#,
        "--output",
        "card 4111 1111 1111 1111",
        "--format",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["call"]["outcome"], "allow");
    assert_eq!(v["output"]["outcome"], "redact");
    assert_eq!(v["redacted_output"], "card [REDACTED:credit_card]");
}

#[test]
fn explain_refuses_bad_input_clearly() {
    let o = perfecx(&[
        "policy",
        "explain",
        "--policy",
        "policies",
        "--tool",
        "t",
        "--args",
        "{not json",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("--args is not valid JSON: malformed JSON at byte 1"),
        "{}",
        text(&o.stderr)
    );
    let o = perfecx(&[
        "policy",
        "explain",
        "--policy",
        "no/such/dir",
        "--tool",
        "t",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("cannot read"),
        "{}",
        text(&o.stderr)
    );
}
