//! Policy engine benchmarks, side by side in one run (`cargo bench --bench policy`):
//!
//! - `allow_path`: tool restriction + limits only (target: under 200 ns);
//! - `evaluate/{shipped,1000_patterns}/{1KiB,64KiB}`: a full evaluation of benign arguments
//!   (target: at least 500 MB/s on 64 KiB, within 4x of the floor);
//! - `floor_aho_corasick/...`: the same bytes through a bare `AhoCorasick` with the same patterns;
//! - `compile/{1000,10000}_patterns` (target: under 50 ms for 1,000).

use std::hint::black_box;

use aho_corasick::{AhoCorasickBuilder, AhoCorasickKind, MatchKind};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use perfecx_policy::{Content, Outcome, Policy, PolicySet, parse_policy};

/// A deterministic generator, so every run measures the same bytes.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() as usize) % items.len()]
    }
}

const WORDS: &[&str] = &[
    "the",
    "agent",
    "searched",
    "for",
    "recent",
    "papers",
    "on",
    "retrieval",
    "augmented",
    "generation",
    "and",
    "summarised",
    "their",
    "results",
    "in",
    "a",
    "table",
    "with",
    "columns",
    "title",
    "year",
    "authors",
    "citations",
    "Kubernetes",
    "deployment",
    "rollout",
    "status",
    "shows",
    "3/3",
    "replicas",
    "ready",
    "SELECT",
    "name,",
    "email_hash",
    "FROM",
    "customers",
    "WHERE",
    "region",
    "=",
    "'eu-west-1'",
    "https://docs.example.org/guide?page=2",
    "{\"nested\":",
    "true}",
    "2026-11-29T10:00:00Z",
    "42",
    "3.14159",
    "Grüße",
    "naïve",
    "café",
    "東京",
    "résumé",
    "ok",
    "error:",
    "timeout",
    "retrying",
];

/// Benign JSON arguments of about `size` bytes: an object of sentence-like strings.
fn arguments(size: usize) -> String {
    let mut rng = Lcg(7);
    let mut obj = serde_json::Map::new();
    let mut total = 0;
    let mut i = 0;
    while total < size {
        let mut s = String::new();
        while s.len() < 80 + (rng.next() as usize % 160) {
            s.push_str(rng.pick(WORDS));
            s.push(' ');
        }
        total += s.len() + 16;
        obj.insert(format!("field_{i}"), serde_json::Value::String(s));
        i += 1;
    }
    let text = serde_json::Value::Object(obj).to_string();
    text[..text.len().min(size)]
        .rfind("\",\"")
        .map_or(text.clone(), |cut| format!("{}\"}}", &text[..cut]))
}

fn shipped() -> Vec<Policy> {
    [
        "production-safety-policy",
        "secrets-and-pii",
        "destructive-commands",
    ]
    .iter()
    .map(|name| {
        let path = format!("{}/policies/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("shipped policy");
        parse_policy(&path, &text).expect("shipped policy parses")
    })
    .collect()
}

/// `n` distinct pseudo-words that do not occur in [`arguments`].
fn patterns(n: usize) -> Vec<String> {
    let mut rng = Lcg(99);
    let mut out = std::collections::BTreeSet::new();
    while out.len() < n {
        let len = 6 + rng.next() as usize % 9;
        let w: String = (0..len)
            .map(|_| (b'a' + (rng.next() % 26) as u8) as char)
            .collect();
        if rng.next() % 4 == 0 {
            out.insert(format!(
                "{w} {}",
                rng.pick(&["now", "all", "-rf", "--force"])
            ));
        } else {
            out.insert(w);
        }
    }
    out.into_iter().collect()
}

fn pattern_policy(patterns: &[String]) -> Policy {
    let mut doc =
        String::from("name: many\nrules:\n  - type: content_filter\n    forbidden_patterns:\n");
    for p in patterns {
        doc.push_str(&format!("      - '{p}'\n"));
    }
    parse_policy("many.yaml", &doc).expect("generated policy parses")
}

fn allow_path(c: &mut Criterion) {
    let p = parse_policy(
        "tools.yaml",
        "name: tools\nrules:\n  - type: tool_restriction\n    allowed_tools: [web_search, calculator, file_reader]\n    forbidden_tools: [code_executor, system_command]\n  - type: execution_limit\n    max_execution_time_ms: 300000\n    max_memory_mb: 512\n",
    )
    .expect("policy parses");
    let set = PolicySet::compile(vec![p]).expect("compiles");
    let args = r#"{"query":"latest AI security news","max_results":5}"#;
    c.bench_function("allow_path/tool_restriction_limits", |b| {
        b.iter(|| {
            let d = set
                .evaluate_call(black_box("web_search"), Content::Json(black_box(args)))
                .expect("valid");
            assert_eq!(d.outcome, Outcome::Allow);
            black_box(d.limits.max_execution_time_ms.as_ref().map(|l| l.value))
        })
    });
}

fn evaluate(c: &mut Criterion) {
    let many = patterns(1000);
    let sets = [
        (
            "shipped",
            PolicySet::compile(shipped()).expect("compiles"),
            shipped_patterns(),
        ),
        (
            "1000_patterns",
            PolicySet::compile(vec![pattern_policy(&many)]).expect("compiles"),
            many.clone(),
        ),
    ];
    let mut group = c.benchmark_group("evaluate");
    for (name, set, _) in &sets {
        for (label, size) in [("1KiB", 1024), ("64KiB", 64 * 1024)] {
            let args = arguments(size);
            assert_eq!(
                set.evaluate_call("web_search", Content::Json(&args))
                    .expect("valid")
                    .outcome,
                Outcome::Allow
            );
            group.throughput(Throughput::Bytes(args.len() as u64));
            group.bench_with_input(BenchmarkId::new(*name, label), &args, |b, args| {
                b.iter(|| {
                    set.evaluate_call(black_box("web_search"), Content::Json(black_box(args)))
                        .expect("valid")
                        .outcome
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("floor_aho_corasick");
    for (name, _, pats) in &sets {
        // The engine's own configuration: the floor is the same automaton, bare.
        let ac = AhoCorasickBuilder::new()
            .match_kind(MatchKind::Standard)
            .ascii_case_insensitive(true)
            .kind(Some(AhoCorasickKind::DFA))
            .build(pats)
            .expect("automaton builds");
        for (label, size) in [("1KiB", 1024), ("64KiB", 64 * 1024)] {
            let args = arguments(size);
            group.throughput(Throughput::Bytes(args.len() as u64));
            group.bench_with_input(BenchmarkId::new(*name, label), &args, |b, args| {
                b.iter(|| ac.find_iter(black_box(args.as_str())).count())
            });
        }
    }
    group.finish();
}

fn shipped_patterns() -> Vec<String> {
    shipped()
        .iter()
        .flat_map(|p| &p.rules)
        .flat_map(|r| match r {
            perfecx_policy::Rule::ContentFilter(c) => c.forbidden_patterns.clone(),
            _ => Vec::new(),
        })
        .map(|p| p.to_lowercase())
        .collect()
}

fn compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    for n in [1000, 10_000] {
        let policy = pattern_policy(&patterns(n));
        group.bench_function(BenchmarkId::from_parameter(format!("{n}_patterns")), |b| {
            b.iter(|| PolicySet::compile(vec![black_box(policy.clone())]).expect("compiles"))
        });
    }
    group.finish();
}

criterion_group!(benches, allow_path, evaluate, compile);
criterion_main!(benches);
