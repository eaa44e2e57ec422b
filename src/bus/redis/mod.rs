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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use prost::Message as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use tokio::sync::{mpsc, oneshot, watch};

mod history;
mod presence;

use super::{Bus, BusUnavailable};
use crate::control::{Answers, ControlHandler, Reply, Request};
use crate::event::{Event, Target};
use crate::history::{self as event_history, HistorySettings, Store as _, StreamKey};
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

/// What the Redis bus needs to know.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
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
#[derive(Clone)]
struct Names {
    prefix: String,
    node_id: String,
    control: String,
    presence: String,
    own_reply: String,
}

impl Names {
    fn new(prefix: &str, node_id: &str) -> Names {
        Names {
            prefix: prefix.to_string(),
            node_id: node_id.to_string(),
            control: format!("{prefix}:control"),
            presence: format!("{prefix}:presence"),
            own_reply: format!("{prefix}:reply:{node_id}"),
        }
    }
    fn group(&self, group: &str) -> String {
        format!("{}:g:{group}", self.prefix)
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
        format!("{}:node:{node_id}", self.prefix)
    }
    fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
    fn presence(&self) -> &str {
        &self.presence
    }
    fn presence_members(&self) -> String {
        format!("{}:presence:members", self.prefix)
    }
    /// The channels every node listens on, whatever its members.
    fn fixed(&self) -> Vec<String> {
        vec![
            self.broadcast(),
            self.control.clone(),
            self.own_reply.clone(),
        ]
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

/// State shared by the bus handle and its tasks.
struct Shared {
    names: Names,
    client: redis::Client,
    /// Made on first use (Redis may be down at start), then reconnects by itself.
    publisher: Mutex<Option<ConnectionManager>>,
    ready: watch::Sender<bool>,
    /// Control requests this node asked, by id, waiting for replies.
    asking: Mutex<HashMap<String, mpsc::UnboundedSender<(String, Reply)>>>,
    control_timeout: Duration,
}

impl Shared {
    async fn publisher(&self) -> Result<ConnectionManager, BusUnavailable> {
        if let Some(connection) = lock(&self.publisher).clone() {
            return Ok(connection);
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_MAX);
        let connection = self
            .client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| BusUnavailable(format!("cannot connect to Redis: {e}")))?;
        *lock(&self.publisher) = Some(connection.clone());
        Ok(connection)
    }

    async fn publish_bytes(&self, channel: String, bytes: Vec<u8>) -> Result<i64, BusUnavailable> {
        let mut connection = self.publisher().await?;
        redis::cmd("PUBLISH")
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

/// The bus of a node in a cluster.
pub struct RedisBus {
    shared: Arc<Shared>,
    /// The publish script, which also records events when `recording`.
    history: Arc<RedisHistory>,
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
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| format!("--redis-url {:?}: {e}", settings.url))?;
        let shared = Arc::new(Shared {
            names: Names::new(&settings.prefix, node_id),
            client,
            publisher: Mutex::default(),
            ready: watch::Sender::new(false),
            asking: Mutex::default(),
            control_timeout: settings.control_timeout,
        });
        let defaults = HistorySettings::default();
        let recording = history.is_some();
        let history = history.unwrap_or(&defaults);
        let history = Arc::new(RedisHistory::new(shared.clone(), history.retention));
        let mut tasks = Vec::new();
        let presence = presence.map(|presence| {
            let (presence, presence_tasks) = RedisPresence::start(shared.clone(), presence);
            tasks.extend(presence_tasks);
            presence
        });
        let listener = Listener {
            presence,
            shared: shared.clone(),
            hub,
            control,
            subscriptions,
            history: recording.then(|| history.clone()),
            delivered_through: AtomicU64::new(0),
            was_connected: AtomicBool::new(false),
        };
        tasks.push(tokio::spawn(listener.run(commands.0)));
        tasks.push(tokio::spawn(heartbeats(shared.clone())));
        Ok(RedisBus {
            shared,
            history,
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
            if self.recording && event.record {
                let ids = self.history.publish(&[event], true).await;
                return ids
                    .map(|ids| ids.first().copied().unwrap_or_default())
                    .map_err(BusUnavailable);
            }
            let channel = match &event.target {
                Target::Group { group, .. } => self.shared.names.group(group),
                _ => self.shared.names.broadcast(),
            };
            let bytes = event.to_bus().encode_to_vec();
            self.shared.publish_bytes(channel, bytes).await.map(|_| 0)
        })
    }

    fn publish_batch(&self, events: Vec<Event>) -> BoxFuture<'_, Result<Vec<u64>, BusUnavailable>> {
        Box::pin(async move {
            self.unavailable_unless_ready()?;
            self.history
                .publish(&events, self.recording)
                .await
                .map_err(BusUnavailable)
        })
    }

    fn history(&self) -> Option<Arc<dyn event_history::Store>> {
        self.recording
            .then(|| self.history.clone() as Arc<dyn event_history::Store>)
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
                    .publish_bytes(shared.names.control().to_string(), message.encode_to_vec())
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
    control: Arc<ControlHandler>,
    subscriptions: Arc<Subscriptions>,
    /// The event history, to catch up after a lost connection; `None` when history is off.
    history: Option<Arc<RedisHistory>>,
    /// Presence; `None` when off.
    presence: Option<Arc<RedisPresence>>,
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
        let pubsub = tokio::time::timeout(COMMAND_TIMEOUT, self.shared.client.get_async_pubsub())
            .await
            .map_err(|_| unreachable("connect timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sink, mut stream) = pubsub.split();
        let names = &self.shared.names;
        let wanted = self.subscriptions.wanted();
        let mut channels = names.fixed();
        if self.presence.is_some() {
            channels.push(names.presence().to_string());
        }
        channels.extend(wanted.iter().map(|g| names.group(g)));
        sink.subscribe(channels)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        self.subscriptions.mark_connected(&wanted);
        self.catch_up(&wanted).await.map_err(unreachable)?;
        if let Some(presence) = &self.presence {
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
    /// the groups with local members, for users and for everyone. Sockets whose streams lost events in the
    /// meantime (or all sockets, with history off) are closed with 1012, so their clients
    /// reconnect and replay or refresh instead of living with a silent hole.
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
        self.revalidate().await;
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
        let mut closed = 0;
        for (key, stream) in keys.iter().zip(&snapshot.streams) {
            if stream.lost_through > after {
                closed += match key {
                    StreamKey::Group(group) => self.hub.close_group(group, CloseReason::Restart),
                    StreamKey::Everyone | StreamKey::Users => {
                        self.hub.close_connections(CloseReason::Restart)
                    }
                };
            }
        }
        self.delivered_through
            .fetch_max(snapshot.latest, Ordering::AcqRel);
        tracing::info!(
            caught_up = events.len(),
            closed,
            "Redis pub/sub reconnected; missed events delivered from the history"
        );
        Ok(())
    }

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

    async fn apply(&self, sink: &mut PubSubSink, command: Command) -> Result<(), String> {
        let names = &self.shared.names;
        match command {
            Command::Subscribe(group) => {
                let needed = lock(&self.subscriptions.groups)
                    .get(&group)
                    .is_some_and(|sub| sub.members > 0 && !sub.subscribed);
                if needed {
                    sink.subscribe(names.group(&group))
                        .await
                        .map_err(|e| e.to_string())?;
                    if let Some(sub) = lock(&self.subscriptions.groups).get_mut(&group) {
                        sub.subscribed = true;
                        sub.wake();
                    }
                }
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
                    sink.unsubscribe(names.group(&group))
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    }

    fn dispatch(&self, channel: &str, payload: &[u8]) {
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
            if let Err(error) = shared.publish_bytes(channel, reply.encode_to_vec()).await {
                tracing::warn!(%error, "control reply not sent");
            }
        });
    }
}
