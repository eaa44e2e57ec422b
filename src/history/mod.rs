//! Event history: where each recorded event is kept, how long, and what a replay sends.
//!
//! Pure rules, shared by both stores: the in-memory one of a node alone ([`memory`]) and
//! the Redis one of a cluster (in the Redis bus, which records an event in the same
//! script that publishes it).
//!
//! Every recorded event gets an id from one increasing sequence per deployment and is kept
//! in one stream: its channel group's, the everyone-stream (`users` group, `all_users`),
//! or the user-stream that all user-targeted and individual events share (so a publish to
//! 1,000 users is one append). A stream forgets events by count, by age and, in memory,
//! by total size; it remembers the highest id it forgot (`lost_through`). A replay after
//! cursor N is complete only if no stream of the socket forgot an id above N.
//!
//! A fresh store (a node start, an emptied Redis) begins its ids just above the clock's
//! microseconds and counts everything below as forgotten, so ids keep increasing across
//! a lost store, and a cursor from before the loss can never pass for complete.

pub mod lanes;
pub mod memory;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;

use crate::event::{Event, Payload, Target};

/// The store did not answer; the replay is retried or the client refreshes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "event history unavailable: {}", self.0)
    }
}

/// Where replays read the history. Recording is the bus's: it happens in the same step
/// as publishing.
pub trait Store: Send + Sync + 'static {
    /// The given streams above `after`, read at one instant, and the highest id issued.
    fn read(
        &self,
        keys: Vec<StreamKey>,
        after: u64,
    ) -> BoxFuture<'_, Result<Snapshot, Unavailable>>;

    /// The highest id issued so far. A fresh store starts its sequence here and answers
    /// the id it starts above, never 0, so that a first connect's cursor is one of its own.
    fn latest(&self) -> BoxFuture<'_, Result<u64, Unavailable>>;

    /// Bytes kept in this process, for `/metrics`; 0 where the memory is Redis's.
    fn local_bytes(&self) -> u64 {
        0
    }
}

/// Where an event is kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamKey {
    /// Events of one channel group.
    Group(Arc<str>),
    /// Events for every connection (the `users` group and `all_users`).
    Everyone,
    /// Events for listed users, and individual payloads: one stream for all users.
    Users,
}

impl StreamKey {
    /// The stream an event is kept in.
    pub fn of(event: &Event) -> StreamKey {
        match &event.target {
            Target::Group { group, .. } => StreamKey::Group(group.as_str().into()),
            Target::Everyone { .. } => StreamKey::Everyone,
            Target::Users { .. } | Target::Individual { .. } => StreamKey::Users,
        }
    }

    /// The streams a socket replays: those of its groups, its user's, everyone's.
    pub fn of_socket(groups: impl IntoIterator<Item = Arc<str>>) -> Vec<StreamKey> {
        let mut keys: Vec<StreamKey> = groups.into_iter().map(StreamKey::Group).collect();
        keys.sort();
        keys.dedup();
        keys.extend([StreamKey::Everyone, StreamKey::Users]);
        keys
    }

    /// A name unique among streams, for store keys: `g:<group>`, `everyone`, `users`.
    pub fn name(&self) -> String {
        match self {
            StreamKey::Group(group) => format!("g:{group}"),
            StreamKey::Everyone => "everyone".into(),
            StreamKey::Users => "users".into(),
        }
    }
}

/// How much history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Events kept per group stream and in the everyone-stream.
    pub events_per_stream: usize,
    /// Events kept in the user-stream, which all users share (on a Redis Cluster, in each
    /// lane's user-stream).
    pub user_events: usize,
    /// Events older than this are forgotten.
    pub max_age: Duration,
    /// Bytes the in-memory store may hold; the oldest events go first beyond it.
    pub max_bytes: usize,
}

impl Retention {
    /// Events a stream keeps.
    pub fn events_in(&self, key: &StreamKey) -> usize {
        match key {
            StreamKey::Users => self.user_events,
            _ => self.events_per_stream,
        }
    }
}

impl Default for Retention {
    /// At least what Baserow keeps (200 events a request, a day): 1,000 events per
    /// stream, 10,000 in the shared user-stream, 24 hours, 256 MiB in memory.
    fn default() -> Self {
        Retention {
            events_per_stream: 1000,
            user_events: 10_000,
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: 256 << 20,
        }
    }
}

/// Everything about history a node is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistorySettings {
    pub retention: Retention,
    /// Events one replay sends at most (Baserow: 200); more force a refresh.
    pub replay_limit: usize,
    /// Replays a node serves at once; more are told to retry (or refresh).
    pub replay_concurrency: usize,
    /// How long a replay waits for the store before it is told to retry (or refresh).
    pub timeout: Duration,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            retention: Retention::default(),
            replay_limit: 200,
            replay_concurrency: 64,
            timeout: Duration::from_secs(2),
        }
    }
}

/// The first id of a fresh store, less one: the clock in microseconds. Everything below
/// it counts as forgotten.
pub fn fresh_floor() -> u64 {
    // Microseconds stay below 2^53, so ids stay exact as JavaScript numbers until 2255.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

/// One stream as a replay reads it.
#[derive(Debug, Clone, Default)]
pub struct StreamRead {
    /// The highest id this stream forgot (by count, age, size, or a lost store).
    pub lost_through: u64,
    /// Its events with an id above the cursor, in id order.
    pub events: Vec<Arc<Event>>,
}

/// What a store holds for one replay, read at one instant.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The highest id issued so far (0: none yet).
    pub latest: u64,
    pub streams: Vec<StreamRead>,
}

/// Where a client says it stands (`last_seen_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// `-1`, and anything that is not a usable id: a first connect, which wants only the
    /// current highest id.
    FirstConnect,
    /// `-2`: the client lost its place and will refresh.
    Lost,
    /// The highest id the client has seen.
    After(u64),
}

impl Cursor {
    /// A missing, non-integer or below -2 `last_seen_id` counts as -1.
    pub fn from_last_seen(last_seen_id: Option<i64>) -> Cursor {
        match last_seen_id {
            Some(-2) => Cursor::Lost,
            Some(id) if id >= 0 => Cursor::After(id as u64),
            _ => Cursor::FirstConnect,
        }
    }
}

/// Why a replay asked the client to refresh instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshReason {
    /// The client sent `last_seen_id: -2`.
    LostCursor,
    /// A stream of the socket forgot events above the cursor (by count, age or size).
    Trimmed,
    /// The cursor is above every id ever issued (a store that was lost, say).
    FutureCursor,
    /// More events than one replay may send.
    OverLimit,
    /// Too many replays at once, or the store did not answer in time, and the client
    /// cannot retry.
    Overloaded,
    /// The connection got too many events live before asking, so a replay could not
    /// tell new from seen.
    TooLate,
}

impl RefreshReason {
    pub const ALL: [RefreshReason; 6] = [
        RefreshReason::LostCursor,
        RefreshReason::Trimmed,
        RefreshReason::FutureCursor,
        RefreshReason::OverLimit,
        RefreshReason::Overloaded,
        RefreshReason::TooLate,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshReason::LostCursor => "lost_cursor",
            RefreshReason::Trimmed => "trimmed",
            RefreshReason::FutureCursor => "future_cursor",
            RefreshReason::OverLimit => "over_limit",
            RefreshReason::Overloaded => "overloaded",
            RefreshReason::TooLate => "too_late",
        }
    }
}

/// What a replay sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// These events (id and this socket's payload, in id order), then a result with
    /// `force_refresh: false` and `latest_event_id`.
    Replay {
        events: Vec<(u64, Payload)>,
        latest_event_id: u64,
    },
    /// Nothing replayed; `force_refresh: true`.
    Refresh {
        reason: RefreshReason,
        latest_event_id: i64,
    },
}

/// The socket a replay is for.
#[derive(Debug, Clone, Copy)]
pub struct Socket<'a> {
    pub web_socket_id: &'a str,
    pub user_id: i64,
}

/// `latest_event_id` of a refresh that cannot name a usable id.
pub const NO_REPLAY_AVAILABLE: i64 = -2;

/// Decides a replay after `after` from what the store held: every event of the socket's
/// streams above the cursor that this socket would have received, in id order, unless
/// the history cannot be complete or there are more than `limit`.
pub fn plan(after: u64, snapshot: &Snapshot, socket: Socket<'_>, limit: usize) -> Outcome {
    let refresh = |reason| Outcome::Refresh {
        reason,
        latest_event_id: NO_REPLAY_AVAILABLE,
    };
    if after > snapshot.latest {
        return refresh(RefreshReason::FutureCursor);
    }
    if snapshot.streams.iter().any(|s| s.lost_through > after) {
        return refresh(RefreshReason::Trimmed);
    }
    let mut events: Vec<(u64, Payload)> = snapshot
        .streams
        .iter()
        .flat_map(|stream| &stream.events)
        .filter(|event| event.id > after)
        .filter_map(|event| {
            let payload = event.payload_for(socket.web_socket_id, socket.user_id)?;
            Some((event.id, payload.clone()))
        })
        .collect();
    if events.len() > limit {
        return refresh(RefreshReason::OverLimit);
    }
    events.sort_unstable_by_key(|(id, _)| *id);
    events.dedup_by_key(|(id, _)| *id);
    let latest_event_id = events.last().map_or(after, |(id, _)| *id);
    Outcome::Replay {
        events,
        latest_event_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group_event(id: u64, group: &str, ignore: Option<&str>, exclude: Vec<i64>) -> Arc<Event> {
        Arc::new(Event {
            target: Target::Group {
                group: group.into(),
                exclude_user_ids: exclude,
                payload: format!(r#"{{"type":"e","n":{id}}}"#).into(),
            },
            ignore_web_socket_id: ignore.map(String::from),
            record: true,
            id,
            idempotency_key: None,
            lost: false,
        })
    }

    fn snapshot(latest: u64, streams: Vec<StreamRead>) -> Snapshot {
        Snapshot { latest, streams }
    }

    const SOCKET: Socket<'static> = Socket {
        web_socket_id: "me",
        user_id: 1,
    };

    fn ids(outcome: &Outcome) -> Vec<u64> {
        match outcome {
            Outcome::Replay { events, .. } => events.iter().map(|(id, _)| *id).collect(),
            Outcome::Refresh { reason, .. } => panic!("refresh: {reason:?}"),
        }
    }

    #[test]
    fn a_replay_merges_streams_in_id_order_and_skips_what_the_socket_would_not_get() {
        let a = StreamRead {
            lost_through: 2,
            events: vec![
                group_event(11, "a", None, vec![]),
                group_event(14, "a", Some("me"), vec![]),
            ],
        };
        let b = StreamRead {
            lost_through: 0,
            events: vec![
                group_event(12, "b", None, vec![1]),
                group_event(13, "b", None, vec![2]),
            ],
        };
        let outcome = plan(10, &snapshot(20, vec![a, b]), SOCKET, 200);
        assert_eq!(ids(&outcome), [11, 13]);
        let Outcome::Replay {
            latest_event_id, ..
        } = outcome
        else {
            unreachable!()
        };
        assert_eq!(latest_event_id, 13);
    }

    #[test]
    fn nothing_to_replay_answers_the_cursor_itself() {
        let outcome = plan(10, &snapshot(12, vec![StreamRead::default()]), SOCKET, 200);
        assert_eq!(
            outcome,
            Outcome::Replay {
                events: vec![],
                latest_event_id: 10
            }
        );
    }

    #[test]
    fn incomplete_history_forces_a_refresh() {
        let reason = |outcome: Outcome| match outcome {
            Outcome::Refresh {
                reason,
                latest_event_id,
            } => {
                assert_eq!(latest_event_id, NO_REPLAY_AVAILABLE);
                reason
            }
            other => panic!("replayed {other:?}"),
        };
        let trimmed = StreamRead {
            lost_through: 11,
            events: vec![],
        };
        assert_eq!(
            reason(plan(10, &snapshot(20, vec![trimmed.clone()]), SOCKET, 200)),
            RefreshReason::Trimmed
        );
        assert_eq!(
            ids(&plan(11, &snapshot(20, vec![trimmed]), SOCKET, 200)),
            Vec::<u64>::new()
        );
        assert_eq!(
            reason(plan(21, &snapshot(20, vec![]), SOCKET, 200)),
            RefreshReason::FutureCursor
        );
        let many = StreamRead {
            lost_through: 0,
            events: (11..=13)
                .map(|id| group_event(id, "a", None, vec![]))
                .collect(),
        };
        assert_eq!(
            reason(plan(10, &snapshot(20, vec![many.clone()]), SOCKET, 2)),
            RefreshReason::OverLimit
        );
        assert_eq!(
            ids(&plan(10, &snapshot(20, vec![many]), SOCKET, 3)).len(),
            3
        );
    }

    #[test]
    fn cursors_follow_baserow() {
        assert_eq!(Cursor::from_last_seen(Some(-1)), Cursor::FirstConnect);
        assert_eq!(Cursor::from_last_seen(Some(-2)), Cursor::Lost);
        assert_eq!(Cursor::from_last_seen(Some(-3)), Cursor::FirstConnect);
        assert_eq!(Cursor::from_last_seen(None), Cursor::FirstConnect);
        assert_eq!(Cursor::from_last_seen(Some(0)), Cursor::After(0));
    }

    #[test]
    fn a_socket_replays_each_group_once_and_the_shared_streams() {
        let keys = StreamKey::of_socket(["b".into(), "a".into(), "b".into()]);
        assert_eq!(
            keys,
            [
                StreamKey::Group("a".into()),
                StreamKey::Group("b".into()),
                StreamKey::Everyone,
                StreamKey::Users
            ]
        );
    }
}
