//! Message ids: the [`IdGenerator`] trait, the default ULID-style [`UlidGenerator`], and a
//! deterministic [`SequentialGenerator`] for tests.
//!
//! An id is a `u128`. ULID-style ids put the millisecond time in the top 48 bits, so ids sort by
//! creation time; within one millisecond the lower 80 bits, which start at a random value, increase
//! by one per id, so ids from one generator are strictly increasing. [`format_id`] and
//! [`parse_id`] convert to and from the 26-character Crockford base-32 text form.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// Makes unique message ids. Implement it to plug in your own scheme (snowflake, UUIDv7 …).
pub trait IdGenerator: Send + Sync + fmt::Debug {
    /// A new id, never returned before by this generator.
    fn next_id(&self) -> u128;

    /// A new id for a message made at `now_ns` (nanoseconds since the Unix epoch), for
    /// generators that put the time in the id: the caller has read the clock already.
    fn next_id_at(&self, now_ns: u64) -> u128 {
        let _ = now_ns;
        self.next_id()
    }
}

/// Nanoseconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

const RANDOM_BITS: u32 = 80;
const RANDOM_MASK: u128 = (1 << RANDOM_BITS) - 1;

/// The default generator: monotonic, time-sortable ULID-style ids.
#[derive(Debug)]
pub struct UlidGenerator {
    state: Mutex<UlidState>,
}

#[derive(Debug)]
struct UlidState {
    last: u128,
    rng: u64,
}

impl Default for UlidGenerator {
    fn default() -> Self {
        Self::new()
    }
}

impl UlidGenerator {
    /// A generator seeded from the process's random hasher keys.
    pub fn new() -> Self {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(now_ns());
        Self { state: Mutex::new(UlidState { last: 0, rng: h.finish() | 1 }) }
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl IdGenerator for UlidGenerator {
    fn next_id(&self) -> u128 {
        self.next_id_at(now_ns())
    }

    fn next_id_at(&self, now_ns: u64) -> u128 {
        let ms = u128::from(now_ns / 1_000_000) & ((1 << 48) - 1);
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let id = if ms > s.last >> RANDOM_BITS {
            // A new millisecond: a random start, with the top random bit clear so that a burst of
            // increments cannot overflow into the time bits.
            let random = (u128::from(splitmix(&mut s.rng)) << 16 | u128::from(splitmix(&mut s.rng) >> 48))
                & (RANDOM_MASK >> 1);
            ms << RANDOM_BITS | random
        } else {
            // Same millisecond (or the clock went back): keep increasing.
            s.last + 1
        };
        s.last = id;
        id
    }
}

/// 1, 2, 3 …: deterministic ids for tests and reproducible runs.
#[derive(Debug, Default)]
pub struct SequentialGenerator(AtomicU64);

impl SequentialGenerator {
    /// Starts at 1.
    pub fn new() -> Self {
        Self::default()
    }
}

impl IdGenerator for SequentialGenerator {
    fn next_id(&self) -> u128 {
        u128::from(self.0.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// The 26-character Crockford base-32 form of an id (the ULID text form).
pub fn format_id(id: u128) -> String {
    (0..26).rev().map(|i| CROCKFORD[((id >> (i * 5)) & 31) as usize] as char).collect()
}

/// Parses the form [`format_id`] writes (case-insensitive; `I`/`L` read as 1, `O` as 0).
pub fn parse_id(text: &str) -> Option<u128> {
    if text.len() != 26 || text.as_bytes()[0] > b'7' {
        return None;
    }
    text.bytes().try_fold(0u128, |acc, c| {
        let digit = match c.to_ascii_uppercase() {
            b'O' => 0,
            b'I' | b'L' => 1,
            c => CROCKFORD.iter().position(|&d| d == c)? as u128,
        };
        Some(acc << 5 | digit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulids_increase_and_carry_the_time() {
        let g = UlidGenerator::new();
        let before = now_ns() / 1_000_000;
        let ids: Vec<u128> = (0..10_000).map(|_| g.next_id()).collect();
        let after = now_ns() / 1_000_000;
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
        let ms = (ids[0] >> 80) as u64;
        assert!(before <= ms && ms <= after);
    }

    #[test]
    fn text_form_round_trips() {
        let g = UlidGenerator::new();
        for id in [0, 1, u128::MAX, g.next_id()] {
            let text = format_id(id);
            assert_eq!(text.len(), 26);
            assert_eq!(parse_id(&text), Some(id));
            assert_eq!(parse_id(&text.to_lowercase()), Some(id));
        }
        assert_eq!(parse_id("8ZZZZZZZZZZZZZZZZZZZZZZZZZ"), None, "overflows 128 bits");
        assert_eq!(parse_id("short"), None);
        assert_eq!(parse_id("0000000000000000000000000U"), None, "U is not a digit");
    }

    #[test]
    fn sequential_is_deterministic() {
        let g = SequentialGenerator::new();
        assert_eq!((g.next_id(), g.next_id()), (1, 2));
    }
}
