//! Reading a policy document (YAML, or JSON, which is YAML too) into a [`Policy`], with every
//! problem located by source, line, column and field path.
//!
//! The document is loaded into a tree that keeps source spans, then walked by hand: serde's
//! derived decoders lose positions inside tagged enums, and authors deserve to see where.

use saphyr::{AnnotatedMapping, LoadableYamlNode, MarkedYaml, Scalar, ScanError, YamlData};
use saphyr_parser::{Event, Parser};

use crate::diagnostic::{Diagnostic, Diagnostics, backticked, did_you_mean};
use crate::model::{
    ContentFilter, Enforcement, ExecutionLimit, MemoryProtection, Origin, Policy, Rule, RuleKind,
    SensitiveAction, ToolRestriction,
};
use crate::normalize::normalize_pattern;
use crate::sensitive::SensitiveKind;

/// Documents larger than this are refused before parsing.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// A policy is at most four levels deep; anything much deeper is not a policy.
const MAX_DEPTH: usize = 16;
const MAX_NAME_CHARS: usize = 128;

/// Parses and validates one policy document. `source` names it in diagnostics (a file path).
pub fn parse_policy(source: &str, text: &str) -> Result<Policy, Diagnostics> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(Diagnostic::document(
            source,
            format!(
                "the document is {} bytes, more than the limit of {MAX_DOCUMENT_BYTES}",
                text.len()
            ),
        )
        .into());
    }
    check_depth(source, text)?;
    let docs = MarkedYaml::load_from_str(text).map_err(|e| scan_error(source, text, &e))?;
    let mut d = Decoder {
        source,
        text,
        diags: Vec::new(),
    };
    let policy = match docs.as_slice() {
        [doc] => d.policy(doc),
        [] => {
            return Err(Diagnostic::document(source, "the document is empty")
                .with_help("a policy needs at least `name` and `rules`")
                .into());
        }
        [_, second, ..] => {
            d.error(
                second,
                "",
                "a file holds one policy, but this one has several documents",
            );
            None
        }
    };
    match policy {
        Some(p) if d.diags.is_empty() => Ok(p),
        _ => Err(Diagnostics(d.diags)),
    }
}

/// Refuses deep nesting before a tree is built (and later dropped) recursively.
fn check_depth(source: &str, text: &str) -> Result<(), Diagnostics> {
    let mut depth = 0usize;
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| scan_error(source, text, &e))?;
        match event {
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    let s = span.start;
                    return Err(Diagnostic::at(
                        source,
                        text,
                        (s.line(), s.col(), 1),
                        "",
                        format!("the document is nested more than {MAX_DEPTH} levels deep"),
                    )
                    .into());
                }
            }
            Event::SequenceEnd | Event::MappingEnd => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn scan_error(source: &str, text: &str, e: &ScanError) -> Diagnostics {
    let m = e.marker();
    Diagnostic::at(
        source,
        text,
        (m.line(), m.col(), 1),
        "",
        format!("invalid YAML or JSON: {}", e.info()),
    )
    .into()
}

/// What a node is, for "expected X, found Y" messages.
fn describe(node: &MarkedYaml) -> &'static str {
    match &node.data {
        YamlData::Value(Scalar::Null) => "null",
        YamlData::Value(Scalar::Boolean(_)) => "a boolean",
        YamlData::Value(Scalar::Integer(_)) => "an integer",
        YamlData::Value(Scalar::FloatingPoint(_)) => "a number",
        YamlData::Value(Scalar::String(_)) | YamlData::Representation(..) => "a string",
        YamlData::Sequence(_) => "a list",
        YamlData::Mapping(_) => "a mapping",
        YamlData::Tagged(..) => "a tagged value",
        YamlData::Alias(_) => "an alias",
        YamlData::BadValue => "an invalid value",
    }
}

fn child(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

struct Decoder<'a> {
    source: &'a str,
    text: &'a str,
    diags: Vec<Diagnostic>,
}

impl Decoder<'_> {
    fn error(
        &mut self,
        node: &MarkedYaml,
        path: &str,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        let (s, e) = (node.span.start, node.span.end);
        let len = if e.line() == s.line() {
            e.index().saturating_sub(s.index())
        } else {
            usize::MAX
        };
        self.diags.push(Diagnostic::at(
            self.source,
            self.text,
            (s.line(), s.col(), len),
            path,
            message,
        ));
        let last = self.diags.len() - 1;
        &mut self.diags[last]
    }

    fn help(&mut self, help: impl Into<String>) {
        if let Some(d) = self.diags.last_mut() {
            d.help = Some(help.into());
        }
    }

    fn wrong_type(&mut self, node: &MarkedYaml, path: &str, expected: &str) {
        let found = describe(node);
        self.error(node, path, format!("expected {expected}, found {found}"));
    }

    fn mapping<'n>(
        &mut self,
        node: &'n MarkedYaml<'n>,
        path: &str,
    ) -> Option<&'n AnnotatedMapping<'n, MarkedYaml<'n>>> {
        match &node.data {
            YamlData::Mapping(m) => Some(m),
            _ => {
                self.wrong_type(node, path, "a mapping");
                None
            }
        }
    }

    /// The fields of `map` whose names are in `known`; every other key is reported.
    fn fields<'n>(
        &mut self,
        map: &'n AnnotatedMapping<'n, MarkedYaml<'n>>,
        path: &str,
        context: &str,
        known: &[&str],
    ) -> Vec<(&'n str, &'n MarkedYaml<'n>)> {
        let mut out = Vec::new();
        for (k, v) in map {
            let YamlData::Value(Scalar::String(name)) = &k.data else {
                self.error(
                    k,
                    path,
                    format!("expected a field name, found {}", describe(k)),
                );
                continue;
            };
            if known.contains(&name.as_ref()) {
                out.push((name.as_ref(), v));
                continue;
            }
            self.error(
                k,
                &child(path, name),
                format!("unknown field `{name}` in {context}"),
            );
            match did_you_mean(name, known) {
                Some(s) => self.help(format!("did you mean `{s}`?")),
                None => self.help(format!("expected one of {}", backticked(known))),
            }
        }
        out
    }

    fn string(&mut self, node: &MarkedYaml, path: &str) -> Option<String> {
        match &node.data {
            YamlData::Value(Scalar::String(s)) => Some(s.to_string()),
            _ => {
                self.wrong_type(node, path, "a string");
                if matches!(
                    node.data,
                    YamlData::Value(
                        Scalar::Integer(_) | Scalar::Boolean(_) | Scalar::FloatingPoint(_)
                    )
                ) {
                    self.help("put the value in quotes to make it a string");
                }
                None
            }
        }
    }

    fn non_empty(&mut self, node: &MarkedYaml, path: &str, what: &str) -> Option<String> {
        let s = self.string(node, path)?;
        if s.trim().is_empty() {
            self.error(node, path, format!("{what} must not be empty"));
            return None;
        }
        Some(s)
    }

    fn boolean(&mut self, node: &MarkedYaml, path: &str) -> Option<bool> {
        match &node.data {
            YamlData::Value(Scalar::Boolean(b)) => Some(*b),
            _ => {
                self.wrong_type(node, path, "`true` or `false`");
                if let YamlData::Value(Scalar::String(v)) = &node.data
                    && ["yes", "no", "on", "off", "y", "n"]
                        .contains(&v.to_ascii_lowercase().as_str())
                {
                    self.help(
                        "policies are read as YAML 1.2, where only `true` and `false` are booleans",
                    );
                }
                None
            }
        }
    }

    fn positive(&mut self, node: &MarkedYaml, path: &str, unit: &str) -> Option<u64> {
        match &node.data {
            YamlData::Value(Scalar::Integer(n)) if *n > 0 => Some(*n as u64),
            YamlData::Value(Scalar::Integer(n)) => {
                let msg = if *n < 0 {
                    format!("a limit must not be negative, found `{n}`")
                } else {
                    "a limit of `0` would refuse every call".to_owned()
                };
                self.error(node, path, msg);
                self.help(format!("expected a whole number of {unit}, at least 1"));
                None
            }
            _ => {
                self.wrong_type(node, path, &format!("a whole number of {unit}"));
                None
            }
        }
    }

    fn list<'n>(&mut self, node: &'n MarkedYaml<'n>, path: &str) -> Option<&'n [MarkedYaml<'n>]> {
        match &node.data {
            YamlData::Sequence(items) => Some(items),
            _ => {
                self.wrong_type(node, path, "a list");
                None
            }
        }
    }

    /// A list of non-empty, distinct strings. `check` may refuse an item with a message.
    fn string_list(
        &mut self,
        node: &MarkedYaml,
        path: &str,
        what: &str,
        check: &dyn Fn(&str) -> Result<(), String>,
    ) -> Option<Vec<String>> {
        let items = self.list(node, path)?;
        let mut out: Vec<String> = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let Some(s) = self.non_empty(item, &p, what) else {
                ok = false;
                continue;
            };
            if let Err(msg) = check(&s) {
                self.error(item, &p, msg);
                ok = false;
            } else if let Some(first) = out.iter().position(|o| *o == s) {
                self.error(item, &p, format!("duplicate {what} `{s}`"));
                self.help(format!("it is already item {first} of this list"));
                ok = false;
            } else {
                out.push(s);
            }
        }
        ok.then_some(out)
    }

    fn policy(&mut self, doc: &MarkedYaml) -> Option<Policy> {
        let map = self.mapping(doc, "")?;
        let fields = self.fields(
            map,
            "",
            "a policy",
            &["name", "description", "enforcement", "rules"],
        );
        let (mut name, mut description, mut enforcement, mut rules) = (None, None, None, None);
        let mut origin = Origin {
            source: self.source.to_owned(),
            line: doc.span.start.line(),
            column: doc.span.start.col() + 1,
        };
        let mut ok = true;
        for (field, value) in fields {
            match field {
                "name" => {
                    name = self.policy_name(value);
                    origin.line = value.span.start.line();
                    origin.column = value.span.start.col() + 1;
                    ok &= name.is_some();
                }
                "description" => {
                    description = self.string(value, "description");
                    ok &= description.is_some();
                }
                "enforcement" => {
                    enforcement = self.one_of(value, "enforcement", &Enforcement::ALL);
                    ok &= enforcement.is_some();
                }
                _ => {
                    rules = self.rules(value);
                    ok &= rules.is_some();
                }
            }
        }
        if name.is_none() && ok {
            self.error(doc, "", "missing field `name`");
            self.help("every policy needs a unique `name`");
        }
        if rules.is_none() && ok {
            self.error(doc, "", "missing field `rules`");
            self.help("a policy needs a list of rules, such as `- type: content_filter`");
        }
        Some(Policy {
            name: name?,
            description,
            enforcement: enforcement.unwrap_or_default(),
            rules: rules?,
            origin,
        })
    }

    fn policy_name(&mut self, node: &MarkedYaml) -> Option<String> {
        let name = self.non_empty(node, "name", "a policy name")?;
        if name.chars().count() > MAX_NAME_CHARS
            || name.chars().any(char::is_control)
            || name.trim() != name
        {
            self.error(
                node,
                "name",
                format!("`{name}` is not a usable policy name"),
            );
            self.help(format!(
                "names are at most {MAX_NAME_CHARS} characters, without control characters or surrounding spaces"
            ));
            return None;
        }
        Some(name)
    }

    fn one_of<T: Copy>(
        &mut self,
        node: &MarkedYaml,
        path: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        let s = self.string(node, path)?;
        if let Some((_, v)) = options.iter().find(|(n, _)| *n == s) {
            return Some(*v);
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        self.error(node, path, format!("unknown value `{s}` for `{path}`"));
        self.help(format!("expected one of {}", backticked(&names)));
        None
    }

    fn rules(&mut self, node: &MarkedYaml) -> Option<Vec<Rule>> {
        let items = self.list(node, "rules")?;
        if items.is_empty() {
            self.error(node, "rules", "a policy needs at least one rule");
            return None;
        }
        let mut rules = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            if let Some(rule) = self.rule(item, &format!("rules[{i}]")) {
                rules.push(rule);
            }
        }
        (rules.len() == items.len()).then_some(rules)
    }

    fn rule(&mut self, node: &MarkedYaml, path: &str) -> Option<Rule> {
        let map = self.mapping(node, path)?;
        let kinds: Vec<&str> = RuleKind::ALL.iter().map(|k| k.as_str()).collect();
        let type_node = map.iter().find_map(|(k, v)| {
            matches!(&k.data, YamlData::Value(Scalar::String(s)) if s == "type").then_some(v)
        });
        let Some(type_node) = type_node else {
            self.error(node, path, "missing field `type` in a rule");
            self.help(format!("expected one of {}", backticked(&kinds)));
            return None;
        };
        let type_path = child(path, "type");
        let type_name = self.string(type_node, &type_path)?;
        let Some(kind) = RuleKind::from_name(&type_name) else {
            self.error(
                type_node,
                &type_path,
                format!("unknown rule type `{type_name}`"),
            );
            match did_you_mean(&type_name, &kinds) {
                Some(s) => self.help(format!("did you mean `{s}`?")),
                None => self.help(format!("expected one of {}", backticked(&kinds))),
            }
            return None;
        };
        let context = format!("a `{kind}` rule");
        let known: &[&str] = match kind {
            RuleKind::ToolRestriction => &["type", "allowed_tools", "forbidden_tools"],
            RuleKind::ExecutionLimit => &["type", "max_execution_time_ms", "max_memory_mb"],
            RuleKind::ContentFilter => &[
                "type",
                "forbidden_patterns",
                "sensitive_data_detection",
                "sensitive_data_types",
                "sensitive_data_action",
                "allowlist",
                "allowlist_patterns",
            ],
            RuleKind::MemoryProtection => &["type", "tools", "forbidden_patterns"],
        };
        let fields: Vec<(&str, &MarkedYaml)> = self
            .fields(map, path, &context, known)
            .into_iter()
            .filter(|(f, _)| *f != "type")
            .collect();
        let errors_before = self.diags.len();
        let get = |name: &str| {
            fields
                .iter()
                .find(|(f, _)| *f == name)
                .map(|(f, v)| (child(path, f), *v))
        };
        let rule = match kind {
            RuleKind::ToolRestriction => {
                let allowed = get("allowed_tools")
                    .and_then(|(p, v)| self.string_list(v, &p, "tool name", &no_check));
                let forbidden = get("forbidden_tools")
                    .and_then(|(p, v)| self.string_list(v, &p, "tool name", &no_check));
                if get("allowed_tools").is_none() && get("forbidden_tools").is_none() {
                    self.error(node, path, "a `tool_restriction` rule restricts nothing");
                    self.help("give `allowed_tools`, `forbidden_tools` or both");
                }
                Rule::ToolRestriction(ToolRestriction {
                    allowed_tools: allowed,
                    forbidden_tools: forbidden.unwrap_or_default(),
                })
            }
            RuleKind::ExecutionLimit => {
                let time = get("max_execution_time_ms")
                    .and_then(|(p, v)| self.positive(v, &p, "milliseconds"));
                let memory =
                    get("max_memory_mb").and_then(|(p, v)| self.positive(v, &p, "megabytes"));
                if fields.is_empty() {
                    self.error(node, path, "an `execution_limit` rule limits nothing");
                    self.help("give `max_execution_time_ms`, `max_memory_mb` or both");
                }
                Rule::ExecutionLimit(ExecutionLimit {
                    max_execution_time_ms: time,
                    max_memory_mb: memory,
                })
            }
            RuleKind::ContentFilter => self.content_filter(node, path, &get),
            RuleKind::MemoryProtection => {
                let tools =
                    get("tools").and_then(|(p, v)| self.string_list(v, &p, "tool name", &no_check));
                if get("tools").is_none() {
                    self.error(
                        node,
                        path,
                        "missing field `tools` in a `memory_protection` rule",
                    );
                    self.help("name the tools that write the agent's memory, such as `memory_*`");
                } else if tools.as_ref().is_some_and(Vec::is_empty) {
                    self.error(
                        get("tools").map_or(node, |(_, v)| v),
                        &child(path, "tools"),
                        "`tools` must name at least one tool",
                    );
                }
                let patterns = get("forbidden_patterns")
                    .and_then(|(p, v)| self.string_list(v, &p, "pattern", &pattern_check));
                Rule::MemoryProtection(MemoryProtection {
                    tools: tools.unwrap_or_default(),
                    forbidden_patterns: patterns,
                })
            }
        };
        (self.diags.len() == errors_before).then_some(rule)
    }

    fn content_filter<'n>(
        &mut self,
        node: &MarkedYaml,
        path: &str,
        get: &dyn Fn(&str) -> Option<(String, &'n MarkedYaml<'n>)>,
    ) -> Rule {
        let patterns = get("forbidden_patterns")
            .and_then(|(p, v)| self.string_list(v, &p, "pattern", &pattern_check));
        let detection = get("sensitive_data_detection").and_then(|(p, v)| self.boolean(v, &p));
        let types = get("sensitive_data_types").and_then(|(p, v)| {
            self.string_list(v, &p, "sensitive data type", &|s| {
                SensitiveKind::from_name(s).map(|_| ()).ok_or_else(|| {
                    let names: Vec<&str> = SensitiveKind::ALL.iter().map(|k| k.as_str()).collect();
                    format!(
                        "unknown sensitive data type `{s}`; expected one of {}",
                        backticked(&names)
                    )
                })
            })
        });
        let action = get("sensitive_data_action")
            .and_then(|(p, v)| self.one_of(v, &p, &SensitiveAction::ALL));
        let allowlist = get("allowlist")
            .and_then(|(p, v)| self.string_list(v, &p, "allowlist value", &no_check));
        let allowlist_patterns = get("allowlist_patterns").and_then(|(p, v)| {
            self.string_list(v, &p, "allowlist pattern", &|s| {
                regex::Regex::new(s).map(|_| ()).map_err(|e| {
                    // The regex crate renders a multi-line report; its last line is the reason.
                    let full = e.to_string();
                    let reason = full.lines().last().unwrap_or_default();
                    let reason = reason.trim_start_matches("error: ");
                    format!("invalid regular expression `{s}`: {reason}")
                })
            })
        });
        let detects = detection.unwrap_or(false);
        let sensitive_only = [
            "sensitive_data_types",
            "sensitive_data_action",
            "allowlist",
            "allowlist_patterns",
        ];
        if !detects {
            for f in sensitive_only {
                if let Some((p, v)) = get(f) {
                    self.error(
                        v,
                        &p,
                        format!("`{f}` has no effect without `sensitive_data_detection: true`"),
                    );
                }
            }
        }
        if get("forbidden_patterns").is_none() && get("sensitive_data_detection").is_none() {
            self.error(node, path, "a `content_filter` rule filters nothing");
            self.help("give `forbidden_patterns`, `sensitive_data_detection: true` or both");
        }
        let mut types: Vec<SensitiveKind> = types
            .unwrap_or_default()
            .iter()
            .filter_map(|s| SensitiveKind::from_name(s))
            .collect();
        types.sort();
        Rule::ContentFilter(ContentFilter {
            forbidden_patterns: patterns.unwrap_or_default(),
            sensitive_data_detection: detects,
            sensitive_data_types: types,
            sensitive_data_action: action.unwrap_or_default(),
            allowlist: allowlist.unwrap_or_default(),
            allowlist_patterns: allowlist_patterns.unwrap_or_default(),
        })
    }
}

fn no_check(_: &str) -> Result<(), String> {
    Ok(())
}

fn pattern_check(p: &str) -> Result<(), String> {
    if normalize_pattern(p).trim().is_empty() {
        return Err(format!(
            "the pattern `{}` is empty once normalized (only spaces or invisible characters)",
            p.escape_debug()
        ));
    }
    Ok(())
}
