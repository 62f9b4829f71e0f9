//! Topics and subscription patterns.
//!
//! A **topic** names what a message is about: dot-separated tokens such as `event.email.new`.
//! A **pattern** is what a subscriber listens to: a topic whose tokens may also be
//! `*` (exactly one token) or, as the last token only, `>` (one or more remaining tokens).
//!
//! | pattern        | matches                          | does not match          |
//! |----------------|----------------------------------|-------------------------|
//! | `event.email`  | `event.email`                    | `event.email.new`       |
//! | `event.*`      | `event.email`                    | `event`, `event.a.b`    |
//! | `event.>`      | `event.email`, `event.email.new` | `event`                 |
//! | `*.email.>`    | `x.email.new`                    | `email.new`             |
//!
//! Rules, checked by [`validate_topic`] and [`validate_pattern`]:
//! - not empty, at most [`MAX_TOPIC_LEN`] bytes and [`MAX_TOKENS`] tokens;
//! - no empty token (`a..b`, `.a`, `a.` are refused);
//! - no whitespace or control characters anywhere;
//! - `*` and `>` are wildcards only as a whole token and only in patterns; elsewhere they are refused,
//!   so a topic can never be mistaken for a pattern.

use thiserror::Error;

/// The longest topic or pattern accepted, in bytes.
pub const MAX_TOPIC_LEN: usize = 1024;
/// The most tokens a topic or pattern may have.
pub const MAX_TOKENS: usize = 64;

/// Why a topic or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicError {
    /// The topic is the empty string.
    #[error("topic is empty")]
    Empty,
    /// The topic is longer than [`MAX_TOPIC_LEN`] bytes.
    #[error("topic is {len} bytes long, the limit is {max}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The topic has more than [`MAX_TOKENS`] tokens.
    #[error("topic has more than {max} tokens")]
    TooManyTokens {
        /// The limit.
        max: usize,
    },
    /// Two dots in a row, or a leading or trailing dot.
    #[error("token {index} is empty (leading, trailing or double dot)")]
    EmptyToken {
        /// Zero-based index of the empty token.
        index: usize,
    },
    /// Whitespace or a control character.
    #[error("character {ch:?} at byte {at} is not allowed in a topic")]
    InvalidChar {
        /// The offending character.
        ch: char,
        /// Its byte offset.
        at: usize,
    },
    /// A wildcard in a topic that is published to.
    #[error("wildcard token {index} is not allowed in a publish topic")]
    WildcardInTopic {
        /// Zero-based index of the token.
        index: usize,
    },
    /// `*` or `>` inside a longer token, like `a*` or `>b`.
    #[error("token {index} mixes a wildcard with other characters")]
    PartialWildcard {
        /// Zero-based index of the token.
        index: usize,
    },
    /// `>` that is not the last token.
    #[error("`>` must be the last token (found at token {index})")]
    FullWildcardNotLast {
        /// Zero-based index of the token.
        index: usize,
    },
}

/// Checks a topic that a message is published to: no wildcards allowed.
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    if plain_ascii_topic(topic) { Ok(()) } else { validate(topic, false) }
}

/// The last topic that passed [`validate_topic`], remembered so that a run of messages to one
/// topic is checked once: a byte comparison instead of the check (which costs about 9
/// instructions a byte). Kept as a copy of at most [`TopicMemo::CAPACITY`] bytes, so that it
/// keeps no buffer alive; a longer topic is checked every time.
#[derive(Debug, Clone)]
pub struct TopicMemo {
    last: [u8; TopicMemo::CAPACITY],
    /// 0: nothing remembered (an empty topic is never valid).
    len: u8,
}

impl TopicMemo {
    /// The longest topic remembered.
    pub const CAPACITY: usize = 64;

    /// Remembers nothing yet.
    pub const fn new() -> Self {
        Self { last: [0; Self::CAPACITY], len: 0 }
    }

    /// [`validate_topic`], answered from memory when `topic` is the last one that passed.
    #[inline]
    pub fn validate(&mut self, topic: &str) -> Result<(), TopicError> {
        let bytes = topic.as_bytes();
        if self.len != 0 && bytes.len() == usize::from(self.len) && bytes == &self.last[..bytes.len()] {
            return Ok(());
        }
        self.check_and_remember(topic)
    }

    // Apart, so that `validate` stays small enough to inline.
    #[inline(never)]
    fn check_and_remember(&mut self, topic: &str) -> Result<(), TopicError> {
        let bytes = topic.as_bytes();
        validate_topic(topic)?;
        if bytes.len() <= Self::CAPACITY {
            self.last[..bytes.len()].copy_from_slice(bytes);
            self.len = bytes.len() as u8;
        }
        Ok(())
    }
}

impl Default for TopicMemo {
    fn default() -> Self {
        Self::new()
    }
}

/// The common case in one pass over the bytes: an ASCII topic of non-empty tokens without
/// wildcards, spaces or control characters. False sends it to the full check (which also names
/// what is wrong); whatever this accepts, that accepts too.
fn plain_ascii_topic(s: &str) -> bool {
    let bytes = s.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_TOPIC_LEN {
        return false;
    }
    let mut tokens = 1;
    let mut after_dot = true;
    for &b in bytes {
        match b {
            b'.' if after_dot => return false,
            b'.' => {
                after_dot = true;
                tokens += 1;
            }
            0..=0x20 | 0x7f..=0xff | b'*' | b'>' => return false,
            _ => after_dot = false,
        }
    }
    !after_dot && tokens <= MAX_TOKENS
}

/// Checks a subscription pattern: `*` and a trailing `>` allowed.
pub fn validate_pattern(pattern: &str) -> Result<(), TopicError> {
    validate(pattern, true)
}

/// True when `pattern` contains a wildcard token (so it cannot match exactly one topic).
pub fn is_wildcard(pattern: &str) -> bool {
    pattern.split('.').any(|t| t == "*" || t == ">")
}

fn validate(s: &str, allow_wildcards: bool) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong { len: s.len(), max: MAX_TOPIC_LEN });
    }
    if let Some((at, ch)) = s.char_indices().find(|(_, c)| c.is_whitespace() || c.is_control()) {
        return Err(TopicError::InvalidChar { ch, at });
    }
    let count = s.split('.').count();
    if count > MAX_TOKENS {
        return Err(TopicError::TooManyTokens { max: MAX_TOKENS });
    }
    for (index, token) in s.split('.').enumerate() {
        match token {
            "" => return Err(TopicError::EmptyToken { index }),
            "*" | ">" if !allow_wildcards => return Err(TopicError::WildcardInTopic { index }),
            ">" if index + 1 != count => return Err(TopicError::FullWildcardNotLast { index }),
            "*" | ">" => {}
            t if t.contains(['*', '>']) => return Err(TopicError::PartialWildcard { index }),
            _ => {}
        }
    }
    Ok(())
}

/// The reference matcher: does `pattern` match `topic`? Both are assumed valid.
///
/// Linear in the length of the two strings. The broker uses [`crate::SubscriptionTrie`] instead, whose
/// cost does not grow with the number of subscriptions; property tests check that both agree.
pub fn matches(pattern: &str, topic: &str) -> bool {
    let mut p = pattern.split('.');
    let mut t = topic.split('.');
    loop {
        match (p.next(), t.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Does every topic matched by pattern `inner` also match pattern `outer`? (`orders.>` covers
/// `orders.*.new`; `orders.*` does not cover `orders.>`.) Both are assumed valid.
pub fn covers(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('.');
    let mut i = inner.split('.');
    loop {
        match (o.next(), i.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b && a != "*" && a != ">" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Is there a topic that both patterns match? Both are assumed valid.
pub fn intersects(a: &str, b: &str) -> bool {
    let mut x = a.split('.');
    let mut y = b.split('.');
    loop {
        match (x.next(), y.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        /// The one-pass check and the full one agree on every string over an alphabet with
        /// every kind of character the rules care about.
        #[test]
        fn the_fast_topic_check_agrees_with_the_full_one(s in "[a.*> \t\x7fé1_-]{0,12}") {
            prop_assert_eq!(validate_topic(&s).is_ok(), validate(&s, false).is_ok(), "{:?}", s);
            if plain_ascii_topic(&s) {
                prop_assert!(validate(&s, false).is_ok());
            }
        }
    }

    use super::*;

    #[test]
    fn the_memo_remembers_only_what_passed_the_check() {
        let mut memo = TopicMemo::new();
        assert!(memo.validate("").is_err(), "nothing remembered is not the empty topic");
        assert!(memo.validate("orders.eu").is_ok());
        assert!(memo.validate("orders.eu").is_ok(), "the remembered topic");
        for bad in ["orders.*", "orders..eu", "", "orders.eu ", "orders.", "orders.eu.>"] {
            assert_eq!(memo.validate(bad), validate_topic(bad), "{bad:?}");
            assert!(memo.validate(bad).is_err(), "{bad:?} twice");
        }
        assert!(memo.validate("orders.eu").is_ok());
        // Longer than the copy holds: checked every time, still right.
        let long = format!("{}.x", "t".repeat(100));
        assert!(memo.validate(&long).is_ok() && memo.validate(&long).is_ok());
        assert!(memo.validate(&format!("{}.>", "t".repeat(100))).is_err());
        // A prefix, and the longest topic it holds.
        assert!(memo.validate("orders.eu").is_ok());
        assert!(memo.validate("orders.e").is_ok());
        let edge = "e".repeat(TopicMemo::CAPACITY);
        assert!(memo.validate(&edge).is_ok() && memo.validate(&edge).is_ok());
        assert!(memo.validate(&edge[..63]).is_ok());
    }

    #[test]
    fn valid_topics() {
        for t in ["a", "event.email.new", "a-b_c.d:e", "ünï.cödé", "x.1.2.3"] {
            assert_eq!(validate_topic(t), Ok(()), "{t}");
        }
    }

    #[test]
    fn invalid_topics() {
        assert_eq!(validate_topic(""), Err(TopicError::Empty));
        assert_eq!(validate_topic("a..b"), Err(TopicError::EmptyToken { index: 1 }));
        assert_eq!(validate_topic(".a"), Err(TopicError::EmptyToken { index: 0 }));
        assert_eq!(validate_topic("a."), Err(TopicError::EmptyToken { index: 1 }));
        assert_eq!(validate_topic("a b"), Err(TopicError::InvalidChar { ch: ' ', at: 1 }));
        assert_eq!(validate_topic("a\tb"), Err(TopicError::InvalidChar { ch: '\t', at: 1 }));
        assert_eq!(validate_topic("a.*"), Err(TopicError::WildcardInTopic { index: 1 }));
        assert_eq!(validate_topic("a.>"), Err(TopicError::WildcardInTopic { index: 1 }));
        assert_eq!(validate_topic("a.b*"), Err(TopicError::PartialWildcard { index: 1 }));
        let long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(
            validate_topic(&long),
            Err(TopicError::TooLong { len: MAX_TOPIC_LEN + 1, max: MAX_TOPIC_LEN })
        );
        let many = vec!["a"; MAX_TOKENS + 1].join(".");
        assert_eq!(validate_topic(&many), Err(TopicError::TooManyTokens { max: MAX_TOKENS }));
    }

    #[test]
    fn patterns() {
        for p in ["a.*", "a.>", ">", "*", "*.b.>", "*.*"] {
            assert_eq!(validate_pattern(p), Ok(()), "{p}");
        }
        assert_eq!(validate_pattern("a.>.b"), Err(TopicError::FullWildcardNotLast { index: 1 }));
        assert_eq!(validate_pattern("a.*x"), Err(TopicError::PartialWildcard { index: 1 }));
        assert_eq!(validate_pattern("a..*"), Err(TopicError::EmptyToken { index: 1 }));
    }

    #[test]
    fn coverage_and_intersection() {
        assert!(covers("orders.>", "orders.*.new"));
        assert!(covers("orders.>", "orders.a"));
        assert!(covers("orders.*", "orders.a"));
        assert!(!covers("orders.*", "orders.>"));
        assert!(!covers("orders.a", "orders.*"));
        assert!(!covers("orders.>", "orders"));
        assert!(covers(">", "anything.at.all"));
        assert!(intersects(">", "billing.x"));
        assert!(intersects("billing.*", "*.x"));
        assert!(!intersects("billing.*", "orders.*"));
        assert!(!intersects("a.b", "a.b.c"));
        assert!(intersects("a.>", "a.b.c"));
    }

    #[test]
    fn reference_matcher() {
        let cases = [
            ("event.email", "event.email", true),
            ("event.email", "event.email.new", false),
            ("event.*", "event.email", true),
            ("event.*", "event", false),
            ("event.*", "event.a.b", false),
            ("event.>", "event.email", true),
            ("event.>", "event.email.new", true),
            ("event.>", "event", false),
            ("*.email.>", "x.email.new", true),
            ("*.email.>", "email.new", false),
            (">", "a", true),
            (">", "a.b.c", true),
            ("*", "a", true),
            ("*", "a.b", false),
        ];
        for (p, t, want) in cases {
            assert_eq!(matches(p, t), want, "{p} ~ {t}");
        }
    }
}
