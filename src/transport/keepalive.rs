//! Keeping a socket alive: the server pings each client every interval and ends a
//! connection whose client sent nothing for two.
//!
//! Pings go out on a node-wide grid, and a due ping rides in the write of the socket's next
//! frame: a ping shares its timer wake-up with the other sockets of its slot and, on a
//! socket that gets events, its system call with an event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::outbox::Outbox;
use crate::protocol::CloseReason;

/// When the client was last heard from, for the pinger.
pub(super) struct Heard {
    since: Instant,
    /// Milliseconds after `since`.
    last_ms: AtomicU64,
}

impl Heard {
    pub(super) fn new() -> Heard {
        Heard {
            since: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// The client was heard from just now.
    pub(super) fn now(&self) {
        let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last)
    }
}

/// Pings the client every `every`, on the slot of the node's grid (from `grid`) that its
/// connection's id picks; one that sent nothing for two intervals (no pong, no frame) is
/// dead or half-open, and its connection ends. A ping goes with the first frame the socket
/// gets within a grace of an eighth of the interval, alone after it.
pub(super) async fn keep_alive(
    outbox: &Outbox,
    heard: &Heard,
    grid: tokio::time::Instant,
    every: Duration,
    conn_id: u64,
) -> CloseReason {
    let slots = PingSlots::of(every);
    let grace = slots.grace();
    loop {
        // The next of this socket's slots: a worker held up past one skips it.
        let due = slots.next_ping(grid, tokio::time::Instant::now(), conn_id);
        tokio::time::sleep_until(due).await;
        if heard.silent_for() > every * 2 {
            return CloseReason::Unresponsive;
        }
        outbox.owe_ping();
        tokio::time::sleep_until(due + grace).await;
        outbox.pay_ping();
    }
}

/// The slots of a ping interval. A node pings only on the slots of one grid, so the sockets
/// of a slot are served by one turn of the timer: at 10,000 sockets and 20 s, a few
/// wake-ups a second rather than the 500 of pings each at its own millisecond, which wake a
/// worker that would otherwise sleep between events.
struct PingSlots {
    count: u32,
    each: Duration,
}

impl PingSlots {
    /// 80 slots an interval (250 ms at 20 s), fewer for an interval under 80 ms: a slot is
    /// at least a millisecond, the timer's resolution.
    fn of(every: Duration) -> PingSlots {
        let count = u32::try_from(every.as_millis().clamp(1, 80)).unwrap_or(80);
        PingSlots {
            count,
            each: every / count,
        }
    }

    /// How long a due ping waits for a frame to go with: an eighth of the interval, in
    /// whole slots, so that it is sent alone on the grid too.
    fn grace(&self) -> Duration {
        self.each * (self.count / 8).max(1)
    }

    /// When a connection's next ping goes: the first slot after `now` of those its id
    /// picks, so within one interval. The sockets of a connect storm (a deploy, a network
    /// blip) would otherwise ping, and read their pongs, all in the same instant of every
    /// interval: a burst of work that shows as a latency spike for every event published
    /// then.
    fn next_ping(
        &self,
        grid: tokio::time::Instant,
        now: tokio::time::Instant,
        conn_id: u64,
    ) -> tokio::time::Instant {
        let count = u64::from(self.count);
        // Fibonacci hashing: consecutive ids land far apart among the slots.
        let mine = ((conn_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) * count) >> 32;
        let slot_ns = u64::try_from(self.each.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let since =
            u64::try_from(now.saturating_duration_since(grid).as_nanos()).unwrap_or(u64::MAX);
        // The first slot boundary after now, then on to this connection's slot.
        let next = since / slot_ns + 1;
        let ahead = (mine + count - next % count) % count;
        grid + Duration::from_nanos((next + ahead).saturating_mul(slot_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const EVERY: Duration = Duration::from_secs(20);

    #[test]
    fn a_first_ping_comes_within_one_interval_on_a_slot_of_the_grid() {
        let grid = tokio::time::Instant::now();
        let slots = PingSlots::of(EVERY);
        let slot = slots.each;
        assert_eq!(slot, Duration::from_millis(250));
        for (conn_id, joined_ms) in [
            (1, 0),
            (2, 3),
            (3, 249),
            (4, 250),
            (5, 77_777),
            (6, 3_600_001),
        ] {
            let now = grid + Duration::from_millis(joined_ms);
            let first = slots.next_ping(grid, now, conn_id);
            assert!(
                first > now && first <= now + EVERY,
                "{conn_id}: {:?}",
                first - now
            );
            assert_eq!(
                (first - grid).as_nanos() % slot.as_nanos(),
                0,
                "{conn_id} is off the grid"
            );
        }
    }

    #[test]
    fn ten_thousand_sockets_ping_at_eighty_instants_an_interval_spread_over_all_of_it() {
        let grid = tokio::time::Instant::now();
        let now = grid + Duration::from_millis(1234);
        let slots = PingSlots::of(EVERY);
        let firsts: Vec<_> = (0..10_000u64)
            .map(|conn_id| slots.next_ping(grid, now, conn_id))
            .collect();
        let instants: HashSet<_> = firsts.iter().collect();
        assert_eq!(instants.len(), 80);
        // Spread evenly: no slot holds more than twice its share.
        let busiest = instants
            .iter()
            .map(|at| firsts.iter().filter(|first| first == at).count())
            .max();
        assert!(busiest <= Some(2 * 10_000 / 80), "{busiest:?}");
        // Sockets that connect one after another land far apart, not in neighbouring slots.
        let gap = firsts[1].max(firsts[0]) - firsts[1].min(firsts[0]);
        assert!(gap > EVERY / 8, "{gap:?}");
    }

    #[test]
    fn the_grid_keeps_the_interval_asked_for() {
        for ms in [1, 40, 79, 80, 200, 1_234, 20_000] {
            let every = Duration::from_millis(ms);
            let slots = PingSlots::of(every);
            assert!(slots.each >= Duration::from_millis(1), "{ms}");
            assert!(
                slots.grace() >= slots.each && slots.grace() <= every / 8 + slots.each,
                "{ms}"
            );
            let grid = tokio::time::Instant::now();
            let first = slots.next_ping(grid, grid, 7);
            assert!(first > grid && first <= grid + every, "{ms}");
            // The ping after it: one interval on, rounded down to whole slots.
            let period = slots.next_ping(grid, first, 7) - first;
            assert!(period <= every, "{ms}");
            assert!(every - period < Duration::from_micros(1), "{ms}");
        }
    }
}
