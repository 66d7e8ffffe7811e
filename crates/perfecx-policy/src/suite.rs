//! Policy test suites: cases kept in YAML beside the policies (`*.test.yaml`), each a call or an
//! output and the decision expected for it.
//!
//! ```yaml
//! policies: [production-safety-policy]   # optional: the policies of the folder to load; default all
//! cases:
//!   - name: deleting everything is blocked
//!     call: { tool: file_reader, args: { path: "/tmp; rm -rf /" } }
//!     expect: { decision: block, policy: production-safety-policy, rule: content_filter }
//!   - name: card numbers in results are redacted
//!     output: { tool: web_search, text: "card 4111 1111 1111 1111" }
//!     expect: { decision: redact, redacted: "card [REDACTED:credit_card]" }
//! ```
//!
//! The same cases run through the library (`cargo test`), the `perfecx policy test` command and,
//! as the sidecar grows, through the sidecar.

use serde::{Deserialize, Serialize};

use crate::PolicySet;
use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::evaluate::{Content, Decision, Outcome};
use crate::model::{Policy, RuleKind};

/// One `*.test.yaml` file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// Names of the policies to compile for these cases; `None`: every policy of the folder.
    #[serde(default)]
    pub policies: Option<Vec<String>>,
    pub cases: Vec<Case>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub call: Option<Call>,
    #[serde(default)]
    pub output: Option<Output>,
    pub expect: Expect,
}

/// A tool call: the tool's name and its arguments (any JSON value, written in YAML).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Call {
    pub tool: String,
    #[serde(default = "empty_object")]
    pub args: serde_json::Value,
}

/// A tool's output: plain `text`, or a `json` value.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    pub tool: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub json: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub decision: Outcome,
    /// A violation of this policy must be among those reported.
    #[serde(default)]
    pub policy: Option<String>,
    /// A violation of this rule type must be among those reported.
    #[serde(default)]
    pub rule: Option<RuleKind>,
    /// For outputs: the text after redaction.
    #[serde(default)]
    pub redacted: Option<String>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// The result of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub name: String,
    pub passed: bool,
    /// The decision the engine gave.
    pub decision: Option<Outcome>,
    /// `policy/rule: detail` for each violation.
    pub violations: Vec<String>,
    /// Why the case failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

impl Suite {
    /// Parses a suite; `source` names it in errors.
    pub fn parse(source: &str, text: &str) -> Result<Suite, Diagnostics> {
        let suite: Suite = serde_saphyr::from_str(text).map_err(|e| {
            let d = Diagnostic::new(source, e.to_string());
            match e.location() {
                Some(l) => d.located(l.line() as usize, l.column() as usize, ""),
                None => d,
            }
        })?;
        let mut problems = Vec::new();
        for (i, case) in suite.cases.iter().enumerate() {
            let path = format!("cases[{i}]");
            if case.call.is_some() == case.output.is_some() {
                problems.push(
                    Diagnostic::new(
                        source,
                        format!(
                            "case `{}` needs exactly one of `call` and `output`",
                            case.name
                        ),
                    )
                    .located(1, 1, &path),
                );
            }
            if let Some(o) = &case.output
                && o.text.is_some() == o.json.is_some()
            {
                problems.push(
                    Diagnostic::new(
                        source,
                        format!(
                            "the output of case `{}` needs exactly one of `text` and `json`",
                            case.name
                        ),
                    )
                    .located(1, 1, &format!("{path}.output")),
                );
            }
        }
        if problems.is_empty() {
            Ok(suite)
        } else {
            Err(Diagnostics(problems))
        }
    }
}

impl Suite {
    /// The policies these cases run against, chosen from `all` by the suite's `policies` list.
    pub fn select(&self, source: &str, all: &[Policy]) -> Result<Vec<Policy>, Diagnostics> {
        let Some(names) = &self.policies else {
            return Ok(all.to_vec());
        };
        names
            .iter()
            .map(|name| {
                all.iter()
                    .find(|p| &p.name == name)
                    .cloned()
                    .ok_or_else(|| {
                        Diagnostic::new(
                            source,
                            format!(
                                "the suite names policy `{name}`, which is not among those loaded"
                            ),
                        )
                        .located(1, 1, "policies")
                        .into()
                    })
            })
            .collect()
    }

    /// Compiles the selected policies and runs every case.
    pub fn run(&self, source: &str, all: &[Policy]) -> Result<Vec<CaseResult>, Diagnostics> {
        let set = PolicySet::compile(self.select(source, all)?)?;
        Ok(self.cases.iter().map(|c| c.run(&set)).collect())
    }
}

impl Case {
    /// Runs the case against `set`.
    pub fn run(&self, set: &PolicySet) -> CaseResult {
        let mut result = CaseResult {
            name: self.name.clone(),
            passed: false,
            decision: None,
            violations: Vec::new(),
            failure: None,
        };
        let (decision, redacted) = match (&self.call, &self.output) {
            (Some(call), _) => {
                let args = call.args.to_string();
                (set.evaluate_call(&call.tool, Content::Json(&args)), None)
            }
            (None, Some(output)) => {
                let json = output.json.as_ref().map(ToString::to_string);
                let content = match (&output.text, &json) {
                    (Some(t), _) => Content::Text(t),
                    (None, Some(j)) => Content::Json(j),
                    (None, None) => Content::Text(""),
                };
                let redacted = set.redact_output(content).ok().flatten();
                (set.evaluate_output(&output.tool, content), redacted)
            }
            (None, None) => {
                result.failure = Some("the case has neither `call` nor `output`".into());
                return result;
            }
        };
        let decision = match decision {
            Ok(d) => d,
            Err(e) => {
                result.failure = Some(e.to_string());
                return result;
            }
        };
        result.decision = Some(decision.outcome);
        result.violations = decision
            .violations
            .iter()
            .map(|v| format!("{}/{}: {}", v.policy, v.rule, v.detail))
            .collect();
        result.failure = self.expect.mismatch(&decision, redacted.as_deref());
        result.passed = result.failure.is_none();
        result
    }
}

impl Expect {
    fn mismatch(&self, d: &Decision<'_>, redacted: Option<&str>) -> Option<String> {
        if d.outcome != self.decision {
            return Some(format!(
                "expected `{}`, got `{}`",
                self.decision.as_str(),
                d.outcome.as_str()
            ));
        }
        let deciding = |v: &&crate::Violation<'_>| {
            self.policy.as_ref().is_none_or(|p| v.policy == p)
                && self.rule.is_none_or(|r| v.rule == r)
        };
        if (self.policy.is_some() || self.rule.is_some())
            && !d.violations.iter().any(|v| deciding(&v))
        {
            let what = match (&self.policy, self.rule) {
                (Some(p), Some(r)) => format!("`{r}` of policy `{p}`"),
                (Some(p), None) => format!("policy `{p}`"),
                (None, Some(r)) => format!("a `{r}` rule"),
                (None, None) => String::new(),
            };
            return Some(format!("expected a violation of {what}, none was reported"));
        }
        if let Some(want) = &self.redacted
            && redacted != Some(want.as_str())
        {
            return Some(format!(
                "expected the redacted output {want:?}, got {:?}",
                redacted.unwrap_or("(nothing redacted)")
            ));
        }
        None
    }
}
