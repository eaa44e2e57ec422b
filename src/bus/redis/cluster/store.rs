//! The history and order of a node on a Redis Cluster: publishing by lane, the node's
//! [`Reorder`], the ticks that move quiet lanes, and replays read through what the node
//! delivered.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{BoxFuture, join_all};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Script, Value};
use tokio::sync::{Notify, watch};

use super::scripts::{Topology, ensure_lua, read_lua, record_lua, slot, tick_lua, topology};
use crate::bus::redis::history::{idempotency_key_name, number, stream_key_names, stream_read};
use crate::bus::redis::link::{COMMAND_TIMEOUT, Connection, Shared, publish_failed};
use crate::bus::redis::lock;
use crate::bus::{BusUnavailable, PublishError};
use crate::event::{Event, Target};
use crate::history::lanes::{LANES, Reorder, lane_of_event, lanes_of_stream, split, through_clock};
use crate::history::{Retention, Snapshot, Store, StreamKey, StreamRead, Unavailable};
use crate::hub::{Hub, Unflushed};

/// How long a publish waits for a replica to confirm it.
const REPLICA_WAIT: Duration = Duration::from_secs(1);
/// How long a replay waits for this node to deliver every id made before it.
const CURSOR_WAIT: Duration = Duration::from_millis(1500);

/// The cluster's history and order: publishing by lane, the node's [`Reorder`], replays.
pub(crate) struct Lanes {
    pub(super) shared: Arc<Shared>,
    pub(super) retention: Retention,
    pub(super) recording: bool,
    /// How long an idempotency key is kept.
    pub(super) idempotency_window: Duration,
    pub(super) order: Mutex<Reorder>,
    /// What the node delivered through, announced for replays that wait for a cursor.
    pub(super) released: watch::Sender<u64>,
    /// The highest lane clock this node saw or was given: what its publishes pass on.
    pub(super) hint: AtomicU64,
    /// This node published since its last tick: it ticks, so that the nodes receiving
    /// its events need not.
    pub(super) published: AtomicBool,
    /// Replays and subscriptions waiting for the delivered position to move.
    pub(super) waiting: AtomicUsize,
    pub(super) wake_listener: Notify,
    /// Which primary serves which lanes (ticks go to each), and per lane whether its
    /// primary has a replica to confirm writes: a publish is acknowledged once a replica
    /// holds it, so a failover cannot lose it silently.
    pub(super) topology: Mutex<Topology>,
    pub(super) record: Script,
    pub(super) ensure: Script,
    pub(super) read: Script,
    /// The tick script's hash, and the script.
    pub(super) tick: (String, String),
    /// Whether every primary has the tick script: ticks go by hash then (a failed tick
    /// sends it whole again, as after a failover to a replica that never ran it).
    pub(super) tick_loaded: AtomicBool,
}

impl Lanes {
    pub(crate) fn new(
        shared: Arc<Shared>,
        retention: Retention,
        recording: bool,
        idempotency_window: Duration,
    ) -> Lanes {
        let tick = tick_lua(&shared.names.lanes);
        Lanes {
            shared,
            retention,
            recording,
            idempotency_window,
            order: Mutex::new(Reorder::default()),
            released: watch::Sender::new(0),
            hint: AtomicU64::new(0),
            published: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            wake_listener: Notify::new(),
            topology: Mutex::default(),
            record: Script::new(&record_lua()),
            ensure: Script::new(&ensure_lua()),
            read: Script::new(&read_lua()),
            tick: (Script::new(&tick).get_hash().to_string(), tick),
            tick_loaded: AtomicBool::new(false),
        }
    }

    pub(super) fn key(&self, lane: usize, name: &str) -> String {
        format!(
            "{}:h:{{{}}}:{name}",
            self.shared.names.prefix, self.shared.names.lanes[lane]
        )
    }

    pub(super) fn lane_channel(&self, lane: usize) -> String {
        format!(
            "{}:l:{{{}}}",
            self.shared.names.prefix, self.shared.names.lanes[lane]
        )
    }

    pub(super) fn channel_of(&self, event: &Event, lane: usize) -> String {
        match &event.target {
            Target::Group { group, .. } => self.shared.names.group(group),
            _ => self.lane_channel(lane),
        }
    }

    /// Every lane's channel: every node listens to them all.
    pub(super) fn lane_channels(&self) -> impl Iterator<Item = String> + '_ {
        (0..LANES as usize).map(|lane| self.lane_channel(lane))
    }

    pub(super) fn saw(&self, t: u64) {
        self.hint.fetch_max(t, Ordering::AcqRel);
    }

    /// This node's cluster connection: lanes only run on a Redis Cluster.
    async fn connection(&self) -> Result<ClusterConnection, BusUnavailable> {
        match self.shared.publisher().await? {
            Connection::Cluster(connection) => Ok(connection),
            Connection::Single(_) => Err(BusUnavailable("not a Redis Cluster".into())),
        }
    }

    /// Publishes events and returns their ids, which increase in request order: each run
    /// of consecutive events on one lane is one script, and the runs go one after another,
    /// each passing on the clock the last one reached (a lane's clock never falls below
    /// what the node has seen), so ids from different lanes still follow the request.
    pub(crate) async fn publish(&self, events: Vec<Event>) -> Result<Vec<u64>, PublishError> {
        let mut connection = self.connection().await?;
        let mut ids = Vec::with_capacity(events.len());
        let mut lanes = Vec::new();
        let mut rest = events.as_slice();
        while let Some(first) = rest.first() {
            let lane = lane_of_event(first);
            let run = rest
                .iter()
                .position(|event| lane_of_event(event) != lane)
                .unwrap_or(rest.len());
            let run_events: Vec<&Event> = rest[..run].iter().collect();
            let run_ids = match self.publish_lane(&mut connection, lane, &run_events).await {
                Ok(run_ids) => run_ids,
                // What went before is out: the batch as a whole may have been published.
                Err(PublishError::Unavailable(why)) if !ids.is_empty() => {
                    return Err(PublishError::Unknown(format!(
                        "the batch's first {} events were published, the rest not: {why}",
                        ids.len()
                    )));
                }
                Err(error) => return Err(error),
            };
            ids.extend(run_ids);
            if !lanes.contains(&lane) {
                lanes.push(lane);
            }
            rest = &rest[run..];
        }
        // One wait per lane for the whole batch, all at once: a replica that confirms the
        // last write of this connection confirms the ones before it.
        if self.recording {
            let waits = lanes
                .into_iter()
                .filter(|lane| lock(&self.topology).replicated[*lane])
                .map(|lane| {
                    let mut connection = connection.clone();
                    async move { self.confirm(&mut connection, lane).await }
                });
            for confirmed in join_all(waits).await {
                confirmed.map_err(PublishError::Unknown)?;
            }
        }
        Ok(ids)
    }

    pub(super) async fn publish_lane(
        &self,
        connection: &mut ClusterConnection,
        lane: usize,
        events: &[&Event],
    ) -> Result<Vec<u64>, PublishError> {
        let plain = |event: &&Event| event.idempotency_key.is_none() && !event.lost;
        if !self.recording && events.iter().all(plain) {
            // No ids: a group's order is its channel's, nothing to order across lanes.
            let mut pipe = redis::pipe();
            for event in events {
                pipe.cmd("SPUBLISH")
                    .arg(self.channel_of(event, lane))
                    .arg(prost::Message::encode_to_vec(&event.to_bus()))
                    .ignore();
            }
            pipe.query_async::<()>(connection)
                .await
                .map_err(|e| publish_failed(e, "Redis SPUBLISH"))?;
            return Ok(vec![0; events.len()]);
        }
        let mut invocation = self.record.prepare_invoke();
        invocation
            .key(self.key(lane, "seq"))
            .key(self.key(lane, "floor"))
            .key(self.key(lane, "rec"))
            .arg(self.retention.max_age.as_millis() as u64)
            .arg(self.hint.load(Ordering::Acquire))
            .arg(lane)
            .arg(self.idempotency_window.as_millis() as u64)
            .arg(u8::from(self.recording));
        for event in events {
            let stream = StreamKey::of(event);
            let keep = if self.recording && event.record {
                self.retention.events_in(&stream)
            } else {
                0
            };
            let [stream_key, lost_key] = stream_key_names(&stream);
            let key = event.idempotency_key.as_deref().unwrap_or_default();
            invocation
                .key(self.key(lane, &stream_key))
                .key(self.key(lane, &lost_key))
                .key(self.key(lane, &idempotency_key_name(key)))
                .arg(self.channel_of(event, lane))
                .arg(prost::Message::encode_to_vec(&event.to_bus()))
                .arg(keep)
                .arg(u8::from(event.lost))
                .arg(key);
        }
        let ids: Vec<u64> = invocation
            .invoke_async(connection)
            .await
            .map_err(|e| publish_failed(e, "Redis publish script"))?;
        if let Some(t) = ids.iter().map(|id| split(*id).0).max() {
            self.saw(t);
        }
        if !self.published.swap(true, Ordering::AcqRel) {
            self.wake_listener.notify_one();
        }
        Ok(ids)
    }

    /// Waits until a replica of the lane's primary holds what this node wrote there.
    pub(super) async fn confirm(
        &self,
        connection: &mut ClusterConnection,
        lane: usize,
    ) -> Result<(), String> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(1).arg(REPLICA_WAIT.as_millis() as u64);
        let slot = slot(self.key(lane, "seq").as_bytes());
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
            slot,
            SlotAddr::Master,
        )));
        match connection.route_command(wait, routing).await {
            Ok(Value::Int(replicas)) if replicas >= 1 => Ok(()),
            Ok(_) => Err(format!(
                "published, but no replica confirmed it within {REPLICA_WAIT:?}: a failover could lose it"
            )),
            Err(error) => Err(format!(
                "published, but not confirmed by a replica: {error}"
            )),
        }
    }

    /// Learns which primary serves which lanes and which have a live replica
    /// (`CLUSTER NODES`).
    pub(super) async fn learn_topology(
        &self,
        connection: &mut ClusterConnection,
    ) -> Result<(), String> {
        let nodes = connection
            .route_command(
                redis::cmd("CLUSTER").arg("NODES").to_owned(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await
            .map_err(|e| format!("CLUSTER NODES: {e}"))?;
        let text = match nodes {
            Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Value::VerbatimString { text, .. } => text,
            other => return Err(format!("CLUSTER NODES answered {other:?}")),
        };
        *lock(&self.topology) = topology(&text, &self.shared.names.lanes);
        Ok(())
    }

    /// Makes sure every lane has a clock, at least the one this node has seen.
    pub(super) async fn ensure_all(&self, connection: &ClusterConnection) -> Result<(), String> {
        let hint = self.hint.load(Ordering::Acquire);
        let work = (0..LANES as usize).map(|lane| self.ensure_lane(connection, lane, hint));
        for started in join_all(work).await {
            started?;
        }
        Ok(())
    }

    /// Makes sure a lane has a clock, at least `hint`, and returns it.
    pub(super) async fn ensure_lane(
        &self,
        connection: &ClusterConnection,
        lane: usize,
        hint: u64,
    ) -> Result<u64, String> {
        let clock: String = self
            .ensure
            .key(self.key(lane, "seq"))
            .key(self.key(lane, "floor"))
            .arg(hint)
            .invoke_async(&mut connection.clone())
            .await
            .map_err(|e| format!("lane {lane} not started: {e}"))?;
        clock
            .parse()
            .map_err(|_| format!("lane {lane}: not a clock: {clock:?}"))
    }

    /// One tick on every primary, for the lanes it serves; what it shows arrives on the
    /// lanes' channels. Returns the highest lane clock shown (every id made before is at or
    /// below its position) and, when `report`, the highest id recorded or counted as lost.
    pub(super) async fn tick(
        &self,
        connection: &ClusterConnection,
        report: bool,
    ) -> Result<(u64, u64), String> {
        let groups = lock(&self.topology).by_primary.clone();
        let loaded = self.tick_loaded.load(Ordering::Acquire);
        let work = groups.iter().map(|lanes| {
            let mut connection = connection.clone();
            let mut command = if loaded {
                redis::cmd("EVALSHA").arg(&self.tick.0).to_owned()
            } else {
                redis::cmd("EVAL").arg(&self.tick.1).to_owned()
            };
            command
                .arg(0)
                .arg(&self.shared.names.prefix)
                .arg(u8::from(report))
                .arg(lanes);
            let slot = slot(self.key(lanes[0], "seq").as_bytes());
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                slot,
                SlotAddr::Master,
            )));
            async move {
                match tokio::time::timeout(
                    COMMAND_TIMEOUT,
                    connection.route_command(command, routing),
                )
                .await
                {
                    Ok(Ok(Value::BulkString(answer))) => Ok(answer),
                    Ok(Ok(other)) => Err(format!("tick failed: {other:?}")),
                    Ok(Err(error)) => Err(format!("tick failed: {error}")),
                    Err(_) => Err("tick timed out".into()),
                }
            }
        });
        let mut highest = (0, 0);
        let mut failed = None;
        for answer in join_all(work).await {
            match answer {
                Ok(answer) => {
                    let answer = String::from_utf8_lossy(&answer);
                    let mut numbers = answer.split(' ').map(|n| n.parse::<u64>().unwrap_or(0));
                    highest.0 = highest.0.max(numbers.next().unwrap_or(0));
                    highest.1 = highest.1.max(numbers.next().unwrap_or(0));
                }
                Err(error) => failed = Some(error),
            }
        }
        // A primary that failed may not know the script (one that took over), or the
        // lanes may have moved: the next tick sends the script whole and the watchdog
        // learns where the lanes are.
        self.tick_loaded.store(failed.is_none(), Ordering::Release);
        match failed {
            Some(error) => Err(error),
            None => Ok(highest),
        }
    }

    /// Where this node must have delivered through for a replay or a first connect to
    /// meet live events exactly (every id made so far, in any lane), and the highest id
    /// recorded or counted as lost.
    pub(super) async fn now(&self) -> Result<(u64, u64), Unavailable> {
        let connection = self.connection().await.map_err(|e| Unavailable(e.0))?;
        let (t, issued) = self.tick(&connection, true).await.map_err(Unavailable)?;
        Ok((through_clock(t), issued))
    }

    /// A message on a lane's channel that is a tick: `T<lane>:<t>,...`.
    pub(super) fn take_tick(&self, payload: &[u8]) -> bool {
        let Some(shown) = payload.strip_prefix(b"T") else {
            return false;
        };
        let mut order = lock(&self.order);
        for pair in String::from_utf8_lossy(shown).split(',') {
            let parsed = pair
                .split_once(':')
                .and_then(|(lane, t)| Some((lane.parse().ok()?, t.parse().ok()?)));
            match parsed {
                Some((lane, t)) => {
                    order.shown(lane, t);
                    self.saw(t);
                }
                None => tracing::warn!(pair, "malformed lane tick"),
            }
        }
        true
    }

    /// Holds an event that arrived at `position` (0: none, delivered at once).
    pub(super) fn hold(&self, hub: &Hub, event: Event, position: u64) {
        if position == 0 {
            hub.deliver(&event);
            return;
        }
        self.saw(split(position).0);
        lock(&self.order).hold(position, Arc::new(event));
    }

    /// Delivers what may go now, in id order.
    pub(super) fn release(&self, hub: &Hub) {
        let (ready, through) = {
            let mut order = lock(&self.order);
            (order.release(), order.released_through())
        };
        let mut unflushed = Unflushed::default();
        for event in &ready {
            hub.queue(event, &mut unflushed);
        }
        unflushed.flush();
        self.released.send_if_modified(|released| {
            let moved = *released != through;
            *released = through;
            moved
        });
    }

    /// Whether a tick is due now: this node published (every node holds those events
    /// until the other lanes show their clocks), or someone waits for the delivered
    /// position to move.
    pub(super) fn tick_due(&self) -> bool {
        self.published.load(Ordering::Acquire) || self.waiting.load(Ordering::Acquire) > 0
    }

    /// Where the node had delivered through, when events wait on lanes that have not
    /// shown their clocks; `None` when nothing waits.
    pub(super) fn blocked_at(&self) -> Option<u64> {
        let order = lock(&self.order);
        order.wanted().map(|_| order.released_through())
    }

    /// Waits (ticking) until the node delivered through `position`, for at most `wait`;
    /// returns where it stands.
    pub(super) async fn released_through(&self, position: u64, wait: Duration) -> u64 {
        let mut released = self.released.subscribe();
        if *released.borrow() >= position {
            return *released.borrow();
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.wake_listener.notify_one();
        let _ = tokio::time::timeout(wait, released.wait_for(|r| *r >= position)).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        *self.released.borrow()
    }

    /// Reads streams after `after`, through `upto` (`None`: everything).
    pub(super) async fn read_streams(
        &self,
        keys: &[StreamKey],
        after: u64,
        upto: Option<u64>,
    ) -> Result<Vec<StreamRead>, Unavailable> {
        let connection = self.connection().await.map_err(|e| Unavailable(e.0))?;
        let mut by_lane: BTreeMap<usize, Vec<(usize, &StreamKey)>> = BTreeMap::new();
        for (index, key) in keys.iter().enumerate() {
            for lane in lanes_of_stream(key) {
                by_lane.entry(lane).or_default().push((index, key));
            }
        }
        let last = upto.map_or("+".to_string(), |upto| upto.to_string());
        let work = by_lane.into_iter().map(|(lane, streams)| {
            let mut connection = connection.clone();
            let last = &last;
            async move {
                let mut invocation = self.read.prepare_invoke();
                invocation
                    .key(self.key(lane, "floor"))
                    .arg(after.saturating_add(1))
                    .arg(last)
                    .arg(self.retention.max_age.as_millis() as u64);
                for (_, key) in &streams {
                    for name in stream_key_names(key) {
                        invocation.key(self.key(lane, &name));
                    }
                }
                let reply: Result<Vec<Vec<Vec<u8>>>, _> =
                    invocation.invoke_async(&mut connection).await;
                (streams, reply)
            }
        });
        let mut reads = vec![StreamRead::default(); keys.len()];
        for (streams, reply) in join_all(work).await {
            let reply = reply.map_err(|e| Unavailable(format!("Redis read script failed: {e}")))?;
            let mut parts = reply.into_iter();
            let head = parts.next().unwrap_or_default();
            let floor = head.first().map_or(Ok(0), |b| number(b))?;
            let aged = head.get(1).map_or(Ok(0), |b| number(b))?;
            for ((index, _), stream) in streams.into_iter().zip(parts) {
                // The users' stream is read from every lane: the parts add up.
                let part = stream_read(stream, floor.max(aged))?;
                let read = &mut reads[index];
                read.lost_through = read.lost_through.max(part.lost_through);
                read.events.extend(part.events);
            }
        }
        for read in &mut reads {
            read.events.sort_unstable_by_key(|event| event.id);
        }
        Ok(reads)
    }
}

impl Store for Lanes {
    /// Reads through what this node delivered, once it delivered every id made before
    /// the read (a tick shows how far that is), so that what a replay sends and what
    /// comes live meet exactly, whatever cursor another node gave.
    fn read(
        &self,
        keys: Vec<StreamKey>,
        after: u64,
    ) -> BoxFuture<'_, Result<Snapshot, Unavailable>> {
        Box::pin(async move {
            let (now, issued) = self.now().await?;
            if after >= issued {
                // Nothing to read: a cursor at the newest id, or above any (the plan
                // tells the client to refresh).
                let streams = vec![StreamRead::default(); keys.len()];
                return Ok(Snapshot {
                    latest: issued,
                    streams,
                });
            }
            let released = self.released_through(now, CURSOR_WAIT).await;
            if released < now {
                return Err(Unavailable(
                    "this node has not yet delivered every event made before the replay".into(),
                ));
            }
            let streams = self.read_streams(&keys, after, Some(released)).await?;
            Ok(Snapshot {
                latest: issued,
                streams,
            })
        })
    }

    /// The newest id issued, once this node delivered what it shows, so that a first
    /// connect's baseline comes after the events the socket got before it. A node that
    /// does not get there in time answers anyway: the events at or below the baseline it
    /// delivers later still reach the socket, live.
    fn latest(&self) -> BoxFuture<'_, Result<u64, Unavailable>> {
        Box::pin(async move {
            let (now, issued) = self.now().await?;
            self.released_through(now, CURSOR_WAIT).await;
            Ok(issued)
        })
    }
}
