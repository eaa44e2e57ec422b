//! The Redis bus: many nodes exchange events and control requests through Redis pub/sub.
//!
//! Channels (under `--redis-prefix`, `channelgate` by default):
//! - `P:g:<group>`: one per channel group; a node subscribes while it has local members;
//! - `P:broadcast`: user-targeted events and the `users` group, for every node;
//! - `P:control` and `P:reply:<node id>`: cluster-wide requests and their replies;
//! - keys `P:node:<node id>` (expiring heartbeats) and the set `P:nodes` name live nodes,
//!   `P:registry` holds when that registry was made, `P:left:<node id>` (and the set
//!   `P:left`) mark nodes that stopped ([`registry`]);
//! - `P:control-log`: the last minutes' revokes and Disconnects ([`control_log`]);
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
//! Both share the node registry, control, presence and the subscription bookkeeping.
//!
//! Here are the settings and the bus itself ([`RedisBus`], its [`Bus`] impl); beside it:
//! - `names.rs`: the channel and key names above;
//! - `subscriptions.rs`: which groups the node subscribes ([`Subscriptions`]);
//! - `link.rs`: the connection to Redis, its timings, and the state the bus and its tasks
//!   share;
//! - `registry.rs`: the node registry (heartbeats, live nodes, and what a node remembers of
//!   them when Redis forgets);
//! - `control_log.rs`: the revokes and Disconnects a node counted gone catches up with;
//! - `listener.rs`: one Redis's pub/sub listener, which reconnects and catches up;
//! - `inbox.rs`: control requests, replies and presence changes a listener takes in;
//! - [`history`], [`presence`] and [`cluster`] as above.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use prost::Message as _;
use tokio::sync::{Notify, mpsc, watch};

/// Lua that appends an event to a history stream (`XADD` at `<id>-0`), trims the stream
/// to `keep` entries remembering the highest id it dropped in `lost`, and lets both expire
/// `ttl` ms after the last append; `record`, which does that or, for a lost mark, moves
/// `lost` to the mark's id; and `varint`, to append an id to protobuf bytes. A
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
local function record(stream, lost, sid, message, keep, ttl, mark)
  if mark then
    redis.call('SET', lost, sid, 'PX', ttl)
  else
    append(stream, lost, sid, message, keep, ttl)
  end
end
"#
    };
}

mod cluster;
mod control_log;
mod history;
mod inbox;
mod link;
mod listener;
mod names;
mod presence;
mod registry;
mod subscriptions;

pub use subscriptions::{PendingCommands, Subscriptions, subscriptions};

use super::{Bus, BusUnavailable, PublishError};
use crate::control::{Answers, ControlHandler, Request};
use crate::event::{Event, Target};
use crate::history::{self as event_history, HistorySettings};
use crate::hub::Hub;
use crate::presence::Presence;
use crate::proto;
use history::RedisHistory;
use inbox::Inbox;
use link::{Link, Shared, publish_failed};
use listener::Listener;
use names::Names;
use presence::RedisPresence;
use registry::heartbeats;

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
    /// How long Redis keeps a publish's idempotency key.
    pub idempotency_window: Duration,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
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
            liveness: Mutex::default(),
            counted_gone: Notify::new(),
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
                let history = Arc::new(RedisHistory::new(
                    shared.clone(),
                    retention,
                    settings.idempotency_window,
                ));
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
                let lanes = Arc::new(cluster::Lanes::new(
                    shared.clone(),
                    retention,
                    recording,
                    settings.idempotency_window,
                ));
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
    fn publish(&self, event: Event) -> BoxFuture<'_, Result<u64, PublishError>> {
        Box::pin(async move {
            self.unavailable_unless_ready()?;
            let history = match &self.store {
                Store::Single(history) => history,
                Store::Lanes(lanes) => {
                    let ids = lanes.publish(vec![event]).await?;
                    return Ok(ids.first().copied().unwrap_or_default());
                }
            };
            // The script gives ids, keeps events and checks keys; a plain event without
            // history needs none of that.
            if (self.recording && event.record) || event.idempotency_key.is_some() || event.lost {
                let ids = history.publish(&[event], self.recording).await?;
                return Ok(ids.first().copied().unwrap_or_default());
            }
            let channel = match &event.target {
                Target::Group { group, .. } => self.shared.names.group(group),
                _ => self.shared.names.broadcast(),
            };
            let bytes = event.to_bus().encode_to_vec();
            let mut connection = self.shared.publisher().await?;
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(bytes)
                .query_async::<i64>(&mut connection)
                .await
                .map_err(|e| publish_failed(e, "Redis PUBLISH"))?;
            Ok(0)
        })
    }

    fn publish_batch(&self, events: Vec<Event>) -> BoxFuture<'_, Result<Vec<u64>, PublishError>> {
        Box::pin(async move {
            self.unavailable_unless_ready()?;
            match &self.store {
                Store::Single(history) => history.publish(&events, self.recording).await,
                Store::Lanes(lanes) => lanes.publish(events).await,
            }
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
                let live = shared.settled_live_nodes().await?;
                let logged = control_log::must_be_logged(&request);
                let message = proto::ControlRequest {
                    id: id.clone(),
                    reply_to: shared.names.node_id.clone(),
                    request: Some(request),
                }
                .encode_to_vec();
                if logged {
                    shared.log_control(&message).await?;
                }
                shared
                    .publish_bytes(shared.names.control(), message)
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
            self.shared.leave_registry().await;
        })
    }
}
