//! Event ids on a Redis Cluster, without one counter key every publish would go through.
//!
//! The history is split in [`LANES`] lanes. A stream lives in one lane (a group's by the
//! hash of its name, the everyone-stream in a fixed one, user events in their first
//! user's), and a lane's keys and channels share one Redis Cluster slot, so one script on
//! that slot gives an id, stores the event and publishes it. Lanes spread over the shards
//! as their slots do.
//!
//! An id is `t * LANES + lane`: `t` is a hybrid logical clock kept per lane, the Redis
//! clock in [`TICK_MICROS`] steps since [`EPOCH_MICROS`], or one more than the lane's last
//! `t`, or one more than the highest `t` the publishing node has seen, whichever is
//! highest. So ids are unique (the lane is in them), increase in each lane, and follow
//! what a node saw before it published; and they stay below 2^53, exact in JavaScript,
//! until 2061.
//!
//! Ids of different lanes are made on different shards, so a node receives them out of
//! order. It holds each event in a [`Reorder`] until every lane has shown that it will
//! never give a smaller id (by an event, or a tick: a script that moves a lane's clock to
//! at least a given `t` and says so on the lane's channel), then delivers in id order. A
//! socket thus gets its events in id order whatever shards they come from, and its last
//! id is a cursor that a replay on any node continues exactly.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use crate::event::{Event, Target};
use crate::history::StreamKey;

/// How many lanes the ids are made in: as many slots carry group traffic.
pub const LANES: u64 = 32;
/// The step of a lane's clock: a lane gives 250,000 ids a second before its clock runs
/// ahead of the Redis clock.
pub const TICK_MICROS: u64 = 4;
/// Where the clock starts: 2026-01-01T00:00:00Z.
pub const EPOCH_MICROS: u64 = 1_767_225_600_000_000;

/// An id's clock and lane.
pub fn split(id: u64) -> (u64, usize) {
    (id / LANES, (id % LANES) as usize)
}

/// The last position with clock `t`, the one of the highest lane: everything a lane
/// makes at `t` or before lies at or below it. Saturating: `t` comes from Redis.
pub fn through_clock(t: u64) -> u64 {
    t.saturating_add(1).saturating_mul(LANES) - 1
}

/// The lane of a name: FNV-1a, so every node and version agrees.
fn lane_of_name(name: &[u8]) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % LANES) as usize
}

/// The lane of a channel group's events.
pub fn lane_of_group(group: &str) -> usize {
    lane_of_name(group.as_bytes())
}

/// The lanes a stream is kept in: a group's in its lane, the everyone-stream in lane 0,
/// and the users' stream in every lane (each user's events in their lane, see
/// [`lane_of_event`]).
pub fn lanes_of_stream(key: &StreamKey) -> Range<usize> {
    match key {
        StreamKey::Group(group) => {
            let lane = lane_of_group(group);
            lane..lane + 1
        }
        StreamKey::Everyone => 0..1,
        StreamKey::Users => 0..LANES as usize,
    }
}

/// The lane an event is made in. User-targeted events go to their first user's lane, so
/// that user events spread over the shards and one user's events keep their order.
pub fn lane_of_event(event: &Event) -> usize {
    let first_user = match &event.target {
        Target::Group { group, .. } => return lane_of_group(group),
        Target::Everyone { .. } => return 0,
        Target::Users { user_ids, .. } => user_ids.first().copied(),
        Target::Individual { payloads } => payloads.first().map(|(user, _)| *user),
    };
    lane_of_name(first_user.unwrap_or(0).to_string().as_bytes())
}

/// Holds a node's events until no lane can still give a smaller id, then hands them out in
/// id order. Pure: the cluster bus feeds it what arrives and what the ticks say.
#[derive(Debug, Default)]
pub struct Reorder {
    /// Per lane, the highest `t` it has shown: it will give no id with this `t` or below.
    shown: [u64; LANES as usize],
    /// Events waiting, by their position (the id, or for an event that is not recorded,
    /// the position its lane gave it).
    held: BTreeMap<u64, Arc<Event>>,
    /// Everything at or below this position was handed out or will never exist.
    released_through: u64,
    /// While the node catches up after a lost subscription, nothing is handed out: events
    /// missed live are still being read from the history.
    frozen: bool,
}

impl Reorder {
    /// A lane said it will give no id at or below `t`.
    pub fn shown(&mut self, lane: usize, t: u64) {
        if let Some(shown) = self.shown.get_mut(lane) {
            *shown = (*shown).max(t);
        }
    }

    /// An event arrived at `position`; it also shows its lane's clock. `false`: handed out
    /// already (a duplicate, from the history and live), so it was dropped.
    pub fn hold(&mut self, position: u64, event: Arc<Event>) -> bool {
        let (t, lane) = split(position);
        self.shown(lane, t);
        if position <= self.released_through {
            return false;
        }
        self.held.insert(position, event).is_none()
    }

    /// The position below which every lane has shown its clock: all ids at or below it
    /// have been made.
    pub fn bound(&self) -> u64 {
        let t = self.shown.iter().copied().min().unwrap_or(0);
        through_clock(t)
    }

    /// The events that can go now, in id order.
    pub fn release(&mut self) -> Vec<Arc<Event>> {
        if self.frozen {
            return Vec::new();
        }
        let bound = self.bound();
        let later = self.held.split_off(&(bound + 1));
        let ready = std::mem::replace(&mut self.held, later);
        self.released_through = self.released_through.max(bound);
        ready.into_values().collect()
    }

    /// Every position at or below this one was handed out (or never existed).
    pub fn released_through(&self) -> u64 {
        self.released_through
    }

    /// Starts handing out after `position`, without delivering what is older (a node's
    /// first connection, or a history that was lost).
    pub fn start_after(&mut self, position: u64) {
        self.released_through = self.released_through.max(position);
        self.held = self.held.split_off(&(self.released_through + 1));
    }

    /// The smallest `t` a tick must show to let the oldest held event go; `None` when
    /// nothing waits (or the node is catching up).
    pub fn wanted(&self) -> Option<u64> {
        let (&first, _) = self.held.first_key_value()?;
        (!self.frozen && first > self.bound()).then(|| split(first).0)
    }

    /// The highest `t` any lane has shown: what ticks and publishes pass on as the clock
    /// this node has seen.
    pub fn seen(&self) -> u64 {
        self.shown.iter().copied().max().unwrap_or(0)
    }

    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    pub fn thaw(&mut self) {
        self.frozen = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64) -> Arc<Event> {
        Arc::new(Event {
            target: Target::Everyone {
                exclude_user_ids: vec![],
                payload: format!(r#"{{"n":{n}}}"#).into(),
            },
            ignore_web_socket_id: None,
            record: true,
            id: n,
            idempotency_key: None,
            lost: false,
        })
    }

    fn id(t: u64, lane: usize) -> u64 {
        t * LANES + lane as u64
    }

    fn ids(events: Vec<Arc<Event>>) -> Vec<u64> {
        events.iter().map(|e| e.id).collect()
    }

    fn all_lanes_show(reorder: &mut Reorder, t: u64) {
        for lane in 0..LANES as usize {
            reorder.shown(lane, t);
        }
    }

    #[test]
    fn events_wait_until_every_lane_has_passed_them_then_go_in_id_order() {
        let mut reorder = Reorder::default();
        all_lanes_show(&mut reorder, 9);
        // Lane 3 is ahead of lane 1: its event arrives first but must wait.
        assert!(reorder.hold(id(12, 3), event(id(12, 3))));
        assert!(reorder.hold(id(11, 1), event(id(11, 1))));
        assert_eq!(reorder.wanted(), Some(11));
        assert!(
            reorder.release().is_empty(),
            "lanes without news may still give t=10"
        );
        all_lanes_show(&mut reorder, 11);
        assert_eq!(ids(reorder.release()), [id(11, 1)]);
        assert_eq!(reorder.wanted(), Some(12));
        all_lanes_show(&mut reorder, 12);
        assert_eq!(ids(reorder.release()), [id(12, 3)]);
        assert_eq!(reorder.wanted(), None);
        assert_eq!(reorder.released_through(), id(12, LANES as usize - 1));
    }

    #[test]
    fn the_same_clock_in_two_lanes_goes_by_lane() {
        let mut reorder = Reorder::default();
        reorder.hold(id(5, 7), event(id(5, 7)));
        reorder.hold(id(5, 2), event(id(5, 2)));
        all_lanes_show(&mut reorder, 5);
        assert_eq!(ids(reorder.release()), [id(5, 2), id(5, 7)]);
    }

    #[test]
    fn an_event_from_the_history_and_live_goes_once() {
        let mut reorder = Reorder::default();
        assert!(reorder.hold(id(3, 0), event(id(3, 0))));
        assert!(!reorder.hold(id(3, 0), event(id(3, 0))), "held already");
        all_lanes_show(&mut reorder, 3);
        assert_eq!(reorder.release().len(), 1);
        assert!(
            !reorder.hold(id(3, 0), event(id(3, 0))),
            "handed out already"
        );
        assert!(reorder.release().is_empty());
    }

    #[test]
    fn nothing_goes_while_frozen_and_a_start_skips_the_past() {
        let mut reorder = Reorder::default();
        reorder.hold(id(4, 0), event(id(4, 0)));
        reorder.freeze();
        all_lanes_show(&mut reorder, 8);
        assert!(reorder.release().is_empty());
        assert_eq!(reorder.wanted(), None);
        reorder.thaw();
        reorder.start_after(id(4, 0));
        reorder.hold(id(6, 1), event(id(6, 1)));
        assert_eq!(ids(reorder.release()), [id(6, 1)]);
    }

    #[test]
    fn a_clock_covers_every_lane_and_a_huge_one_from_redis_does_not_overflow() {
        assert_eq!(through_clock(3), id(3, LANES as usize - 1));
        assert_eq!(split(through_clock(3)), (3, LANES as usize - 1));
        assert_eq!(through_clock(u64::MAX), u64::MAX - 1);
    }

    #[test]
    fn lanes_are_stable_and_spread() {
        let group = StreamKey::Group("table-1".into());
        let lane = lane_of_group("table-1");
        assert_eq!(lanes_of_stream(&group), lane..lane + 1);
        assert_eq!(lanes_of_stream(&StreamKey::Users), 0..LANES as usize);
        let used: std::collections::HashSet<usize> = (0..1000)
            .map(|n| lane_of_group(&format!("table-{n}")))
            .collect();
        assert_eq!(used.len(), LANES as usize, "1,000 groups use every lane");
        assert!(split(id(u64::MAX / LANES, 0)).0 == u64::MAX / LANES);
    }
}
