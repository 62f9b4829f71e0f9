//! The subscription trie: which subscriptions match a topic.
//!
//! Each node stands for one token position. A node has literal children keyed by token, at most one
//! `*` child, the values of patterns that end exactly here, and the values of patterns that end with
//! `>` here. Matching a topic of `k` tokens visits at most the nodes on the paths that can still
//! match, so its cost grows with `k` and with the number of *matching* subscriptions, never with the
//! number of subscriptions to other topics.
//!
//! Patterns without wildcards skip the tree: they sit in one hash map keyed by the whole pattern,
//! so the common case, an exact topic, costs one lookup.

use std::collections::HashMap;

/// Token → child. foldhash, seeded per map, is several times faster than SipHash on short
/// tokens and still randomised, so clients cannot choose topics that collide.
type Children<V> = HashMap<Box<str>, Node<V>, foldhash::fast::RandomState>;

/// A set of `(pattern, value)` pairs that can be searched by topic.
///
/// Patterns must have passed [`crate::validate_pattern`]; the trie does not check them again
/// (removal recurses once per token: [`crate::topic::MAX_TOKENS`] bounds the depth). One
/// pattern may hold many values, and the same value may be stored under several patterns.
#[derive(Debug, Clone)]
pub struct SubscriptionTrie<V> {
    /// Patterns without wildcards, by their full text: one hash lookup per topic (the fast path).
    exact: HashMap<Box<str>, Vec<V>, foldhash::fast::RandomState>,
    /// Patterns with `*` or `>`, token by token.
    root: Node<V>,
    len: usize,
}

#[derive(Debug, Clone)]
struct Node<V> {
    literal: Children<V>,
    star: Option<Box<Node<V>>>,
    /// Patterns that end at this node.
    here: Vec<V>,
    /// Patterns that end with `>` right after this node.
    rest: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self { literal: Children::default(), star: None, here: Vec::new(), rest: Vec::new() }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.star.is_none() && self.here.is_empty() && self.rest.is_empty()
    }
}

impl<V> Default for SubscriptionTrie<V> {
    fn default() -> Self {
        Self { exact: HashMap::default(), root: Node::default(), len: 0 }
    }
}

impl<V: PartialEq> SubscriptionTrie<V> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many `(pattern, value)` pairs are stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `value` under `pattern`.
    pub fn insert(&mut self, pattern: &str, value: V) {
        if !crate::topic::is_wildcard(pattern) {
            self.exact.entry(pattern.into()).or_default().push(value);
            self.len += 1;
            return;
        }
        let mut node = &mut self.root;
        let mut tokens = pattern.split('.').peekable();
        while let Some(token) = tokens.next() {
            if token == ">" && tokens.peek().is_none() {
                node.rest.push(value);
                self.len += 1;
                return;
            }
            node = if token == "*" {
                node.star.get_or_insert_with(Box::default)
            } else {
                node.literal.entry(token.into()).or_default()
            };
        }
        node.here.push(value);
        self.len += 1;
    }

    /// Removes one `value` stored under `pattern`, pruning nodes left empty. Returns it if found.
    pub fn remove(&mut self, pattern: &str, value: &V) -> Option<V> {
        if !crate::topic::is_wildcard(pattern) {
            let list = self.exact.get_mut(pattern)?;
            let removed = list.swap_remove(list.iter().position(|v| v == value)?);
            if list.is_empty() {
                self.exact.remove(pattern);
            }
            self.len -= 1;
            return Some(removed);
        }
        let tokens: Vec<&str> = pattern.split('.').collect();
        let removed = Self::remove_in(&mut self.root, &tokens, value);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    fn remove_in(node: &mut Node<V>, tokens: &[&str], value: &V) -> Option<V> {
        let take = |list: &mut Vec<V>| list.iter().position(|v| v == value).map(|i| list.swap_remove(i));
        match tokens {
            [] => take(&mut node.here),
            [">"] => take(&mut node.rest),
            ["*", tail @ ..] => {
                let child = node.star.as_deref_mut()?;
                let removed = Self::remove_in(child, tail, value);
                if child.is_empty() {
                    node.star = None;
                }
                removed
            }
            [token, tail @ ..] => {
                let child = node.literal.get_mut(*token)?;
                let removed = Self::remove_in(child, tail, value);
                if child.is_empty() {
                    node.literal.remove(*token);
                }
                removed
            }
        }
    }

    /// Calls `f` on every value whose pattern matches `topic` (a valid topic, without wildcards).
    ///
    /// A value stored under several matching patterns is visited once per pattern.
    pub fn for_each_match<'a>(&'a self, topic: &str, mut f: impl FnMut(&'a V)) {
        if let Some(values) = self.exact.get(topic) {
            values.iter().for_each(&mut f);
        }
        if !self.root.is_empty() {
            Self::visit(&self.root, topic.split('.'), &mut f);
        }
    }

    /// Every value whose pattern matches `topic`, in no particular order.
    pub fn matches(&self, topic: &str) -> Vec<&V> {
        let mut out = Vec::new();
        self.for_each_match(topic, |v| out.push(v));
        out
    }

    fn visit<'a>(node: &'a Node<V>, mut tokens: std::str::Split<'_, char>, f: &mut impl FnMut(&'a V)) {
        match tokens.next() {
            None => node.here.iter().for_each(&mut *f),
            Some(token) => {
                node.rest.iter().for_each(&mut *f);
                if let Some(star) = &node.star {
                    Self::visit(star, tokens.clone(), f);
                }
                if let Some(child) = node.literal.get(token) {
                    Self::visit(child, tokens, f);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(trie: &SubscriptionTrie<u32>, topic: &str) -> Vec<u32> {
        let mut v: Vec<u32> = trie.matches(topic).into_iter().copied().collect();
        v.sort();
        v
    }

    #[test]
    fn literal_star_and_rest() {
        let mut t = SubscriptionTrie::new();
        t.insert("event.email.new", 1);
        t.insert("event.*.new", 2);
        t.insert("event.>", 3);
        t.insert(">", 4);
        t.insert("event", 5);
        t.insert("*.*", 6);
        assert_eq!(t.len(), 6);
        assert_eq!(sorted(&t, "event.email.new"), vec![1, 2, 3, 4]);
        assert_eq!(sorted(&t, "event.sms.new"), vec![2, 3, 4]);
        assert_eq!(sorted(&t, "event"), vec![4, 5]);
        assert_eq!(sorted(&t, "event.x"), vec![3, 4, 6]);
        assert_eq!(sorted(&t, "other"), vec![4]);
    }

    #[test]
    fn same_value_under_overlapping_patterns_is_visited_per_pattern() {
        let mut t = SubscriptionTrie::new();
        t.insert("a.*", 7);
        t.insert("a.>", 7);
        assert_eq!(sorted(&t, "a.b"), vec![7, 7]);
    }

    #[test]
    fn remove_prunes() {
        let mut t = SubscriptionTrie::new();
        t.insert("a.b.c", 1);
        t.insert("a.*.c", 2);
        t.insert("a.>", 3);
        assert_eq!(t.remove("a.b.c", &1), Some(1));
        assert_eq!(t.remove("a.b.c", &1), None);
        assert_eq!(t.remove("a.*.c", &9), None);
        assert_eq!(t.remove("a.*.c", &2), Some(2));
        assert_eq!(t.remove("a.>", &3), Some(3));
        assert!(t.is_empty());
        assert!(t.root.is_empty(), "all nodes pruned: {:?}", t.root);
        assert!(t.exact.is_empty());
    }
}
