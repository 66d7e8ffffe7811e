//! Tool names: exact names in a hash set, globs (`*` for any run of characters) in a list.

use std::collections::HashSet;

/// A set of tool names and globs, matched without allocating.
#[derive(Debug, Default, Clone)]
pub(crate) struct ToolMatcher {
    exact: HashSet<Box<str>>,
    globs: Vec<Box<str>>,
}

impl ToolMatcher {
    pub(crate) fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> ToolMatcher {
        let mut m = ToolMatcher::default();
        for n in names {
            if n.contains('*') {
                m.globs.push(n.into());
            } else {
                m.exact.insert(n.into());
            }
        }
        m
    }

    /// The entry (name or glob) that matches `tool`, if any.
    pub(crate) fn find(&self, tool: &str) -> Option<&str> {
        if let Some(e) = self.exact.get(tool) {
            return Some(e);
        }
        self.globs
            .iter()
            .find(|g| glob_match(g, tool))
            .map(|g| &**g)
    }
}

/// `*` matches any run of characters, including none; everything else matches itself.
pub(crate) fn glob_match(glob: &str, name: &str) -> bool {
    let Some((first, tail)) = glob.split_once('*') else {
        return glob == name;
    };
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let mut pieces = tail.split('*').peekable();
    while let Some(piece) = pieces.next() {
        if pieces.peek().is_none() {
            return rest.len() >= piece.len() && rest.ends_with(piece);
        }
        match rest.find(piece) {
            Some(i) => rest = &rest[i + piece.len()..],
            None => return false,
        }
    }
    true
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

    #[test]
    fn finds_exact_then_glob() {
        let m = ToolMatcher::new(["shell", "fs_*"]);
        assert_eq!(m.find("shell"), Some("shell"));
        assert_eq!(m.find("fs_write"), Some("fs_*"));
        assert_eq!(m.find("web"), None);
    }
}
