//! The history of a node alone, in memory: bounded per stream, by age and by bytes.
//!
//! One lock covers giving an id, keeping the event and delivering it, so a group's live
//! order is its id order and no replay sees id N+1 kept while N is not.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use futures_util::future::BoxFuture;

use super::{Retention, Snapshot, Store, StreamKey, StreamRead, Unavailable, fresh_floor};
use crate::event::{Event, Target};

/// What one kept event costs besides its payloads and group name: the `Arc`, the entry,
/// its place in the age order.
const ENTRY_OVERHEAD_BYTES: usize = 160;

struct Kept {
    at: Instant,
    bytes: usize,
    event: Arc<Event>,
}

#[derive(Default)]
struct Stream {
    events: VecDeque<Kept>,
    lost_through: u64,
}

impl Stream {
    fn first_id(&self) -> Option<u64> {
        self.events.front().map(|kept| kept.event.id)
    }
}

#[derive(Default)]
struct State {
    streams: HashMap<StreamKey, Stream>,
    /// Every kept event's (id, stream) in id order, oldest first, so age and size limits
    /// forget the oldest first. Entries of events a stream already dropped by count are
    /// skipped when met, and swept out once they are half the queue.
    order: VecDeque<(u64, StreamKey)>,
    kept: usize,
    bytes: usize,
    latest: u64,
    /// The highest id forgotten along with its whole stream (and, from the start, every
    /// id below the first): stands in for the `lost_through` of a stream that is gone.
    forgotten: u64,
}

impl State {
    /// A fresh store starts its ids at the clock and counts everything below as lost.
    fn start(&mut self) {
        if self.latest == 0 {
            self.latest = fresh_floor();
            self.forgotten = self.latest;
        }
    }

    fn is_kept(&self, id: u64, key: &StreamKey) -> bool {
        self.streams
            .get(key)
            .and_then(Stream::first_id)
            .is_some_and(|first| first <= id)
    }

    /// Drops the oldest event of the stream at the front of `order`.
    fn forget_oldest(&mut self) {
        let Some((id, key)) = self.order.pop_front() else {
            return;
        };
        if !self.is_kept(id, &key) {
            return;
        }
        let Some(stream) = self.streams.get_mut(&key) else {
            return;
        };
        if let Some(kept) = stream.events.pop_front() {
            stream.lost_through = kept.event.id;
            self.kept -= 1;
            self.bytes -= kept.bytes;
        }
        if stream.events.is_empty() {
            self.forgotten = self.forgotten.max(stream.lost_through);
            self.streams.remove(&key);
        }
    }

    fn oldest_at(&mut self) -> Option<Instant> {
        while let Some((id, key)) = self.order.front() {
            if self.is_kept(*id, key) {
                return self.streams.get(key)?.events.front().map(|kept| kept.at);
            }
            self.order.pop_front();
        }
        None
    }

    /// Applies the age and size limits.
    fn expire(&mut self, retention: &Retention, now: Instant) {
        while !self.order.is_empty()
            && (self.bytes > retention.max_bytes
                || self
                    .oldest_at()
                    .is_some_and(|at| now.duration_since(at) > retention.max_age))
        {
            self.forget_oldest();
        }
        if self.order.len() > 2 * self.kept + 64 {
            let order = std::mem::take(&mut self.order);
            self.order = order
                .into_iter()
                .filter(|(id, key)| self.is_kept(*id, key))
                .collect();
        }
    }
}

/// The in-memory history.
pub struct MemoryHistory {
    retention: Retention,
    state: Mutex<State>,
    /// `State::bytes` as of the last change, readable without the lock (for `/metrics`).
    bytes: AtomicUsize,
}

fn bytes_of(event: &Event) -> usize {
    let payloads = match &event.target {
        Target::Group {
            group,
            payload,
            exclude_user_ids,
        } => group.len() + payload.len() + 8 * exclude_user_ids.len(),
        Target::Everyone {
            payload,
            exclude_user_ids,
        } => payload.len() + 8 * exclude_user_ids.len(),
        Target::Users { user_ids, payload } => payload.len() + 8 * user_ids.len(),
        Target::Individual { payloads } => payloads.iter().map(|(_, p)| 8 + p.len()).sum(),
    };
    ENTRY_OVERHEAD_BYTES + payloads + event.ignore_web_socket_id.as_ref().map_or(0, String::len)
}

impl MemoryHistory {
    pub fn new(retention: Retention) -> Self {
        MemoryHistory {
            retention,
            state: Mutex::default(),
            bytes: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every statement leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives the event the next id, keeps it and hands it to `deliver`, in one step. A lost
    /// mark is not kept: its stream counts as lost through its id.
    pub fn record<R>(&self, mut event: Event, deliver: impl FnOnce(&Event) -> R) -> (u64, R) {
        let now = Instant::now();
        let mut state = self.lock();
        state.start();
        state.latest += 1;
        event.id = state.latest;
        let delivered = deliver(&event);
        let key = StreamKey::of(&event);
        let bytes = bytes_of(&event);
        let keep = self.retention.events_in(&key);
        let state = &mut *state;
        let stream = state.streams.entry(key.clone()).or_insert_with(|| Stream {
            events: VecDeque::new(),
            // A stream that is new, or was forgotten whole, may have lost what it had.
            lost_through: state.forgotten,
        });
        if event.lost {
            // A mark of events lost before they got here: a replay across it refreshes.
            stream.lost_through = state.latest;
            return (state.latest, delivered);
        }
        stream.events.push_back(Kept {
            at: now,
            bytes,
            event: Arc::new(event),
        });
        state.order.push_back((state.latest, key));
        state.kept += 1;
        state.bytes += bytes;
        while stream.events.len() > keep {
            if let Some(dropped) = stream.events.pop_front() {
                stream.lost_through = dropped.event.id;
                state.kept -= 1;
                state.bytes -= dropped.bytes;
            }
        }
        state.expire(&self.retention, now);
        self.bytes.store(state.bytes, Ordering::Relaxed);
        (state.latest, delivered)
    }

    /// The socket's streams above `after`, at this instant.
    pub fn read(&self, keys: &[StreamKey], after: u64) -> Snapshot {
        let mut state = self.lock();
        state.expire(&self.retention, Instant::now());
        self.bytes.store(state.bytes, Ordering::Relaxed);
        let streams = keys
            .iter()
            .map(|key| match state.streams.get(key) {
                Some(stream) => StreamRead {
                    lost_through: stream.lost_through,
                    events: stream
                        .events
                        .iter()
                        .filter(|kept| kept.event.id > after)
                        .map(|kept| kept.event.clone())
                        .collect(),
                },
                None => StreamRead {
                    lost_through: state.forgotten,
                    events: Vec::new(),
                },
            })
            .collect();
        Snapshot {
            latest: state.latest,
            streams,
        }
    }

    /// The highest id issued; on a fresh store, the id its sequence starts above, so that
    /// even the first baseline names a point in this store's history.
    pub fn latest(&self) -> u64 {
        let mut state = self.lock();
        state.start();
        state.latest
    }

    /// Bytes the kept events take, as counted against the size limit.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Store for MemoryHistory {
    fn read(
        &self,
        keys: Vec<StreamKey>,
        after: u64,
    ) -> BoxFuture<'_, Result<Snapshot, Unavailable>> {
        Box::pin(std::future::ready(Ok(MemoryHistory::read(
            self, &keys, after,
        ))))
    }

    fn latest(&self) -> BoxFuture<'_, Result<u64, Unavailable>> {
        Box::pin(std::future::ready(Ok(MemoryHistory::latest(self))))
    }

    fn local_bytes(&self) -> u64 {
        self.bytes() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn event(group: &str) -> Event {
        Event {
            target: Target::Group {
                group: group.into(),
                exclude_user_ids: vec![],
                payload: r#"{"type":"e"}"#.into(),
            },
            ignore_web_socket_id: None,
            record: true,
            id: 0,
            idempotency_key: None,
            lost: false,
        }
    }

    fn history(events_per_stream: usize) -> MemoryHistory {
        MemoryHistory::new(Retention {
            events_per_stream,
            ..Retention::default()
        })
    }

    fn key(group: &str) -> StreamKey {
        StreamKey::Group(group.into())
    }

    #[test]
    fn ids_increase_from_the_floor_and_delivery_sees_them() {
        let history = history(10);
        let floor = history.latest();
        assert!(floor > 0);
        let (first, seen) = history.record(event("a"), |e| e.id);
        assert_eq!(first, floor + 1);
        assert_eq!(first, seen);
        let (second, _) = history.record(event("b"), |_| ());
        assert_eq!(second, first + 1);
        let snapshot = history.read(&[key("a"), key("b")], first - 1);
        assert_eq!(snapshot.latest, second);
        // Everything before the first id is lost: a cursor from before the start.
        assert_eq!(snapshot.streams[0].lost_through, first - 1);
        let snapshot = history.read(&[key("a"), key("b"), key("never")], first);
        assert!(snapshot.streams[0].events.is_empty());
        assert_eq!(snapshot.streams[1].events[0].id, second);
        assert_eq!(snapshot.streams[2].lost_through, first - 1);
    }

    #[test]
    fn a_stream_keeps_its_newest_and_remembers_what_it_dropped() {
        let history = history(2);
        let ids: Vec<u64> = (0..4)
            .map(|_| history.record(event("a"), |_| ()).0)
            .collect();
        let read = &history.read(&[key("a")], 0).streams[0];
        assert_eq!(read.lost_through, ids[1]);
        assert_eq!(
            read.events.iter().map(|e| e.id).collect::<Vec<_>>(),
            ids[2..]
        );
    }

    #[test]
    fn old_events_expire_and_the_size_limit_drops_the_oldest_first() {
        let history = MemoryHistory::new(Retention {
            max_age: Duration::from_millis(30),
            ..Retention::default()
        });
        let (old, _) = history.record(event("a"), |_| ());
        std::thread::sleep(Duration::from_millis(60));
        let (new, _) = history.record(event("b"), |_| ());
        let snapshot = history.read(&[key("a"), key("b")], 0);
        assert_eq!(snapshot.streams[0].lost_through, old);
        assert!(snapshot.streams[0].events.is_empty());
        assert_eq!(snapshot.streams[1].events[0].id, new);

        let one = bytes_of(&event("a"));
        let history = MemoryHistory::new(Retention {
            max_bytes: 2 * one,
            ..Retention::default()
        });
        let ids: Vec<u64> = ["a", "b", "a"]
            .iter()
            .map(|g| history.record(event(g), |_| ()).0)
            .collect();
        assert_eq!(history.bytes(), 2 * one);
        let snapshot = history.read(&[key("a"), key("b")], 0);
        assert_eq!(snapshot.streams[0].lost_through, ids[0]);
        assert_eq!(snapshot.streams[1].events[0].id, ids[1]);
    }

    #[test]
    fn the_age_order_stays_small_when_streams_drop_by_count() {
        let history = history(1);
        for _ in 0..10_000 {
            history.record(event("a"), |_| ());
        }
        let state = history.lock();
        assert_eq!(state.kept, 1);
        assert!(
            state.order.len() <= 2 * state.kept + 65,
            "{}",
            state.order.len()
        );
    }
}
