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

use unicode_normalization::UnicodeNormalization;

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
        if is_normal_ascii(s) {
            return s;
        }
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

/// ASCII with no `%` escape, no whitespace but single spaces: already normal up to case.
fn is_normal_ascii(s: &str) -> bool {
    let mut prev_space = false;
    for &b in s.as_bytes() {
        match b {
            b' ' => {
                if prev_space {
                    return false;
                }
                prev_space = true;
                continue;
            }
            b'%' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c | 0x80..=0xff => return false,
            _ => {}
        }
        prev_space = false;
    }
    true
}

fn has_percent_escape(s: &str) -> bool {
    s.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
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
