//! The heartbeat rule both ends of a connection keep, as a clock-free state machine.
//!
//! A connection quiet for one interval is pinged, and pinged again after each further quiet
//! interval, up to `max_missed` pings; quiet for one interval more after that (no answer to any
//! of them), it is dead. So a peer is dead after `interval × (max_missed + 1)` of silence, and
//! even with `max_missed = 1` it has a whole interval to answer its ping. (nats-server's
//! `ping_interval` and `ping_max` work the same way.)
//!
//! The caller owns the clock: it says when something arrived ([`Heartbeat::heard`]) and asks,
//! with the time since then, what to do ([`Heartbeat::check`]).

use std::time::Duration;

/// What a check decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Nothing to do.
    Quiet,
    /// Send a PING.
    Ping,
    /// Quiet for too long: close the connection.
    Dead,
}

/// One connection's heartbeat state.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    interval: Duration,
    max_missed: u32,
    dead_after: Duration,
    /// Pings sent since the peer was last heard.
    pings: u32,
}

impl Heartbeat {
    /// `interval` zero means no heartbeats (every check is [`Beat::Quiet`]); `max_missed` is at
    /// least 1.
    pub fn new(interval: Duration, max_missed: u32) -> Self {
        let max_missed = max_missed.max(1);
        let dead_after = interval.checked_mul(max_missed.saturating_add(1)).unwrap_or(Duration::MAX);
        Self { interval, max_missed, dead_after, pings: 0 }
    }

    /// The interval (zero: heartbeats are off).
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How long a silent peer lives: `interval × (max_missed + 1)`.
    pub fn dead_after(&self) -> Duration {
        self.dead_after
    }

    /// Something arrived from the peer: the count of unanswered pings starts again.
    pub fn heard(&mut self) {
        self.pings = 0;
    }

    /// The PING [`Heartbeat::check`] asked for could not be sent (the outbound queue was full):
    /// it does not count as missed, and the next check asks again.
    pub fn ping_not_sent(&mut self) {
        self.pings = self.pings.saturating_sub(1);
    }

    /// What to do after `idle` of silence (the time since the peer was last heard).
    pub fn check(&mut self, idle: Duration) -> Beat {
        if self.interval.is_zero() {
            return Beat::Quiet;
        }
        if idle >= self.dead_after {
            return Beat::Dead;
        }
        let due = self.interval.checked_mul(self.pings + 1).unwrap_or(Duration::MAX);
        if self.pings < self.max_missed && idle >= due {
            self.pings += 1;
            return Beat::Ping;
        }
        Beat::Quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn one_missed_still_leaves_an_interval_to_answer_the_ping() {
        let mut h = Heartbeat::new(S * 10, 1);
        assert_eq!(h.check(S * 9), Beat::Quiet);
        assert_eq!(h.check(S * 10), Beat::Ping, "pinged after one quiet interval");
        assert_eq!(h.check(S * 15), Beat::Quiet, "once");
        assert_eq!(h.check(S * 20), Beat::Dead, "dead after the interval that followed");
        // Answered in time: a fresh start.
        h.heard();
        assert_eq!(h.check(S * 10), Beat::Ping);
        // A ping that could not go out is asked for again.
        h.ping_not_sent();
        assert_eq!(h.check(S * 11), Beat::Ping);
    }

    #[test]
    fn a_ping_per_quiet_interval_up_to_max_missed() {
        let mut h = Heartbeat::new(S, 2);
        let beats: Vec<Beat> = (0..=12).map(|quarter| h.check(S * quarter / 4)).collect();
        let pings = beats.iter().filter(|b| **b == Beat::Ping).count();
        assert_eq!(pings, 2);
        assert_eq!(beats[4], Beat::Ping);
        assert_eq!(beats[8], Beat::Ping);
        assert_eq!(beats[11], Beat::Quiet);
        assert_eq!(beats[12], Beat::Dead);
        assert_eq!(h.dead_after(), S * 3);
    }

    #[test]
    fn off_and_huge_intervals_never_overflow() {
        let mut off = Heartbeat::new(Duration::ZERO, 2);
        assert_eq!(off.check(Duration::MAX), Beat::Quiet);
        let mut huge = Heartbeat::new(Duration::MAX, u32::MAX);
        assert_eq!(huge.dead_after(), Duration::MAX);
        assert_eq!(huge.check(S), Beat::Quiet);
        let mut zero_missed = Heartbeat::new(S, 0);
        assert_eq!(zero_missed.check(S), Beat::Ping, "0 counts as 1");
        assert_eq!(zero_missed.check(S * 2), Beat::Dead);
    }
}
