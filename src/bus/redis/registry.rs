//! The node registry: each node keeps an expiring heartbeat key and its id in the set of
//! nodes, so a cluster-wide request knows which nodes to wait for ([`Shared::live_nodes`])
//! and presence can sweep the members of nodes that died. Shared by one Redis and a cluster.
//!
//! Redis is not the only memory of who is live. A Redis that lost its keys (a restart
//! without persistence, a failover to a replica that lagged) must not make a live node
//! forgotten, so each node remembers every node it saw until that node's heartbeat would
//! have expired ([`Liveness`]), and a registry younger than a heartbeat's life (Redis came
//! back empty) is not trusted until every live node had the time to write again. And a
//! node knows when the others stopped waiting for it: its own heartbeat lapsed (Redis was
//! away, or the process was stalled). Until it has caught up with what it may have missed
//! it delivers nothing (`Inbox::catch_up_if_counted_gone`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::link::Shared;
use super::lock;
use crate::bus::BusUnavailable;

/// How often a node renews its heartbeat, and how long one lives.
pub(super) const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
pub(super) const HEARTBEAT_TTL: Duration = Duration::from_secs(3);

/// Renews this node's heartbeat (unless the key is empty) and reads the registry in one
/// step: Redis's clock, when the registry was born (made on first use, so a Redis that lost
/// its keys shows a young one), each node in the set with its heartbeat's time to live,
/// and the nodes that said they left (each with a mark that lives as long as a
/// heartbeat). Nodes whose heartbeat or mark is gone leave their set.
const REGISTRY_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[2], now, 'NX')
local born = tonumber(redis.call('GET', KEYS[2])) or now
if ARGV[1] ~= '' then
  redis.call('SET', ARGV[1], ARGV[2], 'PX', ARGV[3])
  redis.call('SADD', KEYS[1], ARGV[4])
  redis.call('SREM', KEYS[3], ARGV[4])
end
local live = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local ttl = redis.call('PTTL', ARGV[5] .. node)
  if ttl == -2 then
    redis.call('SREM', KEYS[1], node)
  else
    live[#live + 1] = node
    live[#live + 1] = ttl
  end
end
local left = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if redis.call('EXISTS', ARGV[6] .. node) == 1 then
    left[#left + 1] = node
  else
    redis.call('SREM', KEYS[3], node)
  end
end
return {now, born, live, left}
";

/// The registry as one read found it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct View {
    /// Redis's clock, in milliseconds.
    pub(super) now_ms: u64,
    /// When the registry was made, on Redis's clock.
    pub(super) born_ms: u64,
    /// Nodes with a heartbeat, and how long it lives on (`None`: no expiry).
    nodes: Vec<(String, Option<Duration>)>,
    /// Nodes that said they left, within a heartbeat's life.
    left: Vec<String>,
}

impl View {
    fn parse(reply: Vec<redis::Value>) -> Option<View> {
        let [now, born, live, left]: [redis::Value; 4] = reply.try_into().ok()?;
        let number = |v: redis::Value| match v {
            redis::Value::Int(n) => u64::try_from(n).ok(),
            _ => None,
        };
        let live: Vec<redis::Value> = redis::from_redis_value(live).ok()?;
        let mut nodes = Vec::new();
        let mut live = live.into_iter();
        while let (Some(node), Some(ttl)) = (live.next(), live.next()) {
            let node: String = redis::from_redis_value(node).ok()?;
            // -1: a key without expiry (not ours to judge), counted as a whole life.
            nodes.push((node, number(ttl).map(Duration::from_millis)));
        }
        Some(View {
            now_ms: number(now)?,
            born_ms: number(born)?,
            nodes,
            left: redis::from_redis_value(left).ok()?,
        })
    }
}

/// A heartbeat Redis took.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Beat {
    /// When this node sent it: Redis set the key after that, so the others wait for this
    /// node at least until `sent + HEARTBEAT_TTL`.
    sent: Instant,
    /// Redis's clock when it took it.
    redis_ms: u64,
}

/// What a node remembers of the registry and of its own heartbeat. Pure: the reads and
/// writes are [`Shared`]'s.
#[derive(Debug, Default)]
pub(super) struct Liveness {
    /// Every node seen live, until when the others may still count it live.
    seen: HashMap<String, Instant>,
    /// Nodes that said they left, until their heartbeat would have expired.
    left: HashMap<String, Instant>,
    /// This node's last heartbeat Redis took.
    own: Option<Beat>,
    /// Redis's clock at this node's last heartbeat before the others stopped waiting for
    /// it; set until the node has caught up.
    gone_since: Option<u64>,
    /// Until when the registry is too young to name every live node.
    young_until: Option<Instant>,
}

impl Liveness {
    /// Takes a read of the registry answered at `answered`, with this node's heartbeat in
    /// it when `beat` says when it was sent.
    pub(super) fn saw(&mut self, view: &View, answered: Instant, beat: Option<Instant>) {
        if let Some(sent) = beat {
            self.beat(Beat {
                sent,
                redis_ms: view.now_ms,
            });
        }
        for node in &view.left {
            self.left(node, answered);
        }
        for (node, ttl) in &view.nodes {
            if self.left.get(node).is_some_and(|until| *until > answered) {
                continue;
            }
            // Redis measured the time to live before the answer came: counting it from
            // the answer errs towards waiting longer.
            let until = answered + ttl.unwrap_or(HEARTBEAT_TTL);
            let known = self.seen.entry(node.clone()).or_insert(until);
            *known = (*known).max(until);
        }
        let age = Duration::from_millis(view.now_ms.saturating_sub(view.born_ms));
        self.young_until = HEARTBEAT_TTL
            .checked_sub(age)
            .filter(|left| !left.is_zero())
            .map(|left| answered + left);
    }

    fn beat(&mut self, beat: Beat) {
        if let Some(last) = self.own
            && beat.sent.saturating_duration_since(last.sent) > HEARTBEAT_TTL
        {
            self.gone_since.get_or_insert(last.redis_ms);
        }
        self.own = Some(beat);
    }

    /// A node that stopped: the others need not wait for it.
    fn left(&mut self, node: &str, now: Instant) {
        self.seen.remove(node);
        self.left.insert(node.to_string(), now + HEARTBEAT_TTL);
    }

    /// The nodes a cluster-wide request must wait for at `now`: each seen live within its
    /// heartbeat's life, whether Redis still shows it or not.
    pub(super) fn live(&mut self, now: Instant) -> Vec<String> {
        self.seen.retain(|_, until| *until > now);
        self.left.retain(|_, until| *until > now);
        let mut live: Vec<String> = self.seen.keys().cloned().collect();
        live.sort_unstable();
        live
    }

    /// Until when the registry cannot yet be trusted to name every live node.
    pub(super) fn young_until(&self, now: Instant) -> Option<Instant> {
        self.young_until.filter(|until| *until > now)
    }

    /// Whether the others may have stopped waiting for this node (its heartbeat lapsed),
    /// and if so Redis's clock at its last heartbeat before: what it may have missed came
    /// after that. It stays so until [`Liveness::caught_up`].
    pub(super) fn counted_gone(&mut self, now: Instant) -> Option<u64> {
        if let Some(last) = self.own
            && now.saturating_duration_since(last.sent) > HEARTBEAT_TTL
        {
            self.gone_since.get_or_insert(last.redis_ms);
        }
        self.gone_since
    }

    /// The node made up for what it missed since `since` (and is live again).
    pub(super) fn caught_up(&mut self, since: u64) {
        if self.gone_since == Some(since) {
            self.gone_since = None;
        }
    }
}

impl Shared {
    /// Reads the registry, renewing this node's heartbeat with `beat`.
    async fn registry(&self, beat: bool) -> Result<View, BusUnavailable> {
        let mut connection = self.publisher().await?;
        let names = &self.names;
        let node = &names.node_id;
        let heartbeat = if beat {
            names.heartbeat(node)
        } else {
            String::new()
        };
        let sent = Instant::now();
        let reply: Vec<redis::Value> = redis::Script::new(REGISTRY_SCRIPT)
            .key(names.nodes())
            .key(names.registry_born())
            .key(names.left_nodes())
            .arg(heartbeat)
            .arg(env!("CARGO_PKG_VERSION"))
            .arg(HEARTBEAT_TTL.as_millis() as u64)
            .arg(node)
            .arg(names.heartbeat(""))
            .arg(names.left(""))
            .invoke_async(&mut connection)
            .await
            .map_err(|e| BusUnavailable(format!("Redis node registry: {e}")))?;
        let view = View::parse(reply)
            .ok_or_else(|| BusUnavailable("Redis node registry: unreadable answer".into()))?;
        lock(&self.liveness).saw(&view, Instant::now(), beat.then_some(sent));
        Ok(view)
    }

    /// Renews this node's heartbeat; the registry as it was then.
    pub(super) async fn heartbeat(&self) -> Result<View, BusUnavailable> {
        self.registry(true).await
    }

    /// The nodes a cluster-wide request must wait for: every node seen live within its
    /// heartbeat's life, from Redis or from memory, and this one.
    pub(super) async fn live_nodes(&self) -> Result<Vec<String>, BusUnavailable> {
        self.registry(false).await?;
        let mut live = lock(&self.liveness).live(Instant::now());
        if !live.contains(&self.names.node_id) {
            live.push(self.names.node_id.clone());
        }
        Ok(live)
    }

    /// The nodes a cluster-wide request must wait for, once the registry names every live
    /// node: a registry Redis made anew (it lost its keys) does so once each live node had
    /// a heartbeat's life to write again; a node that could not has counted itself gone.
    pub(super) async fn settled_live_nodes(&self) -> Result<Vec<String>, BusUnavailable> {
        let live = self.live_nodes().await?;
        let Some(until) = lock(&self.liveness).young_until(Instant::now()) else {
            return Ok(live);
        };
        tracing::info!(
            wait = ?until.saturating_duration_since(Instant::now()),
            "the Redis node registry is new: waiting for every live node to write its heartbeat"
        );
        tokio::time::sleep_until(until).await;
        self.live_nodes().await
    }

    /// This node stops: its heartbeat goes, and a mark tells the others not to wait for it
    /// until the heartbeat would have expired.
    pub(super) async fn leave_registry(&self) {
        let names = &self.names;
        let node = &names.node_id;
        if let Ok(mut connection) = self.publisher().await {
            let _: Result<(), _> = redis::pipe()
                .cmd("SET")
                .arg(names.left(node))
                .arg(1)
                .arg("PX")
                .arg(HEARTBEAT_TTL.as_millis() as u64)
                .ignore()
                .cmd("SADD")
                .arg(names.left_nodes())
                .arg(node)
                .ignore()
                .cmd("DEL")
                .arg(names.heartbeat(node))
                .ignore()
                .cmd("SREM")
                .arg(names.nodes())
                .arg(node)
                .ignore()
                .query_async(&mut connection)
                .await;
        }
    }
}

/// Renews this node's heartbeat; a node whose heartbeat expired is no longer waited for.
/// When this node finds its own heartbeat lapsed, it wakes the listener to catch up.
pub(super) async fn heartbeats(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(error) = shared.heartbeat().await {
            tracing::debug!(%error, "heartbeat not written");
        }
        if lock(&shared.liveness)
            .counted_gone(Instant::now())
            .is_some()
        {
            shared.counted_gone.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(now_ms: u64, born_ms: u64, nodes: &[(&str, u64)]) -> View {
        View {
            now_ms,
            born_ms,
            nodes: nodes
                .iter()
                .map(|(n, ttl)| (n.to_string(), Some(Duration::from_millis(*ttl))))
                .collect(),
            left: Vec::new(),
        }
    }

    #[test]
    fn a_node_redis_forgot_is_waited_for_until_its_heartbeat_would_have_expired() {
        let t0 = Instant::now();
        let mut liveness = Liveness::default();
        liveness.saw(&view(50_000, 0, &[("a", 3000), ("b", 2500)]), t0, None);
        // Redis restarted empty: only a wrote again.
        let later = t0 + Duration::from_millis(500);
        liveness.saw(&view(60_000, 59_800, &[("a", 3000)]), later, None);
        assert_eq!(liveness.live(later), ["a", "b"]);
        assert_eq!(
            liveness.young_until(later),
            Some(later + Duration::from_millis(2800))
        );
        assert_eq!(liveness.live(t0 + Duration::from_millis(2600)), ["a"]);
        assert_eq!(liveness.young_until(t0 + Duration::from_secs(4)), None);
    }

    #[test]
    fn a_node_that_left_is_not_waited_for() {
        let t0 = Instant::now();
        let mut liveness = Liveness::default();
        liveness.saw(&view(1, 0, &[("a", 3000), ("b", 3000)]), t0, None);
        // b's heartbeat is gone and its mark says it left.
        let gone = View {
            left: vec!["b".into()],
            ..view(10_000, 0, &[("a", 3000)])
        };
        liveness.saw(&gone, t0, None);
        assert_eq!(liveness.live(t0), ["a"]);
        // A read that raced the leave and still shows b does not bring it back.
        liveness.saw(&view(10_000, 0, &[("a", 3000), ("b", 100)]), t0, None);
        assert_eq!(liveness.live(t0), ["a"]);
    }

    #[test]
    fn a_node_knows_it_was_counted_gone_after_a_gap_in_its_heartbeats() {
        let t0 = Instant::now();
        let mut liveness = Liveness::default();
        assert_eq!(liveness.counted_gone(t0 + Duration::from_secs(60)), None);
        liveness.saw(&view(10_000, 0, &[]), t0, Some(t0));
        let second = t0 + Duration::from_secs(1);
        liveness.saw(&view(11_000, 0, &[]), second, Some(second));
        assert_eq!(liveness.counted_gone(second), None);
        // Stalled for eight seconds: nothing ran, then a heartbeat went out first.
        let resumed = second + Duration::from_secs(8);
        liveness.saw(&view(19_000, 0, &[]), resumed, Some(resumed));
        assert_eq!(liveness.counted_gone(resumed), Some(11_000));
        liveness.caught_up(11_000);
        assert_eq!(liveness.counted_gone(resumed), None);
        // Or nothing was written at all while Redis was away.
        let away = resumed + Duration::from_secs(4);
        assert_eq!(liveness.counted_gone(away), Some(19_000));
    }
}
