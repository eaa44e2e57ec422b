//! What a cluster node says to Redis: slots and lane tags, the lanes' Lua scripts, and
//! reading the cluster's answers.

use std::collections::HashSet;

use crate::history::lanes::{EPOCH_MICROS, LANES, TICK_MICROS};

/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;

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
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// Each lane's hash tag: the first `<lane>-<n>` whose slot lies in the lane's block.
pub fn lane_tags() -> Vec<String> {
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

/// Lua reading a lane's clock (`KEYS[1]`: seq, `KEYS[2]`: floor) into `last`; a lane without
/// one (fresh, or lost with a primary whose replica did not have it) starts at `now`, and
/// everything below counts as lost.
fn lane_clock_lua() -> String {
    clock_lua()
        + r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], now)
  redis.call('SET', KEYS[2], now)
end
local last = tonumber(redis.call('GET', KEYS[1]))
"
}

/// Gives a lane's events their ids, keeps those recorded and publishes them all. An event
/// whose idempotency key is known answers the id kept under it and is not published again;
/// a lost mark moves its stream's lost marker instead of being kept.
///
/// KEYS: seq, floor, rec (the last recorded id), then per event its stream, lost-marker
/// and idempotency keys.
/// ARGV: the age limit in ms, the clock the node has seen, the lane, the idempotency window
/// in ms, 1 when history is on (else 0: the nodes order nothing, events go without a
/// position), then per event: channel, bus bytes, events its stream keeps (0: not
/// recorded, published with its position), 1 for a lost mark (else 0), its idempotency
/// key ('' for none). Returns the ids (0 for events not recorded).
pub(super) fn record_lua() -> String {
    lane_clock_lua()
        + append_lua!()
        + &format!(
            r"
local lanes, age, hint, lane = {LANES}, tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local window, ordered = tonumber(ARGV[4]), ARGV[5] == '1'
local ttl = age + 60000
local ids = {{}}
for i = 1, (#ARGV - 5) / 5 do
  local a, k = 5 * i + 1, 3 * i + 1
  local channel, bytes, keep = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local mark, key = ARGV[a + 3] == '1', ARGV[a + 4]
  local seen = key ~= '' and redis.call('GET', KEYS[k + 2])
  if seen then
    ids[i] = tonumber(seen)
  else
    last = math.max(now, last + 1, hint + 1)
    local id = last * lanes + lane
    local sid = string.format('%.0f', id)
    if not ordered then
      redis.call('SPUBLISH', channel, bytes)
      ids[i] = 0
    elseif keep == 0 then
      redis.call('SPUBLISH', channel, bytes .. '\24' .. varint(id))
      ids[i] = 0
    else
      local message = bytes .. '\16' .. varint(id)
      record(KEYS[k], KEYS[k + 1], sid, message, keep, ttl, mark)
      redis.call('SET', KEYS[3], sid)
      redis.call('SPUBLISH', channel, message)
      ids[i] = id
    end
    if key ~= '' then
      redis.call('SET', KEYS[k + 2], string.format('%.0f', ids[i]), 'PX', window)
    end
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
pub(super) fn ensure_lua() -> String {
    lane_clock_lua()
        + r"
if tonumber(ARGV[1]) > last then
  last = tonumber(ARGV[1])
  redis.call('SET', KEYS[1], string.format('%.0f', last))
end
return string.format('%.0f', last)
"
}

/// A tick, run on one primary for the lanes it serves: moves each lane's clock to at
/// least now - 1 and says `T<lane>:<t>,...` on the first lane's channel. Publishing it
/// keeps it in order with the lanes' events: one connection brings a node everything a
/// primary publishes. Returns `<t> <id>`: the highest clock it showed, and (when asked)
/// the highest id those lanes recorded or count as lost. A lane whose slot this primary
/// does not serve fails the script (Redis refuses keys of other nodes), so a tick never
/// speaks for a lane elsewhere; a lane whose clock is gone (its keys moving away) is left
/// out.
/// ARGV: the prefix, 1 to report the highest id (else 0), then the lanes.
pub(super) fn tick_lua(tags: &[String]) -> String {
    let tags: Vec<String> = tags.iter().map(|tag| format!("'{tag}'")).collect();
    clock_lua()
        + &format!(
            r"
local lanes, prefix, report = {LANES}, ARGV[1], ARGV[2] == '1'
local tags = {{{}}}
local shown, channel, highest, issued = {{}}, nil, 0, 0
for i = 3, #ARGV do
  local lane = tonumber(ARGV[i])
  local keys = prefix .. ':h:{{' .. tags[lane + 1] .. '}}:'
  local last = redis.call('GET', keys .. 'seq')
  if last then
    last = math.max(tonumber(last), now - 1)
    redis.call('SET', keys .. 'seq', string.format('%.0f', last))
    shown[#shown + 1] = lane .. ':' .. string.format('%.0f', last)
    highest = math.max(highest, last)
    channel = channel or (prefix .. ':l:{{' .. tags[lane + 1] .. '}}')
    if report then
      local floor = tonumber(redis.call('GET', keys .. 'floor') or '0')
      local recorded = tonumber(redis.call('GET', keys .. 'rec') or '0')
      issued = math.max(issued, recorded, (floor + 1) * lanes - 1)
    end
  end
end
if channel then
  redis.call('SPUBLISH', channel, 'T' .. table.concat(shown, ','))
end
return string.format('%.0f %.0f', highest, issued)
",
            tags.join(", ")
        )
}

/// Reads one lane's streams.
///
/// KEYS: floor, then per stream its stream and lost-marker keys.
/// ARGV: the first id to read, the last ('+': all), the age limit in ms.
/// Returns `{{floor id, aged}, {lost, bytes...}...}`. `aged` is the last position before
/// the age limit: an id's clock is never below the Redis clock when it was made, so
/// every id made before the limit is at or below it.
pub(super) fn read_lua() -> String {
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

/// Where the lanes are, from the text of `CLUSTER NODES`: the lanes each primary serves
/// (by the primary's id; lanes of slots being moved are left out), and per lane whether
/// its primary has a replica that is not failed.
#[derive(Default)]
pub(super) struct Topology {
    pub by_primary: Vec<Vec<usize>>,
    pub replicated: [bool; LANES as usize],
}

pub(super) fn topology(nodes: &str, tags: &[String]) -> Topology {
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
    let mut topology = Topology::default();
    for fields in lines.iter().filter(|f| f[2].contains("master")) {
        let mut lanes = Vec::new();
        for range in &fields[8..] {
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            let (Ok(first), Ok(last)) = (first.parse::<u16>(), last.parse::<u16>()) else {
                continue; // a slot being imported or migrated: `[...]`
            };
            for (lane, tag) in tags.iter().enumerate() {
                if (first..=last).contains(&slot(tag.as_bytes())) {
                    lanes.push(lane);
                    topology.replicated[lane] = with_replica.contains(fields[0]);
                }
            }
        }
        if !lanes.is_empty() {
            topology.by_primary.push(lanes);
        }
    }
    topology
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_redis() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(slot(b"abc"), 7638);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        // An empty first tag hashes the whole key; the tag ends at the first `}`.
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"123456789"), 0x31C3 % SLOTS);
    }

    #[test]
    fn lanes_are_found_on_their_primaries_and_confirmed_where_it_has_a_live_replica() {
        let tags = lane_tags();
        let nodes = "\
a 127.0.0.1:1@11 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:2@12 master - 0 0 2 connected 5461-10922
c 127.0.0.1:3@13 master - 0 0 3 connected 10923-16383
d 127.0.0.1:4@14 slave a 0 0 1 connected
e 127.0.0.1:5@15 slave,fail b 0 0 2 connected
f 127.0.0.1:6@16 slave c 0 0 3 connected
";
        let topology = topology(nodes, &tags);
        for (lane, tag) in tags.iter().enumerate() {
            let on_b = (5461..=10922).contains(&slot(tag.as_bytes()));
            assert_eq!(topology.replicated[lane], !on_b, "lane {lane}");
        }
        assert_eq!(topology.by_primary.len(), 3);
        let mut every: Vec<usize> = topology.by_primary.concat();
        every.sort_unstable();
        assert_eq!(every, (0..LANES as usize).collect::<Vec<_>>());
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
