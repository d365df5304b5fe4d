//! Series identity and selection: a [`SeriesKey`] is a metric name plus a
//! sorted set of tags; a [`Selector`] picks series by metric and tag
//! matchers (`=`, `!=`, `=~`, `!~`; regexes are anchored, as in PromQL).
//!
//! On disk a key is `varint len, metric, varint n_tags, (varint len, name,
//! varint len, value)…`, tags sorted by name.

use std::collections::BTreeMap;
use std::fmt;

use crate::codec::{put_varint, Cursor};
use crate::error::{DecodeError, Error};

/// A series: metric name and tags (sorted by name, one value per name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    metric: String,
    tags: Vec<(String, String)>,
}

impl SeriesKey {
    /// A key from a metric name and tags; the metric and tag names must be
    /// non-empty.
    pub fn new<M, I, K, V>(metric: M, tags: I) -> Result<Self, Error>
    where
        M: Into<String>,
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let metric = metric.into();
        if metric.is_empty() {
            return Err(Error::InvalidSeries("empty metric name".into()));
        }
        let map: BTreeMap<String, String> = tags.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        if map.keys().any(|k| k.is_empty()) {
            return Err(Error::InvalidSeries(format!("{metric}: empty tag name")));
        }
        Ok(SeriesKey { metric, tags: map.into_iter().collect() })
    }

    /// A key without tags.
    pub fn metric(metric: impl Into<String>) -> Result<Self, Error> {
        Self::new(metric, std::iter::empty::<(String, String)>())
    }

    /// The metric name.
    pub fn name(&self) -> &str {
        &self.metric
    }

    /// The tags, sorted by name.
    pub fn tags(&self) -> &[(String, String)] {
        &self.tags
    }

    /// The value of a tag (`""` when absent, as in PromQL).
    pub fn tag(&self, name: &str) -> &str {
        self.tags.binary_search_by(|(k, _)| k.as_str().cmp(name)).map(|i| self.tags[i].1.as_str()).unwrap_or("")
    }

    /// Heap bytes held, for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        self.metric.capacity()
            + self.tags.capacity() * std::mem::size_of::<(String, String)>()
            + self.tags.iter().map(|(k, v)| k.capacity() + v.capacity()).sum::<usize>()
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, &self.metric);
        put_varint(out, self.tags.len() as u64);
        for (k, v) in &self.tags {
            put_str(out, k);
            put_str(out, v);
        }
    }

    pub(crate) fn decode(c: &mut Cursor<'_>) -> Result<Self, DecodeError> {
        let metric = c.string()?;
        let n = c.len(c.remaining() / 2)?;
        let mut tags = Vec::with_capacity(n);
        for _ in 0..n {
            let k = c.string()?;
            let v = c.string()?;
            tags.push((k, v));
        }
        if metric.is_empty() || tags.iter().any(|(k, _)| k.is_empty()) || tags.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(DecodeError::Invalid("series key"));
        }
        Ok(SeriesKey { metric, tags })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

impl fmt::Display for SeriesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.metric)?;
        if !self.tags.is_empty() {
            write!(f, "{{")?;
            for (i, (k, v)) in self.tags.iter().enumerate() {
                if i > 0 {
                    write!(f, ",")?;
                }
                write!(f, "{k}={v:?}")?;
            }
            write!(f, "}}")?;
        }
        Ok(())
    }
}

/// How a tag matcher compares.
#[derive(Debug, Clone)]
enum MatchOp {
    Eq(String),
    Ne(String),
    Re(regex_lite::Regex),
    NotRe(regex_lite::Regex),
}

/// One tag condition of a [`Selector`].
#[derive(Debug, Clone)]
pub struct TagMatcher {
    name: String,
    op: MatchOp,
}

impl TagMatcher {
    /// `name = value` (`value` empty matches series without the tag).
    pub fn eq(name: impl Into<String>, value: impl Into<String>) -> Self {
        TagMatcher { name: name.into(), op: MatchOp::Eq(value.into()) }
    }
    /// `name != value`.
    pub fn ne(name: impl Into<String>, value: impl Into<String>) -> Self {
        TagMatcher { name: name.into(), op: MatchOp::Ne(value.into()) }
    }
    /// `name =~ regex`, anchored at both ends.
    pub fn re(name: impl Into<String>, pattern: &str) -> Result<Self, Error> {
        Ok(TagMatcher { name: name.into(), op: MatchOp::Re(anchored(pattern)?) })
    }
    /// `name !~ regex`, anchored at both ends.
    pub fn not_re(name: impl Into<String>, pattern: &str) -> Result<Self, Error> {
        Ok(TagMatcher { name: name.into(), op: MatchOp::NotRe(anchored(pattern)?) })
    }

    fn matches(&self, key: &SeriesKey) -> bool {
        let v = key.tag(&self.name);
        match &self.op {
            MatchOp::Eq(x) => v == x,
            MatchOp::Ne(x) => v != x,
            MatchOp::Re(r) => r.is_match(v),
            MatchOp::NotRe(r) => !r.is_match(v),
        }
    }
}

fn anchored(pattern: &str) -> Result<regex_lite::Regex, Error> {
    regex_lite::Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| Error::InvalidQuery(format!("regex {pattern:?}: {e}")))
}

/// Which series a query reads: an optional metric name and tag matchers.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    metric: Option<String>,
    matchers: Vec<TagMatcher>,
}

impl Selector {
    /// All series of a metric.
    pub fn metric(name: impl Into<String>) -> Self {
        Selector { metric: Some(name.into()), matchers: Vec::new() }
    }
    /// Every series.
    pub fn all() -> Self {
        Selector::default()
    }
    /// Adds a tag matcher.
    pub fn with(mut self, m: TagMatcher) -> Self {
        self.matchers.push(m);
        self
    }
    /// Whether `key` is selected.
    pub fn matches(&self, key: &SeriesKey) -> bool {
        self.metric.as_deref().is_none_or(|m| m == key.name()) && self.matchers.iter().all(|m| m.matches(key))
    }

    /// Parses the selector syntax of the query API and CLI (Prometheus's):
    /// `metric`, `metric{tag="v", tag!="v", tag=~"re", tag!~"re"}`, or
    /// `{…}` alone. Values are double-quoted with `\"` and `\\` escapes.
    pub fn parse(text: &str) -> Result<Selector, Error> {
        let bad = |m: &str| Error::InvalidQuery(format!("selector {text:?}: {m}"));
        let s = text.trim();
        let (metric, rest) = match s.find('{') {
            Some(i) => (s[..i].trim(), &s[i..]),
            None => (s, ""),
        };
        let mut sel = if metric.is_empty() { Selector::all() } else { Selector::metric(metric) };
        if !metric.is_empty() && !metric.chars().all(|c| c.is_ascii_alphanumeric() || "_:.-".contains(c)) {
            return Err(bad("metric names are letters, digits, '_', ':', '.' and '-'"));
        }
        if rest.is_empty() {
            if metric.is_empty() {
                return Err(bad("empty"));
            }
            return Ok(sel);
        }
        let body = rest.strip_prefix('{').and_then(|r| r.strip_suffix('}')).ok_or_else(|| bad("unbalanced braces"))?;
        let mut chars = body.chars().peekable();
        loop {
            while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
                chars.next();
            }
            if chars.peek().is_none() {
                break;
            }
            let mut name = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' || c == '/' {
                    name.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            let mut op = String::new();
            while let Some(&c) = chars.peek() {
                if "=!~".contains(c) {
                    op.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            if name.is_empty() {
                return Err(bad("expected a tag name"));
            }
            if chars.next() != Some('"') {
                return Err(bad("expected a double-quoted value"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(bad("unterminated value")),
                    },
                    Some('"') => break,
                    Some(c) => value.push(c),
                    None => return Err(bad("unterminated value")),
                }
            }
            let m = match op.as_str() {
                "=" => TagMatcher::eq(name, value),
                "!=" => TagMatcher::ne(name, value),
                "=~" => TagMatcher::re(name, &value)?,
                "!~" => TagMatcher::not_re(name, &value)?,
                other => return Err(bad(&format!("unknown operator {other:?}"))),
            };
            sel = sel.with(m);
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            match chars.next() {
                None | Some(',') => {}
                Some(c) => return Err(bad(&format!("expected ',' or '}}' after a value, found {c:?}"))),
            }
        }
        if sel.metric.is_none() && sel.matchers.is_empty() {
            return Err(bad("select a metric or at least one tag"));
        }
        Ok(sel)
    }
}

#[cfg(test)]
mod selector_tests {
    use super::*;

    fn key(metric: &str, tags: &[(&str, &str)]) -> SeriesKey {
        SeriesKey::new(metric, tags.iter().map(|(k, v)| (k.to_string(), v.to_string()))).expect("key")
    }

    #[test]
    fn parses_prometheus_style_selectors() {
        let s = Selector::parse(r#"temperature{device="boiler-1", site!="b",node=~"edge-.*"}"#).expect("parses");
        assert!(s.matches(&key("temperature", &[("device", "boiler-1"), ("site", "a"), ("node", "edge-1")])));
        assert!(!s.matches(&key("temperature", &[("device", "boiler-1"), ("site", "b"), ("node", "edge-1")])));
        assert!(!s.matches(&key("temperature", &[("device", "boiler-2"), ("site", "a"), ("node", "edge-1")])));
        assert!(!s.matches(&key("humidity", &[("device", "boiler-1"), ("node", "edge-1")])));
        let any = Selector::parse(r#"{device!~"boiler-.*"}"#).expect("parses");
        assert!(any.matches(&key("x", &[("device", "pump")])));
        assert!(Selector::parse("temp").expect("bare").matches(&key("temp", &[])));
        assert!(Selector::parse(r#"t{a="q\"x"}"#).expect("escape").matches(&key("t", &[("a", "q\"x")])));
        for bad in ["", "{}", "t{a=b}", r#"t{a="1"b="2"}"#, r#"t{a=="b"}"#, r#"t{a="b""#, "t{", "te mp", r#"t{a=~"("}"#]
        {
            assert!(Selector::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
