//! Sensitive data: what each kind looks like (a regular expression) and what makes a candidate
//! real (a validator), so that random digits, git SHAs and UUIDs are not flagged.
//!
//! All kinds are searched at once with one `RegexSet`; only the kinds it reports are searched
//! again, one by one, to find and validate each match.

use std::fmt;

use regex::{Regex, RegexSet};
use serde::Serialize;

use crate::matcher::Matcher;

/// A kind of sensitive data, named as in policy documents (`sensitive_data_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SensitiveKind {
    CreditCard,
    UsSsn,
    Email,
    Phone,
    Iban,
    AwsAccessKey,
    GithubToken,
    GitlabToken,
    SlackToken,
    Jwt,
    PrivateKey,
    GenericApiKey,
}

impl SensitiveKind {
    pub const ALL: [SensitiveKind; 12] = [
        SensitiveKind::CreditCard,
        SensitiveKind::UsSsn,
        SensitiveKind::Email,
        SensitiveKind::Phone,
        SensitiveKind::Iban,
        SensitiveKind::AwsAccessKey,
        SensitiveKind::GithubToken,
        SensitiveKind::GitlabToken,
        SensitiveKind::SlackToken,
        SensitiveKind::Jwt,
        SensitiveKind::PrivateKey,
        SensitiveKind::GenericApiKey,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SensitiveKind::CreditCard => "credit_card",
            SensitiveKind::UsSsn => "us_ssn",
            SensitiveKind::Email => "email",
            SensitiveKind::Phone => "phone",
            SensitiveKind::Iban => "iban",
            SensitiveKind::AwsAccessKey => "aws_access_key",
            SensitiveKind::GithubToken => "github_token",
            SensitiveKind::GitlabToken => "gitlab_token",
            SensitiveKind::SlackToken => "slack_token",
            SensitiveKind::Jwt => "jwt",
            SensitiveKind::PrivateKey => "private_key",
            SensitiveKind::GenericApiKey => "generic_api_key",
        }
    }

    pub fn from_name(name: &str) -> Option<SensitiveKind> {
        SensitiveKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// ASCII-only syntax (`(?-u)`) keeps the lazy DFA fast on any input.
    fn pattern(self) -> &'static str {
        match self {
            SensitiveKind::CreditCard => r"(?-u)\b[0-9](?:[ -]?[0-9]){12,18}\b",
            SensitiveKind::UsSsn => r"(?-u)\b[0-9]{3}[- ][0-9]{2}[- ][0-9]{4}\b",
            SensitiveKind::Email => {
                r"(?-u)\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}\b"
            }
            SensitiveKind::Phone => {
                r"(?-u)(?:\+[1-9][0-9]{0,2}[ .-]?)?(?:\([0-9]{2,4}\)|\b[0-9]{2,4})[ .-]?[0-9]{3,4}[ .-]?[0-9]{3,4}\b"
            }
            SensitiveKind::Iban => r"(?-u)\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b",
            SensitiveKind::AwsAccessKey => r"(?-u)\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b",
            SensitiveKind::GithubToken => {
                r"(?-u)\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{82})\b"
            }
            SensitiveKind::GitlabToken => r"(?-u)\bglpat-[A-Za-z0-9_-]{20,}",
            SensitiveKind::SlackToken => r"(?-u)\bxox[abposr]-[A-Za-z0-9-]{10,}",
            SensitiveKind::Jwt => {
                r"(?-u)\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}"
            }
            SensitiveKind::PrivateKey => {
                r"(?-u)-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----"
            }
            SensitiveKind::GenericApiKey => {
                r#"(?-u)(?i:api[_-]?key|apikey|secret|token|access[_-]?key|passw(?:or)?d|pwd|credential|authorization)s?["']?[ \t]*[:=][ \t]*["']?(?i:bearer )?([A-Za-z0-9_+/=.-]{16,})"#
            }
        }
    }

    /// Whether `m` (a match of [`Self::pattern`], or its captured value for a generic key) is
    /// real data of this kind.
    fn validate(self, m: &str) -> bool {
        match self {
            SensitiveKind::CreditCard => is_card_number(m),
            SensitiveKind::UsSsn => is_ssn(m),
            SensitiveKind::Phone => is_phone(m),
            SensitiveKind::Iban => is_iban(m),
            SensitiveKind::GenericApiKey => looks_like_secret(m),
            _ => true,
        }
    }
}

impl fmt::Display for SensitiveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One piece of sensitive data found in a string: its kind and byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    pub kind: SensitiveKind,
    pub start: usize,
    pub end: usize,
}

/// A set of kinds, as bits indexed by [`SensitiveKind::index`].
pub(crate) type KindSet = u16;

/// Runs of digits (with spaces, dashes, dots, brackets, `+`, `/` and capital letters between
/// them) shorter than this cannot be any numeric kind: an SSN has 9 digits, the rest more.
const MIN_NUMERIC_DIGITS: usize = 9;

/// The compiled detectors for a chosen set of kinds.
///
/// Scanning every string with every kind's expression would cost a pass per kind. Instead each
/// kind has a cheap gate: the literal kinds a trigger (`@`, `AKIA`, `ghp_`, `eyJ`, `secret`, ...)
/// found by an Aho-Corasick automaton — the policy set folds these triggers into its one
/// automaton of forbidden patterns, so they cost nothing extra — and the numeric kinds (cards,
/// SSNs, phones, IBANs) a run of at least nine digits, found by a byte loop. Only what passes a
/// gate meets the kind's regular expression (the numeric ones as one `RegexSet`) and validator.
#[derive(Debug)]
pub(crate) struct Detector {
    kinds: KindSet,
    regexes: Vec<Option<Regex>>,
    triggers: Option<Matcher>,
    trigger_kinds: Vec<SensitiveKind>,
    numeric: Option<(RegexSet, Vec<SensitiveKind>)>,
}

impl SensitiveKind {
    fn bit(self) -> KindSet {
        1 << self.index()
    }

    /// Literals of which at least one occurs (ignoring ASCII case) in every match; empty for the
    /// numeric kinds.
    pub(crate) fn triggers(self) -> &'static [&'static str] {
        match self {
            SensitiveKind::Email => &["@"],
            SensitiveKind::AwsAccessKey => &["akia", "asia", "abia", "acca"],
            SensitiveKind::GithubToken => &["ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"],
            SensitiveKind::GitlabToken => &["glpat-"],
            SensitiveKind::SlackToken => &["xoxa-", "xoxb-", "xoxp-", "xoxo-", "xoxs-", "xoxr-"],
            SensitiveKind::Jwt => &["eyj"],
            SensitiveKind::PrivateKey => &["private key"],
            SensitiveKind::GenericApiKey => &[
                "api_key",
                "api-key",
                "apikey",
                "secret",
                "token",
                "access_key",
                "access-key",
                "password",
                "passwd",
                "pwd",
                "credential",
                "authorization",
            ],
            SensitiveKind::CreditCard
            | SensitiveKind::UsSsn
            | SensitiveKind::Phone
            | SensitiveKind::Iban => &[],
        }
    }
}

impl Detector {
    pub(crate) fn new(kinds: &[SensitiveKind]) -> Detector {
        // The patterns are constants covered by tests; a failure here is a bug, not input.
        #[allow(clippy::expect_used)]
        let regexes = SensitiveKind::ALL
            .iter()
            .map(|k| {
                kinds
                    .contains(k)
                    .then(|| Regex::new(k.pattern()).expect("sensitive-data pattern compiles"))
            })
            .collect();
        let (trigger_words, trigger_kinds): (Vec<&str>, Vec<SensitiveKind>) = kinds
            .iter()
            .flat_map(|k| k.triggers().iter().map(move |t| (*t, *k)))
            .unzip();
        #[allow(clippy::expect_used)]
        let triggers = (!trigger_words.is_empty())
            .then(|| Matcher::new(&trigger_words).expect("trigger automaton builds"));
        let numeric_kinds: Vec<SensitiveKind> = kinds
            .iter()
            .copied()
            .filter(|k| k.triggers().is_empty())
            .collect();
        #[allow(clippy::expect_used)]
        let numeric = (!numeric_kinds.is_empty()).then(|| {
            let set = RegexSet::new(numeric_kinds.iter().map(|k| k.pattern()))
                .expect("numeric patterns compile");
            (set, numeric_kinds)
        });
        Detector {
            kinds: kinds.iter().fold(0, |acc, k| acc | k.bit()),
            regexes,
            triggers,
            trigger_kinds,
            numeric,
        }
    }

    /// Every (trigger, kind) pair this detector looks for, for an automaton shared with other
    /// patterns.
    pub(crate) fn trigger_words(&self) -> impl Iterator<Item = (&'static str, SensitiveKind)> + '_ {
        SensitiveKind::ALL
            .into_iter()
            .filter(|k| self.kinds & k.bit() != 0)
            .flat_map(|k| k.triggers().iter().map(move |t| (*t, k)))
    }

    /// Calls `found` for each validated finding in `text`. `key` is the JSON key the text is the
    /// value of, if any: a key such as `api_key` is context for a generic secret. `triggered` is
    /// the set of literal kinds whose triggers occur in `text`, when the caller already knows it.
    /// `escaped`: whether `text` may hold `%XX` escapes (false when the caller knows it is
    /// normal, which saves a pass over it).
    pub(crate) fn scan(
        &self,
        text: &str,
        key: Option<&str>,
        triggered: Option<KindSet>,
        escaped: bool,
        found: &mut dyn FnMut(Finding),
    ) {
        // A value hidden by percent-encoding (`jane%40example.com`, as URLs and forms carry
        // it) is found in the decoded text; its place there is not its place in `text`, so the
        // finding covers the whole string.
        let decoded = escaped.then(|| {
            crate::normalize::with_percent_decoded(text, |decoded| {
                let mut kinds: KindSet = 0;
                self.scan_decoded(decoded, key, None, &mut |f| kinds |= f.kind.bit());
                kinds
            })
        });
        if let Some(kinds) = decoded.flatten().filter(|&k| k != 0) {
            for kind in SensitiveKind::ALL
                .into_iter()
                .filter(|k| kinds & k.bit() != 0)
            {
                found(Finding {
                    kind,
                    start: 0,
                    end: text.len(),
                });
            }
            return;
        }
        self.scan_decoded(text, key, triggered, found);
    }

    /// [`Detector::scan`] of a text whose escapes are resolved.
    fn scan_decoded(
        &self,
        text: &str,
        key: Option<&str>,
        triggered: Option<KindSet>,
        found: &mut dyn FnMut(Finding),
    ) {
        if let Some(key) = key
            && self.kinds & SensitiveKind::GenericApiKey.bit() != 0
            && looks_like_secret(text)
            && is_secret_key_name(key)
        {
            found(Finding {
                kind: SensitiveKind::GenericApiKey,
                start: 0,
                end: text.len(),
            });
            return;
        }
        if text.len() < 8 {
            return;
        }
        let triggered = triggered.unwrap_or_else(|| self.triggered(text)) & self.kinds;
        if triggered != 0 {
            for kind in SensitiveKind::ALL
                .into_iter()
                .filter(|k| triggered & k.bit() != 0)
            {
                self.find(kind, text, 0, found);
            }
        }
        if let Some((set, kinds)) = &self.numeric
            && let Some(window) = numeric_window(text)
        {
            let part = &text[window.clone()];
            for i in set.matches(part).iter() {
                self.find(kinds[i], part, window.start, found);
            }
        }
    }

    fn triggered(&self, text: &str) -> KindSet {
        let Some(ac) = &self.triggers else { return 0 };
        let mut kinds = 0;
        ac.for_each(text.as_bytes(), &mut |pattern, _| {
            kinds |= self.trigger_kinds[pattern].bit()
        });
        kinds
    }

    /// Validated matches of `kind` in `text`, which starts at `offset` of the scanned string.
    fn find(&self, kind: SensitiveKind, text: &str, offset: usize, found: &mut dyn FnMut(Finding)) {
        let Some(re) = &self.regexes[kind.index()] else {
            return;
        };
        if kind == SensitiveKind::GenericApiKey {
            for caps in re.captures_iter(text) {
                if let Some(v) = caps.get(1)
                    && kind.validate(v.as_str())
                {
                    found(Finding {
                        kind,
                        start: offset + v.start(),
                        end: offset + v.end(),
                    });
                }
            }
        } else {
            for m in re.find_iter(text) {
                if kind.validate(m.as_str()) {
                    found(Finding {
                        kind,
                        start: offset + m.start(),
                        end: offset + m.end(),
                    });
                }
            }
        }
    }
}

/// A range of `text` that covers every run of at least [`MIN_NUMERIC_DIGITS`] digits (with
/// separators between them), or `None`: where numeric kinds could be.
fn numeric_window(text: &str) -> Option<std::ops::Range<usize>> {
    // Most text has too few digits in all: a vectorized count settles it without the loop.
    // Counted in bytes per block of 128, so that the count vectorizes without widening.
    let total: usize = text
        .as_bytes()
        .chunks(128)
        .map(|block| {
            let n = block
                .iter()
                .fold(0u8, |n, b| n + u8::from(b.is_ascii_digit()));
            usize::from(n)
        })
        .sum();
    if total < MIN_NUMERIC_DIGITS {
        return None;
    }
    let bytes = text.as_bytes();
    let mut runs = Runs::default();
    let mut chunks = bytes.chunks_exact(16);
    for (c, chunk) in chunks.by_ref().enumerate() {
        let at = c * 16;
        // A chunk without digits is settled by two vectorized tests; it may widen the window a
        // little past the exact one, which only costs the regular expressions a few bytes.
        if !chunk.iter().fold(false, |any, b| any | b.is_ascii_digit()) {
            if chunk.iter().fold(false, |any, &b| any | breaks_run(b)) {
                runs.close(at + 16, at);
            }
            continue;
        }
        for (i, &b) in chunk.iter().enumerate() {
            runs.byte(at + i, b);
        }
    }
    let at = bytes.len() - chunks.remainder().len();
    for (i, &b) in chunks.remainder().iter().enumerate() {
        runs.byte(at + i, b);
    }
    runs.close(bytes.len(), bytes.len());
    // The window's ends may fall inside a character: widen to the character boundaries.
    runs.window.map(|w| {
        let start = (0..=w.start)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        let end = (w.end..=text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        start..end
    })
}

/// Runs of digits and separators, and the window that covers the long ones.
#[derive(Default)]
struct Runs {
    window: Option<std::ops::Range<usize>>,
    /// Where the current run may start: at or before its first digit, after a breaking byte.
    start: usize,
    digits: usize,
}

impl Runs {
    fn byte(&mut self, i: usize, b: u8) {
        if b.is_ascii_digit() {
            self.digits += 1;
        } else if breaks_run(b) {
            self.close(i, i + 1);
        }
    }

    /// Ends the current run at `end`; the next may start at `next`.
    fn close(&mut self, end: usize, next: usize) {
        if self.digits >= MIN_NUMERIC_DIGITS {
            self.window.get_or_insert(self.start..end).end = end;
        }
        self.start = next;
        self.digits = 0;
    }
}

/// Whether `b` ends a run of digits: anything but a digit or a separator found in numbers.
fn breaks_run(b: u8) -> bool {
    !matches!(b, b'0'..=b'9' | b' ' | b'-' | b'.' | b'(' | b')' | b'+' | b'/' | b'A'..=b'Z')
}

fn digits(s: &str) -> impl Iterator<Item = u32> + '_ {
    s.chars().filter_map(|c| c.to_digit(10))
}

/// Luhn-valid, 13 to 19 digits, with the prefix of a card network.
pub fn is_card_number(s: &str) -> bool {
    let n = digits(s).count();
    if !(13..=19).contains(&n) {
        return false;
    }
    let d: Vec<u32> = digits(s).collect();
    let prefix2 = d[0] * 10 + d[1];
    let network = match d[0] {
        4 => true,                                           // Visa
        5 => (51..=55).contains(&prefix2),                   // Mastercard
        2 => (22..=27).contains(&prefix2),                   // Mastercard 2-series
        3 => matches!(prefix2, 34 | 37 | 35 | 36 | 38 | 30), // Amex, JCB, Diners
        6 => matches!(prefix2, 60 | 62 | 64 | 65),           // Discover, UnionPay
        _ => false,
    };
    network && luhn(&d)
}

fn luhn(d: &[u32]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 { y - 9 } else { y }
            } else {
                x
            }
        })
        .sum();
    sum % 10 == 0
}

/// Area not 000, 666 or 9xx; group not 00; serial not 0000; one separator style.
pub fn is_ssn(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 11 || b[3] != b[6] {
        return false;
    }
    let area: u32 = s[0..3].parse().unwrap_or(0);
    let group: u32 = s[4..6].parse().unwrap_or(0);
    let serial: u32 = s[7..11].parse().unwrap_or(0);
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// 10 to 15 digits, with a `+` country code or separators (a bare run of digits is more often an
/// id or a timestamp than a phone number); NANP numbers need valid area and exchange codes.
fn is_phone(s: &str) -> bool {
    let d: Vec<u32> = digits(s).collect();
    if !(10..=15).contains(&d.len()) {
        return false;
    }
    let international = s.starts_with('+');
    let separated = s.contains([' ', '-', '.', '(']);
    if !international && !separated {
        return false;
    }
    if !international {
        // North American Numbering Plan: NXX-NXX-XXXX.
        let local = if d.len() == 11 && d[0] == 1 {
            &d[1..]
        } else {
            &d[..]
        };
        return local.len() == 10 && local[0] >= 2 && local[3] >= 2;
    }
    true
}

/// Country code of an IBAN country, length as the registry gives it, and mod-97 equal to 1.
pub fn is_iban(s: &str) -> bool {
    let compact: Vec<u8> = s.bytes().filter(|b| *b != b' ').collect();
    let Some(expected) = iban_length(&compact[..2]) else {
        return false;
    };
    if compact.len() != expected {
        return false;
    }
    let rearranged = compact[4..].iter().chain(&compact[..4]);
    let mut rem: u32 = 0;
    for &b in rearranged {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn iban_length(cc: &[u8]) -> Option<usize> {
    const LENGTHS: &[(&[u8; 2], usize)] = &[
        (b"AD", 24),
        (b"AE", 23),
        (b"AL", 28),
        (b"AT", 20),
        (b"AZ", 28),
        (b"BA", 20),
        (b"BE", 16),
        (b"BG", 22),
        (b"BH", 22),
        (b"BR", 29),
        (b"CH", 21),
        (b"CR", 22),
        (b"CY", 28),
        (b"CZ", 24),
        (b"DE", 22),
        (b"DK", 18),
        (b"DO", 28),
        (b"EE", 20),
        (b"EG", 29),
        (b"ES", 24),
        (b"FI", 18),
        (b"FO", 18),
        (b"FR", 27),
        (b"GB", 22),
        (b"GE", 22),
        (b"GI", 23),
        (b"GL", 18),
        (b"GR", 27),
        (b"GT", 28),
        (b"HR", 21),
        (b"HU", 28),
        (b"IE", 22),
        (b"IL", 23),
        (b"IS", 26),
        (b"IT", 27),
        (b"JO", 30),
        (b"KW", 30),
        (b"KZ", 20),
        (b"LB", 28),
        (b"LI", 21),
        (b"LT", 20),
        (b"LU", 20),
        (b"LV", 21),
        (b"MC", 27),
        (b"MD", 24),
        (b"ME", 22),
        (b"MK", 19),
        (b"MR", 27),
        (b"MT", 31),
        (b"MU", 30),
        (b"NL", 18),
        (b"NO", 15),
        (b"PK", 24),
        (b"PL", 28),
        (b"PS", 29),
        (b"PT", 25),
        (b"QA", 29),
        (b"RO", 24),
        (b"RS", 22),
        (b"SA", 24),
        (b"SE", 24),
        (b"SI", 19),
        (b"SK", 24),
        (b"SM", 27),
        (b"TN", 24),
        (b"TR", 26),
        (b"UA", 29),
        (b"VG", 24),
        (b"XK", 20),
    ];
    LENGTHS.iter().find(|(c, _)| &c[..] == cc).map(|(_, n)| *n)
}

fn is_secret_key_name(key: &str) -> bool {
    const WORDS: [&str; 9] = [
        "apikey",
        "api_key",
        "api-key",
        "secret",
        "token",
        "password",
        "passwd",
        "access_key",
        "credential",
    ];
    let key = key.as_bytes();
    WORDS.iter().any(|w| {
        key.windows(w.len())
            .any(|win| win.eq_ignore_ascii_case(w.as_bytes()))
    })
}

/// A value that looks like a generated secret: long enough, letters and digits mixed, high
/// Shannon entropy, and not a git SHA (all hex) or a UUID.
pub fn looks_like_secret(v: &str) -> bool {
    let v = v.trim_end_matches('=');
    if v.len() < 16 || v.len() > 512 {
        return false;
    }
    if v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return false; // git SHAs, hashes
    }
    if is_uuid(v) {
        return false;
    }
    if !v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_+/=.-".contains(&b))
    {
        return false;
    }
    let has_digit = v.bytes().any(|b| b.is_ascii_digit());
    let has_alpha = v.bytes().any(|b| b.is_ascii_alphabetic());
    has_digit && has_alpha && shannon_entropy(v) >= 3.5
}

fn is_uuid(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn shannon_entropy(v: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in v.bytes() {
        counts[b as usize] += 1;
    }
    let n = v.len() as f64;
    counts
        .iter()
        .filter(|c| **c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// A short description of a finding that does not repeat the secret: `4111********1111`.
pub(crate) fn mask(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(text: &str) -> Vec<(SensitiveKind, String)> {
        let d = Detector::new(&SensitiveKind::ALL);
        let mut out = Vec::new();
        d.scan(text, None, None, true, &mut |f| {
            out.push((f.kind, text[f.start..f.end].to_owned()))
        });
        out
    }

    fn kinds(text: &str) -> Vec<SensitiveKind> {
        let mut k: Vec<_> = find(text).into_iter().map(|(k, _)| k).collect();
        k.sort();
        k.dedup();
        k
    }

    #[test]
    fn finds_each_kind() {
        use SensitiveKind::*;
        let cases = [
            ("pay with 4111 1111 1111 1111 today", CreditCard),
            ("ssn 123-45-6789", UsSsn),
            ("mail jane.doe@example.com now", Email),
            ("call +1 415 555 2671", Phone),
            ("call (415) 555-2671", Phone),
            ("iban GB82 WEST 1234 5698 7654 32", Iban),
            ("iban DE89370400440532013000", Iban),
            ("key AKIAIOSFODNN7EXAMPLE", AwsAccessKey),
            ("ghp_abcdefghijklmnopqrstuvwxyz0123456789", GithubToken),
            ("glpat-abcdefghij0123456789", GitlabToken),
            ("xoxb-1234567890-abcdefghij", SlackToken),
            (
                "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
                Jwt,
            ),
            ("-----BEGIN RSA PRIVATE KEY-----\nMIIE", PrivateKey),
            ("api_key=sk9Xb2QmR7vLp4Tn8WzA1cE5", GenericApiKey),
        ];
        for (text, kind) in cases {
            assert!(kinds(text).contains(&kind), "{kind} not found in {text:?}");
        }
    }

    #[test]
    fn percent_encoded_values_are_found_and_cover_the_string() {
        let text = "to=jane.doe%40acme-corp.io&card=4111%201111%201111%201111";
        let found = find(text);
        assert_eq!(
            kinds(text),
            [SensitiveKind::CreditCard, SensitiveKind::Email]
        );
        assert!(found.iter().all(|(_, value)| value == text), "{found:?}");
        // Twice encoded too; a lone `%` is no escape.
        assert_eq!(
            kinds("mail jane.doe%2540acme-corp.io"),
            [SensitiveKind::Email]
        );
        assert!(kinds("100% sure, 50%off").is_empty());
    }

    #[test]
    fn rejects_look_alikes() {
        // Luhn-invalid card, SSN with area 000, 666, 9xx, git SHA, UUID, bare digits.
        assert!(kinds("4111 1111 1111 1112").is_empty());
        assert!(kinds("000-12-3456 666-12-3456 912-12-3456 123-00-4567").is_empty());
        assert!(kinds("commit 3f786850e387550fdab836ed7e6dc881de23001b").is_empty());
        assert!(kinds("token: 3f786850e387550fdab836ed7e6dc881de23001b").is_empty());
        assert!(kinds("token: 123e4567-e89b-12d3-a456-426614174000").is_empty());
        assert!(kinds("id 1700000000123").is_empty());
        assert!(kinds("GB00 WEST 1234 5698 7654 32").is_empty());
        assert!(kinds("password: aaaaaaaaaaaaaaaaaaaa").is_empty());
    }

    #[test]
    fn key_context_flags_a_secret_value() {
        let d = Detector::new(&[SensitiveKind::GenericApiKey]);
        let mut n = 0;
        d.scan(
            "sk9Xb2QmR7vLp4Tn8WzA1cE5",
            Some("api_key"),
            None,
            true,
            &mut |_| n += 1,
        );
        d.scan(
            "sk9Xb2QmR7vLp4Tn8WzA1cE5",
            Some("name"),
            None,
            true,
            &mut |_| n += 10,
        );
        assert_eq!(n, 1);
    }

    #[test]
    fn masks_without_revealing() {
        assert_eq!(mask("4111111111111111"), "4111********1111");
        assert_eq!(mask("short"), "*****");
    }

    /// The window as one exact byte loop finds it.
    fn exact_window(text: &str) -> Option<std::ops::Range<usize>> {
        let mut runs = Runs::default();
        for (i, b) in text.bytes().enumerate() {
            runs.byte(i, b);
        }
        runs.close(text.len(), text.len());
        runs.window
    }

    #[test]
    fn numeric_window_covers_every_long_run() {
        let alphabet = ["1", "2", "9", " ", "-", "(", "+", "x", "Q", "é", "東", "\n"];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut text = String::new();
            for _ in 0..seed % 80 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Long stretches of one symbol make whole chunks of digits or of letters.
                let symbol = alphabet[(seed % alphabet.len() as u64) as usize];
                text.push_str(&symbol.repeat(1 + (seed >> 40) as usize % 12));
            }
            let (fast, exact) = (numeric_window(&text), exact_window(&text));
            assert_eq!(fast.is_some(), exact.is_some(), "{text:?}");
            if let (Some(fast), Some(exact)) = (fast, exact) {
                assert!(
                    fast.start <= exact.start && fast.end >= exact.end,
                    "{text:?}: {fast:?} does not cover {exact:?}"
                );
                assert!(text.is_char_boundary(fast.start) && text.is_char_boundary(fast.end));
            }
        }
    }
}
