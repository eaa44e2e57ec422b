//! The listener of one Redis (`--redis-url`): the node's one pub/sub connection, which
//! receives everything in order, keeps the group subscriptions, watches Redis with pings,
//! reconnects with backoff and catches up from the history after a gap. A cluster has its
//! own listener ([`super::cluster`]), which shares [`close_where_lost`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures_util::{FutureExt, StreamExt};
use redis::aio::PubSubSink;
use tokio::sync::mpsc;

use super::history::RedisHistory;
use super::inbox::Inbox;
use super::link::{BACKOFF_MAX, BACKOFF_MIN, COMMAND_TIMEOUT, Link, Shared, WATCHDOG_EVERY};
use super::subscriptions::{Command, Subscriptions};
use crate::event::Event;
use crate::history::{self as event_history, Store as _, StreamKey};
use crate::hub::{Hub, Unflushed};
use crate::protocol::CloseReason;

/// Messages already read from Redis that are dispatched before their frames are written.
const DISPATCH_AT_ONCE: usize = 64;

/// Why a pub/sub connection ended.
enum Broken {
    /// It never worked.
    Unreachable(String),
    /// It worked, then broke.
    Lost(String),
}

/// The pub/sub connection: receives everything for this node, keeps its subscriptions.
pub(super) struct Listener {
    pub(super) shared: Arc<Shared>,
    pub(super) hub: Arc<Hub>,
    pub(super) inbox: Inbox,
    pub(super) subscriptions: Arc<Subscriptions>,
    /// The event history, to catch up after a lost connection; `None` when history is off.
    pub(super) history: Option<Arc<RedisHistory>>,
    /// The highest event id this node has delivered or caught up to. Events arrive in id
    /// order on the one pub/sub connection, so an event at or below it is one the node
    /// already delivered while catching up.
    pub(super) delivered_through: AtomicU64,
    /// Whether a connection worked before: the next one must make up for the gap.
    pub(super) was_connected: AtomicBool,
}

impl Listener {
    pub(super) async fn run(self, mut commands: mpsc::UnboundedReceiver<Command>) {
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
        // Control before events: no page the backend took away is served what it missed.
        self.inbox
            .catch_up_if_counted_gone()
            .await
            .map_err(unreachable)?;
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
                    Some(first) => self.dispatch_read(first, &mut stream)?,
                    None => return Err(Broken::Lost("pub/sub connection closed".into())),
                },
                _ = watchdog.tick() => {
                    match tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => return Err(Broken::Lost(format!("ping failed: {error}"))),
                        Err(_) => return Err(Broken::Lost(format!("no answer to a ping within {COMMAND_TIMEOUT:?}"))),
                    }
                }
                _ = self.shared.counted_gone.notified() => {
                    return Err(Broken::Lost("this node's heartbeat lapsed".into()));
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
        let mut unflushed = Unflushed::default();
        for event in &events {
            self.hub.queue(event, &mut unflushed);
        }
        unflushed.flush();
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

    /// Dispatches `first` and the messages already read with it (up to
    /// [`DISPATCH_AT_ONCE`]), then writes their frames: a socket gets them in one write.
    /// `unflushed` flushes when dropped, on every way out.
    fn dispatch_read(
        &self,
        first: redis::Msg,
        stream: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin),
    ) -> Result<(), Broken> {
        let mut unflushed = Unflushed::default();
        let mut next = Some(first);
        let mut dispatched = 0;
        while let Some(message) = next.take() {
            // Counted gone, the node may hold what a revoke took away and have missed
            // requests: it catches up as after a lost connection.
            if self.inbox.is_counted_gone() {
                return Err(Broken::Lost("this node's heartbeat lapsed".into()));
            }
            self.dispatch(
                message.get_channel_name(),
                message.get_payload_bytes(),
                &mut unflushed,
            );
            dispatched += 1;
            if dispatched < DISPATCH_AT_ONCE {
                next = match stream.next().now_or_never() {
                    Some(None) => return Err(Broken::Lost("pub/sub connection closed".into())),
                    ready => ready.flatten(),
                };
            }
        }
        Ok(())
    }

    fn dispatch(&self, channel: &str, payload: &[u8], unflushed: &mut Unflushed) {
        if self.inbox.take(channel, payload) {
            return;
        }
        match Event::from_bus(payload) {
            Some(event) if event.id == 0 => {
                self.hub.queue(&event, unflushed);
            }
            Some(event) => {
                if event.id > self.delivered_through.load(Ordering::Acquire) {
                    self.hub.queue(&event, unflushed);
                    self.delivered_through.store(event.id, Ordering::Release);
                }
            }
            None => tracing::warn!(channel, "undecodable event"),
        }
    }
}

/// Closes, with 1012, the sockets of the streams that lost events after `after`, so their
/// clients reconnect and replay or refresh; returns how many were closed.
pub(super) fn close_where_lost(
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
