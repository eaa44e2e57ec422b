//! The subscription bookkeeping: which groups this node's sockets are members of, and the
//! (un)subscribe commands the pub/sub task (one Redis's or the cluster's listener) carries
//! out. Kept apart from the listeners, which both read it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::lock;
use crate::hub::GroupInterest;

/// A node's wish to (un)subscribe a group, carried out by the pub/sub task.
pub(super) enum Command {
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
    pub(super) fn wanted(&self) -> Vec<Arc<str>> {
        lock(&self.groups)
            .iter()
            .filter(|(_, sub)| sub.members > 0)
            .map(|(group, _)| group.clone())
            .collect()
    }

    pub(super) fn mark_connected(&self, groups: &[Arc<str>]) {
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
    pub(super) fn needs_subscribing(&self, group: &Arc<str>) -> bool {
        lock(&self.groups)
            .get(group)
            .is_some_and(|sub| sub.members > 0 && !sub.subscribed)
    }

    /// A group's subscription took effect: its subscribers go on.
    pub(super) fn subscribed(&self, group: &Arc<str>) {
        if let Some(sub) = lock(&self.groups).get_mut(group) {
            sub.subscribed = true;
            sub.wake();
        }
    }

    /// Forgets a group that has had no local member since its unsubscribe was asked for;
    /// `true`: its channel is to be unsubscribed.
    pub(super) fn forget_unused(&self, group: &Arc<str>) -> bool {
        let mut groups = lock(&self.groups);
        let unused = groups.get(group).is_some_and(|sub| sub.members == 0);
        if unused {
            groups.remove(group);
        }
        unused
    }

    /// Redis is gone: nothing is subscribed any more, and nobody waits for it.
    pub(super) fn mark_disconnected(&self) {
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
/// bus's pub/sub task reads; see [`RedisBus::start`](super::RedisBus::start).
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
pub struct PendingCommands(pub(super) mpsc::UnboundedReceiver<Command>);
