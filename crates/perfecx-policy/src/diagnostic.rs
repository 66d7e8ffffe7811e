//! Errors in policy documents, located and rendered for the people who wrote them.

use std::fmt;

use serde::Serialize;

/// One problem in a policy document: where it is (source, line, column, field path), what is
/// wrong, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// The file name (or other source name) the document was read from.
    pub source: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// The field path, such as `rules[0].allowed_tools[2]`; empty for the document itself.
    pub path: String,
    /// What is wrong, lowercase, with the user's input in backticks.
    pub message: String,
    /// What was expected, or how to fix it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
    #[serde(skip)]
    excerpt: Option<Excerpt>,
}

impl Diagnostic {
    /// A diagnostic at a character position of `text` (`line` 1-based, `col` 0-based, `len` in
    /// characters, as the YAML parser reports them).
    pub(crate) fn at(
        source: &str,
        text: &str,
        (line, col, len): (usize, usize, usize),
        path: &str,
        message: impl Into<String>,
    ) -> Diagnostic {
        let excerpt = text
            .lines()
            .nth(line.saturating_sub(1))
            .map(|l| Excerpt::new(l, col, len));
        Diagnostic {
            source: source.to_owned(),
            line: line.max(1),
            column: col + 1,
            path: path.to_owned(),
            message: message.into(),
            help: None,
            excerpt,
        }
    }

    /// A diagnostic about a whole document or file, with no position to point at.
    pub fn new(source: impl Into<String>, message: impl Into<String>) -> Diagnostic {
        Diagnostic::document(&source.into(), message)
    }

    /// A diagnostic about a whole document, with no position to point at.
    pub(crate) fn document(source: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            source: source.to_owned(),
            line: 1,
            column: 1,
            path: String::new(),
            message: message.into(),
            help: None,
            excerpt: None,
        }
    }

    /// Places a document-level diagnostic at a known position, without an excerpt.
    pub fn located(mut self, line: usize, column: usize, path: &str) -> Diagnostic {
        self.line = line.max(1);
        self.column = column.max(1);
        self.path = path.to_owned();
        self
    }

    pub(crate) fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }
}

/// Renders in the style of rustc and miette:
///
/// ```text
/// error: unknown field `allowed_toolz` in a `tool_restriction` rule
///   --> policies/prod.yaml:6:7 (rules[0].allowed_toolz)
///    |
///  6 |     - allowed_toolz: [web_search]
///    |       ^^^^^^^^^^^^^
///    = help: expected one of `type`, `allowed_tools`, `forbidden_tools`
/// ```
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.message)?;
        let gutter = self.line.to_string().len();
        let pad = " ".repeat(gutter);
        write!(f, "{pad}--> {}:{}:{}", self.source, self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, " ({})", self.path)?;
        }
        if let Some(e) = &self.excerpt {
            let indent = " ".repeat(e.caret);
            let carets = "^".repeat(e.width);
            write!(
                f,
                "\n{pad} |\n{} | {}\n{pad} | {indent}{carets}",
                self.line, e.text
            )?;
        }
        if let Some(help) = &self.help {
            write!(f, "\n{pad} = help: {help}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostic {}

/// The source line shown under a diagnostic: at most [`Excerpt::WIDTH`] characters around the
/// column, tabs shown as spaces, with the caret position and underline width within it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Excerpt {
    text: String,
    caret: usize,
    width: usize,
}

impl Excerpt {
    const WIDTH: usize = 100;

    fn new(line: &str, col: usize, len: usize) -> Excerpt {
        let chars: Vec<char> = line
            .chars()
            .map(|c| if c == '\t' { ' ' } else { c })
            .collect();
        let start = if chars.len() <= Self::WIDTH {
            0
        } else {
            col.saturating_sub(Self::WIDTH / 3).min(chars.len())
        };
        let end = (start + Self::WIDTH).min(chars.len());
        let mut text: String = chars[start..end].iter().collect();
        let mut caret = col - start;
        if start > 0 {
            text.insert(0, '…');
            caret += 1;
        }
        if end < chars.len() {
            text.push('…');
        }
        let available = (end.saturating_sub(col)).max(1);
        Excerpt {
            text,
            caret,
            width: len.clamp(1, available),
        }
    }
}

/// Every problem found in one or more documents; never empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Diagnostic> for Diagnostics {
    fn from(d: Diagnostic) -> Self {
        Diagnostics(vec![d])
    }
}

impl IntoIterator for Diagnostics {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n\n")?;
            }
            d.fmt(f)?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// The known name closest to `given`, if it is close enough to be a likely typo.
pub(crate) fn did_you_mean<'a>(given: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(given, k), *k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// `a`, `b`, `c` — for "expected one of" help lines.
pub(crate) fn backticked(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_location_excerpt_and_help() {
        let text = "name: x\nrules:\n  - allowed_toolz: [a]\n";
        let d = Diagnostic::at(
            "p.yaml",
            text,
            (3, 4, 13),
            "rules[0].allowed_toolz",
            "unknown field `allowed_toolz`",
        )
        .with_help("expected `allowed_tools`");
        assert_eq!(
            d.to_string(),
            "error: unknown field `allowed_toolz`\n --> p.yaml:3:5 (rules[0].allowed_toolz)\n  |\n3 |   - allowed_toolz: [a]\n  |     ^^^^^^^^^^^^^\n  = help: expected `allowed_tools`"
        );
    }

    #[test]
    fn suggests_close_names_only() {
        let known = ["allowed_tools", "forbidden_tools"];
        assert_eq!(did_you_mean("allowed_toolz", &known), Some("allowed_tools"));
        assert_eq!(did_you_mean("colour", &known), None);
    }
}
