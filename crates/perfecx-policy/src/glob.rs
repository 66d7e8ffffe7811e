//! Tool names: exact names in a sorted list, globs (`*` for any run of characters) split into
//! their literal pieces once, when the policy set is compiled.
//!
//! Every tool call is checked against every tool rule, so matching must cost next to nothing:
//! no hashing, and no substring searcher built per call (`str::find` builds a Two-Way searcher
//! each time, which costs more than the search of a short tool name).

use memchr::memmem::Finder;

/// A set of tool names and globs, matched without allocating.
#[derive(Debug, Default, Clone)]
pub(crate) struct ToolMatcher {
    /// Sorted, without duplicates.
    exact: Vec<Box<str>>,
    globs: Vec<Glob>,
}

impl ToolMatcher {
    pub(crate) fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> ToolMatcher {
        let mut m = ToolMatcher::default();
        for n in names {
            match Glob::new(n) {
                Some(glob) => m.globs.push(glob),
                None => m.exact.push(n.into()),
            }
        }
        m.exact.sort_unstable();
        m.exact.dedup();
        m
    }

    /// The entry (name or glob) that matches `tool`, if any.
    pub(crate) fn find(&self, tool: &str) -> Option<&str> {
        if let Ok(i) = self.exact.binary_search_by(|e| (**e).cmp(tool)) {
            return Some(&self.exact[i]);
        }
        self.globs
            .iter()
            .find(|g| g.matches(tool))
            .map(|g| &*g.text)
    }
}

/// A glob cut at its stars: `first*middle[0]*...*last`.
#[derive(Debug, Clone)]
struct Glob {
    text: Box<str>,
    first: Box<str>,
    middle: Vec<Finder<'static>>,
    last: Box<str>,
}

impl Glob {
    /// `None` when `text` has no star: it is a plain name.
    fn new(text: &str) -> Option<Glob> {
        let (first, tail) = text.split_once('*')?;
        let (middle, last) = tail.rsplit_once('*').unwrap_or(("", tail));
        Some(Glob {
            text: text.into(),
            first: first.into(),
            middle: middle
                .split('*')
                .filter(|p| !p.is_empty())
                .map(|p| Finder::new(p).into_owned())
                .collect(),
            last: last.into(),
        })
    }

    fn matches(&self, name: &str) -> bool {
        let Some(rest) = name
            .strip_prefix(&*self.first)
            .and_then(|rest| rest.strip_suffix(&*self.last))
        else {
            return false;
        };
        // Each middle piece is taken at its first occurrence: leftmost is never worse.
        let mut rest = rest.as_bytes();
        for piece in &self.middle {
            match piece.find(rest) {
                Some(i) => rest = &rest[i + piece.needle().len()..],
                None => return false,
            }
        }
        true
    }
}

/// `*` matches any run of characters, including none; everything else matches itself.
#[cfg(test)]
fn glob_match(glob: &str, name: &str) -> bool {
    match Glob::new(glob) {
        Some(g) => g.matches(name),
        None => glob == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shells() {
        assert!(glob_match("memory_*", "memory_write"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*_exec*", "code_executor"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(!glob_match("memory_*", "my_memory_write"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("a*a", "aa"));
        assert!(!glob_match("a*a", "a"));
    }

    /// The definition, by backtracking: the oracle for the compiled form.
    fn oracle(glob: &[char], name: &[char]) -> bool {
        match glob.split_first() {
            None => name.is_empty(),
            Some(('*', rest)) => (0..=name.len()).any(|i| oracle(rest, &name[i..])),
            Some((&c, rest)) => name.first() == Some(&c) && oracle(rest, &name[1..]),
        }
    }

    #[test]
    fn compiled_globs_agree_with_the_definition() {
        let mut rand = crate::testing::rand(0x2545_f491_4f6c_dd1du64);
        let mut word = |alphabet: &[char]| -> Vec<char> {
            (0..rand(7))
                .map(|_| alphabet[rand(alphabet.len())])
                .collect()
        };
        for _ in 0..20_000 {
            let (glob, name) = (word(&['a', 'é', '*']), word(&['a', 'é']));
            let (g, n): (String, String) = (glob.iter().collect(), name.iter().collect());
            assert_eq!(
                glob_match(&g, &n),
                oracle(&glob, &name),
                "{g:?} against {n:?}"
            );
        }
    }

    #[test]
    fn finds_exact_then_glob() {
        let m = ToolMatcher::new(["shell", "fs_*"]);
        assert_eq!(m.find("shell"), Some("shell"));
        assert_eq!(m.find("fs_write"), Some("fs_*"));
        assert_eq!(m.find("web"), None);
    }
}
