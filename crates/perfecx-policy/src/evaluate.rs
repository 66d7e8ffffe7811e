//! Deciding a tool call, or a tool's output, against a compiled [`PolicySet`].
//!
//! Every applicable policy is consulted and every violation reported, with the policy, the rule
//! and what matched; the outcome is the strictest action among them. On the allow path nothing is
//! allocated: the decision's violation list stays empty and scanning reuses per-thread buffers.

use std::cell::RefCell;

use serde::{Deserialize, Serialize};

use crate::compile::{Limits, PolicySet, RuleRef};
use crate::json::{JsonError, Scanner, TokenKind, push_json_string};
use crate::model::{Enforcement, RuleKind, SensitiveAction};
use crate::normalize::{Normalizer, is_normal};
use crate::sensitive::{Finding, KindSet, mask};

/// What is evaluated: JSON text (a call's arguments, a structured result) or plain text.
#[derive(Debug, Clone, Copy)]
pub enum Content<'a> {
    Json(&'a str),
    Text(&'a str),
}

/// What the caller must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Forward the call (or return the output) as it is.
    Allow,
    /// Forward it with sensitive data replaced: see [`PolicySet::redact_call`] and
    /// [`PolicySet::redact_output`].
    Redact,
    /// Refuse the call (or replace the output with an error).
    Block,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Redact => "redact",
            Outcome::Block => "block",
        }
    }
}

/// What a violation led to; a permissive policy only ever alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Blocked,
    Redacted,
    Alerted,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Blocked => "blocked",
            Action::Redacted => "redacted",
            Action::Alerted => "alerted",
        }
    }
}

/// One rule that a call or output broke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation<'s> {
    pub policy: &'s str,
    pub enforcement: Enforcement,
    pub rule: RuleKind,
    /// The rule's position in its policy's `rules`.
    pub rule_index: usize,
    pub action: Action,
    /// A sentence for people.
    pub detail: String,
    /// What matched: the tool name or glob, the pattern as written, or a masked value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched: Option<String>,
}

/// The decision on a call or an output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision<'s> {
    pub outcome: Outcome,
    pub violations: Vec<Violation<'s>>,
    /// Limits in force for the call (for outputs too, for reference).
    pub limits: &'s Limits,
}

impl Decision<'_> {
    pub fn is_allowed(&self) -> bool {
        self.outcome != Outcome::Block
    }

    /// The violation that decided a block: the first one that blocked.
    pub fn blocking(&self) -> Option<&Violation<'_>> {
        self.violations.iter().find(|v| v.action == Action::Blocked)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Call,
    Output,
}

/// Which findings a redaction replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Redaction {
    /// Those of strict `sensitive_data_action: redact` rules.
    Call,
    /// Those of strict rules.
    Output,
    /// Those of every rule.
    Report,
}

#[derive(Default)]
struct Scratch {
    scanner: Scanner,
    norm: Normalizer,
    /// Occurrences in a whole document: (end, automaton pattern), sorted.
    hits: Vec<(usize, usize)>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

impl PolicySet {
    /// Decides a call of `tool` with `args` (the JSON arguments). Malformed JSON is an error, which
    /// callers must treat as a refusal.
    pub fn evaluate_call<'s>(
        &'s self,
        tool: &str,
        args: Content<'_>,
    ) -> Result<Decision<'s>, JsonError> {
        let mut violations = Vec::new();
        self.check_tool(tool, &mut violations);
        if self.scans(tool) {
            self.scan(tool, args, Direction::Call, &mut violations)?;
        }
        Ok(self.decide(violations))
    }

    /// Decides what happens to `output`, the result of a call of `tool`.
    pub fn evaluate_output<'s>(
        &'s self,
        tool: &str,
        output: Content<'_>,
    ) -> Result<Decision<'s>, JsonError> {
        let mut violations = Vec::new();
        if self.sensitive.is_some() || self.patterns.as_ref().is_some_and(|p| p.any_content_filter)
        {
            self.scan(tool, output, Direction::Output, &mut violations)?;
        }
        Ok(self.decide(violations))
    }

    /// Whether `tool` may be called at all (and so appear in `tools/list`): no strict tool
    /// restriction forbids it.
    pub fn tool_allowed(&self, tool: &str) -> bool {
        self.tool_rules.iter().all(|r| {
            self.policies[r.at.policy].enforcement != Enforcement::Strict
                || tool_violation(r, tool).is_none()
        })
    }

    /// `args` with the sensitive data that strict `sensitive_data_action: redact` rules catch
    /// replaced by `[REDACTED:kind]`; `None` when there is nothing to replace.
    pub fn redact_call(&self, args: Content<'_>) -> Result<Option<String>, JsonError> {
        self.redact(args, Redaction::Call)
    }

    /// `output` with the sensitive data that strict content filters catch replaced by
    /// `[REDACTED:kind]`; `None` when there is nothing to replace.
    pub fn redact_output(&self, output: Content<'_>) -> Result<Option<String>, JsonError> {
        self.redact(output, Redaction::Output)
    }

    /// `content` with every value that any content filter detects as sensitive replaced,
    /// whatever the policy's enforcement or `sensitive_data_action` (allowlists still apply):
    /// for copies that leave the host, such as the events a sidecar reports. `None` when there
    /// is nothing to replace.
    pub fn redact_for_report(&self, content: Content<'_>) -> Result<Option<String>, JsonError> {
        self.redact(content, Redaction::Report)
    }

    /// Whether some content filter only reports sensitive data (a permissive policy's): then
    /// arguments and outputs that passed the enforcing checks may still hold sensitive data,
    /// and copies of them need [`PolicySet::redact_for_report`]. Without such a filter they
    /// hold none that any filter detects.
    pub fn reports_sensitive_data_unredacted(&self) -> bool {
        self.sensitive.as_ref().is_some_and(|s| {
            s.rules
                .iter()
                .any(|r| self.policies[r.at.policy].enforcement != Enforcement::Strict)
        })
    }

    fn decide<'s>(&'s self, violations: Vec<Violation<'s>>) -> Decision<'s> {
        let outcome = violations
            .iter()
            .map(|v| match v.action {
                Action::Blocked => Outcome::Block,
                Action::Redacted => Outcome::Redact,
                Action::Alerted => Outcome::Allow,
            })
            .max()
            .unwrap_or(Outcome::Allow);
        Decision {
            outcome,
            violations,
            limits: &self.limits,
        }
    }

    fn violation(
        &self,
        at: RuleRef,
        rule: RuleKind,
        strict_action: Action,
        detail: String,
        matched: Option<String>,
    ) -> Violation<'_> {
        let policy = &self.policies[at.policy];
        Violation {
            policy: &policy.name,
            enforcement: policy.enforcement,
            rule,
            rule_index: at.rule,
            action: if policy.enforcement == Enforcement::Strict {
                strict_action
            } else {
                Action::Alerted
            },
            detail,
            matched,
        }
    }

    fn check_tool<'s>(&'s self, tool: &str, out: &mut Vec<Violation<'s>>) {
        for r in &self.tool_rules {
            if let Some((detail, matched)) = tool_violation(r, tool) {
                out.push(self.violation(
                    r.at,
                    RuleKind::ToolRestriction,
                    Action::Blocked,
                    detail,
                    Some(matched),
                ));
            }
        }
    }

    fn scan<'s>(
        &'s self,
        tool: &str,
        content: Content<'_>,
        dir: Direction,
        out: &mut Vec<Violation<'s>>,
    ) -> Result<(), JsonError> {
        with_scratch(
            |Scratch {
                 scanner,
                 norm,
                 hits,
             }| {
                let src = match content {
                    Content::Json(src) => src,
                    Content::Text(text) => {
                        let triggered = self.match_patterns(
                            tool,
                            norm.normalize(text),
                            TokenKind::String,
                            dir,
                            out,
                        );
                        self.match_sensitive(text, None, triggered, true, dir, out);
                        return Ok(());
                    }
                };
                // Most strings are normal already and hold no escape that could hide a pattern: one
                // search over the whole document serves them all, its occurrences attributed to the
                // string they lie in. The other strings are normalized and searched one by one.
                let whole = self
                    .patterns
                    .as_ref()
                    .filter(|p| p.whole_document)
                    .map(|p| &p.matcher);
                hits.clear();
                if let Some(m) = whole {
                    m.for_each(src.as_bytes(), &mut |pattern, end| {
                        hits.push((end, pattern))
                    });
                    hits.sort_unstable();
                }
                let mut next_hit = 0;
                scanner.scan(src, &mut |t| {
                    let inner = match t.kind {
                        TokenKind::Number => t.raw.clone(),
                        TokenKind::Key | TokenKind::String => t.raw.start + 1..t.raw.end - 1,
                    };
                    let normal = is_normal(t.text);
                    // A number written otherwise than its plain digits is searched both ways:
                    // as it reads and as it is written.
                    let written = (t.kind == TokenKind::Number && t.text != &src[inner.clone()])
                        .then(|| &src[inner.clone()]);
                    let in_place = normal
                        && whole.is_some()
                        && only_quote_escapes(&src.as_bytes()[inner.clone()]);
                    let mut triggered = 0;
                    while let Some(&(end, pattern)) = hits.get(next_hit)
                        && end <= inner.end
                    {
                        next_hit += 1;
                        if in_place
                            && let Some(m) = whole
                            && end - m.len(pattern) >= inner.start
                        {
                            triggered |= self.report_pattern(pattern, tool, t.kind, dir, out);
                        }
                    }
                    if !in_place {
                        let text = if normal { t.text } else { norm.rewrite(t.text) };
                        triggered = self.match_patterns(tool, text, t.kind, dir, out);
                    }
                    if let Some(written) = written {
                        // Whichever form the search above took, the other one; both are ASCII.
                        let other = if in_place { t.text } else { written };
                        triggered |= self.match_patterns(tool, other, t.kind, dir, out);
                        self.match_sensitive(written, t.key, triggered, false, dir, out);
                    }
                    // Keys too: a key can carry data (an address as the key of a map).
                    self.match_sensitive(t.text, t.key, triggered, !normal, dir, out);
                })
            },
        )
    }

    /// Reports the forbidden patterns in `text` (normalized); returns the sensitive kinds whose
    /// triggers it holds.
    fn match_patterns<'s>(
        &'s self,
        tool: &str,
        text: &str,
        kind: TokenKind,
        dir: Direction,
        out: &mut Vec<Violation<'s>>,
    ) -> KindSet {
        let Some(p) = &self.patterns else { return 0 };
        let mut triggered = 0;
        p.matcher.for_each(text.as_bytes(), &mut |pattern, _| {
            triggered |= self.report_pattern(pattern, tool, kind, dir, out);
        });
        triggered
    }

    /// Reports the violations of an occurrence of automaton pattern `pattern` in a token of
    /// `kind`; returns the sensitive kinds it is a trigger of.
    fn report_pattern<'s>(
        &'s self,
        pattern: usize,
        tool: &str,
        kind: TokenKind,
        dir: Direction,
        out: &mut Vec<Violation<'s>>,
    ) -> KindSet {
        let Some(p) = &self.patterns else { return 0 };
        for owner in &p.owners[pattern] {
            if owner.kind == RuleKind::MemoryProtection
                && (dir == Direction::Output
                    || !self
                        .memory_rules
                        .iter()
                        .any(|r| r.at == owner.at && r.tools.find(tool).is_some()))
            {
                continue;
            }
            let policy = self.policies[owner.at.policy].name.as_str();
            let seen = out.iter().any(|v| {
                v.policy == policy
                    && v.rule_index == owner.at.rule
                    && v.matched.as_deref() == Some(&*owner.pattern)
            });
            if seen {
                continue;
            }
            let place = match (dir, kind) {
                (Direction::Output, _) => "the output",
                (Direction::Call, TokenKind::Key) => "an argument name",
                (Direction::Call, _) => "the arguments",
            };
            let detail = match owner.kind {
                RuleKind::MemoryProtection => {
                    format!("`{}` in a write to memory tool `{tool}`", owner.pattern)
                }
                _ => format!("forbidden pattern `{}` in {place}", owner.pattern),
            };
            out.push(self.violation(
                owner.at,
                owner.kind,
                Action::Blocked,
                detail,
                Some(owner.pattern.to_string()),
            ));
        }
        p.triggers[pattern]
    }

    fn match_sensitive<'s>(
        &'s self,
        text: &str,
        key: Option<&str>,
        triggered: KindSet,
        escaped: bool,
        dir: Direction,
        out: &mut Vec<Violation<'s>>,
    ) {
        let Some(s) = &self.sensitive else { return };
        s.detector
            .scan(text, key, Some(triggered), escaped, &mut |f: Finding| {
                let value = &text[f.start..f.end];
                for rule in &s.rules {
                    if !rule.kinds[f.kind.index()] || rule.allows(value) {
                        continue;
                    }
                    let action = match (dir, rule.action) {
                        (Direction::Output, _) | (Direction::Call, SensitiveAction::Redact) => {
                            Action::Redacted
                        }
                        (Direction::Call, SensitiveAction::Block) => Action::Blocked,
                    };
                    let matched = format!("{}: {}", f.kind, mask(value));
                    let policy = self.policies[rule.at.policy].name.as_str();
                    if out.iter().any(|v| {
                        v.policy == policy
                            && v.rule_index == rule.at.rule
                            && v.matched.as_deref() == Some(&matched)
                    }) {
                        continue;
                    }
                    let place = if dir == Direction::Call {
                        "the arguments"
                    } else {
                        "the output"
                    };
                    let detail = format!("sensitive data ({}) in {place}", f.kind);
                    out.push(self.violation(
                        rule.at,
                        RuleKind::ContentFilter,
                        action,
                        detail,
                        Some(matched),
                    ));
                }
            });
    }

    fn redact(&self, content: Content<'_>, how: Redaction) -> Result<Option<String>, JsonError> {
        let Some(s) = &self.sensitive else {
            return Ok(None);
        };
        let redacts = |f: &Finding, value: &str| {
            s.rules.iter().any(|r| {
                let applies = match how {
                    Redaction::Report => true,
                    Redaction::Output => {
                        self.policies[r.at.policy].enforcement == Enforcement::Strict
                    }
                    Redaction::Call => {
                        self.policies[r.at.policy].enforcement == Enforcement::Strict
                            && r.action == SensitiveAction::Redact
                    }
                };
                applies && r.kinds[f.kind.index()] && !r.allows(value)
            })
        };
        let mut findings: Vec<Finding> = Vec::new();
        let collect = |text: &str, key: Option<&str>, findings: &mut Vec<Finding>| {
            findings.clear();
            s.detector.scan(text, key, None, true, &mut |f| {
                if redacts(&f, &text[f.start..f.end]) {
                    findings.push(f);
                }
            });
            !findings.is_empty()
        };
        match content {
            Content::Text(text) => {
                Ok(collect(text, None, &mut findings).then(|| redacted(text, &mut findings)))
            }
            Content::Json(src) => with_scratch(|Scratch { scanner, .. }| {
                let mut out: Option<String> = None;
                let mut copied = 0;
                scanner.scan(src, &mut |t| {
                    // A number is looked at as it reads, then as it is written.
                    let written = &src[t.raw.clone()];
                    let text = if collect(t.text, t.key, &mut findings) {
                        t.text
                    } else if t.kind == TokenKind::Number
                        && written != t.text
                        && collect(written, t.key, &mut findings)
                    {
                        written
                    } else {
                        return;
                    };
                    let o = out.get_or_insert_with(|| String::with_capacity(src.len()));
                    o.push_str(&src[copied..t.raw.start]);
                    push_json_string(o, &redacted(text, &mut findings));
                    copied = t.raw.end;
                })?;
                Ok(out.map(|mut o| {
                    o.push_str(&src[copied..]);
                    o
                }))
            }),
        }
    }
}

fn tool_violation(r: &crate::compile::ToolRule, tool: &str) -> Option<(String, String)> {
    if let Some(glob) = r.forbidden.find(tool) {
        let detail = if glob == tool {
            format!("tool `{tool}` is forbidden")
        } else {
            format!("tool `{tool}` is forbidden by `{glob}`")
        };
        return Some((detail, glob.to_owned()));
    }
    match &r.allowed {
        Some(allowed) if allowed.find(tool).is_none() => Some((
            format!("tool `{tool}` is not among the allowed tools"),
            tool.to_owned(),
        )),
        _ => None,
    }
}

/// Whether the only escapes in `raw` (a JSON string's text between its quotes) are `\"` and
/// `\\`, which no pattern can match across.
fn only_quote_escapes(raw: &[u8]) -> bool {
    let mut escapes = memchr::memchr_iter(b'\\', raw);
    while let Some(i) = escapes.next() {
        match raw.get(i + 1) {
            Some(b'"') => {}
            // The escaped backslash is the next one the iterator would yield.
            Some(b'\\') => _ = escapes.next(),
            _ => return false,
        }
    }
    true
}

/// `text` with each finding replaced by `[REDACTED:kind]` (overlaps: the first one wins).
fn redacted(text: &str, findings: &mut [Finding]) -> String {
    findings.sort_by_key(|f| (f.start, std::cmp::Reverse(f.end)));
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for f in findings.iter() {
        if f.start < at {
            continue;
        }
        out.push_str(&text[at..f.start]);
        out.push_str("[REDACTED:");
        out.push_str(f.kind.as_str());
        out.push(']');
        at = f.end;
    }
    out.push_str(&text[at..]);
    out
}
