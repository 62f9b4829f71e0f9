//! Choosing one member of a group: random, round-robin, or consistent hashing of a key.
//!
//! Shared by the broker's router and the in-process bus so that a group behaves the same in both.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::GroupPolicy;

/// Per-group state for [`Balancer::pick`]: a lock-free random stream.
#[derive(Debug, Default)]
pub struct Balancer {
    rng: AtomicU64,
}

/// A member's place in round-robin: a stamp of when it was last chosen (0: never). Each member
/// keeps its own, so that members that match different topics (or patterns) take turns fairly
/// whatever mix of topics is published.
#[derive(Debug, Default)]
pub struct Turn(AtomicU64);

impl Balancer {
    /// A balancer whose random stream starts at `seed`.
    pub fn with_seed(seed: u64) -> Self {
        Self { rng: AtomicU64::new(seed) }
    }

    /// Picks one of `n` members (`n > 0`), listed in a stable order. `member(i)` is a stable
    /// identity of member `i`, used by the hash policy; `turn(i)` its round-robin place.
    ///
    /// - Round-robin takes the member chosen longest ago (the first listed on a tie), so each
    ///   member matching a topic gets its turn even when other topics, matched by other members
    ///   of the group, are published in between.
    /// - Hash takes the member that wins the key by rendezvous hashing; a message without a key
    ///   has no affinity to keep and goes round-robin.
    pub fn pick<'a>(
        &self,
        policy: GroupPolicy,
        key: Option<u64>,
        n: usize,
        member: impl Fn(usize) -> u64,
        turn: impl Fn(usize) -> &'a Turn,
    ) -> usize {
        debug_assert!(n > 0);
        match (policy, key) {
            (GroupPolicy::Hash, Some(key)) => rendezvous(key, n, member),
            (GroupPolicy::Random, _) => {
                let r = mix(self.rng.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed));
                // Lemire's multiply-shift: unbiased enough for load spreading, no division.
                ((u128::from(r) * n as u128) >> 64) as usize
            }
            (GroupPolicy::RoundRobin | GroupPolicy::Hash, _) => Self::least_recent(n, turn),
        }
    }

    /// The member chosen longest ago (the lowest stamp), stamped one above the highest stamp
    /// among the candidates. Stamps only grow, so they compare across the sets of candidates of
    /// different topics, with no clock shared by every publisher. Two publishers picking at once
    /// cannot both take the same turn: the stamp is swapped in only if no one moved it since.
    fn least_recent<'a>(n: usize, turn: impl Fn(usize) -> &'a Turn) -> usize {
        loop {
            let (mut oldest, mut low, mut high) = (0, u64::MAX, 0u64);
            for i in 0..n {
                let last = turn(i).0.load(Ordering::Relaxed);
                if last < low {
                    (oldest, low) = (i, last);
                }
                high = high.max(last);
            }
            let next = high.saturating_add(1);
            if turn(oldest).0.compare_exchange(low, next, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                return oldest;
            }
        }
    }
}

/// Rendezvous (highest random weight) hashing: each member scores `mix(key, member)`, the
/// highest wins. Adding a member moves only the keys it now wins, about 1/(n+1) of them; removing
/// one moves only the keys it had.
pub fn rendezvous(key: u64, n: usize, member: impl Fn(usize) -> u64) -> usize {
    (0..n).max_by_key(|&i| mix(key ^ mix(member(i)))).unwrap_or(0)
}

/// splitmix64's finaliser: a fixed, well-spread 64-bit mix, the same on every machine and run.
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_and_random_spread() {
        let b = Balancer::with_seed(7);
        let turns: [Turn; 3] = Default::default();
        let mut rr = [0; 3];
        let mut rand = [0; 3];
        for _ in 0..3000 {
            rr[b.pick(GroupPolicy::RoundRobin, None, 3, |i| i as u64, |i| &turns[i])] += 1;
            rand[b.pick(GroupPolicy::Random, None, 3, |i| i as u64, |i| &turns[i])] += 1;
        }
        assert_eq!(rr, [1000; 3]);
        assert!(rand.iter().all(|&c| (900..=1100).contains(&c)), "{rand:?}");
    }

    #[test]
    fn round_robin_is_fair_per_topic_when_topics_interleave() {
        // One group, members 0 and 1 match topic a, members 2 and 3 topic b, member 4 both.
        let b = Balancer::default();
        let turns: [Turn; 5] = Default::default();
        let (on_a, on_b) = ([0, 1, 4], [2, 3, 4]);
        let mut got = [0; 5];
        for _ in 0..300 {
            got[on_a[b.pick(GroupPolicy::RoundRobin, None, 3, |i| i as u64, |i| &turns[on_a[i]])]] += 1;
            got[on_b[b.pick(GroupPolicy::RoundRobin, None, 3, |i| i as u64, |i| &turns[on_b[i]])]] += 1;
        }
        // 600 messages: members 0-3 take turns with member 4, which both topics share.
        assert_eq!(got.iter().sum::<i32>(), 600);
        assert!(got.iter().all(|&c| (100..=200).contains(&c)), "{got:?}");
        // A shared counter modulo the candidates would have starved members 1 and 2.
        assert!(got[1] > 0 && got[2] > 0);
    }

    #[test]
    fn hash_without_a_key_spreads_and_with_one_sticks() {
        let b = Balancer::default();
        let turns: [Turn; 4] = Default::default();
        let mut keyless = [0; 4];
        for _ in 0..400 {
            keyless[b.pick(GroupPolicy::Hash, None, 4, |i| i as u64, |i| &turns[i])] += 1;
        }
        assert_eq!(keyless, [100; 4]);
        let first = b.pick(GroupPolicy::Hash, Some(42), 4, |i| i as u64, |i| &turns[i]);
        assert!(
            (0..50).all(|_| b.pick(GroupPolicy::Hash, Some(42), 4, |i| i as u64, |i| &turns[i]) == first)
        );
    }

    #[test]
    fn hashing_moves_only_keys_won_by_a_new_member() {
        let ids = [11u64, 22, 33, 44];
        let before: Vec<usize> = (0..10_000).map(|k| rendezvous(k, 3, |i| ids[i])).collect();
        let after: Vec<usize> = (0..10_000).map(|k| rendezvous(k, 4, |i| ids[i])).collect();
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert!(before.iter().zip(&after).all(|(b, a)| b == a || *a == 3));
        assert!((2000..3000).contains(&moved), "{moved} of 10000 moved, ~2500 expected");
    }
}
