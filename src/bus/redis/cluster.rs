//! The bus on a Redis Cluster: sharded pub/sub, and the history in lanes.
//!
//! Channels and keys (`P` the prefix, `{Ln}` lane n's hash tag, one slot in each of
//! [`LANES`] equal blocks of the slot space, so lanes spread over the shards as slots do):
//! - `P:g:{Ln}:<group>`: a group's events, on its lane's slot; a node subscribes
//!   (`SSUBSCRIBE`) while it has local members, so a shard carries its groups' traffic only;
//! - `P:l:{Ln}`: the lane's events for users (by their first user) and everyone, and its
//!   ticks; every node listens to every lane;
//! - `{P}:control`, `P:reply:<node>`, `{P}:node:<id>`, `{P}:nodes`, `{P}:presence`,
//!   `{P}:presence:members`: control, the node registry and presence, as on one Redis, the
//!   `{P}` ones on one slot (little traffic; the presence scripts read them together);
//! - `P:h:{Ln}:seq` (the lane's clock), `floor` (what a fresh lane starts above),
//!   `s:<stream>` and `l:<stream>` (a stream, and the highest id it dropped), as on one
//!   Redis but per lane; ids carry their time, so the age limit needs no index of its own.
//!
//! How ids are made and why a replay is exact: [`crate::history::lanes`]. A node holds
//! what arrives in a [`Reorder`] and delivers in id order; when events wait on lanes that
//! have been quiet, it ticks: one script on every primary shows the clock of the lanes it
//! serves, on their channels.
//!
//! Following the cluster: the Redis client follows `MOVED` and failovers for commands,
//! but it does not subscribe sharded channels again when their shard changes: a replaced
//! primary shows as a `Disconnection`, a moved slot as an `SUNSUBSCRIBE` nobody asked for.
//! On either (or a failed ping of the primaries) the node stops delivering, subscribes
//! everything again, reads what it missed from the history, and goes on; sockets stay
//! connected. With history off it closes its sockets with 1012 instead, so their clients
//! refresh.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{BoxFuture, join_all};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::{ProtocolVersion, PushInfo, PushKind, Script, Value};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use super::{
    BACKOFF_MAX, BACKOFF_MIN, COMMAND_TIMEOUT, Command, Connection, Inbox, Link, Shared,
    Subscriptions, WATCHDOG_EVERY, close_where_lost, lock,
};
use crate::event::{Event, Target};
use crate::history::lanes::{
    self, EPOCH_MICROS, LANES, Reorder, TICK_MICROS, lane_of_event, lane_of_stream, split,
};
use crate::history::{Retention, Snapshot, Store, StreamKey, StreamRead, Unavailable};
use crate::hub::Hub;
use crate::protocol::CloseReason;

/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;
/// Tick rounds start this far apart at least.
const TICK_EVERY: Duration = Duration::from_millis(1);
/// How long events may wait without anything delivered before the node subscribes again.
const STALLED: Duration = Duration::from_secs(3);
/// How long a publish waits for a replica to confirm it.
const REPLICA_WAIT: Duration = Duration::from_secs(1);
/// How long a replay waits for this node to deliver every id made before it.
const CURSOR_WAIT: Duration = Duration::from_millis(500);

/// CRC16 (XMODEM), the hash of Redis Cluster slots.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in bytes {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key or channel, by the hash tag rule.
pub(super) fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// Each lane's hash tag: the first `<lane>-<n>` whose slot lies in the lane's block.
pub(super) fn lane_tags() -> Vec<String> {
    let block = u64::from(SLOTS) / LANES;
    (0..LANES)
        .map(|lane| {
            (0u32..)
                .map(|n| format!("{lane}-{n}"))
                .find(|tag| u64::from(slot(tag.as_bytes())) / block == lane)
                .unwrap_or_default()
        })
        .collect()
}

/// Lua turning the Redis clock into a lane clock (`now`).
fn clock_lua() -> String {
    format!(
        r"
local time = redis.call('TIME')
local micros = tonumber(time[1]) * 1000000 + tonumber(time[2])
local now = math.floor((micros - {EPOCH_MICROS}) / {TICK_MICROS})
"
    )
}

/// Gives a lane's events their ids, keeps those recorded and publishes them all.
///
/// KEYS: seq, floor, rec (the last recorded id), then per event its stream and lost-marker
/// keys.
/// ARGV: the age limit in ms, the clock the node has seen, the lane, then per event:
/// channel, bus bytes, events its stream keeps (0: not recorded, published with its
/// position). Returns the ids (0 for events not recorded).
fn record_lua() -> String {
    clock_lua()
        + &format!(
            r"
local lanes, age, hint, lane = {LANES}, tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl = age + 60000
local function varint(n)
  local out = {{}}
  while n >= 128 do
    out[#out + 1] = string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  out[#out + 1] = string.char(n)
  return table.concat(out)
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], now)
  redis.call('SET', KEYS[2], now)
end
local last = tonumber(redis.call('GET', KEYS[1]))
local ids = {{}}
for i = 1, (#ARGV - 3) / 3 do
  local channel, bytes, keep = ARGV[3 * i + 1], ARGV[3 * i + 2], tonumber(ARGV[3 * i + 3])
  last = math.max(now, last + 1, hint + 1)
  local id = last * lanes + lane
  local sid = string.format('%.0f', id)
  if keep == 0 then
    redis.call('SPUBLISH', channel, bytes .. '\24' .. varint(id))
    ids[i] = 0
  else
    local stream, lost = KEYS[2 * i + 2], KEYS[2 * i + 3]
    local message = bytes .. '\16' .. varint(id)
    redis.call('XADD', stream, sid .. '-0', 'e', message)
    local over = redis.call('XLEN', stream) - keep
    if over > 0 then
      local dropped = {{}}
      for j, entry in ipairs(redis.call('XRANGE', stream, '-', '+', 'COUNT', over)) do
        dropped[j] = entry[1]
      end
      redis.call('XDEL', stream, unpack(dropped))
      redis.call('SET', lost, string.match(dropped[#dropped], '^%d+'))
    end
    redis.call('PEXPIRE', stream, ttl)
    redis.call('PEXPIRE', lost, ttl)
    redis.call('SET', KEYS[3], sid)
    redis.call('SPUBLISH', channel, message)
    ids[i] = id
  end
end
redis.call('SET', KEYS[1], string.format('%.0f', last))
return ids
"
        )
}

/// Starts a lane that has no clock yet (fresh, or lost with a primary whose replica did
/// not have it): everything below now counts as lost. Moves it to at least the clock the
/// node has seen, so no id it makes can fall below what the node already delivered.
/// KEYS: seq, floor. ARGV: the clock the node has seen. Returns the lane's clock.
fn ensure_lua() -> String {
    clock_lua()
        + r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], now)
  redis.call('SET', KEYS[2], now)
end
local last = tonumber(redis.call('GET', KEYS[1]))
if tonumber(ARGV[1]) > last then
  last = tonumber(ARGV[1])
  redis.call('SET', KEYS[1], string.format('%.0f', last))
end
return string.format('%.0f', last)
"
}

/// A tick, run on every primary: for each lane whose slot this primary serves and whose
/// clock it holds, moves the clock to at least now - 1 and says `T<lane>:<t>,...` on the
/// channel of the first such lane. Publishing it keeps it in order with the lanes' events:
/// one connection brings a node everything a primary publishes. Returns `<t> <id>`: the
/// highest clock it showed, and the highest id its lanes recorded or count as lost.
/// ARGV: per lane, its slot, clock key, channel, floor key and last-recorded key.
fn tick_lua() -> String {
    clock_lua()
        + &format!(
            r"
local lanes = {LANES}
local me = redis.call('CLUSTER', 'MYID')
local mine = {{}}
for _, range in ipairs(redis.call('CLUSTER', 'SLOTS')) do
  if range[3][3] == me then
    mine[#mine + 1] = {{range[1], range[2]}}
  end
end
local shown, channel, highest, issued = {{}}, nil, 0, 0
for i = 1, #ARGV, 5 do
  local slot = tonumber(ARGV[i])
  for _, range in ipairs(mine) do
    if slot >= range[1] and slot <= range[2] then
      local last = redis.call('GET', ARGV[i + 1])
      if last then
        last = math.max(tonumber(last), now - 1)
        redis.call('SET', ARGV[i + 1], string.format('%.0f', last))
        shown[#shown + 1] = ((i - 1) / 5) .. ':' .. string.format('%.0f', last)
        highest = math.max(highest, last)
        channel = channel or ARGV[i + 2]
        local floor = tonumber(redis.call('GET', ARGV[i + 3]) or '0')
        local recorded = tonumber(redis.call('GET', ARGV[i + 4]) or '0')
        issued = math.max(issued, recorded, (floor + 1) * lanes - 1)
      end
      break
    end
  end
end
if channel then
  redis.call('SPUBLISH', channel, 'T' .. table.concat(shown, ','))
end
return string.format('%.0f %.0f', highest, issued)
"
        )
}

/// Reads one lane's streams.
///
/// KEYS: floor, then per stream its stream and lost-marker keys.
/// ARGV: the first id to read, the last ('+': all), the age limit in ms.
/// Returns `{{floor id, aged}, {lost, bytes...}...}`. `aged` is the last position before
/// the age limit: an id's clock is never below the Redis clock when it was made, so
/// every id made before the limit is at or below it.
fn read_lua() -> String {
    clock_lua()
        + &format!(
            r"
local lanes = {LANES}
local floor = redis.call('GET', KEYS[1])
local floor_id = '0'
if floor then
  floor_id = string.format('%.0f', (tonumber(floor) + 1) * lanes - 1)
end
local limit = now - math.floor(tonumber(ARGV[3]) * 1000 / {TICK_MICROS})
local aged = string.format('%.0f', math.max(0, limit * lanes - 1))
local out = {{{{floor_id, aged}}}}
for i = 2, #KEYS, 2 do
  local read = {{redis.call('GET', KEYS[i + 1]) or '0'}}
  for _, entry in ipairs(redis.call('XRANGE', KEYS[i], ARGV[1], ARGV[2])) do
    read[#read + 1] = entry[2][2]
  end
  out[#out + 1] = read
end
return out
"
        )
}

/// Per lane, whether the primary serving its slot has a replica that is not failed, from
/// the text of `CLUSTER NODES`.
fn replicated_lanes(nodes: &str, tags: &[String]) -> [bool; LANES as usize] {
    let lines: Vec<Vec<&str>> = nodes
        .lines()
        .map(|line| line.split_whitespace().collect())
        .filter(|fields: &Vec<&str>| fields.len() >= 8 && !fields[2].contains("fail"))
        .collect();
    let with_replica: HashSet<&str> = lines
        .iter()
        .filter(|fields| fields[2].contains("slave"))
        .map(|fields| fields[3])
        .collect();
    let mut replicated = [false; LANES as usize];
    for fields in lines.iter().filter(|f| f[2].contains("master")) {
        if !with_replica.contains(fields[0]) {
            continue;
        }
        for range in &fields[8..] {
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            let (Ok(first), Ok(last)) = (first.parse::<u16>(), last.parse::<u16>()) else {
                continue; // a slot being imported or migrated: `[...]`
            };
            for (lane, tag) in tags.iter().enumerate() {
                if (first..=last).contains(&slot(tag.as_bytes())) {
                    replicated[lane] = true;
                }
            }
        }
    }
    replicated
}

/// The text answers of every primary to one command.
fn answers_of(answers: &Value) -> Vec<String> {
    match answers {
        Value::BulkString(bytes) => vec![String::from_utf8_lossy(bytes).into_owned()],
        Value::SimpleString(text) => vec![text.clone()],
        Value::Array(values) | Value::Set(values) => values.iter().flat_map(answers_of).collect(),
        Value::Map(pairs) => pairs.iter().flat_map(|(_, v)| answers_of(v)).collect(),
        _ => Vec::new(),
    }
}

fn number(bytes: &[u8]) -> Result<u64, Unavailable> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Unavailable(format!("not an id: {:?}", String::from_utf8_lossy(bytes))))
}

/// The cluster's history and order: publishing by lane, the node's [`Reorder`], replays.
pub(super) struct Lanes {
    shared: Arc<Shared>,
    retention: Retention,
    recording: bool,
    tags: Arc<[String]>,
    order: Mutex<Reorder>,
    /// What the node delivered through, announced for replays that wait for a cursor.
    released: watch::Sender<u64>,
    /// The highest lane clock this node saw or was given: what its publishes pass on.
    hint: AtomicU64,
    /// Replays and subscriptions waiting for the delivered position to move.
    waiting: AtomicUsize,
    wake_listener: Notify,
    /// Per lane, whether its primary has a replica to confirm writes: a publish is
    /// acknowledged once a replica holds it, so a failover cannot lose it silently.
    replicated: Mutex<[bool; LANES as usize]>,
    record: Script,
    ensure: Script,
    read: Script,
    tick: String,
}

impl Lanes {
    pub(super) fn new(shared: Arc<Shared>, retention: Retention, recording: bool) -> Lanes {
        Lanes {
            tags: shared.names.lanes.clone(),
            shared,
            retention,
            recording,
            order: Mutex::new(Reorder::default()),
            released: watch::Sender::new(0),
            hint: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            wake_listener: Notify::new(),
            replicated: Mutex::new([false; LANES as usize]),
            record: Script::new(&record_lua()),
            ensure: Script::new(&ensure_lua()),
            read: Script::new(&read_lua()),
            tick: tick_lua(),
        }
    }

    fn key(&self, lane: usize, name: &str) -> String {
        format!(
            "{}:h:{{{}}}:{name}",
            self.shared.names.prefix, self.tags[lane]
        )
    }

    fn lane_channel(&self, lane: usize) -> String {
        format!("{}:l:{{{}}}", self.shared.names.prefix, self.tags[lane])
    }

    fn channel_of(&self, event: &Event, lane: usize) -> String {
        match &event.target {
            Target::Group { group, .. } => self.shared.names.group(group),
            _ => self.lane_channel(lane),
        }
    }

    /// Every lane's channel: every node listens to them all.
    fn lane_channels(&self) -> impl Iterator<Item = String> + '_ {
        (0..LANES as usize).map(|lane| self.lane_channel(lane))
    }

    fn saw(&self, t: u64) {
        self.hint.fetch_max(t, Ordering::AcqRel);
    }

    /// Publishes events, each lane's in order in one script (all lanes at once), and
    /// returns their ids.
    pub(super) async fn publish(&self, events: Vec<Event>) -> Result<Vec<u64>, String> {
        let connection = self.shared.publisher().await.map_err(|e| e.0)?;
        let mut by_lane: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (index, event) in events.iter().enumerate() {
            by_lane.entry(lane_of_event(event)).or_default().push(index);
        }
        let events = &events;
        let work = by_lane.into_iter().map(|(lane, indices)| {
            let mut connection = connection.clone();
            async move {
                let lane_events: Vec<&Event> = indices.iter().map(|i| &events[*i]).collect();
                let ids = self.publish_lane(&mut connection, lane, &lane_events).await;
                (indices, ids)
            }
        });
        let mut ids = vec![0; events.len()];
        for (indices, lane_ids) in join_all(work).await {
            for (index, id) in indices.into_iter().zip(lane_ids?) {
                ids[index] = id;
            }
        }
        Ok(ids)
    }

    async fn publish_lane(
        &self,
        connection: &mut Connection,
        lane: usize,
        events: &[&Event],
    ) -> Result<Vec<u64>, String> {
        if !self.recording {
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
                .map_err(|e| format!("Redis SPUBLISH failed: {e}"))?;
            return Ok(vec![0; events.len()]);
        }
        let mut invocation = self.record.prepare_invoke();
        invocation
            .key(self.key(lane, "seq"))
            .key(self.key(lane, "floor"))
            .key(self.key(lane, "rec"))
            .arg(self.retention.max_age.as_millis() as u64)
            .arg(self.hint.load(Ordering::Acquire))
            .arg(lane);
        for event in events {
            let stream = StreamKey::of(event);
            let keep = if event.record {
                self.retention.events_in(&stream)
            } else {
                0
            };
            invocation
                .key(self.key(lane, &format!("s:{}", stream.name())))
                .key(self.key(lane, &format!("l:{}", stream.name())))
                .arg(self.channel_of(event, lane))
                .arg(prost::Message::encode_to_vec(&event.to_bus()))
                .arg(keep);
        }
        let ids: Vec<u64> = invocation
            .invoke_async(connection)
            .await
            .map_err(|e| format!("Redis publish script failed: {e}"))?;
        if let Some(t) = ids.iter().map(|id| split(*id).0).max() {
            self.saw(t);
        }
        if lock(&self.replicated)[lane] {
            self.confirm(connection, lane).await?;
        }
        Ok(ids)
    }

    /// Waits until a replica of the lane's primary holds what this node wrote there.
    async fn confirm(&self, connection: &mut Connection, lane: usize) -> Result<(), String> {
        let Connection::Cluster(connection) = connection else {
            return Ok(());
        };
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

    /// Learns which primaries have a live replica (`CLUSTER NODES`), for [`Lanes::confirm`].
    async fn learn_replicas(&self, connection: &mut ClusterConnection) -> Result<(), String> {
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
        let replicated = replicated_lanes(&text, &self.tags);
        *lock(&self.replicated) = replicated;
        Ok(())
    }

    /// Makes sure every lane has a clock, at least the one this node has seen.
    async fn ensure_all(&self, connection: &Connection) -> Result<(), String> {
        let hint = self.hint.load(Ordering::Acquire);
        let work = (0..LANES as usize).map(|lane| {
            let mut connection = connection.clone();
            async move {
                self.ensure
                    .key(self.key(lane, "seq"))
                    .key(self.key(lane, "floor"))
                    .arg(hint)
                    .invoke_async::<String>(&mut connection)
                    .await
                    .map_err(|e| format!("lane {lane} not started: {e}"))
            }
        });
        for started in join_all(work).await {
            started?;
        }
        Ok(())
    }

    /// One tick on every primary; what it shows arrives on the lanes' channels. Returns
    /// the highest lane clock shown (every id made before is at or below its position) and
    /// the highest id recorded or counted as lost.
    async fn tick(&self, connection: &mut ClusterConnection) -> Result<(u64, u64), String> {
        let mut command = redis::cmd("EVAL");
        command.arg(&self.tick).arg(0);
        for lane in 0..LANES as usize {
            let seq = self.key(lane, "seq");
            command
                .arg(slot(seq.as_bytes()))
                .arg(seq)
                .arg(self.lane_channel(lane))
                .arg(self.key(lane, "floor"))
                .arg(self.key(lane, "rec"));
        }
        let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
        match tokio::time::timeout(COMMAND_TIMEOUT, connection.route_command(command, routing))
            .await
        {
            Ok(Ok(Value::ServerError(error))) => Err(format!("tick failed: {error:?}")),
            Ok(Ok(answers)) => {
                let mut highest = (0, 0);
                for answer in answers_of(&answers) {
                    let mut numbers = answer.split(' ').map(|n| n.parse::<u64>().unwrap_or(0));
                    let (t, id) = (numbers.next(), numbers.next());
                    highest = (
                        highest.0.max(t.unwrap_or(0)),
                        highest.1.max(id.unwrap_or(0)),
                    );
                }
                Ok(highest)
            }
            Ok(Err(error)) => Err(format!("tick failed: {error}")),
            Err(_) => Err("tick timed out".into()),
        }
    }

    /// Where this node must have delivered through for a replay or a first connect to
    /// meet live events exactly (every id made so far, in any lane), and the highest id
    /// recorded or counted as lost.
    async fn now(&self) -> Result<(u64, u64), Unavailable> {
        let connection = self
            .shared
            .publisher()
            .await
            .map_err(|e| Unavailable(e.0))?;
        let Connection::Cluster(mut connection) = connection else {
            return Err(Unavailable("not a Redis Cluster".into()));
        };
        let (t, issued) = self.tick(&mut connection).await.map_err(Unavailable)?;
        Ok(((t + 1) * LANES - 1, issued))
    }

    /// A message on a lane's channel that is a tick: `T<lane>:<t>,...`.
    fn take_tick(&self, payload: &[u8]) -> bool {
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
    fn hold(&self, hub: &Hub, event: Event, position: u64) {
        if position == 0 {
            hub.deliver(&event);
            return;
        }
        self.saw(split(position).0);
        lock(&self.order).hold(position, Arc::new(event));
    }

    /// Delivers what may go now, in id order.
    fn release(&self, hub: &Hub) {
        let (ready, through) = {
            let mut order = lock(&self.order);
            (order.release(), order.released_through())
        };
        for event in &ready {
            hub.deliver(event);
        }
        self.released.send_if_modified(|released| {
            let moved = *released != through;
            *released = through;
            moved
        });
    }

    /// Whether a tick should run: events wait on quiet lanes, or someone waits for the
    /// delivered position to move.
    fn tick_wanted(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0 || lock(&self.order).wanted().is_some()
    }

    /// Waits (ticking) until the node delivered through `position`, for at most `wait`;
    /// returns where it stands.
    async fn released_through(&self, position: u64, wait: Duration) -> u64 {
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
    async fn read_streams(
        &self,
        keys: &[StreamKey],
        after: u64,
        upto: Option<u64>,
    ) -> Result<Vec<StreamRead>, Unavailable> {
        let connection = self
            .shared
            .publisher()
            .await
            .map_err(|e| Unavailable(e.0))?;
        let mut by_lane: BTreeMap<usize, Vec<(usize, &StreamKey)>> = BTreeMap::new();
        for (index, key) in keys.iter().enumerate() {
            if *key == StreamKey::Users {
                for lane in 0..LANES as usize {
                    by_lane.entry(lane).or_default().push((index, key));
                }
            } else {
                by_lane
                    .entry(lane_of_stream(key))
                    .or_default()
                    .push((index, key));
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
                    invocation
                        .key(self.key(lane, &format!("s:{}", key.name())))
                        .key(self.key(lane, &format!("l:{}", key.name())));
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
                let mut entries = stream.into_iter();
                let lost = entries.next().map_or(Ok(0), |b| number(&b))?;
                let read = &mut reads[index];
                read.lost_through = read.lost_through.max(lost).max(floor).max(aged);
                for bytes in entries {
                    let event = Event::from_bus(&bytes)
                        .ok_or_else(|| Unavailable("undecodable history entry".into()))?;
                    read.events.push(Arc::new(event));
                }
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

    fn latest(&self) -> BoxFuture<'_, Result<u64, Unavailable>> {
        Box::pin(async move {
            let (now, issued) = self.now().await?;
            self.released_through(now, CURSOR_WAIT).await;
            Ok(issued)
        })
    }
}

/// The node's side of the cluster: its one connection, the pushes it brings, and the
/// subscriptions it must keep.
pub(super) struct Listener {
    client: ClusterClient,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    lanes: Arc<Lanes>,
    hub: Arc<Hub>,
    inbox: Inbox,
    subscriptions: Arc<Subscriptions>,
    /// The channels this node subscribed and still wants.
    subscribed: HashSet<String>,
    /// Whether the node delivered before: a new start must make up for the gap.
    started: bool,
}

impl Listener {
    pub(super) fn new(
        nodes: Vec<String>,
        lanes: Arc<Lanes>,
        hub: Arc<Hub>,
        inbox: Inbox,
        subscriptions: Arc<Subscriptions>,
    ) -> Result<Listener, String> {
        let urls: Vec<String> = nodes
            .iter()
            .map(|node| {
                if node.contains("://") {
                    node.clone()
                } else {
                    format!("redis://{node}")
                }
            })
            .collect();
        let (sender, pushes) = mpsc::unbounded_channel();
        let client = ClusterClientBuilder::new(urls)
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(sender)
            .connection_timeout(COMMAND_TIMEOUT)
            .response_timeout(COMMAND_TIMEOUT)
            .build()
            .map_err(|e| format!("--redis-cluster-nodes {:?}: {e}", nodes.join(",")))?;
        Ok(Listener {
            client,
            pushes,
            lanes,
            hub,
            inbox,
            subscriptions,
            subscribed: HashSet::new(),
            started: false,
        })
    }

    fn shared(&self) -> &Shared {
        &self.lanes.shared
    }

    pub(super) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut backoff = BACKOFF_MIN;
        let mut connection = loop {
            match tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_connection()).await {
                Ok(Ok(connection)) => break connection,
                Ok(Err(error)) => tracing::debug!(%error, "Redis Cluster unreachable; retrying"),
                Err(_) => tracing::debug!("Redis Cluster connect timed out; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        };
        if let Link::Cluster(slot) = &self.shared().link {
            *lock(slot) = Some(connection.clone());
        }
        self.serve(&mut connection, &mut commands).await;
    }

    /// Keeps the node in step with the cluster until it stops.
    async fn serve(
        &mut self,
        connection: &mut ClusterConnection,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) {
        let lanes = self.lanes.clone();
        let mut out_of_step = true;
        let mut backoff = BACKOFF_MIN;
        let mut watchdog = tokio::time::interval(WATCHDOG_EVERY);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (tick_done, mut ticks_done) = mpsc::unbounded_channel::<Result<(), String>>();
        let mut ticking = false;
        let mut last_tick = Instant::now() - TICK_EVERY;
        // Since when events wait, and where the node had delivered through then.
        let mut waiting_since: Option<(Instant, u64)> = None;
        loop {
            if out_of_step {
                match self.sync(connection).await {
                    Ok(()) => {
                        out_of_step = false;
                        backoff = BACKOFF_MIN;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "Redis Cluster not in step yet; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
            let want_tick = lanes.recording && !ticking && (!self.started || lanes.tick_wanted());
            let tick_at = last_tick + TICK_EVERY;
            tokio::select! {
                push = self.pushes.recv() => {
                    let Some(push) = push else { return };
                    out_of_step |= self.take(push);
                    while let Ok(push) = self.pushes.try_recv() {
                        out_of_step |= self.take(push);
                    }
                    lanes.release(&self.hub);
                    if !self.started {
                        self.start_if_shown();
                    }
                }
                command = commands.recv() => match command {
                    Some(command) => {
                        if let Err(error) = self.apply(connection, command).await {
                            tracing::warn!(%error, "Redis Cluster subscription failed");
                            out_of_step = true;
                        }
                    }
                    None => return,
                },
                _ = watchdog.tick() => {
                    if self.stalled(&mut waiting_since) {
                        tracing::warn!(
                            "events have waited {STALLED:?} on lanes that show nothing; subscribing again"
                        );
                        out_of_step = true;
                    } else if let Err(error) = ping_primaries(connection).await {
                        tracing::warn!(%error, "Redis Cluster primaries do not answer");
                        out_of_step = true;
                    } else if let Err(error) = lanes.learn_replicas(connection).await {
                        tracing::debug!(%error, "Redis Cluster replicas not learnt");
                    }
                }
                done = ticks_done.recv() => {
                    ticking = false;
                    if let Some(Err(error)) = done {
                        tracing::debug!(%error, "lane tick failed");
                    }
                }
                _ = tokio::time::sleep_until(tick_at), if want_tick => {
                    ticking = true;
                    last_tick = Instant::now();
                    let lanes = lanes.clone();
                    let mut connection = connection.clone();
                    let tick_done = tick_done.clone();
                    tokio::spawn(async move {
                        let _ = tick_done.send(lanes.tick(&mut connection).await.map(|_| ()));
                    });
                }
                _ = lanes.wake_listener.notified() => {}
            }
            if out_of_step {
                self.shared().set_ready(false);
                lock(&lanes.order).freeze();
            }
        }
    }

    /// Whether events have waited `STALLED` without the node delivering anything: a lane
    /// whose messages do not reach it any more (a subscription lost in a slot move).
    fn stalled(&self, waiting_since: &mut Option<(Instant, u64)>) -> bool {
        let (waiting, released) = {
            let order = lock(&self.lanes.order);
            (order.wanted().is_some(), order.released_through())
        };
        match *waiting_since {
            Some((since, at)) if waiting && at == released => {
                if since.elapsed() >= STALLED {
                    *waiting_since = None;
                    return true;
                }
            }
            _ if waiting => *waiting_since = Some((Instant::now(), released)),
            _ => *waiting_since = None,
        }
        false
    }

    /// Takes one push; `true` when the node fell out of step with the cluster.
    fn take(&mut self, push: PushInfo) -> bool {
        match push.kind {
            PushKind::SMessage => {
                let mut data = push.data.into_iter();
                let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
                    (data.next(), data.next())
                else {
                    return false;
                };
                let channel = String::from_utf8_lossy(&channel);
                if self.inbox.take(&channel, &payload) || self.lanes.take_tick(&payload) {
                    return false;
                }
                match Event::from_bus_positioned(&payload) {
                    Some((event, position)) => self.lanes.hold(&self.hub, event, position),
                    None => tracing::warn!(%channel, "undecodable event"),
                }
                false
            }
            PushKind::Disconnection => {
                tracing::warn!("a Redis Cluster connection closed; subscribing again");
                true
            }
            PushKind::SUnsubscribe => {
                let channel = match push.data.first() {
                    Some(Value::BulkString(channel)) => {
                        String::from_utf8_lossy(channel).into_owned()
                    }
                    _ => return false,
                };
                let moved = self.subscribed.contains(&channel);
                if moved {
                    tracing::warn!(%channel, "Redis Cluster moved a channel's slot; subscribing again");
                }
                moved
            }
            _ => false,
        }
    }

    /// The channels this node listens to whatever its members.
    fn fixed_channels(&self) -> Vec<String> {
        let names = &self.shared().names;
        let mut channels = vec![names.control().to_string(), names.own_reply.clone()];
        if self.inbox.presence.is_some() {
            channels.push(names.presence().to_string());
        }
        channels.extend(self.lanes.lane_channels());
        channels
    }

    /// Subscribes everything again, and with history reads what was missed meanwhile;
    /// the node is ready again once every lane has shown its clock.
    async fn sync(&mut self, connection: &mut ClusterConnection) -> Result<(), String> {
        let lanes = self.lanes.clone();
        self.shared().set_ready(false);
        // Commands on every lane's slot and the registry's first: a slot that moved
        // answers MOVED, which makes the client learn where slots are before it routes
        // the subscriptions (it does not follow MOVED for those).
        let commands = Connection::Cluster(connection.clone());
        lanes.ensure_all(&commands).await?;
        self.shared().heartbeat().await.map_err(|e| e.0)?;
        let wanted = self.subscriptions.wanted();
        let mut channels = self.fixed_channels();
        channels.extend(wanted.iter().map(|g| self.shared().names.group(g)));
        subscribe(connection, &channels).await?;
        lanes.learn_replicas(connection).await?;
        self.subscribed = channels.into_iter().collect();
        self.subscriptions.mark_connected(&wanted);
        if lanes.recording {
            lock(&lanes.order).freeze();
            if self.started {
                self.catch_up(&wanted).await?;
            }
            lock(&lanes.order).thaw();
            lanes.tick(connection).await?;
        } else if self.started {
            let closed = self.hub.close_connections(CloseReason::Restart);
            tracing::warn!(
                closed,
                "Redis Cluster subscriptions renewed without event history: sockets closed"
            );
        }
        if let Some(presence) = &self.inbox.presence {
            presence.load().await?;
        }
        if self.started || !lanes.recording {
            self.started = true;
            self.shared().set_ready(true);
            tracing::info!(groups = wanted.len(), "Redis Cluster bus in step");
        }
        Ok(())
    }

    /// The first start: ready once every lane has shown its clock; what came before is
    /// not delivered (no socket was here for it).
    fn start_if_shown(&mut self) {
        let mut order = lock(&self.lanes.order);
        if order.bound() < LANES {
            return;
        }
        // After the highest clock shown: an event below it may have been published
        // before this node's subscription to its channel took effect.
        let start = (order.seen() + 1) * LANES - 1;
        order.start_after(start);
        drop(order);
        self.lanes.released.send_replace(start);
        self.started = true;
        self.shared().set_ready(true);
        tracing::info!("Redis Cluster bus in step");
    }

    /// Reads from the history what the groups, users and everyone got after the last
    /// delivered position, to deliver it in order; sockets of streams that lost events
    /// meanwhile are closed with 1012.
    async fn catch_up(&self, groups: &[Arc<str>]) -> Result<(), String> {
        self.inbox.revalidate().await;
        let after = lock(&self.lanes.order).released_through();
        let keys = StreamKey::of_socket(groups.iter().cloned());
        let streams = self
            .lanes
            .read_streams(&keys, after, None)
            .await
            .map_err(|e| e.0)?;
        let mut caught_up = 0;
        {
            let mut order = lock(&self.lanes.order);
            for event in streams.iter().flat_map(|s| &s.events) {
                caught_up += usize::from(order.hold(event.id, event.clone()));
            }
        }
        let snapshot = Snapshot {
            latest: after,
            streams,
        };
        let closed = close_where_lost(&self.hub, &keys, &snapshot, after);
        tracing::info!(
            caught_up,
            closed,
            "Redis Cluster subscriptions renewed; missed events taken from the history"
        );
        Ok(())
    }

    async fn apply(
        &mut self,
        connection: &mut ClusterConnection,
        command: Command,
    ) -> Result<(), String> {
        match command {
            Command::Subscribe(group) => {
                let needed = lock(&self.subscriptions.groups)
                    .get(&group)
                    .is_some_and(|sub| sub.members > 0 && !sub.subscribed);
                if !needed {
                    return Ok(());
                }
                let channel = self.shared().names.group(&group);
                subscribe(connection, std::slice::from_ref(&channel)).await?;
                self.subscribed.insert(channel);
                // With history, the group counts as subscribed once this node delivered
                // through its lane's clock: what came before is a replay's, what comes
                // after arrives live.
                let lanes = self.lanes.clone();
                let subscriptions = self.subscriptions.clone();
                let commands = Connection::Cluster(connection.clone());
                tokio::spawn(async move {
                    if lanes.recording {
                        let lane = lanes::lane_of_group(&group);
                        let mut commands = commands;
                        let clock = lanes
                            .ensure
                            .key(lanes.key(lane, "seq"))
                            .key(lanes.key(lane, "floor"))
                            .arg(0)
                            .invoke_async::<String>(&mut commands)
                            .await;
                        if let Some(t) = clock.ok().and_then(|t| t.parse::<u64>().ok()) {
                            lanes
                                .released_through((t + 1) * LANES - 1, COMMAND_TIMEOUT)
                                .await;
                        }
                    }
                    if let Some(sub) = lock(&subscriptions.groups).get_mut(&group) {
                        sub.subscribed = true;
                        sub.wake();
                    }
                });
            }
            Command::Unsubscribe(group) => {
                let unused = {
                    let mut groups = lock(&self.subscriptions.groups);
                    let unused = groups.get(&group).is_some_and(|sub| sub.members == 0);
                    if unused {
                        groups.remove(&group);
                    }
                    unused
                };
                if unused {
                    let channel = self.shared().names.group(&group);
                    self.subscribed.remove(&channel);
                    connection
                        .sunsubscribe(&channel)
                        .await
                        .map_err(|e| format!("SUNSUBSCRIBE {channel}: {e}"))?;
                }
            }
        }
        Ok(())
    }
}

/// Subscribes sharded channels, each on its own slot's primary, all at once.
async fn subscribe(connection: &ClusterConnection, channels: &[String]) -> Result<(), String> {
    let work = channels.iter().map(|channel| {
        let mut connection = connection.clone();
        async move {
            tokio::time::timeout(COMMAND_TIMEOUT, connection.ssubscribe(channel))
                .await
                .map_err(|_| format!("SSUBSCRIBE {channel} timed out"))?
                .map_err(|e| format!("SSUBSCRIBE {channel}: {e}"))
        }
    });
    for subscribed in join_all(work).await {
        subscribed?;
    }
    Ok(())
}

/// A frozen or lost primary sends nothing: pinging them all is how a node notices.
async fn ping_primaries(connection: &mut ClusterConnection) -> Result<(), String> {
    let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
    match tokio::time::timeout(
        COMMAND_TIMEOUT,
        connection.route_command(redis::cmd("PING"), routing),
    )
    .await
    {
        Ok(Ok(Value::ServerError(error))) => Err(format!("{error:?}")),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {COMMAND_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_redis() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(slot(b"abc"), 7638);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_eq!(slot(b"123456789"), 0x31C3 % SLOTS);
    }

    #[test]
    fn lanes_are_confirmed_where_their_primary_has_a_live_replica() {
        let tags = lane_tags();
        let nodes = "\
a 127.0.0.1:1@11 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:2@12 master - 0 0 2 connected 5461-10922
c 127.0.0.1:3@13 master - 0 0 3 connected 10923-16383
d 127.0.0.1:4@14 slave a 0 0 1 connected
e 127.0.0.1:5@15 slave,fail b 0 0 2 connected
f 127.0.0.1:6@16 slave c 0 0 3 connected
";
        let replicated = replicated_lanes(nodes, &tags);
        for (lane, tag) in tags.iter().enumerate() {
            let on_b = (5461..=10922).contains(&slot(tag.as_bytes()));
            assert_eq!(replicated[lane], !on_b, "lane {lane}");
        }
    }

    #[test]
    fn each_lane_has_a_slot_in_its_own_block() {
        let tags = lane_tags();
        assert_eq!(tags.len(), LANES as usize);
        let block = u64::from(SLOTS) / LANES;
        for (lane, tag) in tags.iter().enumerate() {
            assert_eq!(
                u64::from(slot(tag.as_bytes())) / block,
                lane as u64,
                "{tag}"
            );
        }
    }
}
