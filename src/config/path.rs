//! Route path templates (`/orders/{id}/events`, `/files/{*rest}`) and the precedence rule
//! between them: compared segment by segment from the left, a static segment beats a parameter
//! with a literal prefix or suffix (the longer literal first), which beats a bare parameter,
//! which beats a `{*tail}`. The most specific template that matches a path wins, so "specific
//! routes plus a catch-all proxy" works as in nginx or Envoy. Two templates are refused
//! together only when some path matches both equally well ([`PathTemplate::ambiguous_with`]).
//!
//! Matching works on the raw (still percent-encoded) path: an encoded `/` never splits a
//! segment. Decoding and validating parameter values is the router's job, after the route is
//! chosen.

use std::cmp::Ordering;

/// One `/`-separated piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Literal text, compared byte for byte with the raw path.
    Static(String),
    /// `prefix{name}suffix`: a non-empty value between the two literals.
    Param { prefix: String, suffix: String },
    /// `{*name}`: the non-empty rest of the path, `/` included; only last.
    Tail,
}

impl Segment {
    /// How specific the segment is: higher wins. Equal keys can tie.
    fn specificity(&self) -> (u8, usize) {
        match self {
            Segment::Static(_) => (3, 0),
            Segment::Param { prefix, suffix } if !prefix.is_empty() || !suffix.is_empty() => {
                (2, prefix.len() + suffix.len())
            }
            Segment::Param { .. } => (1, 0),
            Segment::Tail => (0, 0),
        }
    }
}

/// A parsed route template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    text: String,
    segments: Vec<Segment>,
    /// Parameter names in path order, each with whether it is the `{*tail}`.
    params: Vec<(String, bool)>,
}

/// Literal text of a template may hold only what a request path carries unescaped (RFC 3986
/// `pchar` without `%`): anything else could never match, since paths are matched raw (with
/// escapes of unreserved characters decoded).
fn literal(text: &str, path: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@".contains(c);
    match text.chars().find(|&c| !allowed(c)) {
        None => Ok(()),
        Some('}') => Err(format!("unopened }} in {path:?}")),
        Some(c) => Err(format!(
            "{c:?} cannot appear unescaped in a request path, so {path:?} would never match"
        )),
    }
}

impl PathTemplate {
    /// Parses `/a/{x}/b-{y}.json/{*rest}`: it starts with `/`, a segment holds at most one
    /// parameter, names are `[A-Za-z0-9_]+` and appear once, a tail ends the path.
    pub fn parse(path: &str) -> Result<PathTemplate, String> {
        let Some(body) = path.strip_prefix('/') else {
            return Err(format!("{path:?} must start with /"));
        };
        let mut segments = Vec::new();
        let mut params: Vec<(String, bool)> = Vec::new();
        let pieces: Vec<&str> = body.split('/').collect();
        for (i, piece) in pieces.iter().enumerate() {
            let Some(open) = piece.find('{') else {
                literal(piece, path)?;
                segments.push(Segment::Static((*piece).to_owned()));
                continue;
            };
            let close = piece[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed {{ in {path:?}"))?
                + open;
            let (prefix, inner, suffix) =
                (&piece[..open], &piece[open + 1..close], &piece[close + 1..]);
            literal(prefix, path)?;
            if suffix.contains(['{', '}']) || inner.contains('{') {
                return Err(format!(
                    "a segment may hold one parameter only, in {path:?}"
                ));
            }
            let (name, tail) = match inner.strip_prefix('*') {
                Some(n) => (n, true),
                None => (inner, false),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid parameter name {inner:?} in {path:?}"));
            }
            if tail && (i + 1 != pieces.len() || !prefix.is_empty() || !suffix.is_empty()) {
                return Err(format!("{{*{name}}} must end the path {path:?}"));
            }
            if params.iter().any(|(n, _)| n == name) {
                return Err(format!("parameter {{{name}}} appears twice in {path:?}"));
            }
            literal(suffix, path)?;
            params.push((name.to_owned(), tail));
            segments.push(if tail {
                Segment::Tail
            } else {
                Segment::Param {
                    prefix: prefix.to_owned(),
                    suffix: suffix.to_owned(),
                }
            });
        }
        Ok(PathTemplate {
            text: path.to_owned(),
            segments,
            params,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Parameter names in path order, each with whether it is the `{*tail}`.
    pub fn params(&self) -> &[(String, bool)] {
        &self.params
    }

    /// The first segment when it is literal text: only paths whose first segment is exactly
    /// this can match.
    pub fn first_static(&self) -> Option<&str> {
        match &self.segments[0] {
            Segment::Static(s) => Some(s),
            _ => None,
        }
    }

    /// The raw (undecoded) parameter values when `path` matches, in path order.
    pub fn captures<'p>(&self, path: &'p str) -> Option<Vec<&'p str>> {
        let mut out = Vec::with_capacity(self.params.len());
        self.walk(path, |value| out.push(value)).then_some(out)
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        self.walk(path, |_| {})
    }

    /// Matches `path` segment by segment, handing each parameter's raw value to `found`.
    fn walk<'p>(&self, path: &'p str, mut found: impl FnMut(&'p str)) -> bool {
        let Some(mut rest) = path.strip_prefix('/') else {
            return false;
        };
        let last = self.segments.len() - 1;
        for (i, seg) in self.segments.iter().enumerate() {
            if let Segment::Tail = seg {
                if rest.is_empty() {
                    return false;
                }
                found(rest);
                return true;
            }
            let (piece, after) = match rest.split_once('/') {
                Some((piece, after)) if i < last => (piece, Some(after)),
                Some(_) => return false,
                None if i == last => (rest, None),
                None => return false,
            };
            match seg {
                Segment::Static(s) if s == piece => {}
                Segment::Param { prefix, suffix }
                    if piece.len() > prefix.len() + suffix.len()
                        && piece.starts_with(prefix.as_str())
                        && piece.ends_with(suffix.as_str()) =>
                {
                    found(&piece[prefix.len()..piece.len() - suffix.len()]);
                }
                _ => return false,
            }
            rest = after.unwrap_or_default();
        }
        true
    }

    /// Which of two templates that both match one path is the more specific there:
    /// `Greater` when `self` wins. `Equal` only for [ambiguous](Self::ambiguous_with) pairs.
    pub fn precedence(&self, other: &PathTemplate) -> Ordering {
        for (a, b) in self.segments.iter().zip(&other.segments) {
            match a.specificity().cmp(&b.specificity()) {
                Ordering::Equal if matches!(a, Segment::Tail) => return Ordering::Equal,
                Ordering::Equal => {}
                decided => return decided,
            }
        }
        Ordering::Equal
    }

    /// Whether some path matches both templates equally well, so that neither can win.
    pub fn ambiguous_with(&self, other: &PathTemplate) -> bool {
        let (a, b) = (&self.segments, &other.segments);
        for i in 0.. {
            let (sa, sb) = match (a.get(i), b.get(i)) {
                (None, None) => return true,
                (Some(sa), Some(sb)) => (sa, sb),
                // Without a tail reached, templates of different lengths match different paths.
                _ => return false,
            };
            if sa.specificity() != sb.specificity() {
                return false;
            }
            match (sa, sb) {
                (Segment::Static(x), Segment::Static(y)) if x != y => return false,
                (
                    Segment::Param {
                        prefix: p1,
                        suffix: s1,
                    },
                    Segment::Param {
                        prefix: p2,
                        suffix: s2,
                    },
                ) => {
                    let prefixes = p1.starts_with(p2.as_str()) || p2.starts_with(p1.as_str());
                    let suffixes = s1.ends_with(s2.as_str()) || s2.ends_with(s1.as_str());
                    if !prefixes || !suffixes {
                        return false;
                    }
                }
                (Segment::Tail, Segment::Tail) => return true,
                _ => {}
            }
        }
        unreachable!("the loop returns once either template runs out of segments")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(path: &str) -> PathTemplate {
        PathTemplate::parse(path).unwrap()
    }

    #[test]
    fn parses_and_captures() {
        assert_eq!(
            t("/a/{x}/b/{*rest}").params(),
            [("x".to_string(), false), ("rest".to_string(), true)]
        );
        let tpl = t("/a/{x}/img-{id}.png/{*rest}");
        assert_eq!(
            tpl.params(),
            [
                ("x".to_string(), false),
                ("id".to_string(), false),
                ("rest".to_string(), true)
            ]
        );
        assert_eq!(
            tpl.captures("/a/1/img-7.png/b/c/"),
            Some(vec!["1", "7", "b/c/"])
        );
        assert_eq!(tpl.captures("/a/1/img-.png/b"), None, "empty value");
        assert_eq!(tpl.captures("/a/1/img-7.png/"), None, "empty tail");
        assert_eq!(tpl.captures("/a/1/img-7.jpg/b"), None);
        assert!(t("/").matches("/"));
        assert!(!t("/").matches("/x"));
        assert!(t("/{db}/").matches("/a/"));
        assert!(!t("/{db}/").matches("/a"));
        assert!(!t("/{db}").matches("/a/"));
        assert!(!t("/x/{id}").matches("/x/a%2Fb/c"));
        assert!(t("/x/{id}").matches("/x/a%2Fb"));
    }

    #[test]
    fn rejects_malformed_templates() {
        for bad in [
            "a",
            "/{*rest}/x",
            "/{x}/{x}",
            "/{x",
            "/x}",
            "/{a}{b}",
            "/{}",
            "/{a-b}",
            "/p{*rest}",
            "/a}{b}",
            "/caf\u{e9}",
            "/a b",
            "/a%20b",
            "/x/{id}%",
        ] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn specific_segments_win_from_the_left() {
        let stat = t("/{db}/_changes");
        let tail = t("/{*rest}");
        let deep = t("/{db}/{*rest}");
        let feeds = t("/feeds/poll/{db}");
        assert_eq!(stat.precedence(&tail), Ordering::Greater);
        assert_eq!(stat.precedence(&deep), Ordering::Greater);
        assert_eq!(deep.precedence(&tail), Ordering::Greater);
        assert_eq!(feeds.precedence(&deep), Ordering::Greater);
        assert_eq!(t("/img-{id}").precedence(&t("/{x}")), Ordering::Greater);
        assert_eq!(
            t("/img-{id}.png").precedence(&t("/img-{id}")),
            Ordering::Greater
        );
        assert_eq!(tail.precedence(&stat), Ordering::Less);
    }

    #[test]
    fn only_truly_ambiguous_pairs_conflict() {
        let ambiguous = [
            ("/x/{id}", "/x/{name}"),
            ("/{*a}", "/{*b}"),
            ("/x/{*a}", "/x/{*b}"),
            ("/{a}/{*r}", "/{b}/{*s}"),
            ("/a{x}", "/{y}b"),
            ("/ab{x}", "/a{y}c"),
            ("/same", "/same"),
        ];
        for (a, b) in ambiguous {
            assert!(t(a).ambiguous_with(&t(b)), "{a} vs {b}");
            assert!(t(b).ambiguous_with(&t(a)), "{b} vs {a}");
        }
        let distinct = [
            ("/{*rest}", "/{db}/_changes"),
            ("/{*rest}", "/{db}"),
            ("/{db}", "/{db}/"),
            ("/{db}/", "/{db}/{*rest}"),
            ("/", "/{*rest}"),
            ("/x/{id}", "/y/{id}"),
            ("/x/{id}", "/x/{id}/z"),
            ("/a{x}", "/b{y}"),
            ("/{x}.json", "/{x}.xml"),
            ("/a{x}", "/{y}"),
            ("/feeds/poll/{db}", "/{db}/{*rest}"),
        ];
        for (a, b) in distinct {
            assert!(!t(a).ambiguous_with(&t(b)), "{a} vs {b}");
            assert!(!t(b).ambiguous_with(&t(a)), "{b} vs {a}");
        }
    }
}
