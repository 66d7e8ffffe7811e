//! `perfecx policy lint | test | explain`: the policy engine's tools for policy authors.
//!
//! Exit codes: 0 success (explain: allowed, possibly with redactions); 1 invalid policies, a
//! failing test or bad input; 2 wrong usage; 3 (explain only) the call or output is blocked.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use perfecx_policy::suite::{CaseResult, Suite};
use perfecx_policy::{Content, Decision, Diagnostics, Outcome, Policy, PolicySet, RuleKind};
use serde_json::json;

use crate::policy_files::{self, LoadedFile};

/// Exit code of `explain` for a blocked call or output.
pub const EXIT_BLOCKED: u8 = 3;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check policy files: exit 1 with every problem located, 0 and a summary otherwise.
    Lint(LintArgs),
    /// Run the test suites (`*.test.yaml`) kept beside the policies of a folder.
    Test(TestArgs),
    /// Show how the policies decide one call (and, optionally, its output).
    Explain(ExplainArgs),
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LintArgs {
    /// Policy files, or folders of them.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// The folder holding the policies and their `*.test.yaml` suites.
    dir: PathBuf,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// A policy file or a folder of them.
    #[arg(long)]
    policy: Vec<PathBuf>,
    /// The tool's name.
    #[arg(long)]
    tool: String,
    /// The call's arguments, as JSON.
    #[arg(long, default_value = "{}")]
    args: String,
    /// The tool's output (JSON or text), to see what the agent would get back.
    #[arg(long)]
    output: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

pub fn run(cmd: PolicyCommand) -> ExitCode {
    match cmd {
        PolicyCommand::Lint(a) => lint(&a),
        PolicyCommand::Test(a) => test(&a),
        PolicyCommand::Explain(a) => explain(&a),
    }
}

fn print_problems(d: &Diagnostics, format: Format) {
    match format {
        Format::Text => eprintln!("{d}\n"),
        Format::Json => println!("{}", json!({ "ok": false, "problems": d })),
    }
}

fn lint(args: &LintArgs) -> ExitCode {
    let loaded = policy_files::read_policies(&args.paths).and_then(|pairs| {
        let (policies, files): (Vec<Policy>, Vec<LoadedFile>) = pairs.into_iter().unzip();
        let summary = Summary::of(&policies);
        PolicySet::compile(policies).map(|_| (summary, files))
    });
    let (summary, files) = match loaded {
        Ok(ok) => ok,
        Err(d) => {
            print_problems(&d, args.format);
            if let Format::Text = args.format {
                let files: std::collections::BTreeSet<&str> =
                    d.iter().map(|p| p.source.as_str()).collect();
                eprintln!(
                    "error: {} problem{} in {} file{}",
                    d.len(),
                    plural(d.len()),
                    files.len(),
                    plural(files.len())
                );
            }
            return ExitCode::FAILURE;
        }
    };
    match args.format {
        Format::Text => println!(
            "ok: {} polic{} in {} file{}; {}",
            summary.policies,
            if summary.policies == 1 { "y" } else { "ies" },
            files.len(),
            plural(files.len()),
            summary.describe()
        ),
        Format::Json => println!(
            "{}",
            json!({
                "ok": true,
                "files": files.iter().map(|f| json!({"path": f.path, "policy": f.policy, "hash": f.hash})).collect::<Vec<_>>(),
                "rules": summary.rules,
                "forbidden_patterns": summary.patterns,
            })
        ),
    }
    ExitCode::SUCCESS
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Counts for the lint summary.
struct Summary {
    policies: usize,
    rules: BTreeMap<RuleKind, usize>,
    patterns: usize,
}

impl Summary {
    fn of(policies: &[Policy]) -> Summary {
        let mut rules = BTreeMap::new();
        let mut patterns = 0;
        for rule in policies.iter().flat_map(|p| &p.rules) {
            *rules.entry(rule.kind()).or_insert(0) += 1;
            match rule {
                perfecx_policy::Rule::ContentFilter(c) => patterns += c.forbidden_patterns.len(),
                perfecx_policy::Rule::MemoryProtection(m) => {
                    patterns += m
                        .forbidden_patterns
                        .as_ref()
                        .map_or(perfecx_policy::PROMPT_INJECTION_PACK.len(), Vec::len)
                }
                _ => {}
            }
        }
        Summary {
            policies: policies.len(),
            rules,
            patterns,
        }
    }

    fn describe(&self) -> String {
        let total: usize = self.rules.values().sum();
        let kinds: Vec<String> = self.rules.iter().map(|(k, n)| format!("{n} {k}")).collect();
        format!(
            "{total} rule{} ({}), {} forbidden pattern{}",
            plural(total),
            kinds.join(", "),
            self.patterns,
            plural(self.patterns)
        )
    }
}

/// One suite file and what became of it.
struct SuiteRun {
    file: PathBuf,
    results: Result<Vec<CaseResult>, Diagnostics>,
}

fn test(args: &TestArgs) -> ExitCode {
    let policies = match policy_files::read_policies(std::slice::from_ref(&args.dir)) {
        Ok(p) => p.into_iter().map(|(p, _)| p).collect::<Vec<_>>(),
        Err(d) => {
            print_problems(&d, args.format);
            return ExitCode::FAILURE;
        }
    };
    let suites = match suite_files(&args.dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.dir.display());
            return ExitCode::FAILURE;
        }
    };
    if suites.is_empty() {
        eprintln!(
            "error: no test suites (*.test.yaml) in {}",
            args.dir.display()
        );
        return ExitCode::FAILURE;
    }
    let runs: Vec<SuiteRun> = suites
        .into_iter()
        .map(|file| {
            let results = run_suite(&file, &policies);
            SuiteRun { file, results }
        })
        .collect();
    let (mut passed, mut failed) = (0, 0);
    for run in &runs {
        match &run.results {
            Ok(cases) => {
                let p = cases.iter().filter(|c| c.passed).count();
                passed += p;
                failed += cases.len() - p;
            }
            Err(_) => failed += 1,
        }
    }
    match args.format {
        Format::Text => print_test_text(&runs, passed, failed),
        Format::Json => {
            let suites: Vec<_> = runs
                .iter()
                .map(|r| match &r.results {
                    Ok(cases) => json!({"file": r.file, "cases": cases}),
                    Err(d) => json!({"file": r.file, "problems": d}),
                })
                .collect();
            println!(
                "{}",
                json!({"passed": passed, "failed": failed, "suites": suites})
            );
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_test_text(runs: &[SuiteRun], passed: usize, failed: usize) {
    for run in runs {
        println!("{}", run.file.display());
        match &run.results {
            Ok(cases) => {
                for c in cases {
                    if c.passed {
                        println!("  pass  {}", c.name);
                    } else {
                        println!("  FAIL  {}: {}", c.name, c.failure.as_deref().unwrap_or(""));
                        for v in &c.violations {
                            println!("          reported {v}");
                        }
                    }
                }
            }
            Err(d) => println!("  ERROR {d}"),
        }
    }
    println!("{passed} passed, {failed} failed");
}

fn suite_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| policy_files::is_test_file(p))
        .collect();
    files.sort();
    Ok(files)
}

fn run_suite(file: &Path, all: &[Policy]) -> Result<Vec<CaseResult>, Diagnostics> {
    let source = file.display().to_string();
    let text = fs::read_to_string(file)
        .map_err(|e| perfecx_policy::Diagnostic::new(&source, format!("cannot read: {e}")))?;
    Suite::parse(&source, &text)?.run(&source, all)
}

fn explain(args: &ExplainArgs) -> ExitCode {
    if args.policy.is_empty() {
        eprintln!("error: give the policies to explain with, as `--policy FILE_OR_FOLDER`");
        return ExitCode::from(2);
    }
    let loaded = match policy_files::load(&args.policy) {
        Ok(l) => l,
        Err(d) => {
            print_problems(&d, args.format);
            return ExitCode::FAILURE;
        }
    };
    let set = &loaded.set;
    let call = match set.evaluate_call(&args.tool, Content::Json(&args.args)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: --args is not valid JSON: {e}");
            return ExitCode::FAILURE;
        }
    };
    let output_content = args.output.as_deref().map(|o| {
        if serde_json::from_str::<serde_json::Value>(o).is_ok() {
            Content::Json(o)
        } else {
            Content::Text(o)
        }
    });
    let output = output_content.map(|c| {
        // The content was checked above (JSON) or is text: neither can fail to scan.
        let decision = set.evaluate_output(&args.tool, c).ok();
        let redacted = set.redact_output(c).ok().flatten();
        (decision, redacted)
    });
    let blocked = call.outcome == Outcome::Block
        || output
            .as_ref()
            .and_then(|(d, _)| d.as_ref())
            .is_some_and(|d| d.outcome == Outcome::Block);
    match args.format {
        Format::Json => {
            let mut v = json!({ "tool": args.tool, "call": call });
            if let Some((d, r)) = &output {
                v["output"] = json!(d);
                v["redacted_output"] = json!(r);
            }
            println!("{v}");
        }
        Format::Text => {
            print_decision("call", &args.tool, &call);
            if let Some((Some(d), redacted)) = &output {
                print_decision("output", &args.tool, d);
                if let Some(r) = redacted {
                    println!("redacted output: {r}");
                }
            }
        }
    }
    if blocked {
        ExitCode::from(EXIT_BLOCKED)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_decision(what: &str, tool: &str, d: &Decision<'_>) {
    println!("{what} of `{tool}`: {}", d.outcome.as_str());
    for v in &d.violations {
        println!(
            "  {} by policy `{}` ({}), rule {} `{}`: {}",
            v.action.as_str(),
            v.policy,
            v.enforcement.as_str(),
            v.rule_index,
            v.rule,
            v.detail
        );
    }
    if what == "call" {
        let l = d.limits;
        for (name, limit) in [
            ("max_execution_time_ms", &l.max_execution_time_ms),
            ("max_memory_mb", &l.max_memory_mb),
        ] {
            if let Some(limit) = limit {
                println!(
                    "  limit {name} = {} (policy `{}`)",
                    limit.value, limit.policy
                );
            }
        }
    }
}
