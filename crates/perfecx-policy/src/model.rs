//! The policy document: what authors write, after validation.
//!
//! These types are produced by [`crate::parse_policy`] (never deserialized directly, so that every
//! error carries a source location) and serialize to the JSON shape of the API reference.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::sensitive::SensitiveKind;

/// One policy document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub enforcement: Enforcement,
    pub rules: Vec<Rule>,
    /// Where the document came from, for diagnostics that span several documents.
    #[serde(skip)]
    pub origin: Origin,
}

/// Where a policy was read from: the source name and the position of its `name` field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    pub source: String,
    pub line: usize,
    pub column: usize,
}

/// What a policy does with the violations it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    /// Violations block the call (or redact the output).
    #[default]
    Strict,
    /// Violations are reported; the call goes ahead untouched.
    Permissive,
    /// The policy is validated but takes no part in decisions.
    Disabled,
}

impl Enforcement {
    pub const ALL: [(&'static str, Enforcement); 3] = [
        ("strict", Enforcement::Strict),
        ("permissive", Enforcement::Permissive),
        ("disabled", Enforcement::Disabled),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::Strict => "strict",
            Enforcement::Permissive => "permissive",
            Enforcement::Disabled => "disabled",
        }
    }
}

/// One rule of a policy, tagged by `type` in the document.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Rule {
    ToolRestriction(ToolRestriction),
    ExecutionLimit(ExecutionLimit),
    ContentFilter(ContentFilter),
    MemoryProtection(MemoryProtection),
}

impl Rule {
    pub fn kind(&self) -> RuleKind {
        match self {
            Rule::ToolRestriction(_) => RuleKind::ToolRestriction,
            Rule::ExecutionLimit(_) => RuleKind::ExecutionLimit,
            Rule::ContentFilter(_) => RuleKind::ContentFilter,
            Rule::MemoryProtection(_) => RuleKind::MemoryProtection,
        }
    }
}

/// The rule types, as named in documents, violations and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    ToolRestriction,
    ExecutionLimit,
    ContentFilter,
    MemoryProtection,
}

impl RuleKind {
    pub const ALL: [RuleKind; 4] = [
        RuleKind::ToolRestriction,
        RuleKind::ExecutionLimit,
        RuleKind::ContentFilter,
        RuleKind::MemoryProtection,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::ToolRestriction => "tool_restriction",
            RuleKind::ExecutionLimit => "execution_limit",
            RuleKind::ContentFilter => "content_filter",
            RuleKind::MemoryProtection => "memory_protection",
        }
    }

    pub fn from_name(name: &str) -> Option<RuleKind> {
        RuleKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which tools may be called. Names are exact, or globs where `*` stands for any run of
/// characters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolRestriction {
    /// `None`: any tool not forbidden.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_tools: Option<Vec<String>>,
    /// Wins over `allowed_tools`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forbidden_tools: Vec<String>,
}

/// Resource limits on a forwarded call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExecutionLimit {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_execution_time_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<u64>,
}

/// Substring patterns that must not appear, and sensitive data detection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContentFilter {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forbidden_patterns: Vec<String>,
    pub sensitive_data_detection: bool,
    /// The kinds to detect; empty means all of them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sensitive_data_types: Vec<SensitiveKind>,
    /// What sensitive data in a call's arguments does under a strict policy.
    #[serde(skip_serializing_if = "SensitiveAction::is_default")]
    pub sensitive_data_action: SensitiveAction,
    /// Literal values that are never reported as sensitive.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowlist: Vec<String>,
    /// Regular expressions; a detected value that matches one in full is not reported.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowlist_patterns: Vec<String>,
}

/// What a strict content filter does with sensitive data in a call's arguments.
/// (In a tool's output sensitive data is always redacted.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SensitiveAction {
    #[default]
    Block,
    Redact,
}

impl SensitiveAction {
    fn is_default(&self) -> bool {
        *self == SensitiveAction::default()
    }

    pub const ALL: [(&'static str, SensitiveAction); 2] = [
        ("block", SensitiveAction::Block),
        ("redact", SensitiveAction::Redact),
    ];
}

/// Tools that write the agent's memory, and what such writes must not carry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryProtection {
    /// Tool names or globs, such as `memory_*`.
    pub tools: Vec<String>,
    /// `None`: the shipped prompt-injection pack ([`crate::PROMPT_INJECTION_PACK`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forbidden_patterns: Option<Vec<String>>,
}
