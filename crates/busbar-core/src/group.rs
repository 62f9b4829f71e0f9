//! Choosing one member of a group: random, round-robin, or consistent hashing of a key.
//!
//! Shared by the broker's router and the in-process bus so that a group behaves the same in both.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::GroupPolicy;

/// Per-group state for [`Balancer::pick`]: a round-robin position and a lock-free random stream.
#[derive(Debug, Default)]
pub struct Balancer {
    next: AtomicU64,
    rng: AtomicU64,
}

impl Balancer {
    /// A balancer whose random stream starts at `seed`.
    pub fn with_seed(seed: u64) -> Self {
        Self { next: AtomicU64::new(0), rng: AtomicU64::new(seed) }
    }

    /// Picks one of `n` members (`n > 0`). `member(i)` is a stable identity of member `i`, used by
    /// the hash policy; members must be listed in a stable order for round-robin to be fair.
    pub fn pick(
        &self,
        policy: GroupPolicy,
        key: Option<u64>,
        n: usize,
        member: impl Fn(usize) -> u64,
    ) -> usize {
        debug_assert!(n > 0);
        match policy {
            GroupPolicy::RoundRobin => (self.next.fetch_add(1, Ordering::Relaxed) % n as u64) as usize,
            GroupPolicy::Random => {
                let r = mix(self.rng.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed));
                // Lemire's multiply-shift: unbiased enough for load spreading, no division.
                ((u128::from(r) * n as u128) >> 64) as usize
            }
            GroupPolicy::Hash => rendezvous(key.unwrap_or(0), n, member),
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
        let mut rr = [0; 3];
        let mut rand = [0; 3];
        for _ in 0..3000 {
            rr[b.pick(GroupPolicy::RoundRobin, None, 3, |i| i as u64)] += 1;
            rand[b.pick(GroupPolicy::Random, None, 3, |i| i as u64)] += 1;
        }
        assert_eq!(rr, [1000; 3]);
        assert!(rand.iter().all(|&c| (900..=1100).contains(&c)), "{rand:?}");
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
