//! The event history of a cluster, in Redis, so that a client can replay on any node.
//!
//! Keys (under `P:h:`, `P` the Redis prefix):
//! - `seq`: the last id issued; `floor`: the id the store started above (everything
//!   below it counts as lost: Redis was emptied or restarted);
//! - `s:<stream>`: a Redis stream per history stream, entry ids `<event id>-0`, field `e`
//!   the event's bus bytes with its id; trimmed by count on each append, and expiring
//!   with its `l:<stream>` (the highest id it dropped) once unused past the age limit;
//! - `clock`: an entry a second at most (finer for an age limit under 1,000 s), the id
//!   issued at that time, so a replay knows which ids are older than the age limit
//!   without a time per event. A cursor older than the age limit is refreshed.
//!
//! One script gives ids, appends, trims and publishes a whole batch: one round trip, and
//! atomic, so the live order of a group is its id order and no replay sees id N+1 stored
//! while N is not.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::Script;

use super::link::{Shared, publish_failed};
use crate::bus::PublishError;

/// Lua that starts a fresh store's sequence at the clock's microseconds (KEYS[1] `seq`,
/// KEYS[2] `floor`): ids stay above those of a store that was lost, and cursors from
/// before it count as lost. A macro, so the scripts can `concat!` it.
macro_rules! start_lua {
    () => {
        r#"
local function start(t)
  local floor = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', KEYS[1], floor)
  redis.call('SET', KEYS[2], floor)
end
"#
    };
}
use crate::event::{Event, Target};
use crate::history::{Retention, Snapshot, Store, StreamKey, StreamRead, Unavailable};

/// Gives each recorded event its id, keeps it and publishes it; publishes the others. An
/// event whose idempotency key is known answers the id kept under it and is not published
/// again; a lost mark moves its stream's lost marker instead of being kept.
///
/// KEYS: seq, floor, clock, then per event its stream, lost-marker and idempotency keys.
/// ARGV: the age limit in ms, the idempotency window in ms, then per event: channel, bus
/// bytes, events its stream keeps (0: not recorded), 1 for a lost mark (else 0), its
/// idempotency key ('' for none). Returns the ids (0 for events not recorded).
const RECORD: &str = concat!(
    start_lua!(),
    append_lua!(),
    r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1]) + 60000
local window = tonumber(ARGV[2])
local step = math.min(1000, math.max(1, math.floor(tonumber(ARGV[1]) / 1000)))
local ids = {}
for i = 1, (#ARGV - 2) / 5 do
  local a, k = 5 * i - 2, 3 * i + 1
  local channel, bytes, keep = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local mark, key = ARGV[a + 3] == '1', ARGV[a + 4]
  local seen = key ~= '' and redis.call('GET', KEYS[k + 2])
  if seen then
    ids[i] = tonumber(seen)
  elseif keep == 0 then
    redis.call('PUBLISH', channel, bytes)
    ids[i] = 0
  else
    if redis.call('EXISTS', KEYS[1]) == 0 then
      start(t)
    end
    local id = redis.call('INCR', KEYS[1])
    local sid = string.format('%.0f', id)
    local message = bytes .. '\16' .. varint(id)
    record(KEYS[k], KEYS[k + 1], sid, message, keep, ttl, mark)
    local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
    if #last == 0 or tonumber(string.match(last[1][1], '^%d+')) <= now - step then
      redis.call('XADD', KEYS[3], 'MINID', '~', string.format('%.0f', now - ttl), '*', 'i', sid)
    end
    redis.call('PUBLISH', channel, message)
    ids[i] = id
  end
  if key ~= '' and not seen then
    redis.call('SET', KEYS[k + 2], string.format('%.0f', ids[i]), 'PX', window)
  end
end
return ids
"#
);

/// The highest id issued, starting the sequence if the store is fresh, so that even the
/// first baseline names a point in this store's history. KEYS: seq, floor.
const LATEST: &str = concat!(
    start_lua!(),
    r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  start(redis.call('TIME'))
end
return redis.call('GET', KEYS[1])
"#
);

/// Reads streams for a replay, at one instant.
///
/// KEYS: seq, floor, clock, then per stream its stream and lost-marker keys.
/// ARGV: the first id to read, the age limit in ms.
/// Returns `{{latest, floor, aged}, {lost, bytes...}...}`: `aged` is an id at or above
/// every id issued before the age limit.
const READ: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local latest = redis.call('GET', KEYS[1]) or '0'
local floor = redis.call('GET', KEYS[2]) or '0'
local aged = latest
local since = redis.call('XRANGE', KEYS[3], string.format('%.0f', now - tonumber(ARGV[2])), '+', 'COUNT', 1)
if #since > 0 then
  aged = string.format('%.0f', tonumber(since[1][2][2]) - 1)
end
local out = {{latest, floor, aged}}
for i = 4, #KEYS, 2 do
  local read = {redis.call('GET', KEYS[i + 1]) or '0'}
  for _, entry in ipairs(redis.call('XRANGE', KEYS[i], ARGV[1], '+')) do
    read[#read + 1] = entry[2][2]
  end
  out[#out + 1] = read
end
return out
"#;

/// The cluster's history: retention, key names and the scripts.
pub struct RedisHistory {
    shared: Arc<Shared>,
    retention: Retention,
    /// How long an idempotency key is kept.
    idempotency_window: Duration,
    record: Script,
    read: Script,
    latest: Script,
}

impl RedisHistory {
    pub fn new(shared: Arc<Shared>, retention: Retention, idempotency_window: Duration) -> Self {
        RedisHistory {
            shared,
            retention,
            idempotency_window,
            record: Script::new(RECORD),
            read: Script::new(READ),
            latest: Script::new(LATEST),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}:h:{name}", self.shared.names.prefix)
    }

    fn stream_keys(&self, key: &StreamKey) -> [String; 2] {
        stream_key_names(key).map(|name| self.key(&name))
    }

    /// Publishes events in order in one script, recording those that ask for it; returns
    /// their ids. `record` false: history is off, nothing is recorded.
    pub async fn publish(&self, events: &[Event], record: bool) -> Result<Vec<u64>, PublishError> {
        let mut invocation = self.record.prepare_invoke();
        invocation
            .key(self.key("seq"))
            .key(self.key("floor"))
            .key(self.key("clock"))
            .arg(self.retention.max_age.as_millis() as u64)
            .arg(self.idempotency_window.as_millis() as u64);
        for event in events {
            let stream = StreamKey::of(event);
            let keep = if record && event.record {
                self.retention.events_in(&stream)
            } else {
                0
            };
            let channel = match &event.target {
                Target::Group { group, .. } => self.shared.names.group(group),
                _ => self.shared.names.broadcast(),
            };
            let bytes = prost::Message::encode_to_vec(&event.to_bus());
            let [stream, lost] = self.stream_keys(&stream);
            let key = event.idempotency_key.as_deref().unwrap_or_default();
            invocation
                .key(stream)
                .key(lost)
                .key(self.key(&idempotency_key_name(key)))
                .arg(channel)
                .arg(bytes)
                .arg(keep)
                .arg(u8::from(event.lost))
                .arg(key);
        }
        let mut connection = self.shared.publisher().await?;
        invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| publish_failed(e, "Redis publish script"))
    }
}

/// The name, under the history's prefix, that keeps an idempotency key's event id.
pub(super) fn idempotency_key_name(key: &str) -> String {
    format!("i:{key}")
}

/// An id as Redis answers it.
/// The names, under the history's prefix, of a stream and of the highest id it dropped.
pub(super) fn stream_key_names(key: &StreamKey) -> [String; 2] {
    let name = key.name();
    [format!("s:{name}"), format!("l:{name}")]
}

/// One stream as the read script gives it: the highest id it dropped, then its entries.
/// `floor`: ids at or below it are lost too (a fresh store, or the age limit).
pub(super) fn stream_read(stream: Vec<Vec<u8>>, floor: u64) -> Result<StreamRead, Unavailable> {
    let mut entries = stream.into_iter();
    let lost = entries.next().map_or(Ok(0), |b| number(&b))?;
    let events = entries
        .map(|bytes| {
            Event::from_bus(&bytes)
                .map(Arc::new)
                .ok_or_else(|| Unavailable("undecodable history entry".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(StreamRead {
        lost_through: lost.max(floor),
        events,
    })
}

pub(super) fn number(bytes: &[u8]) -> Result<u64, Unavailable> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Unavailable(format!("not an id: {:?}", String::from_utf8_lossy(bytes))))
}

impl Store for RedisHistory {
    fn read(
        &self,
        keys: Vec<StreamKey>,
        after: u64,
    ) -> BoxFuture<'_, Result<Snapshot, Unavailable>> {
        Box::pin(async move {
            let mut invocation = self.read.prepare_invoke();
            invocation
                .key(self.key("seq"))
                .key(self.key("floor"))
                .key(self.key("clock"))
                .arg(after.saturating_add(1))
                .arg(self.retention.max_age.as_millis() as u64);
            for key in &keys {
                let [stream, lost] = self.stream_keys(key);
                invocation.key(stream).key(lost);
            }
            let mut connection = self
                .shared
                .publisher()
                .await
                .map_err(|e| Unavailable(e.0))?;
            let reply: Vec<Vec<Vec<u8>>> = invocation
                .invoke_async(&mut connection)
                .await
                .map_err(|e| Unavailable(format!("Redis read script failed: {e}")))?;
            let mut parts = reply.into_iter();
            let head = parts.next().unwrap_or_default();
            let [latest, floor, aged] = [0, 1, 2].map(|i| head.get(i).map_or(Ok(0), |b| number(b)));
            let (latest, floor, aged) = (latest?, floor?, aged?);
            let streams = parts
                .map(|stream| stream_read(stream, floor.max(aged)))
                .collect::<Result<Vec<_>, Unavailable>>()?;
            Ok(Snapshot { latest, streams })
        })
    }

    fn latest(&self) -> BoxFuture<'_, Result<u64, Unavailable>> {
        Box::pin(async move {
            let mut connection = self
                .shared
                .publisher()
                .await
                .map_err(|e| Unavailable(e.0))?;
            self.latest
                .key(self.key("seq"))
                .key(self.key("floor"))
                .invoke_async(&mut connection)
                .await
                .map_err(|e| Unavailable(format!("Redis latest-id script failed: {e}")))
        })
    }
}
