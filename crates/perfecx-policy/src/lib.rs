//! The perfecx policy engine: policy documents in, decisions on tool calls out.
//!
//! Pure and synchronous: no I/O, no async, nothing that panics on input. The sidecar, the control
//! plane and the `perfecx policy` commands all call it.
//!
//! # A tour
//!
//! [`parse_policy`] reads one document (YAML or JSON) into a [`Policy`], or returns
//! [`Diagnostics`] that name the source, line, column and field path of every problem.
//! [`PolicySet::compile`] turns many policies into one immutable set, and
//! [`PolicySet::evaluate_call`] decides a call: every applicable policy must allow it.
//!
//! ```
//! use perfecx_policy::{parse_policy, Content, Outcome, PolicySet};
//!
//! let policy = parse_policy("safety.yaml", r#"
//! name: safety
//! rules:
//!   - type: tool_restriction
//!     forbidden_tools: [system_command]
//!   - type: content_filter
//!     forbidden_patterns: ["rm -rf"]
//! "#).unwrap();
//! let set = PolicySet::compile(vec![policy]).unwrap();
//!
//! let ok = set.evaluate_call("web_search", Content::Json(r#"{"q": "rust"}"#)).unwrap();
//! assert_eq!(ok.outcome, Outcome::Allow);
//!
//! // Case, whitespace, escapes and invisible characters do not hide a forbidden pattern.
//! let no = set.evaluate_call("shell", Content::Json(r#"{"cmd": "RM  \u002Drf /"}"#)).unwrap();
//! assert_eq!(no.outcome, Outcome::Block);
//! assert_eq!(no.violations[0].policy, "safety");
//! assert_eq!(no.violations[0].matched.as_deref(), Some("rm -rf"));
//! ```
//!
//! Outputs go through [`PolicySet::evaluate_output`] and [`PolicySet::redact_output`], which
//! replaces sensitive data (card numbers, keys, tokens, ...) with `[REDACTED:kind]`.

mod compile;
mod decode;
mod diagnostic;
mod evaluate;
#[doc(hidden)]
pub mod fuzzing;
mod glob;
mod json;
mod matcher;
mod model;
mod normalize;
pub mod sensitive;
pub mod suite;
#[cfg(test)]
mod testing;

pub use compile::{Limit, Limits, PROMPT_INJECTION_PACK, PolicyInfo, PolicySet};
pub use decode::{MAX_DOCUMENT_BYTES, parse_policy};
pub use diagnostic::{Diagnostic, Diagnostics};
pub use evaluate::{Action, Content, Decision, Outcome, Violation};
pub use json::{JsonError, is_json};
pub use model::{
    ContentFilter, Enforcement, ExecutionLimit, MemoryProtection, Origin, Policy, Rule, RuleKind,
    SensitiveAction, ToolRestriction,
};
pub use sensitive::SensitiveKind;
