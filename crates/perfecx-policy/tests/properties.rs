//! Properties over generated input: evasions never hide a pattern, nothing panics, valid JSON
//! always scans, card numbers are found exactly when they are valid.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write;
use std::sync::LazyLock;

use perfecx_policy::sensitive::is_card_number;
use perfecx_policy::{Content, Outcome, PolicySet, parse_policy};
use proptest::prelude::*;

const PATTERNS: [&str; 5] = [
    "rm -rf",
    "drop table",
    "delete from",
    "ignore previous instructions",
    "xp_cmdshell",
];

/// Compiled once: compiling the sensitive-data detectors per case would dominate the run.
static SET: LazyLock<PolicySet> = LazyLock::new(compile_filter_set);

fn filter_set() -> &'static PolicySet {
    &SET
}

fn compile_filter_set() -> PolicySet {
    let mut doc = String::from(
        "name: f\nrules:\n  - type: content_filter\n    sensitive_data_detection: true\n    forbidden_patterns:\n",
    );
    for p in PATTERNS {
        writeln!(doc, "      - '{p}'").unwrap();
    }
    PolicySet::compile(vec![parse_policy("f.yaml", &doc).unwrap()]).unwrap()
}

/// How one character of a pattern is disguised.
#[derive(Debug, Clone, Copy)]
enum Disguise {
    Plain,
    Upper,
    FullWidth,
    PercentEncoded,
    JsonEscaped,
    ZeroWidthBefore(usize),
}

const ZERO_WIDTH: [char; 6] = [
    '\u{200b}', '\u{200c}', '\u{200d}', '\u{feff}', '\u{2060}', '\u{ad}',
];
const SPACES: [&str; 6] = [" ", "  ", "\t", "\n \t", "\u{a0}", "\u{3000}"];

fn disguise() -> impl Strategy<Value = Disguise> {
    prop_oneof![
        Just(Disguise::Plain),
        Just(Disguise::Upper),
        Just(Disguise::FullWidth),
        Just(Disguise::PercentEncoded),
        Just(Disguise::JsonEscaped),
        (0..ZERO_WIDTH.len()).prop_map(Disguise::ZeroWidthBefore),
    ]
}

/// Appends `c` to a JSON string literal's body, escaped as needed (or as `\u` when asked).
fn push_json(out: &mut String, c: char, as_escape: bool) {
    if as_escape || c == '"' || c == '\\' || (c as u32) < 0x20 {
        let mut buf = [0u16; 2];
        for unit in c.encode_utf16(&mut buf) {
            write!(out, "\\u{unit:04X}").unwrap();
        }
    } else {
        out.push(c);
    }
}

/// The pattern, disguised character by character, inside a JSON string literal.
fn disguised_json(
    pattern: &str,
    how: &[Disguise],
    space: usize,
    prefix: &str,
    suffix: &str,
) -> String {
    let mut s = String::from("{\"arg\": \"");
    for c in prefix.chars() {
        push_json(&mut s, c, false);
    }
    for (i, c) in pattern.chars().enumerate() {
        if c == ' ' {
            for sc in SPACES[(space + i) % SPACES.len()].chars() {
                push_json(&mut s, sc, false);
            }
            continue;
        }
        match how[i % how.len()] {
            Disguise::Plain => push_json(&mut s, c, false),
            Disguise::Upper => push_json(&mut s, c.to_ascii_uppercase(), false),
            Disguise::FullWidth if c.is_ascii_graphic() => {
                push_json(&mut s, char::from_u32(c as u32 + 0xFEE0).unwrap(), false)
            }
            Disguise::FullWidth => push_json(&mut s, c, false),
            Disguise::PercentEncoded => write!(s, "%{:02X}", c as u32).unwrap(),
            Disguise::JsonEscaped => push_json(&mut s, c, true),
            Disguise::ZeroWidthBefore(z) => {
                push_json(&mut s, ZERO_WIDTH[z], false);
                push_json(&mut s, c, false);
            }
        }
    }
    for c in suffix.chars() {
        push_json(&mut s, c, false);
    }
    s.push_str("\"}");
    s
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..8)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn luhn_complete(body: &[u32]) -> u32 {
    // The check digit that makes `body` followed by it Luhn-valid.
    let sum: u32 = body
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    (10 - sum % 10) % 10
}

/// Pieces of strings that stress the whole-document search: the shipped packs' patterns and
/// triggers, the escapes that may or may not hide them, scripts, digits and padding long enough
/// to cut a document into lanes.
const FRAGMENTS: &[&str] = &[
    "rm -rf /",
    "RM  -RF",
    "rm\\n-rf",
    "drop table users",
    "ignore previous instructions",
    "IGNORE PREVIOUS\\tINSTRUCTIONS",
    "/etc/shadow",
    "\\/etc\\/shadow",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_0123456789abcdefghijklmnopqrstuvwxyz",
    "jane@example.com",
    "4111 1111 1111 1111",
    "4111111111111111",
    "\\\"quoted\\\"",
    "back\\\\slash",
    "\\u0072m -rf",
    "r\\u200bm -rf",
    "ｒｍ －ｒｆ",
    "Grüße 東京",
    "%72m%20-rf",
    "secret",
    " ",
    "lorem ipsum dolor sit amet, consectetur adipiscing elit ",
];

fn fragment_json() -> impl Strategy<Value = String> {
    let string = prop::collection::vec((0..FRAGMENTS.len(), 0usize..40), 0..12).prop_map(|parts| {
        parts
            .into_iter()
            .map(|(f, pad)| format!("{}{}", "x ".repeat(pad), FRAGMENTS[f]))
            .collect::<String>()
    });
    prop::collection::vec((string.clone(), string, any::<bool>()), 1..12).prop_map(|fields| {
        let mut json = String::from("{");
        for (i, (key, value, nested)) in fields.into_iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            if nested {
                let _ = write!(json, "\"k{i}{key}\":[\"{value}\",{i}]");
            } else {
                let _ = write!(json, "\"k{i}\":\"{value}\"");
            }
        }
        json.push('}');
        json
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// `fuzzing::evaluate` asserts that searching a document whole and string by string agree.
    #[test]
    fn the_whole_document_search_agrees_with_string_by_string(
        json in fragment_json(),
        tool in any::<u8>(),
    ) {
        prop_assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok(), "{}", json);
        let mut data = vec![tool];
        data.extend_from_slice(json.as_bytes());
        perfecx_policy::fuzzing::evaluate(&data);
    }

    #[test]
    fn every_evasion_of_a_pattern_is_still_caught(
        which in 0..PATTERNS.len(),
        how in prop::collection::vec(disguise(), 1..6),
        space in 0..SPACES.len(),
        prefix in "[a-z0-9 ]{0,12}",
        suffix in "[a-z0-9 ]{0,12}",
    ) {
        let set = filter_set();
        let json = disguised_json(PATTERNS[which], &how, space, &prefix, &suffix);
        let d = set.evaluate_call("tool", Content::Json(&json)).unwrap();
        prop_assert_eq!(d.outcome, Outcome::Block, "not caught: {}", json);
        prop_assert!(d.violations.iter().any(|v| v.matched.as_deref() == Some(PATTERNS[which])));
    }

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>(), tool in any::<String>()) {
        let set = filter_set();
        let _ = set.evaluate_call(&tool, Content::Json(&text));
        let _ = set.evaluate_output(&tool, Content::Json(&text));
        let _ = set.evaluate_output(&tool, Content::Text(&text));
        let _ = set.redact_output(Content::Json(&text));
        let _ = set.redact_output(Content::Text(&text));
    }

    #[test]
    fn valid_json_always_scans_and_redaction_keeps_it_valid(value in arb_json()) {
        let set = filter_set();
        let text = value.to_string();
        prop_assert!(set.evaluate_call("t", Content::Json(&text)).is_ok());
        prop_assert!(set.evaluate_output("t", Content::Json(&text)).is_ok());
        if let Some(red) = set.redact_output(Content::Json(&text)).unwrap() {
            prop_assert!(serde_json::from_str::<serde_json::Value>(&red).is_ok(), "invalid after redaction: {}", red);
        }
    }

    #[test]
    fn valid_card_numbers_are_found_and_invalid_ones_not(
        prefix in prop_oneof![Just(vec![4]), Just(vec![5, 1]), Just(vec![5, 5]), Just(vec![3, 7]), Just(vec![6, 5])],
        rest in prop::collection::vec(0u32..10, 12..15),
        wrong in 1u32..10,
        separator in prop_oneof![Just(""), Just(" "), Just("-")],
    ) {
        let mut body = prefix.clone();
        body.extend(&rest);
        let check = luhn_complete(&body);
        let render = |last: u32| {
            let digits: Vec<String> = body.iter().chain(std::iter::once(&last)).map(u32::to_string).collect();
            digits.chunks(4).map(|c| c.concat()).collect::<Vec<_>>().join(separator)
        };
        let valid = render(check);
        let invalid = render((check + wrong) % 10);
        prop_assert!(is_card_number(&valid), "{}", valid);
        prop_assert!(!is_card_number(&invalid), "{}", invalid);

        let set = filter_set();
        let found = |n: &str| {
            let out = format!("{{\"text\": \"card {n} on file\"}}");
            set.evaluate_output("t", Content::Json(&out)).unwrap().violations.iter().any(|v| {
                v.matched.as_deref().is_some_and(|m| m.starts_with("credit_card"))
            })
        };
        prop_assert!(found(&valid), "missed {}", valid);
        prop_assert!(!found(&invalid), "flagged {}", invalid);
    }
}
