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
//! - `P:h:{Ln}:seq` (the lane's clock), `floor` (what a fresh lane starts above), `rec`
//!   (its last recorded id), `s:<stream>` and `l:<stream>` (a stream, and the highest id it
//!   dropped), as on one Redis but per lane; ids carry their time, so the age limit needs
//!   no index of its own.
//!
//! How ids are made and why a replay is exact: [`crate::history::lanes`]. A node holds
//! what arrives in a [`crate::history::lanes::Reorder`] and delivers in id order; when
//! events wait on lanes that have been quiet, it ticks: one script on each primary shows
//! the clocks of the lanes it serves, on their channels (the node learns which primary
//! serves which lanes from `CLUSTER NODES`, every second and whenever a tick fails).
//!
//! Following the cluster: the Redis client follows `MOVED` and failovers for commands,
//! but it does not subscribe sharded channels again when their shard changes: a replaced
//! primary shows as a `Disconnection`, a moved slot as an `SUNSUBSCRIBE` nobody asked for.
//! On either (or a failed ping of the primaries) the node stops delivering, subscribes
//! everything again, reads what it missed from the history, and goes on; sockets stay
//! connected. With history off it closes its sockets with 1012 instead, so their clients
//! refresh.

mod scripts;
mod store;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::join_all;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use redis::{ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

pub(super) use scripts::lane_tags;
pub(crate) use store::Lanes;

use super::inbox::Inbox;
use super::link::{BACKOFF_MAX, BACKOFF_MIN, COMMAND_TIMEOUT, Link, Shared, WATCHDOG_EVERY};
use super::listener::close_where_lost;
use super::lock;
use super::subscriptions::{Command, Subscriptions};
use crate::event::Event;
use crate::history::StreamKey;
use crate::history::lanes::{self, LANES};
use crate::hub::Hub;
use crate::protocol::CloseReason;

/// Tick rounds start this far apart at least.
const TICK_EVERY: Duration = Duration::from_millis(1);
/// How long events from other nodes wait for their publisher's tick before this node
/// ticks for them.
const OTHERS_TICK_AFTER: Duration = Duration::from_millis(2);
/// The longest pause between attempts to get in step again, or to tick: short, since
/// delivery waits for it on every node while a shard's replica takes over.
const SYNC_BACKOFF_MAX: Duration = Duration::from_millis(250);
/// How long events may wait without anything delivered before the node subscribes again:
/// a lane whose messages no longer reach it (a subscription lost in a slot move).
const STALLED: Duration = Duration::from_secs(3);

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
            // The client's own retries wait over a second each by default: a command
            // caught in a failover would outlast the replica taking over.
            .retries(4)
            .min_retry_wait(20)
            .max_retry_wait(250)
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
            // Only this listener sets it, once.
            let _ = slot.set(connection.clone());
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
        let shared = self.inbox.shared.clone();
        let mut out_of_step = true;
        let mut backoff = BACKOFF_MIN;
        let mut watchdog = tokio::time::interval(WATCHDOG_EVERY);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (tick_done, mut ticks_done) = mpsc::unbounded_channel::<Result<(), String>>();
        let mut ticking = false;
        let mut last_tick = Instant::now() - TICK_EVERY;
        // The pause before the next tick: it doubles while ticks fail (a shard without a
        // primary fails them at once), so that a failover is not met with a busy loop.
        let mut tick_pause = TICK_EVERY;
        // Since when events have waited on lanes that did not show their clocks, without
        // the node delivering anything (it had delivered through the second field).
        let mut blocked: Option<(Instant, u64)> = None;
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
                        backoff = (backoff * 2).min(SYNC_BACKOFF_MAX);
                        continue;
                    }
                }
            }
            // A node ticks after it published, or when a replay or a subscription waits;
            // events that came from other nodes wait for their publisher's tick, and only
            // when none came within `OTHERS_TICK_AFTER` does this node tick for them.
            blocked = match (lanes.blocked_at(), blocked) {
                (Some(at), Some((since, was))) if at == was => Some((since, at)),
                (Some(at), _) => Some((Instant::now(), at)),
                (None, _) => None,
            };
            let tick_at = if !lanes.recording || ticking {
                None
            } else if !self.started || lanes.tick_due() {
                Some(last_tick + tick_pause)
            } else {
                blocked.map(|(since, _)| (since + OTHERS_TICK_AFTER).max(last_tick + tick_pause))
            };
            tokio::select! {
                push = self.pushes.recv() => {
                    let Some(push) = push else { return };
                    if self.inbox.is_counted_gone() {
                        // The node may hold what a revoke took away and have missed
                        // requests: nothing is delivered until it is in step again, which
                        // catches up with the control log and then with the history.
                        out_of_step = true;
                        continue;
                    }
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
                    if blocked.is_some_and(|(since, _)| since.elapsed() >= STALLED) {
                        blocked = None;
                        tracing::warn!(
                            "events have waited {STALLED:?} on lanes that show nothing; subscribing again"
                        );
                        out_of_step = true;
                    } else if let Err(error) = ping_primaries(connection).await {
                        tracing::warn!(%error, "Redis Cluster primaries do not answer");
                        out_of_step = true;
                    } else if let Err(error) = lanes.learn_topology(connection).await {
                        tracing::debug!(%error, "Redis Cluster topology not learnt");
                    }
                }
                done = ticks_done.recv() => {
                    ticking = false;
                    tick_pause = match done {
                        Some(Err(_)) => (tick_pause * 2).min(SYNC_BACKOFF_MAX),
                        _ => TICK_EVERY,
                    };
                    if let Some(Err(error)) = done {
                        // Lanes may have moved: learn where they are before the next tick.
                        tracing::debug!(%error, "lane tick failed");
                        if let Err(error) = lanes.learn_topology(connection).await {
                            tracing::debug!(%error, "Redis Cluster topology not learnt");
                        }
                    }
                }
                _ = tokio::time::sleep_until(tick_at.unwrap_or(last_tick)), if tick_at.is_some() => {
                    ticking = true;
                    last_tick = Instant::now();
                    lanes.published.store(false, Ordering::Release);
                    let lanes = lanes.clone();
                    let connection = connection.clone();
                    let tick_done = tick_done.clone();
                    tokio::spawn(async move {
                        let _ = tick_done.send(lanes.tick(&connection, false).await.map(|_| ()));
                    });
                }
                _ = lanes.wake_listener.notified() => {}
                _ = shared.counted_gone.notified() => out_of_step = true,
            }
            if out_of_step {
                // Until in step again: not ready, nothing delivered, and a page subscribed
                // meanwhile does not wait (getting in step subscribes its group).
                self.shared().set_ready(false);
                lock(&lanes.order).freeze();
                self.subscriptions.mark_disconnected();
            }
        }
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
        let mut channels = self.shared().names.fixed(self.inbox.presence.is_some());
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
        // A primary that took over may not know the tick script yet.
        lanes.tick_loaded.store(false, Ordering::Release);
        lanes.ensure_all(connection).await?;
        self.shared().heartbeat().await.map_err(|e| e.0)?;
        let wanted = self.subscriptions.wanted();
        let mut channels = self.fixed_channels();
        channels.extend(wanted.iter().map(|g| self.shared().names.group(g)));
        subscribe(connection, &channels).await?;
        // Control before events: no page the backend took away is served what it missed.
        self.inbox.catch_up_if_counted_gone().await?;
        lanes.learn_topology(connection).await?;
        self.subscribed = channels.into_iter().collect();
        self.subscriptions.mark_connected(&wanted);
        if lanes.recording {
            lock(&lanes.order).freeze();
            if self.started {
                self.catch_up(&wanted).await?;
            }
            lock(&lanes.order).thaw();
            lanes.tick(connection, false).await?;
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
        let start = lanes::through_clock(order.seen());
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
        let closed = close_where_lost(&self.hub, &keys, &streams, after);
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
                if !self.subscriptions.needs_subscribing(&group) {
                    return Ok(());
                }
                let channel = self.shared().names.group(&group);
                subscribe(connection, std::slice::from_ref(&channel)).await?;
                self.subscribed.insert(channel);
                // With history, the group counts as subscribed once this node delivered
                // through its lane's clock: what came before is a replay's, what comes
                // after arrives live. If the clock cannot be read or the node does not
                // get there within the command timeout, it counts as subscribed anyway:
                // an event from before may then also arrive live, which the outbox keeps
                // from reaching a socket twice.
                let lanes = self.lanes.clone();
                let subscriptions = self.subscriptions.clone();
                let connection = connection.clone();
                tokio::spawn(async move {
                    if lanes.recording {
                        let lane = lanes::lane_of_group(&group);
                        if let Ok(t) = lanes.ensure_lane(&connection, lane, 0).await {
                            let through = lanes::through_clock(t);
                            lanes.released_through(through, COMMAND_TIMEOUT).await;
                        }
                    }
                    subscriptions.subscribed(&group);
                });
            }
            Command::Unsubscribe(group) => {
                if self.subscriptions.forget_unused(&group) {
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
