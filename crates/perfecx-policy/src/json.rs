//! An iterative scanner over JSON text that yields every key, string and number, decoded.
//!
//! Content filters need the strings of a document, not its tree: scanning the text directly
//! builds nothing, allocates nothing once its buffers have grown, and keeps its nesting on a heap
//! stack of one byte per level, so 100,000 levels of `[` cannot overflow the call stack.

use std::fmt;
use std::ops::Range;

/// A scalar token that content filters look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenKind {
    Key,
    String,
    Number,
}

/// One token, decoded (`\u` escapes resolved; a number with a fraction or an exponent written
/// out in plain digits, see [`plain_number`]), with its byte range in the source (quotes
/// included) and, for a value directly under an object key, that key.
#[derive(Debug)]
pub(crate) struct Token<'a> {
    pub kind: TokenKind,
    pub text: &'a str,
    pub raw: Range<usize>,
    pub key: Option<&'a str>,
}

/// Malformed JSON: where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    pub offset: usize,
    pub message: &'static str,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed JSON at byte {}: {}",
            self.offset, self.message
        )
    }
}

impl std::error::Error for JsonError {}

/// Whether `text` is one JSON document as the engine reads JSON (at any depth): what
/// [`crate::Content::Json`] accepts.
pub fn is_json(text: &str) -> bool {
    Scanner::default().scan(text, &mut |_| {}).is_ok()
}

#[derive(Debug, Default)]
pub(crate) struct Scanner {
    stack: Vec<u8>,
    buf: String,
    key: String,
}

#[derive(Clone, Copy)]
enum State {
    Value,
    ObjectFirst,
    Key,
    ArrayFirst,
    After,
}

impl Scanner {
    /// Calls `visit` for each key, string and number of `src`, in document order.
    pub(crate) fn scan(
        &mut self,
        src: &str,
        visit: &mut dyn FnMut(Token<'_>),
    ) -> Result<(), JsonError> {
        let b = src.as_bytes();
        self.stack.clear();
        let mut i = 0;
        let mut state = State::Value;
        // Whether the value about to be read sits directly under an object key.
        let mut keyed = false;
        loop {
            i = skip_ws(b, i);
            match state {
                State::Value => {
                    let Some(&c) = b.get(i) else {
                        return Err(err(i, "expected a value"));
                    };
                    match c {
                        b'{' => {
                            self.stack.push(b'{');
                            i += 1;
                            state = State::ObjectFirst;
                            continue;
                        }
                        b'[' => {
                            self.stack.push(b'[');
                            i += 1;
                            state = State::ArrayFirst;
                            continue;
                        }
                        b'"' => {
                            let (end, escaped) = self.string(src, i)?;
                            let text = if escaped {
                                &self.buf[..]
                            } else {
                                &src[i + 1..end - 1]
                            };
                            let key = keyed.then_some(&self.key[..]);
                            visit(Token {
                                kind: TokenKind::String,
                                text,
                                raw: i..end,
                                key,
                            });
                            i = end;
                        }
                        b't' => i = literal(b, i, b"true")?,
                        b'f' => i = literal(b, i, b"false")?,
                        b'n' => i = literal(b, i, b"null")?,
                        b'-' | b'0'..=b'9' => {
                            let end = number(b, i)?;
                            let raw = &src[i..end];
                            let text = if plain_number(raw, &mut self.buf) {
                                &self.buf[..]
                            } else {
                                raw
                            };
                            let key = keyed.then_some(&self.key[..]);
                            visit(Token {
                                kind: TokenKind::Number,
                                text,
                                raw: i..end,
                                key,
                            });
                            i = end;
                        }
                        _ => return Err(err(i, "expected a value")),
                    }
                    state = State::After;
                }
                State::ObjectFirst if b.get(i) == Some(&b'}') => {
                    self.stack.pop();
                    i += 1;
                    state = State::After;
                }
                State::ObjectFirst | State::Key => {
                    if b.get(i) != Some(&b'"') {
                        return Err(err(i, "expected a string key"));
                    }
                    let (end, escaped) = self.string(src, i)?;
                    let text = if escaped {
                        &self.buf[..]
                    } else {
                        &src[i + 1..end - 1]
                    };
                    visit(Token {
                        kind: TokenKind::Key,
                        text,
                        raw: i..end,
                        key: None,
                    });
                    self.key.clear();
                    self.key.push_str(text);
                    i = skip_ws(b, end);
                    if b.get(i) != Some(&b':') {
                        return Err(err(i, "expected `:` after a key"));
                    }
                    i += 1;
                    keyed = true;
                    state = State::Value;
                    continue;
                }
                State::ArrayFirst if b.get(i) == Some(&b']') => {
                    self.stack.pop();
                    i += 1;
                    state = State::After;
                }
                State::ArrayFirst => state = State::Value,
                State::After => {
                    let Some(&top) = self.stack.last() else {
                        return if i == b.len() {
                            Ok(())
                        } else {
                            Err(err(i, "unexpected text after the document"))
                        };
                    };
                    match (top, b.get(i)) {
                        (b'{', Some(b',')) => state = State::Key,
                        (b'[', Some(b',')) => state = State::Value,
                        (b'{', Some(b'}')) | (b'[', Some(b']')) => {
                            self.stack.pop();
                        }
                        (b'{', _) => return Err(err(i, "expected `,` or `}`")),
                        _ => return Err(err(i, "expected `,` or `]`")),
                    }
                    i += 1;
                }
            }
            keyed = false;
        }
    }

    /// Reads the string starting at `start` (a `"`); returns the end (after the closing quote)
    /// and whether it had escapes, in which case the decoded text is in `self.buf`.
    fn string(&mut self, src: &str, start: usize) -> Result<(usize, bool), JsonError> {
        let b = src.as_bytes();
        let body = start + 1;
        // Fast path: the closing quote with no escape on the way, found with SIMD.
        let stop = memchr::memchr2(b'"', b'\\', &b[body..]).map_or(b.len(), |p| body + p);
        if let Some(p) = first_control(&b[body..stop]) {
            return Err(err(body + p, "control character in a string"));
        }
        let mut i = stop;
        match b.get(i) {
            Some(b'"') => return Ok((i + 1, false)),
            Some(_) => {}
            None => return Err(err(i, "unterminated string")),
        }
        self.buf.clear();
        self.buf.push_str(&src[start + 1..i]);
        loop {
            let Some(&c) = b.get(i) else {
                return Err(err(i, "unterminated string"));
            };
            match c {
                b'"' => return Ok((i + 1, true)),
                b'\\' => {
                    let esc = b.get(i + 1).copied();
                    i += 2;
                    let ch = match esc {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            let hi = hex4(b, i)?;
                            i += 4;
                            if (0xD800..0xDC00).contains(&hi)
                                && b.get(i) == Some(&b'\\')
                                && b.get(i + 1) == Some(&b'u')
                                && let Ok(lo) = hex4(b, i + 2)
                                && (0xDC00..0xE000).contains(&lo)
                            {
                                i += 6;
                                let cp = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                                char::from_u32(cp).unwrap_or('\u{fffd}')
                            } else {
                                char::from_u32(hi).unwrap_or('\u{fffd}')
                            }
                        }
                        _ => return Err(err(i - 1, "invalid escape")),
                    };
                    self.buf.push(ch);
                }
                0..=0x1f => return Err(err(i, "control character in a string")),
                _ => {
                    // Copy the run up to the next quote or backslash in one go.
                    let run_end = b[i..]
                        .iter()
                        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                        .map_or(b.len(), |p| i + p);
                    self.buf.push_str(&src[i..run_end]);
                    i = run_end;
                }
            }
        }
    }
}

/// The position of the first control character, which JSON strings may not hold raw. The
/// branch-free test runs vectorized; the position is looked for only when there is one.
fn first_control(b: &[u8]) -> Option<usize> {
    if b.iter().fold(false, |any, &c| any | (c < 0x20)) {
        b.iter().position(|&c| c < 0x20)
    } else {
        None
    }
}

fn err(offset: usize, message: &'static str) -> JsonError {
    JsonError { offset, message }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

fn literal(b: &[u8], i: usize, word: &[u8]) -> Result<usize, JsonError> {
    if b.get(i..i + word.len()) == Some(word) {
        Ok(i + word.len())
    } else {
        Err(err(i, "expected a value"))
    }
}

/// Longest plain form written for a number; one longer stays as written.
const MAX_PLAIN_NUMBER: usize = 64;

/// Writes the number `raw` (valid JSON) into `out` in plain digits, as a reader of the document
/// sees its value: `4.111111111111111e15` is `4111111111111111` (a card number), `2.5E-3` is
/// `0.0025`, `10.50` is `10.5`. Returns false, writing nothing, when `raw` is plain already or
/// its plain form would be longer than [`MAX_PLAIN_NUMBER`] bytes.
fn plain_number(raw: &str, out: &mut String) -> bool {
    // Without an exponent, only a fraction's trailing zeros make the plain form differ.
    let trailing_zeros = raw.contains('.') && raw.ends_with('0');
    if !(raw.contains(['e', 'E']) || trailing_zeros) {
        return false;
    }
    let (negative, unsigned) = match raw.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, raw),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], &unsigned[at + 1..]),
        None => (unsigned, "0"),
    };
    // A larger exponent puts the point more than 64 digits away: nothing to write out.
    let Some(exponent) = exponent
        .parse::<i64>()
        .ok()
        .filter(|e| e.unsigned_abs() <= 128)
    else {
        return false;
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    // The significant digits (no leading or trailing zeros), and where the point falls among
    // them; read in place, so that the allow path allocates nothing.
    let all = || int.bytes().chain(frac.bytes());
    let total = int.len() + frac.len();
    let lead = all().take_while(|&d| d == b'0').count();
    if lead == total {
        out.clear();
        out.push('0');
        return true;
    }
    let trail = all().rev().take_while(|&d| d == b'0').count();
    let len = (total - lead - trail) as i64;
    let Some(point) = (int.len() as i64 - lead as i64).checked_add(exponent) else {
        return false;
    };
    let width = point.max(len) - point.min(0) + 3;
    if width > MAX_PLAIN_NUMBER as i64 {
        return false;
    }
    out.clear();
    if negative {
        out.push('-');
    }
    if point <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-point) as usize));
    }
    for (i, d) in all().skip(lead).take(len as usize).enumerate() {
        if i as i64 == point && point > 0 {
            out.push('.');
        }
        out.push(char::from(d));
    }
    out.extend(std::iter::repeat_n('0', (point - len).max(0) as usize));
    true
}

fn number(b: &[u8], start: usize) -> Result<usize, JsonError> {
    let mut i = start;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    let digits = |i: &mut usize| {
        let s = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > s
    };
    let int_start = i;
    if !digits(&mut i) {
        return Err(err(i, "expected digits"));
    }
    if b[int_start] == b'0' && i - int_start > 1 {
        return Err(err(int_start, "leading zero in a number"));
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return Err(err(i, "expected digits after `.`"));
        }
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        if !digits(&mut i) {
            return Err(err(i, "expected digits in the exponent"));
        }
    }
    Ok(i)
}

fn hex4(b: &[u8], i: usize) -> Result<u32, JsonError> {
    let s = b.get(i..i + 4).ok_or(err(i, "short `\\u` escape"))?;
    s.iter().try_fold(0u32, |acc, &c| {
        let d = (c as char)
            .to_digit(16)
            .ok_or(err(i, "invalid `\\u` escape"))?;
        Ok(acc * 16 + d)
    })
}

/// Appends `s` to `out` as a JSON string literal.
pub(crate) fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                use std::fmt::Write;
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(src: &str) -> Result<Vec<(TokenKind, String, Option<String>)>, JsonError> {
        let mut out = Vec::new();
        Scanner::default().scan(src, &mut |t| {
            out.push((t.kind, t.text.to_owned(), t.key.map(str::to_owned)))
        })?;
        Ok(out)
    }

    #[test]
    fn yields_keys_strings_and_numbers_decoded() {
        let t = tokens(r#"{"a\u0062": ["x\"y", 1.5e3, true, null, {"k": "v"}], "n": -2}"#).unwrap();
        let got: Vec<(TokenKind, &str, Option<&str>)> = t
            .iter()
            .map(|(k, s, key)| (*k, s.as_str(), key.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                (TokenKind::Key, "ab", None),
                (TokenKind::String, "x\"y", None),
                (TokenKind::Number, "1500", None),
                (TokenKind::Key, "k", None),
                (TokenKind::String, "v", Some("k")),
                (TokenKind::Key, "n", None),
                (TokenKind::Number, "-2", Some("n")),
            ]
        );
    }

    #[test]
    fn numbers_are_read_in_plain_digits() {
        let plain = |raw: &str| {
            let mut out = String::new();
            plain_number(raw, &mut out).then_some(out)
        };
        for (raw, want) in [
            ("4.111111111111111e15", "4111111111111111"),
            ("4111111111111111.0", "4111111111111111"),
            ("41111111111111110000E-4", "4111111111111111"),
            ("-2.5E-3", "-0.0025"),
            ("10.50", "10.5"),
            ("1e2", "100"),
            ("0.0", "0"),
            ("0e5", "0"),
            ("123.456e1", "1234.56"),
        ] {
            assert_eq!(plain(raw).as_deref(), Some(want), "{raw}");
            // Whatever the spelling, the value is the same.
            assert_eq!(
                raw.parse::<f64>().unwrap(),
                want.parse::<f64>().unwrap(),
                "{raw}"
            );
        }
        // Plain already, or too long to be written out.
        for raw in [
            "42",
            "-7",
            "1e400",
            "1e-400",
            "1e9223372036854775807",
            "1e9223372036854775806",
            "1e-9223372036854775807",
            "0.1e-9223372036854775808",
            "1e99999999999999999999",
        ] {
            assert_eq!(plain(raw), None, "{raw}");
        }
    }

    #[test]
    fn decodes_surrogate_pairs_and_lone_surrogates() {
        let t = tokens(r#"["\ud83d\ude00", "\ud800x"]"#).unwrap();
        assert_eq!(t[0].1, "😀");
        assert_eq!(t[1].1, "\u{fffd}x");
    }

    #[test]
    fn rejects_malformed_documents() {
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\"}",
            "{\"a\":1,}",
            "[1 2]",
            "\"abc",
            "tru",
            "01x",
            "[1]]",
            "{1:2}",
            "\"a\u{1}\"",
            "-",
            "1.",
            "1e",
            "\"\\x\"",
            "[\"\\u12\"]",
        ] {
            assert!(tokens(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let depth = 100_000;
        let src = format!("{}\"deep\"{}", "[".repeat(depth), "]".repeat(depth));
        let t = tokens(&src).unwrap();
        assert_eq!(t.len(), 1);
        let src = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
        assert_eq!(tokens(&src).unwrap().len(), depth + 1);
    }

    #[test]
    fn encodes_strings_back() {
        let mut out = String::new();
        push_json_string(&mut out, "a\"b\\c\n\u{1}é");
        assert_eq!(out, r#""a\"b\\c\n\u0001é""#);
        assert_eq!(
            serde_json::from_str::<String>(&out).unwrap(),
            "a\"b\\c\n\u{1}é"
        );
    }
}
