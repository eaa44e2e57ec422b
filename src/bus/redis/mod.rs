//! The Redis bus: many nodes exchange events and control requests through Redis pub/sub.
//!
//! Channels (under `--redis-prefix`, `channelgate` by default):
//! - `P:g:<group>`: one per channel group; a node subscribes while it has local members;
//! - `P:broadcast`: user-targeted events and the `users` group, for every node;
//! - `P:control` and `P:reply:<node id>`: cluster-wide requests and their replies;
//! - keys `P:node:<node id>` (expiring heartbeats) and the set `P:nodes` name live nodes;
//! - `P:h:*`: the event history ([`history`]);
//! - `P:presence` and `P:presence:members`: presence, when on ([`presence`]).
//!
//! One pub/sub connection per node receives everything in order, so events published one
//! after another to a group reach every node in that order. When Redis goes away the node
//! reports not ready, `Publish` fails with `UNAVAILABLE`, and a reconnect with backoff
//! restores every subscription; sockets stay connected throughout.
//!
//! That is one Redis (`--redis-url`). On a Redis Cluster (`--redis-cluster-nodes`) the
//! channels and keys carry hash tags and the history is kept in lanes: see [`cluster`].
//! Both share the node registry, control, presence and the subscription bookkeeping here.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use prost::Message as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use redis::cluster_async::ClusterConnection;
use tokio::sync::{mpsc, oneshot, watch};

/// Lua that appends an event to a history stream (`XADD` at `<id>-0`), trims the stream
/// to `keep` entries remembering the highest id it dropped in `lost`, and lets both expire
/// `ttl` ms after the last append; and `varint`, to append an id to protobuf bytes. A
/// macro, so the scripts of one Redis and of a cluster can `concat!` it.
macro_rules! append_lua {
    () => {
        r#"
local function varint(n)
  local out = {}
  while n >= 128 do
    out[#out + 1] = string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  out[#out + 1] = string.char(n)
  return table.concat(out)
end
local function append(stream, lost, sid, message, keep, ttl)
  redis.call('XADD', stream, sid .. '-0', 'e', message)
  local over = redis.call('XLEN', stream) - keep
  if over > 0 then
    local dropped = {}
    for j, entry in ipairs(redis.call('XRANGE', stream, '-', '+', 'COUNT', over)) do
      dropped[j] = entry[1]
    end
    redis.call('XDEL', stream, unpack(dropped))
    redis.call('SET', lost, string.match(dropped[#dropped], '^%d+'))
  end
  redis.call('PEXPIRE', stream, ttl)
  redis.call('PEXPIRE', lost, ttl)
end
"#
    };
}

mod cluster;
mod history;
mod presence;

use super::{Bus, BusUnavailable};
use crate::control::{Answers, ControlHandler, Reply, Request};
use crate::event::{Event, Target};
use crate::history::{self as event_history, HistorySettings, Store as _, StreamKey, lanes};
use crate::hub::GroupInterest;
use crate::hub::Hub;
use crate::presence::Presence;
use crate::proto;
use crate::protocol::CloseReason;
use history::RedisHistory;
use presence::RedisPresence;

/// How often a node renews its heartbeat, and how long one lives.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const HEARTBEAT_TTL: Duration = Duration::from_secs(3);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long one Redis command may take before the bus counts Redis as unavailable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the pub/sub connection pings Redis: a frozen or silent Redis sends nothing,
/// so without it the node would not notice. No pong within `COMMAND_TIMEOUT` breaks the
/// connection: the node turns not ready and reconnects.
const WATCHDOG_EVERY: Duration = Duration::from_secs(1);

/// Where the nodes meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis (`--redis-url`).
    Url(String),
    /// A Redis Cluster, by some of its nodes (`--redis-cluster-nodes`): see [`cluster`].
    Cluster(Vec<String>),
}

/// What the Redis bus needs to know.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub target: RedisTarget,
    pub prefix: String,
    /// How long a cluster-wide request waits for the nodes' replies.
    pub control_timeout: Duration,
    /// How long a group stays subscribed after its last local member left, so groups
    /// whose members come and go do not churn Redis.
    pub unsubscribe_delay: Duration,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Channel and key names. The channels every message is told apart by are made once: the
/// listener compares each message's channel with them before it delivers an event.
///
/// On a Redis Cluster, the keys and channels that must share a slot carry a hash tag: the
/// node registry, control requests and presence share `{P}` (they are little traffic, and
/// the presence and sweep scripts read a node's heartbeat with its members), and a group's
/// channel is on its history lane's slot ([`cluster`]).
#[derive(Clone)]
struct Names {
    prefix: String,
    /// `P`, or `{P}` on a cluster.
    registry: String,
    node_id: String,
    control: String,
    presence: String,
    own_reply: String,
    /// The lanes' hash tags on a cluster; empty on one Redis.
    lanes: Arc<[String]>,
}

impl Names {
    fn new(prefix: &str, node_id: &str, cluster: bool) -> Names {
        let registry = if cluster {
            format!("{{{prefix}}}")
        } else {
            prefix.to_string()
        };
        Names {
            prefix: prefix.to_string(),
            node_id: node_id.to_string(),
            control: format!("{registry}:control"),
            presence: format!("{registry}:presence"),
            own_reply: format!("{prefix}:reply:{node_id}"),
            registry,
            lanes: if cluster {
                cluster::lane_tags().into()
            } else {
                Arc::from([])
            },
        }
    }
    fn cluster(&self) -> bool {
        !self.lanes.is_empty()
    }
    fn group(&self, group: &str) -> String {
        match self.lanes.get(lanes::lane_of_group(group)) {
            Some(tag) => format!("{}:g:{{{tag}}}:{group}", self.prefix),
            None => format!("{}:g:{group}", self.prefix),
        }
    }
    fn broadcast(&self) -> String {
        format!("{}:broadcast", self.prefix)
    }
    fn control(&self) -> &str {
        &self.control
    }
    fn reply(&self, node_id: &str) -> String {
        format!("{}:reply:{node_id}", self.prefix)
    }
    fn heartbeat(&self, node_id: &str) -> String {
        format!("{}:node:{node_id}", self.registry)
    }
    fn nodes(&self) -> String {
        format!("{}:nodes", self.registry)
    }
    fn presence(&self) -> &str {
        &self.presence
    }
    fn presence_members(&self) -> String {
        format!("{}:presence:members", self.registry)
    }
    /// The publish command for these channels: sharded on a cluster, so a message goes
    /// to one shard and not to every node of the cluster.
    fn publish_command(&self) -> &'static str {
        if self.cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }
    /// The channels every node listens on whatever its members, but for those that bring
    /// it every node's events (one Redis: broadcast; a cluster: the lanes).
    fn fixed(&self, presence: bool) -> Vec<String> {
        let mut channels = vec![self.control.clone(), self.own_reply.clone()];
        if presence {
            channels.push(self.presence().to_string());
        }
        channels
    }
}

/// A node's wish to (un)subscribe a group, carried out by the pub/sub task.
enum Command {
    Subscribe(Arc<str>),
    Unsubscribe(Arc<str>),
}

#[derive(Default)]
struct GroupSub {
    /// Local (connection, group) memberships.
    members: usize,
    subscribed: bool,
    /// Subscribes waiting for Redis to confirm the group.
    waiters: Vec<oneshot::Sender<()>>,
}

impl GroupSub {
    fn wake(&mut self) {
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(());
        }
    }
}

/// Reference-counted group subscriptions: the first local member subscribes the group's
/// channel, the last one unsubscribes it after a short delay.
pub struct Subscriptions {
    groups: Mutex<HashMap<Arc<str>, GroupSub>>,
    commands: mpsc::UnboundedSender<Command>,
    connected: AtomicBool,
    unsubscribe_delay: Duration,
}

impl GroupInterest for Subscriptions {
    fn joined(&self, group: &Arc<str>) -> BoxFuture<'static, ()> {
        let mut groups = lock(&self.groups);
        let sub = groups.entry(group.clone()).or_default();
        sub.members += 1;
        if sub.subscribed || !self.connected.load(Ordering::Acquire) {
            // Subscribed already, or Redis is away and the reconnect will subscribe it.
            return Box::pin(std::future::ready(()));
        }
        let (tx, rx) = oneshot::channel();
        if sub.waiters.is_empty() {
            let _ = self.commands.send(Command::Subscribe(group.clone()));
        }
        sub.waiters.push(tx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }

    fn left(&self, group: &Arc<str>) {
        let mut groups = lock(&self.groups);
        let Some(sub) = groups.get_mut(group) else {
            return;
        };
        sub.members = sub.members.saturating_sub(1);
        if sub.members == 0 {
            let commands = self.commands.clone();
            let group = group.clone();
            let delay = self.unsubscribe_delay;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = commands.send(Command::Unsubscribe(group));
            });
        }
    }
}

impl Subscriptions {
    /// Groups with local members, to subscribe after a (re)connect.
    fn wanted(&self) -> Vec<Arc<str>> {
        lock(&self.groups)
            .iter()
            .filter(|(_, sub)| sub.members > 0)
            .map(|(group, _)| group.clone())
            .collect()
    }

    fn mark_connected(&self, groups: &[Arc<str>]) {
        let mut state = lock(&self.groups);
        for group in groups {
            if let Some(sub) = state.get_mut(group) {
                sub.subscribed = true;
                sub.wake();
            }
        }
        self.connected.store(true, Ordering::Release);
    }

    /// Whether a group has local members but no subscription yet.
    fn needs_subscribing(&self, group: &Arc<str>) -> bool {
        lock(&self.groups)
            .get(group)
            .is_some_and(|sub| sub.members > 0 && !sub.subscribed)
    }

    /// A group's subscription took effect: its subscribers go on.
    fn subscribed(&self, group: &Arc<str>) {
        if let Some(sub) = lock(&self.groups).get_mut(group) {
            sub.subscribed = true;
            sub.wake();
        }
    }

    /// Forgets a group that has had no local member since its unsubscribe was asked for;
    /// `true`: its channel is to be unsubscribed.
    fn forget_unused(&self, group: &Arc<str>) -> bool {
        let mut groups = lock(&self.groups);
        let unused = groups.get(group).is_some_and(|sub| sub.members == 0);
        if unused {
            groups.remove(group);
        }
        unused
    }

    /// Redis is gone: nothing is subscribed any more, and nobody waits for it.
    fn mark_disconnected(&self) {
        self.connected.store(false, Ordering::Release);
        let mut state = lock(&self.groups);
        state.retain(|_, sub| sub.members > 0);
        for sub in state.values_mut() {
            sub.subscribed = false;
            sub.wake();
        }
    }
}

/// Creates the group interest a Redis node's hub reports to, and the receiving end the
/// bus's pub/sub task reads; see [`RedisBus::start`].
pub fn subscriptions(unsubscribe_delay: Duration) -> (Arc<Subscriptions>, PendingCommands) {
    let (commands, receiver) = mpsc::unbounded_channel();
    let subscriptions = Arc::new(Subscriptions {
        groups: Mutex::default(),
        commands,
        connected: AtomicBool::new(false),
        unsubscribe_delay,
    });
    (subscriptions, PendingCommands(receiver))
}

/// The subscription commands for the pub/sub task.
pub struct PendingCommands(mpsc::UnboundedReceiver<Command>);

/// How a node reaches Redis.
enum Link {
    /// One Redis: a connection made on first use (Redis may be down at start), which
    /// then reconnects by itself; the pub/sub connection is the listener's own.
    Single {
        client: redis::Client,
        manager: Mutex<Option<ConnectionManager>>,
    },
    /// A Redis Cluster: one connection, made once by the cluster listener (it follows
    /// the cluster by itself), carries commands and the sharded pub/sub messages
    /// ([`cluster`]).
    Cluster(OnceLock<ClusterConnection>),
}

/// A connection for commands, to one Redis or to a cluster.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// State shared by the bus handle and its tasks.
struct Shared {
    names: Names,
    link: Link,
    ready: watch::Sender<bool>,
    /// Control requests this node asked, by id, waiting for replies.
    asking: Mutex<HashMap<String, mpsc::UnboundedSender<(String, Reply)>>>,
    control_timeout: Duration,
}

impl Shared {
    async fn publisher(&self) -> Result<Connection, BusUnavailable> {
        let (client, manager) = match &self.link {
            Link::Cluster(connection) => {
                return connection
                    .get()
                    .cloned()
                    .map(Connection::Cluster)
                    .ok_or_else(|| {
                        BusUnavailable("not connected to the Redis Cluster yet".into())
                    });
            }
            Link::Single { client, manager } => (client, manager),
        };
        if let Some(connection) = lock(manager).clone() {
            return Ok(Connection::Single(connection));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_MAX);
        let connection = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| BusUnavailable(format!("cannot connect to Redis: {e}")))?;
        *lock(manager) = Some(connection.clone());
        Ok(Connection::Single(connection))
    }

    async fn publish_bytes(&self, channel: &str, bytes: Vec<u8>) -> Result<i64, BusUnavailable> {
        let mut connection = self.publisher().await?;
        redis::cmd(self.names.publish_command())
            .arg(channel)
            .arg(bytes)
            .query_async(&mut connection)
            .await
            .map_err(|e| BusUnavailable(format!("Redis PUBLISH failed: {e}")))
    }

    /// Nodes whose heartbeat is alive; forgets the others.
    async fn live_nodes(&self) -> Result<Vec<String>, BusUnavailable> {
        let mut connection = self.publisher().await?;
        let fail = |e: redis::RedisError| BusUnavailable(format!("Redis: {e}"));
        let nodes: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.names.nodes())
            .query_async(&mut connection)
            .await
            .map_err(fail)?;
        if nodes.is_empty() {
            return Ok(nodes);
        }
        let keys: Vec<String> = nodes.iter().map(|n| self.names.heartbeat(n)).collect();
        let beats: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut connection)
            .await
            .map_err(fail)?;
        let dead: Vec<&String> = nodes
            .iter()
            .zip(&beats)
            .filter(|(_, beat)| beat.is_none())
            .map(|(node, _)| node)
            .collect();
        if !dead.is_empty() {
            let _: Result<i64, _> = redis::cmd("SREM")
                .arg(self.names.nodes())
                .arg(dead)
                .query_async(&mut connection)
                .await;
        }
        Ok(nodes
            .into_iter()
            .zip(beats)
            .filter(|(_, beat)| beat.is_some())
            .map(|(node, _)| node)
            .collect())
    }

    async fn heartbeat(&self) -> Result<(), BusUnavailable> {
        let mut connection = self.publisher().await?;
        let node = &self.names.node_id;
        redis::pipe()
            .cmd("SET")
            .arg(self.names.heartbeat(node))
            .arg(env!("CARGO_PKG_VERSION"))
            .arg("PX")
            .arg(HEARTBEAT_TTL.as_millis() as u64)
            .ignore()
            .cmd("SADD")
            .arg(self.names.nodes())
            .arg(node)
            .ignore()
            .query_async::<()>(&mut connection)
            .await
            .map_err(|e| BusUnavailable(format!("Redis heartbeat failed: {e}")))
    }

    fn set_ready(&self, ready: bool) {
        self.ready.send_if_modified(|current| {
            let changed = *current != ready;
            *current = ready;
            changed
        });
    }
}

/// What a node's bus delivers into: its sockets, its answers to control requests, and
/// its presence (`None` when off).
pub struct Receivers {
    pub hub: Arc<Hub>,
    pub control: Arc<ControlHandler>,
    pub presence: Option<Arc<Presence>>,
}

/// Where events are published and recorded.
enum Store {
    /// One Redis: one script gives ids from one sequence, stores and publishes.
    Single(Arc<RedisHistory>),
    /// A Redis Cluster: ids, storage and publishing by lane ([`cluster`]).
    Lanes(Arc<cluster::Lanes>),
}

/// The bus of a node in a cluster.
pub struct RedisBus {
    shared: Arc<Shared>,
    /// The publish scripts, which also record events when `recording`.
    store: Store,
    recording: bool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RedisBus {
    /// Starts the pub/sub and heartbeat tasks. Redis need not be up yet: the node starts
    /// not ready and connects as soon as it can. A malformed URL is an error.
    pub fn start(
        settings: &RedisSettings,
        history: Option<&HistorySettings>,
        node_id: &str,
        receivers: Receivers,
        subscriptions: Arc<Subscriptions>,
        commands: PendingCommands,
    ) -> Result<RedisBus, String> {
        let Receivers {
            hub,
            control,
            presence,
        } = receivers;
        let link = match &settings.target {
            RedisTarget::Url(url) => Link::Single {
                client: redis::Client::open(url.as_str())
                    .map_err(|e| format!("--redis-url {url:?}: {e}"))?,
                manager: Mutex::default(),
            },
            RedisTarget::Cluster(_) if settings.prefix.contains(['{', '}']) => {
                return Err(format!(
                    "--redis-prefix {:?}: no braces on a Redis Cluster (they pick slots)",
                    settings.prefix
                ));
            }
            RedisTarget::Cluster(_) => Link::Cluster(OnceLock::new()),
        };
        let cluster = matches!(link, Link::Cluster(_));
        let shared = Arc::new(Shared {
            names: Names::new(&settings.prefix, node_id, cluster),
            link,
            ready: watch::Sender::new(false),
            asking: Mutex::default(),
            control_timeout: settings.control_timeout,
        });
        let recording = history.is_some();
        let retention = history.map(|h| h.retention).unwrap_or_default();
        let mut tasks = Vec::new();
        let presence = presence.map(|presence| {
            let (presence, presence_tasks) = RedisPresence::start(shared.clone(), presence);
            tasks.extend(presence_tasks);
            presence
        });
        let inbox = Inbox {
            shared: shared.clone(),
            control,
            presence,
        };
        let store = match &settings.target {
            RedisTarget::Url(_) => {
                let history = Arc::new(RedisHistory::new(shared.clone(), retention));
                let listener = Listener {
                    shared: shared.clone(),
                    hub,
                    inbox,
                    subscriptions,
                    history: recording.then(|| history.clone()),
                    delivered_through: AtomicU64::new(0),
                    was_connected: AtomicBool::new(false),
                };
                tasks.push(tokio::spawn(listener.run(commands.0)));
                Store::Single(history)
            }
            RedisTarget::Cluster(nodes) => {
                let lanes = Arc::new(cluster::Lanes::new(shared.clone(), retention, recording));
                let listener = cluster::Listener::new(
                    nodes.clone(),
                    lanes.clone(),
                    hub,
                    inbox,
                    subscriptions,
                )?;
                tasks.push(tokio::spawn(listener.run(commands.0)));
                Store::Lanes(lanes)
            }
        };
        tasks.push(tokio::spawn(heartbeats(shared.clone())));
        Ok(RedisBus {
            shared,
            store,
            recording,
            tasks,
        })
    }

    fn unavailable_unless_ready(&self) -> Result<(), BusUnavailable> {
        if *self.shared.ready.borrow() {
            Ok(())
        } else {
            Err(BusUnavailable("Redis is unreachable".into()))
        }
    }
}

impl Drop for RedisBus {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Bus for RedisBus {
    fn publish(&self, event: Event) -> BoxFuture<'_, Result<u64, BusUnavailable>> {
        Box::pin(async move {
            self.unavailable_unless_ready()?;
            let history = match &self.store {
                Store::Single(history) => history,
                Store::Lanes(lanes) => {
                    let ids = lanes.publish(vec![event]).await.map_err(BusUnavailable)?;
                    return Ok(ids.first().copied().unwrap_or_default());
                }
            };
            if self.recording && event.record {
                let ids = history.publish(&[event], true).await;
                return ids
                    .map(|ids| ids.first().copied().unwrap_or_default())
                    .map_err(BusUnavailable);
            }
            let channel = match &event.target {
                Target::Group { group, .. } => self.shared.names.group(group),
                _ => self.shared.names.broadcast(),
            };
            let bytes = event.to_bus().encode_to_vec();
            self.shared.publish_bytes(&channel, bytes).await.map(|_| 0)
        })
    }

    fn publish_batch(&self, events: Vec<Event>) -> BoxFuture<'_, Result<Vec<u64>, BusUnavailable>> {
        Box::pin(async move {
            self.unavailable_unless_ready()?;
            match &self.store {
                Store::Single(history) => history.publish(&events, self.recording).await,
                Store::Lanes(lanes) => lanes.publish(events).await,
            }
            .map_err(BusUnavailable)
        })
    }

    fn history(&self) -> Option<Arc<dyn event_history::Store>> {
        if !self.recording {
            return None;
        }
        Some(match &self.store {
            Store::Single(history) => history.clone(),
            Store::Lanes(lanes) => lanes.clone(),
        })
    }

    fn ask_all(&self, request: Request) -> BoxFuture<'_, Result<Answers, BusUnavailable>> {
        Box::pin(async move {
            self.unavailable_unless_ready()?;
            let shared = &self.shared;
            let id = uuid::Uuid::new_v4().to_string();
            let (tx, mut replies) = mpsc::unbounded_channel();
            lock(&shared.asking).insert(id.clone(), tx);
            let asked = async {
                let live = shared.live_nodes().await?;
                let message = proto::ControlRequest {
                    id: id.clone(),
                    reply_to: shared.names.node_id.clone(),
                    request: Some(request),
                };
                shared
                    .publish_bytes(shared.names.control(), message.encode_to_vec())
                    .await?;
                Ok::<_, BusUnavailable>(live)
            }
            .await;
            let mut answers = Answers::default();
            if let Ok(live) = &asked {
                // Every live node must answer, for the request to have reached every
                // socket; one that is cut off from Redis keeps its heartbeat a while,
                // so it shows up as missing rather than being forgotten.
                let mut answered = HashSet::new();
                let deadline = tokio::time::sleep(shared.control_timeout);
                tokio::pin!(deadline);
                while answered.is_empty() || !live.iter().all(|n| answered.contains(n)) {
                    tokio::select! {
                        reply = replies.recv() => match reply {
                            Some((node, reply)) => {
                                answered.insert(node);
                                answers.replies.push(reply);
                            }
                            None => break,
                        },
                        _ = &mut deadline => break,
                    }
                }
                answers.missing = live
                    .iter()
                    .filter(|n| !answered.contains(*n))
                    .cloned()
                    .collect();
            }
            lock(&shared.asking).remove(&id);
            asked?;
            Ok(answers)
        })
    }

    fn readiness(&self) -> watch::Receiver<bool> {
        self.shared.ready.subscribe()
    }

    fn leave(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for task in &self.tasks {
                task.abort();
            }
            let shared = &self.shared;
            let node = &shared.names.node_id;
            if let Ok(mut connection) = shared.publisher().await {
                let _: Result<(), _> = redis::pipe()
                    .cmd("DEL")
                    .arg(shared.names.heartbeat(node))
                    .ignore()
                    .cmd("SREM")
                    .arg(shared.names.nodes())
                    .arg(node)
                    .ignore()
                    .query_async(&mut connection)
                    .await;
            }
        })
    }
}

/// Renews this node's heartbeat; a node whose heartbeat expired is no longer waited for.
async fn heartbeats(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(error) = shared.heartbeat().await {
            tracing::debug!(%error, "heartbeat not written");
        }
    }
}

/// Why a pub/sub connection ended.
enum Broken {
    /// It never worked.
    Unreachable(String),
    /// It worked, then broke.
    Lost(String),
}

/// The pub/sub connection: receives everything for this node, keeps its subscriptions.
struct Listener {
    shared: Arc<Shared>,
    hub: Arc<Hub>,
    inbox: Inbox,
    subscriptions: Arc<Subscriptions>,
    /// The event history, to catch up after a lost connection; `None` when history is off.
    history: Option<Arc<RedisHistory>>,
    /// The highest event id this node has delivered or caught up to. Events arrive in id
    /// order on the one pub/sub connection, so an event at or below it is one the node
    /// already delivered while catching up.
    delivered_through: AtomicU64,
    /// Whether a connection worked before: the next one must make up for the gap.
    was_connected: AtomicBool,
}

impl Listener {
    async fn run(self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.listen(&mut commands).await {
                Ok(()) => return,
                Err(Broken::Lost(error)) => {
                    tracing::warn!(%error, "Redis connection lost; reconnecting");
                    backoff = BACKOFF_MIN;
                }
                Err(Broken::Unreachable(error)) => {
                    tracing::debug!(%error, "Redis unreachable; retrying");
                }
            }
            self.shared.set_ready(false);
            self.subscriptions.mark_disconnected();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection's life: subscribe everything wanted, then serve until it breaks.
    /// `Ok` only when the node is going away.
    async fn listen(&self, commands: &mut mpsc::UnboundedReceiver<Command>) -> Result<(), Broken> {
        let unreachable = |e: String| Broken::Unreachable(e);
        let Link::Single { client, .. } = &self.shared.link else {
            return Ok(());
        };
        let pubsub = tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_pubsub())
            .await
            .map_err(|_| unreachable("connect timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sink, mut stream) = pubsub.split();
        let names = &self.shared.names;
        let wanted = self.subscriptions.wanted();
        let mut channels = names.fixed(self.inbox.presence.is_some());
        channels.push(names.broadcast());
        channels.extend(wanted.iter().map(|g| names.group(g)));
        sink.subscribe(channels)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        self.subscriptions.mark_connected(&wanted);
        self.catch_up(&wanted).await.map_err(unreachable)?;
        if let Some(presence) = &self.inbox.presence {
            presence.load().await.map_err(unreachable)?;
        }
        self.was_connected.store(true, Ordering::Release);
        self.shared.set_ready(true);
        tracing::info!(groups = wanted.len(), "Redis bus connected");
        let mut watchdog = tokio::time::interval(WATCHDOG_EVERY);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => self.dispatch(message.get_channel_name(), message.get_payload_bytes()),
                    None => return Err(Broken::Lost("pub/sub connection closed".into())),
                },
                _ = watchdog.tick() => {
                    match tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => return Err(Broken::Lost(format!("ping failed: {error}"))),
                        Err(_) => return Err(Broken::Lost(format!("no answer to a ping within {COMMAND_TIMEOUT:?}"))),
                    }
                }
                command = commands.recv() => match command {
                    Some(command) => self.apply(&mut sink, command).await.map_err(Broken::Lost)?,
                    None => return Ok(()),
                },
            }
        }
    }

    /// Makes up for what a lost connection missed, before the node is ready again: pages
    /// are re-checked with the authorizer (a revoke may have missed the node), then the
    /// events after the last one delivered are read from the history and delivered, for
    /// the groups with local members, for users and for everyone. Sockets whose streams
    /// lost events in the meantime (or all sockets, with history off) are closed with
    /// 1012, so their clients reconnect and replay or refresh instead of living with a
    /// silent hole.
    async fn catch_up(&self, groups: &[Arc<str>]) -> Result<(), String> {
        let reconnect = self.was_connected.load(Ordering::Acquire);
        let Some(history) = &self.history else {
            if reconnect {
                tracing::warn!(
                    "Redis pub/sub reconnected without event history: closing sockets that may have missed events"
                );
                self.hub.close_connections(CloseReason::Restart);
            }
            return Ok(());
        };
        let after = self.delivered_through.load(Ordering::Acquire);
        if !reconnect || after == 0 {
            let latest = history.latest().await.map_err(|e| e.to_string())?;
            self.delivered_through.fetch_max(latest, Ordering::AcqRel);
            return Ok(());
        }
        // Pages first, so no page the backend took away meanwhile gets what it missed.
        self.inbox.revalidate().await;
        let keys = StreamKey::of_socket(groups.iter().cloned());
        let snapshot = history
            .read(keys.clone(), after)
            .await
            .map_err(|e| e.to_string())?;
        if snapshot.latest < after {
            // Not the store the node knew (replaced, or its clock behind): its ids say
            // nothing about what was missed.
            let closed = self.hub.close_connections(CloseReason::Restart);
            self.delivered_through
                .store(snapshot.latest, Ordering::Release);
            tracing::warn!(
                closed,
                "Redis lost the event history: sockets closed to reconnect"
            );
            return Ok(());
        }
        let mut events: Vec<_> = snapshot.streams.iter().flat_map(|s| &s.events).collect();
        events.sort_unstable_by_key(|event| event.id);
        for event in &events {
            self.hub.deliver(event);
        }
        let closed = close_where_lost(&self.hub, &keys, &snapshot.streams, after);
        self.delivered_through
            .fetch_max(snapshot.latest, Ordering::AcqRel);
        tracing::info!(
            caught_up = events.len(),
            closed,
            "Redis pub/sub reconnected; missed events delivered from the history"
        );
        Ok(())
    }

    async fn apply(&self, sink: &mut PubSubSink, command: Command) -> Result<(), String> {
        let names = &self.shared.names;
        match command {
            Command::Subscribe(group) => {
                if self.subscriptions.needs_subscribing(&group) {
                    sink.subscribe(names.group(&group))
                        .await
                        .map_err(|e| e.to_string())?;
                    self.subscriptions.subscribed(&group);
                }
            }
            Command::Unsubscribe(group) => {
                if self.subscriptions.forget_unused(&group) {
                    sink.unsubscribe(names.group(&group))
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    }

    fn dispatch(&self, channel: &str, payload: &[u8]) {
        if self.inbox.take(channel, payload) {
            return;
        }
        match Event::from_bus(payload) {
            Some(event) if event.id == 0 => {
                self.hub.deliver(&event);
            }
            Some(event) => {
                if event.id > self.delivered_through.load(Ordering::Acquire) {
                    self.hub.deliver(&event);
                    self.delivered_through.store(event.id, Ordering::Release);
                }
            }
            None => tracing::warn!(channel, "undecodable event"),
        }
    }
}

/// Closes, with 1012, the sockets of the streams that lost events after `after`, so their
/// clients reconnect and replay or refresh; returns how many were closed.
fn close_where_lost(
    hub: &Hub,
    keys: &[StreamKey],
    streams: &[event_history::StreamRead],
    after: u64,
) -> usize {
    let mut closed = 0;
    for (key, stream) in keys.iter().zip(streams) {
        if stream.lost_through > after {
            closed += match key {
                StreamKey::Group(group) => hub.close_group(group, CloseReason::Restart),
                StreamKey::Everyone | StreamKey::Users => {
                    hub.close_connections(CloseReason::Restart)
                }
            };
        }
    }
    closed
}

/// What a node receives besides events: cluster-wide requests, replies to its own, and
/// presence changes.
struct Inbox {
    shared: Arc<Shared>,
    control: Arc<ControlHandler>,
    presence: Option<Arc<RedisPresence>>,
}

impl Inbox {
    /// A node cut off from Redis may have missed a revoke: it asks the authorizer again
    /// about every page its sockets hold, as a `CheckPermission` would.
    async fn revalidate(&self) {
        let request = Request::CheckPermission(proto::CheckPermissionRequest::default());
        if let Reply::CheckPermission(outcome) = self.control.answer(request).await {
            tracing::info!(
                checked = outcome.checked,
                revoked = outcome.revoked.len(),
                "pages re-checked after the Redis reconnect"
            );
        }
    }

    /// Takes a message of the control, reply or presence channels; `false` for others.
    fn take(&self, channel: &str, payload: &[u8]) -> bool {
        let names = &self.shared.names;
        if channel == names.control() {
            match proto::ControlRequest::decode(payload) {
                Ok(request) => self.answer(request),
                Err(error) => tracing::warn!(%error, "undecodable control request"),
            }
        } else if channel == names.presence() {
            if let Some(presence) = &self.presence {
                presence.received(payload);
            }
        } else if channel == names.own_reply {
            match proto::ControlReply::decode(payload) {
                Ok(proto::ControlReply {
                    id,
                    node_id,
                    reply: Some(reply),
                }) => {
                    if let Some(asker) = lock(&self.shared.asking).get(&id) {
                        let _ = asker.send((node_id, reply));
                    }
                }
                Ok(_) => tracing::warn!("control reply without an answer"),
                Err(error) => tracing::warn!(%error, "undecodable control reply"),
            }
        } else {
            return false;
        }
        true
    }

    /// Acts on a cluster-wide request for this node's sockets and replies to the asker.
    fn answer(&self, request: proto::ControlRequest) {
        let Some(question) = request.request else {
            return;
        };
        let control = self.control.clone();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let reply = proto::ControlReply {
                id: request.id,
                node_id: shared.names.node_id.clone(),
                reply: Some(control.answer(question).await),
            };
            let channel = shared.names.reply(&request.reply_to);
            if let Err(error) = shared.publish_bytes(&channel, reply.encode_to_vec()).await {
                tracing::warn!(%error, "control reply not sent");
            }
        });
    }
}
