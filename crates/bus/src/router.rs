//! The subscription index: a trie of topic-filter levels.
//!
//! Each node is one filter level; `+` and `#` are ordinary children whose
//! meaning is applied while matching. A node holds the plain subscriptions
//! whose filter ends there and the shared-subscription groups
//! (`$share/{group}/…`) on that filter. Matching a topic of `k` levels
//! visits at most the exact, `+` and `#` children at each level, so its
//! cost depends on the filters that could match, not on the number of
//! subscriptions. Topics starting with `$` skip `+`/`#` at the first level.
//!
//! A subscriber has at most one entry per filter (re-subscribing replaces
//! its options). A shared group hands each message to one member, round
//! robin, preferring members that are online.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::codec::SubscriptionOptions;
use crate::session::Session;
use crate::topic::SubscriptionFilter;
use crate::Message;

/// Who subscribed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum SubscriberId {
    /// A client session, by client id.
    Client(Arc<str>),
    /// An in-process subscription of the agent.
    Local(u64),
}

/// Where matching messages go.
#[derive(Debug, Clone)]
pub(crate) enum Sink {
    Session(Arc<Session>),
    Local(mpsc::Sender<Message>),
}

impl Sink {
    fn online(&self) -> bool {
        match self {
            Sink::Session(s) => s.online.load(Ordering::Relaxed),
            Sink::Local(tx) => !tx.is_closed(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub id: SubscriberId,
    pub sink: Sink,
    pub options: SubscriptionOptions,
    pub sub_id: Option<u32>,
}

#[derive(Debug)]
struct SharedGroup {
    name: String,
    members: Vec<Entry>,
    next: AtomicUsize,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<String, Node>,
    subs: Vec<Entry>,
    shared: Vec<SharedGroup>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subs.is_empty() && self.shared.is_empty()
    }

    fn collect(&self, out: &mut Vec<Entry>) {
        out.extend(self.subs.iter().cloned());
        for g in &self.shared {
            if g.members.is_empty() {
                continue;
            }
            let start = g.next.fetch_add(1, Ordering::Relaxed);
            let n = g.members.len();
            let pick = (0..n).map(|k| &g.members[(start + k) % n]).find(|e| e.sink.online());
            if let Some(e) = pick.or_else(|| g.members.get(start % n)) {
                out.push(e.clone());
            }
        }
    }

    fn matches(&self, levels: &[&str], depth: usize, dollar: bool, out: &mut Vec<Entry>) {
        let wild_ok = !(depth == 0 && dollar);
        if wild_ok {
            if let Some(h) = self.children.get("#") {
                h.collect(out);
            }
        }
        let Some(level) = levels.get(depth) else {
            self.collect(out);
            return;
        };
        if let Some(c) = self.children.get(*level) {
            c.matches(levels, depth + 1, dollar, out);
        }
        if wild_ok {
            if let Some(p) = self.children.get("+") {
                p.matches(levels, depth + 1, dollar, out);
            }
        }
    }

    /// Removes `id` from the filter at `levels`; prunes empty nodes.
    fn remove(&mut self, levels: &[&str], group: Option<&str>, id: &SubscriberId) -> bool {
        match levels.split_first() {
            None => match group {
                None => {
                    let before = self.subs.len();
                    self.subs.retain(|e| &e.id != id);
                    before != self.subs.len()
                }
                Some(g) => {
                    let Some(gi) = self.shared.iter().position(|s| s.name == g) else { return false };
                    let members = &mut self.shared[gi].members;
                    let before = members.len();
                    members.retain(|e| &e.id != id);
                    let removed = before != members.len();
                    if members.is_empty() {
                        self.shared.remove(gi);
                    }
                    removed
                }
            },
            Some((first, rest)) => {
                let Some(child) = self.children.get_mut(*first) else { return false };
                let removed = child.remove(rest, group, id);
                if child.is_empty() {
                    self.children.remove(*first);
                }
                removed
            }
        }
    }
}

/// The index of all subscriptions.
#[derive(Debug, Default)]
pub(crate) struct Router {
    root: Node,
    count: usize,
}

fn split_filter<'a>(f: &SubscriptionFilter<'a>) -> (Option<&'a str>, &'a str) {
    match f {
        SubscriptionFilter::Plain(p) => (None, p),
        SubscriptionFilter::Shared(s) => (Some(s.group), s.filter),
    }
}

impl Router {
    /// Adds or replaces `entry` on `filter`. Returns true if it replaced an
    /// existing subscription of the same subscriber.
    pub fn insert(&mut self, filter: &SubscriptionFilter<'_>, entry: Entry) -> bool {
        let (group, f) = split_filter(filter);
        let mut node = &mut self.root;
        for level in f.split('/') {
            node = node.children.entry(level.to_owned()).or_default();
        }
        let list = match group {
            None => &mut node.subs,
            Some(g) => {
                let gi = match node.shared.iter().position(|s| s.name == g) {
                    Some(i) => i,
                    None => {
                        node.shared.push(SharedGroup {
                            name: g.to_owned(),
                            members: Vec::new(),
                            next: AtomicUsize::new(0),
                        });
                        node.shared.len() - 1
                    }
                };
                &mut node.shared[gi].members
            }
        };
        if let Some(existing) = list.iter_mut().find(|e| e.id == entry.id) {
            *existing = entry;
            true
        } else {
            list.push(entry);
            self.count += 1;
            false
        }
    }

    /// Removes a subscription; true if it existed.
    pub fn remove(&mut self, filter: &SubscriptionFilter<'_>, id: &SubscriberId) -> bool {
        let (group, f) = split_filter(filter);
        let levels: Vec<&str> = f.split('/').collect();
        let removed = self.root.remove(&levels, group, id);
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Every subscription matching `topic` (one member per shared group).
    pub fn matches(&self, topic: &str, out: &mut Vec<Entry>) {
        let levels: Vec<&str> = topic.split('/').collect();
        self.root.matches(&levels, 0, topic.starts_with('$'), out);
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Drops everything (at shutdown: closes local subscriptions).
    pub fn clear(&mut self) {
        self.root = Node::default();
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::QoS;
    use crate::topic::parse_subscription_filter;

    fn entry(n: u64) -> Entry {
        let (tx, _rx) = mpsc::channel(1);
        Entry {
            id: SubscriberId::Local(n),
            sink: Sink::Local(tx),
            options: SubscriptionOptions::qos(QoS::AtMostOnce),
            sub_id: None,
        }
    }

    fn ids(r: &Router, topic: &str) -> Vec<u64> {
        let mut out = Vec::new();
        r.matches(topic, &mut out);
        let mut v: Vec<u64> = out
            .iter()
            .map(|e| match e.id {
                SubscriberId::Local(n) => n,
                SubscriberId::Client(_) => 0,
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn trie_matches_like_the_reference() {
        let mut r = Router::default();
        let filters = ["a/b", "a/+", "a/#", "#", "+/b", "$SYS/#", "a/b/c", "+"];
        for (i, f) in filters.iter().enumerate() {
            r.insert(&parse_subscription_filter(f).expect("valid"), entry(i as u64 + 1));
        }
        for topic in ["a/b", "a", "a/b/c", "$SYS/x", "x/b", "/b", "a/"] {
            let want: Vec<u64> = filters
                .iter()
                .enumerate()
                .filter(|(_, f)| crate::topic::filter_matches(f, topic))
                .map(|(i, _)| i as u64 + 1)
                .collect();
            assert_eq!(ids(&r, topic), want, "topic {topic}");
        }
        assert!(r.remove(&parse_subscription_filter("a/#").expect("valid"), &SubscriberId::Local(3)));
        assert_eq!(ids(&r, "a/b/c"), vec![4, 7]);
        assert_eq!(r.len(), 7);
    }

    #[test]
    fn shared_group_takes_turns() {
        let mut r = Router::default();
        let f = parse_subscription_filter("$share/g/t/#").expect("valid");
        r.insert(&f, entry(1));
        r.insert(&f, entry(2));
        let picks: Vec<u64> = (0..4).flat_map(|_| ids(&r, "t/x")).collect();
        assert_eq!(picks, vec![1, 2, 1, 2]);
    }
}
