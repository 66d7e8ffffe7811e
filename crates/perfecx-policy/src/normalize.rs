//! Normalization of text before forbidden patterns are matched, so that the cheap evasions fail.
//!
//! Applied in this order to a string already decoded from JSON (`\u` escapes resolved):
//! 1. percent-decoding (twice, for double encoding), invalid UTF-8 replaced;
//! 2. removal of zero-width, bidirectional and other default-ignorable or format characters;
//! 3. Unicode NFKC (full-width letters, ligatures, compatibility spaces);
//! 4. lowercasing;
//! 5. every run of whitespace becomes one space.
//!
//! Patterns go through the same steps when a policy set is compiled. Plain ASCII text with no `%`
//! and no unusual whitespace is already normal up to ASCII case, which the automaton ignores, so
//! it is matched in place without a copy.

use unicode_normalization::{IsNormalized, UnicodeNormalization};

/// Reusable buffers, so that normalizing allocates only while they grow.
#[derive(Debug, Default)]
pub(crate) struct Normalizer {
    out: String,
    decoded: String,
    bytes: Vec<u8>,
}

impl Normalizer {
    /// The normalized form of `s` (ASCII letters may keep their case: match case-insensitively).
    pub(crate) fn normalize<'a>(&'a mut self, s: &'a str) -> &'a str {
        if is_normal(s) { s } else { self.rewrite(s) }
    }

    /// The normalized form of `s`, which [`is_normal`] said is not normal, in a reused buffer.
    pub(crate) fn rewrite(&mut self, s: &str) -> &str {
        let mut text = s;
        if has_percent_escape(text) {
            decode_into(text, &mut self.bytes, &mut self.decoded);
            if has_percent_escape(&self.decoded) {
                let once = std::mem::take(&mut self.decoded);
                decode_into(&once, &mut self.bytes, &mut self.decoded);
            }
            text = &self.decoded;
        }
        self.out.clear();
        let mut last_space = false;
        let mut push = |c: char, out: &mut String| {
            for lc in c.to_lowercase() {
                if lc.is_whitespace() {
                    if !last_space {
                        out.push(' ');
                        last_space = true;
                    }
                } else {
                    out.push(lc);
                    last_space = false;
                }
            }
        };
        if text.is_ascii() {
            for c in text.chars() {
                push(c, &mut self.out);
            }
        } else {
            for c in text.chars().filter(|c| !is_ignorable(*c)).nfkc() {
                if !is_ignorable(c) {
                    push(c, &mut self.out);
                }
            }
        }
        &self.out
    }
}

/// Normalizes a pattern once, at compile time; fully lowercased.
pub(crate) fn normalize_pattern(pattern: &str) -> String {
    let mut n = Normalizer::default();
    n.normalize(pattern).to_lowercase()
}

/// Already normal up to ASCII case: no `%XX` escape, no whitespace but single spaces, and every
/// non-ASCII character stable (visible, not a space, its own lowercase, unchanged by NFKC).
/// Most text, in any script, is; it is then matched in place.
pub(crate) fn is_normal(s: &str) -> bool {
    let b = s.as_bytes();
    let Some((&last, _)) = b.split_last() else {
        return true;
    };
    // One vectorized pass gathers what the byte-level tests need, far cheaper than a branchy
    // loop per byte or one pass per test.
    const CONTROL: u8 = 1;
    const PERCENT: u8 = 2;
    const NON_ASCII: u8 = 4;
    const TWO_SPACES: u8 = 8;
    // Multiplications rather than branches: this is what keeps the fold vectorized.
    let class = |c: u8, next: u8| {
        (u8::from(c < 0x20) * CONTROL)
            | (u8::from(c == b'%') * PERCENT)
            | (u8::from(c >= 0x80) * NON_ASCII)
            | (u8::from(c == b' ' && next == b' ') * TWO_SPACES)
    };
    let seen = b
        .iter()
        .zip(&b[1..])
        .fold(class(last, 0), |seen, (&c, &next)| seen | class(c, next));
    if seen & TWO_SPACES != 0
        || seen & CONTROL != 0
            && b.iter()
                .any(|c| matches!(c, b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
        || seen & PERCENT != 0 && has_percent_escape(s)
    {
        return false;
    }
    if seen & NON_ASCII == 0 {
        return true;
    }
    // Only the non-ASCII characters need a look: skip ASCII sixteen bytes at a time. `i` stays
    // on a character boundary: it moves over whole ASCII bytes or whole characters.
    let table = stable_table();
    let mut i = 0;
    while i < b.len() {
        if let Some(chunk) = b.get(i..i + 16) {
            if chunk.iter().fold(0, |acc, &c| acc | c) < 0x80 {
                i += 16;
                continue;
            }
            i += chunk.iter().position(|&c| c >= 0x80).unwrap_or(0);
        } else if b[i] < 0x80 {
            i += 1;
            continue;
        }
        let Some(c) = s.get(i..).and_then(|rest| rest.chars().next()) else {
            return false;
        };
        let stable = match table.get(c as usize / 64) {
            Some(bits) => bits >> (c as usize % 64) & 1 == 1,
            None => is_stable(c),
        };
        if !stable {
            return false;
        }
        i += c.len_utf8();
    }
    true
}

/// [`is_stable`] for every character of the Basic Multilingual Plane, one bit each (8 KiB),
/// computed once: the lookups behind it cost far more than a bit test.
fn stable_table() -> &'static [u64] {
    static TABLE: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..0x10000 / 64)
            .map(|block: u32| {
                (0..64).fold(0u64, |bits, i| {
                    let stable = char::from_u32(block * 64 + i).is_some_and(is_stable);
                    bits | u64::from(stable) << i
                })
            })
            .collect()
    })
}

/// Computes the tables behind normalization now, rather than on the first request.
pub(crate) fn warm_up() {
    stable_table();
}

fn is_stable(c: char) -> bool {
    let mut lower = c.to_lowercase();
    !is_ignorable(c)
        && !c.is_whitespace()
        && lower.next() == Some(c)
        && lower.next().is_none()
        && unicode_normalization::is_nfkc_quick(std::iter::once(c)) == IsNormalized::Yes
}

/// Calls `f` with `s` with its `%XX` escapes decoded (twice, for double encoding); `None`, without
/// calling it, when `s` has none. The buffers are reused, so that warm scans do not allocate.
pub(crate) fn with_percent_decoded<R>(s: &str, f: impl FnOnce(&str) -> R) -> Option<R> {
    thread_local! {
        static BUFFERS: std::cell::RefCell<(Vec<u8>, String, String)> = Default::default();
    }
    if !has_percent_escape(s) {
        return None;
    }
    BUFFERS.with(|b| {
        // Taken out for the call: `f` may decode again without finding the buffers borrowed.
        let (mut bytes, mut once, mut twice) = b.take();
        decode_into(s, &mut bytes, &mut once);
        let decoded = if has_percent_escape(&once) {
            decode_into(&once, &mut bytes, &mut twice);
            &twice
        } else {
            &once
        };
        let r = f(decoded);
        b.replace((bytes, once, twice));
        Some(r)
    })
}

fn has_percent_escape(s: &str) -> bool {
    let b = s.as_bytes();
    memchr::memchr_iter(b'%', b).any(|i| {
        b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
    })
}

fn decode_into(s: &str, bytes: &mut Vec<u8>, out: &mut String) {
    percent_decode(s, bytes);
    out.clear();
    out.push_str(&String::from_utf8_lossy(bytes));
}

fn percent_decode(s: &str, out: &mut Vec<u8>) {
    out.clear();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Default-ignorable code points and format characters (Unicode general category Cf): invisible
/// in rendering, so an attacker can put them inside a forbidden word.
pub(crate) fn is_ignorable(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x034F | 0x061C | 0x115F..=0x1160 | 0x17B4..=0x17B5 | 0x180B..=0x180F
        | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F | 0x3164 | 0xFE00..=0xFE0F
        | 0xFEFF | 0xFFA0 | 0xFFF0..=0xFFFB | 0x0600..=0x0605 | 0x06DD | 0x070F | 0x0890..=0x0891
        | 0x08E2 | 0x110BD | 0x110CD | 0x13430..=0x1343F | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A
        | 0xE0000..=0xE0FFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        Normalizer::default().normalize(s).to_lowercase()
    }

    #[test]
    fn plain_ascii_is_borrowed() {
        let mut n = Normalizer::default();
        let s = "ls -la /tmp";
        assert!(std::ptr::eq(n.normalize(s), s));
    }

    #[test]
    fn normal_text_in_any_script_is_borrowed() {
        let mut n = Normalizer::default();
        for s in [
            "Grüße aus Köln",
            "naïve café 東京の天気",
            "50% off",
            "a\u{e9}",
        ] {
            assert!(std::ptr::eq(n.normalize(s), s), "{s:?} was copied");
        }
        for s in ["e\u{301}", "ÉCOLE", "a\u{200b}b", "ﬁ", "a\u{a0}b", "%41"] {
            assert!(!std::ptr::eq(n.normalize(s), s), "{s:?} was not normalized");
        }
    }

    #[test]
    fn each_evasion_is_undone() {
        assert_eq!(norm("RM   -RF"), "rm -rf");
        assert_eq!(norm("rm\t\n-rf"), "rm -rf");
        assert_eq!(norm("rm%20-rf"), "rm -rf");
        assert_eq!(norm("rm%2520-rf"), "rm -rf");
        assert_eq!(norm("r\u{200b}m -r\u{feff}f"), "rm -rf");
        assert_eq!(norm("ｒｍ　－ｒｆ"), "rm -rf");
        assert_eq!(norm("ＤＲＯＰ\u{00a0}ＴＡＢＬＥ"), "drop table");
        assert_eq!(norm("ﬁle"), "file");
        assert_eq!(norm("%ff%fe"), "\u{fffd}\u{fffd}");
    }

    #[test]
    fn patterns_are_fully_lowercased() {
        assert_eq!(normalize_pattern("DROP  TABLE"), "drop table");
        assert_eq!(normalize_pattern("\u{200b}"), "");
    }
}
