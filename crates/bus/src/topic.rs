//! Topic names and topic filters: validation, matching, and shared
//! subscriptions (`$share/{group}/{filter}`).
//!
//! A topic name is what a PUBLISH carries: non-empty, at most 65,535
//! bytes, no `+`, no `#`. A topic filter is what a SUBSCRIBE carries:
//! levels separated by `/`, where `+` matches exactly one level and `#`
//! (alone in the last level) matches the parent level and everything below
//! it. Topics starting with `$` (`$SYS/…`) are not matched by a filter
//! starting with a wildcard (MQTT 5 §4.7.2).

/// Largest length of a topic, as every MQTT string (a u16 length prefix).
pub const MAX_TOPIC_LEN: usize = u16::MAX as usize;

/// Whether `topic` is a valid topic name for a PUBLISH (or a will).
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN && !topic.contains(['+', '#', '\0'])
}

/// Whether `filter` is a valid topic filter (not a shared subscription;
/// see [`SharedFilter::parse`] for those).
pub fn valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > MAX_TOPIC_LEN || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// Whether `filter` (valid, not shared) matches the topic name `topic`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A subscription filter as written by a client: plain, or shared by a
/// group of subscribers who each receive a share of the messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionFilter<'a> {
    /// An ordinary filter: every subscriber gets every matching message.
    Plain(&'a str),
    /// `$share/{group}/{filter}`: one member of the group gets each message.
    Shared(SharedFilter<'a>),
}

/// The parts of a `$share/{group}/{filter}` subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFilter<'a> {
    /// The share name (no `/`, `+` or `#`, not empty).
    pub group: &'a str,
    /// The topic filter the group subscribes to.
    pub filter: &'a str,
}

impl<'a> SharedFilter<'a> {
    /// Parses `$share/{group}/{filter}`; `None` if `s` is not a shared
    /// subscription or is malformed.
    pub fn parse(s: &'a str) -> Option<SharedFilter<'a>> {
        let rest = s.strip_prefix("$share/")?;
        let (group, filter) = rest.split_once('/')?;
        if group.is_empty() || group.contains(['+', '#']) || !valid_topic_filter(filter) {
            return None;
        }
        Some(SharedFilter { group, filter })
    }
}

/// Classifies and validates a filter from a SUBSCRIBE or UNSUBSCRIBE.
pub fn parse_subscription_filter(s: &str) -> Option<SubscriptionFilter<'_>> {
    if s.starts_with("$share/") || s == "$share" {
        return SharedFilter::parse(s).map(SubscriptionFilter::Shared);
    }
    valid_topic_filter(s).then_some(SubscriptionFilter::Plain(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_validate_and_match() {
        assert!(valid_topic_filter("a/+/c"));
        assert!(valid_topic_filter("#"));
        assert!(valid_topic_filter("a/#"));
        assert!(!valid_topic_filter("a/#/c"));
        assert!(!valid_topic_filter("a+/b"));
        assert!(!valid_topic_filter(""));
        assert!(filter_matches("sport/#", "sport"));
        assert!(filter_matches("sport/+", "sport/"));
        assert!(!filter_matches("sport/+", "sport"));
        assert!(filter_matches("+/+", "/finance"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(!filter_matches("+/x", "$SYS/x"));
        assert!(filter_matches("$SYS/#", "$SYS/x"));
        assert!(!valid_topic_name("a/+"));
        assert_eq!(SharedFilter::parse("$share/g/a/#"), Some(SharedFilter { group: "g", filter: "a/#" }));
        assert_eq!(parse_subscription_filter("$share/g"), None);
    }
}
