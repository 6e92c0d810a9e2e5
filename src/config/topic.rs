//! Topic templates such as `orders:{id}` over a route's path parameters: rendered into topics
//! and upstream paths, and matched back to parameter values when a topic is published.

use regex::Regex;

/// A topic template such as `orders:{id}` over a route's path parameters.
#[derive(Debug, Clone)]
pub struct TopicTemplate {
    parts: Vec<TopicPart>,
    /// Matches a topic string back to its parameter values (publish), anchored.
    matcher: Regex,
}

/// The matcher is built from the parts: equal parts, equal templates.
impl PartialEq for TopicTemplate {
    fn eq(&self, other: &TopicTemplate) -> bool {
        self.parts == other.parts
    }
}

#[derive(Debug, Clone, PartialEq)]
enum TopicPart {
    Literal(String),
    Param(String),
}

impl TopicTemplate {
    /// Parses a topic template; every `{name}` must be one of `params`, used once (a topic is
    /// matched back to its parameters when published).
    pub fn parse(template: &str, params: &[String]) -> Result<TopicTemplate, String> {
        TopicTemplate::parse_inner(template, params, false)
    }

    /// Parses the path template of a request pollmux makes (a source's, a hook's), which is
    /// only ever rendered: a parameter may appear more than once.
    pub fn parse_path(template: &str, params: &[String]) -> Result<TopicTemplate, String> {
        TopicTemplate::parse_inner(template, params, true)
    }

    fn parse_inner(
        template: &str,
        params: &[String],
        repeats: bool,
    ) -> Result<TopicTemplate, String> {
        let mut parts = Vec::new();
        let mut pattern = String::from("^");
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed {{ in {template:?}"))?
                + open;
            let name = &rest[open + 1..close];
            if !params.iter().any(|p| p == name) {
                return Err(format!("{{{name}}} is not a parameter of the route's path"));
            }
            let seen = parts
                .iter()
                .any(|p| matches!(p, TopicPart::Param(n) if n == name));
            if seen && !repeats {
                return Err(format!(
                    "{{{name}}} appears twice; a topic uses each parameter once"
                ));
            }
            if open > 0 {
                parts.push(TopicPart::Literal(rest[..open].to_owned()));
                pattern.push_str(&regex::escape(&rest[..open]));
            }
            // Groups are numbered by occurrence: a parameter may appear twice, and parameter
            // names need not be valid group names.
            pattern.push_str(&format!("(?P<p{}>.+?)", parts.len()));
            parts.push(TopicPart::Param(name.to_owned()));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched }} in {template:?}"));
        }
        if !rest.is_empty() {
            parts.push(TopicPart::Literal(rest.to_owned()));
            pattern.push_str(&regex::escape(rest));
        }
        if parts.is_empty() {
            return Err("must not be empty".into());
        }
        pattern.push('$');
        let matcher = Regex::new(&pattern).map_err(|e| e.to_string())?;
        Ok(TopicTemplate { parts, matcher })
    }

    /// The parameter names the template uses.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            TopicPart::Param(name) => Some(name.as_str()),
            TopicPart::Literal(_) => None,
        })
    }

    /// Renders the template as a URL path: parameter values are percent-encoded, so no value
    /// can add a segment, a query or a fragment.
    pub fn render_path(&self, params: &[(String, String)]) -> String {
        self.render_with(params, |v, out| out.push_str(&percent_encode(v)))
    }

    /// The topic for validated parameter values.
    pub fn render(&self, params: &[(String, String)]) -> String {
        self.render_with(params, |v, out| out.push_str(v))
    }

    /// The template with each parameter's value written by `value`.
    fn render_with(
        &self,
        params: &[(String, String)],
        value: impl Fn(&str, &mut String),
    ) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                TopicPart::Literal(l) => out.push_str(l),
                TopicPart::Param(name) => {
                    if let Some((_, v)) = params.iter().find(|(n, _)| n == name) {
                        value(v, &mut out);
                    }
                }
            }
        }
        out
    }

    /// The parameter values a topic string was rendered from, unvalidated; `None` if the
    /// template cannot produce it.
    /// A parameter that appears twice must have the same value at each place.
    pub fn capture(&self, topic: &str) -> Option<Vec<(String, String)>> {
        let caps = self.matcher.captures(topic)?;
        let mut values: Vec<(String, String)> = Vec::new();
        for (i, part) in self.parts.iter().enumerate() {
            let TopicPart::Param(name) = part else {
                continue;
            };
            let value = caps.name(&format!("p{i}"))?.as_str();
            match values.iter().find(|(n, _)| n == name) {
                Some((_, first)) if first != value => return None,
                Some(_) => {}
                None => values.push((name.clone(), value.to_owned())),
            }
        }
        Some(values)
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for a value placed in a
/// URL path segment or query.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_templates() {
        let names = ["id".to_string()];
        let t = TopicTemplate::parse("orders:{id}", &names).unwrap();
        assert_eq!(t.render(&[("id".into(), "42".into())]), "orders:42");
        assert_eq!(
            t.capture("orders:42").unwrap(),
            [("id".to_string(), "42".to_string())]
        );
        assert!(t.capture("order:42").is_none());
        // A parameter used twice, and a name that is no regex group name.
        let names = ["id".to_string(), "1d".to_string()];
        assert!(TopicTemplate::parse("{id}:{id}", &names).is_err());
        let t = TopicTemplate::parse_path("/o/{id}/s?id={id}&x={1d}", &names).unwrap();
        let params = [
            ("id".to_string(), "7".to_string()),
            ("1d".to_string(), "x".to_string()),
        ];
        assert_eq!(t.render(&params), "/o/7/s?id=7&x=x");
        assert_eq!(t.capture("/o/7/s?id=7&x=x").unwrap(), params);
        assert!(t.capture("/o/7/s?id=8&x=x").is_none());
        assert!(TopicTemplate::parse("x{other}", &names).is_err());
        assert!(TopicTemplate::parse("", &names).is_err());
        assert!(TopicTemplate::parse("a}", &names).is_err());
    }
}
