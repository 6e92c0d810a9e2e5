//! The TOML document as parsed, kept beside the typed config while it is validated, so that every
//! error (syntax, type, unknown key, semantic) can name its key path and its line and column.
//!
//! Spans are byte ranges into the original text; `toml`'s spanned tree keeps them for every key
//! and value, and errors raised while deserializing a sub-tree carry absolute spans as well.

use std::fmt;
use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// One problem found in a configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path, e.g. `routes.news.hold`; empty for document-level syntax errors.
    pub path: String,
    /// 1-based line and column of the offending key or value, when the text has one.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.path.is_empty(), self.position) {
            (false, Some((line, col))) => {
                write!(
                    f,
                    "{} (line {line}, column {col}): {}",
                    self.path, self.message
                )
            }
            (true, Some((line, col))) => write!(f, "line {line}, column {col}: {}", self.message),
            (false, None) => write!(f, "{}: {}", self.path, self.message),
            (true, None) => f.write_str(&self.message),
        }
    }
}

/// Every problem found in one configuration, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} configuration error{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

/// The parsed document: raw text plus its spanned tree.
pub struct Source<'i> {
    text: &'i str,
    pub root: DeTable<'i>,
}

impl<'i> Source<'i> {
    /// Parses `text`; syntax errors are all reported, with positions.
    pub fn parse(text: &'i str) -> Result<Self, ConfigErrors> {
        let (root, errors) = DeTable::parse_recoverable(text);
        if !errors.is_empty() {
            let located = Source {
                text,
                root: DeTable::new(),
            };
            return Err(ConfigErrors(
                errors
                    .iter()
                    .map(|e| located.error_at_span(e.span(), e.message()))
                    .collect(),
            ));
        }
        Ok(Source {
            text,
            root: root.into_inner(),
        })
    }

    /// 1-based (line, column) of a byte offset; columns count characters.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    /// An error located by a span (from the toml crate), its key path derived from the tree.
    pub fn error_at_span(&self, span: Option<Range<usize>>, message: &str) -> ConfigError {
        ConfigError {
            path: span
                .as_ref()
                .map(|s| path_at(&self.root, s.start).join("."))
                .unwrap_or_default(),
            position: span.map(|s| self.line_col(s.start)),
            message: message.trim().to_owned(),
        }
    }

    /// An error located by its key path. A path that does not exist in the text (a missing key,
    /// a default) is located at its deepest existing parent.
    pub fn error_at_path(&self, path: &[&str], message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: path.join("."),
            position: span_of(&self.root, path).map(|s| self.line_col(s.start)),
            message: message.into(),
        }
    }
}

/// The span of the value at `path`, or of the deepest existing parent's key.
fn span_of(table: &DeTable<'_>, path: &[&str]) -> Option<Range<usize>> {
    let (first, rest) = path.split_first()?;
    let (key, value) = table.iter().find(|(k, _)| k.get_ref() == first)?;
    if rest.is_empty() {
        return Some(value.span());
    }
    match value.get_ref() {
        DeValue::Table(inner) => span_of(inner, rest).or_else(|| Some(key.span())),
        _ => Some(value.span()),
    }
}

/// The key path of the deepest key whose key or value contains `offset`. Sub-tables are
/// searched whatever their own span (a `[header]` table's span covers only its header).
pub(super) fn path_at(table: &DeTable<'_>, offset: usize) -> Vec<String> {
    let contains = |r: Range<usize>| r.start <= offset && offset < r.end.max(r.start + 1);
    for (key, value) in table.iter() {
        let name = key.get_ref().to_string();
        if let DeValue::Table(inner) = value.get_ref() {
            let deeper = path_at(inner, offset);
            if !deeper.is_empty() {
                return std::iter::once(name).chain(deeper).collect();
            }
        }
        if contains(key.span()) || contains(value.span()) {
            return vec![name];
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "[a]\nx = 1\n[a.b]\ny = \"z\"\n";

    #[test]
    fn span_and_path_agree() {
        let src = Source::parse(DOC).unwrap();
        let e = src.error_at_path(&["a", "b", "y"], "bad");
        assert_eq!(e.position, Some((4, 5)));
        assert_eq!(e.to_string(), "a.b.y (line 4, column 5): bad");
        let offset = DOC.find("\"z\"").unwrap();
        assert_eq!(path_at(&src.root, offset), ["a", "b", "y"]);
    }

    #[test]
    fn missing_key_points_at_parent() {
        let src = Source::parse(DOC).unwrap();
        let e = src.error_at_path(&["a", "b", "nope"], "required");
        assert_eq!(e.position.map(|p| p.0), Some(3));
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = Source::parse("[a]\nx = = 1\n").err().unwrap();
        assert!(err.0[0].position.unwrap().0 == 2, "{err}");
    }

    #[test]
    fn columns_count_characters() {
        let src = Source::parse("k = \"é\"\n").unwrap();
        assert_eq!(src.line_col(7), (1, 7));
    }
}
