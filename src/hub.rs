//! The hub: a node's connections, their pages, the channel groups and the users index,
//! and fan-out of events to them.
//!
//! Delivering an event means pushing one shared frame into each recipient's [`Outbox`].
//! The hub knows no sockets: the frames of sockets whose writers were idle are written
//! through each outbox's [`crate::sink::Sink`] when the fan-out's [`Unflushed`] is flushed,
//! after the caller let go of its locks. Groups and users are sharded by hash so that
//! unrelated joins and fan-outs do not contend on one lock.
//!
//! Lock order (outer to inner): the presence state (it asks whether a connection still
//! holds a space), a connection's pages, a group shard, a group's members, an outbox.
//! Every lock is a std mutex held for in-memory work only, never across `.await`.

use std::collections::HashMap;
use std::collections::hash_map::{Entry, RandomState};
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use futures_util::future::BoxFuture;

use crate::deflate::DeflateSettings;
use crate::event::{Event, Target};
use crate::outbox::{Frame, Outbox, Pushed};
use crate::pages::Page;
use crate::protocol::{CloseReason, server};

/// Told by the hub of each (connection, group) membership added and removed.
pub trait GroupInterest: Send + Sync + 'static {
    /// A membership was added. The future completes once the group's events reach this
    /// node; it never fails (a bus that is down restores its subscriptions when back).
    fn joined(&self, group: &Arc<str>) -> BoxFuture<'static, ()>;

    /// A membership was removed.
    fn left(&self, group: &Arc<str>);
}

/// Told by the hub when a connection stops being in a presence space: it lost its last
/// page of the space (an unsubscribe or a revoke, after its `page_discard`), or it is gone.
pub trait SpaceInterest: Send + Sync + 'static {
    /// The connection's last page of `space` went; `still_held` tells, under the presence
    /// lock, whether a page of the space came back meanwhile (then it stays a member).
    fn left(&self, conn: &Connection, space: &Arc<str>, still_held: &dyn Fn() -> bool);
    fn disconnected(&self, conn: &Connection);
}

/// Presence off: nobody is told.
pub struct NoSpaces;

impl SpaceInterest for NoSpaces {
    fn left(&self, _conn: &Connection, _space: &Arc<str>, _still_held: &dyn Fn() -> bool) {}
    fn disconnected(&self, _conn: &Connection) {}
}

/// For a node alone: every event is local, so there is nothing to subscribe to.
pub struct NoInterest;

impl GroupInterest for NoInterest {
    fn joined(&self, _group: &Arc<str>) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }

    fn left(&self, _group: &Arc<str>) {}
}

const SHARDS: usize = 32;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The hub's maps stay consistent between statements, so a poisoned lock is usable.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A map split into independently locked shards.
struct Sharded<K, V> {
    shards: Vec<Mutex<HashMap<K, V>>>,
    hasher: RandomState,
}

impl<K: Hash + Eq, V> Sharded<K, V> {
    fn new() -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> MutexGuard<'_, HashMap<K, V>> {
        let index = self.hasher.hash_one(key) as usize % SHARDS;
        lock(&self.shards[index])
    }

    fn each_shard(&self) -> impl Iterator<Item = MutexGuard<'_, HashMap<K, V>>> {
        self.shards.iter().map(lock)
    }
}

/// One WebSocket connection as the hub sees it.
pub struct Connection {
    /// Unique within this node.
    pub id: u64,
    /// The client-visible id (`web_socket_id`), used by `ignore_web_socket_id`.
    pub web_socket_id: Arc<str>,
    /// The user; 0 for anonymous.
    pub user_id: i64,
    pub outbox: Outbox,
    /// The pages this connection holds.
    pages: Mutex<Vec<Page>>,
}

impl Connection {
    /// Queues an event's frame for this connection, counting overflows.
    fn send(
        self: &Arc<Self>,
        frame: &Frame,
        id: u64,
        counters: &HubCounters,
        unflushed: &mut Unflushed,
    ) -> bool {
        let (pushed, flush) = self.outbox.push_unflushed(frame.clone(), id);
        if flush {
            unflushed.0.push(self.clone());
        }
        match pushed {
            Pushed::Queued => true,
            Pushed::Overflowed => {
                counters.slow_consumers.fetch_add(1, Ordering::Relaxed);
                false
            }
            Pushed::Closed => false,
        }
    }
}

/// Connections whose frames a fan-out queued without waking their idle writers. They are
/// written from where the fan-out ran, once the caller has let go of the locks that order
/// events ([`Unflushed::flush`]); a drop flushes too, so no frame is left waiting.
#[derive(Default)]
pub struct Unflushed(Vec<Arc<Connection>>);

impl Unflushed {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn flush(&mut self) {
        for conn in self.0.drain(..) {
            conn.outbox.flush();
        }
    }
}

impl Drop for Unflushed {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Members of one channel group, kept in a vector so fan-out is a linear walk.
#[derive(Default)]
struct Members {
    list: Vec<Arc<Connection>>,
    /// Connection id to index in `list`, for O(1) removal.
    index: HashMap<u64, usize>,
}

impl Members {
    fn insert(&mut self, conn: Arc<Connection>) {
        if let Entry::Vacant(slot) = self.index.entry(conn.id) {
            slot.insert(self.list.len());
            self.list.push(conn);
        }
    }

    fn remove(&mut self, conn_id: u64) {
        if let Some(i) = self.index.remove(&conn_id) {
            self.list.swap_remove(i);
            if let Some(moved) = self.list.get(i) {
                self.index.insert(moved.id, i);
            }
        }
    }
}

/// Which subscriptions a check covers; every filter given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Empty: every subscriber.
    pub user_ids: Vec<i64>,
    pub permission_group: Option<String>,
    pub group: Option<String>,
}

impl Scope {
    /// Whether a page of a connection is in scope (users are filtered by the hub).
    pub fn covers(&self, page: &Page) -> bool {
        self.covers_group(&page.group, page.permission_group.as_deref())
    }

    /// Whether a page of this group and permission group is in scope, whoever holds it.
    pub fn covers_group(&self, group: &str, permission_group: Option<&str>) -> bool {
        self.permission_group
            .as_deref()
            .is_none_or(|pg| permission_group == Some(pg))
            && self.group.as_deref().is_none_or(|g| group == g)
    }
}

/// The result of a subscribe.
pub enum Subscribed {
    /// The page was added; `live` completes once the bus carries the group's events to
    /// this node (at once on a single node).
    Added { live: BoxFuture<'static, ()> },
    /// The connection already held this page; nothing changed.
    AlreadyHeld,
    /// The connection holds the maximum number of pages.
    TooManyPages,
}

/// Counters of a node's hub, for `Info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HubStats {
    pub connections: u64,
    pub users: u64,
    pub groups: u64,
    pub subscriptions: u64,
}

/// Counters the hub keeps as it connects and fans out; `/metrics` reads them.
#[derive(Debug, Default)]
pub struct HubCounters {
    connections_opened: AtomicU64,
    frames_queued: AtomicU64,
    /// Connections closed because their outbound queue overflowed.
    slow_consumers: AtomicU64,
}

impl HubCounters {
    pub fn connections_opened(&self) -> u64 {
        self.connections_opened.load(Ordering::Relaxed)
    }

    pub fn frames_queued(&self) -> u64 {
        self.frames_queued.load(Ordering::Relaxed)
    }

    pub fn slow_consumers(&self) -> u64 {
        self.slow_consumers.load(Ordering::Relaxed)
    }
}

/// Connections, groups and users of one node.
pub struct Hub {
    /// Groups with at least one local member. The group's own mutex is held during its
    /// fan-out, which gives every member the group's events in one order even when
    /// several publishers race; a join waits at most one fan-out of in-memory pushes.
    groups: Sharded<Arc<str>, Arc<Mutex<Members>>>,
    /// Connections by user id (anonymous under 0).
    users: Sharded<i64, Vec<Arc<Connection>>>,
    next_id: AtomicU64,
    connections: AtomicU64,
    subscriptions: AtomicU64,
    outbox_limit_bytes: usize,
    max_pages: usize,
    counters: HubCounters,
    /// Told of every membership added and removed, so the bus subscribes to the groups
    /// this node has members of, and only those.
    interest: Arc<dyn GroupInterest>,
    /// Told when a connection leaves a presence space.
    spaces: Arc<dyn SpaceInterest>,
    /// Set by [`Hub::close_all`]: connections that join afterwards are closed at once.
    closing: OnceLock<CloseReason>,
    /// Whether connections keep the ids of their live events, for replays.
    history: bool,
    /// permessage-deflate for event frames; `None`: off.
    deflate: Option<DeflateSettings>,
}

impl Hub {
    pub fn new(
        outbox_limit_bytes: usize,
        max_pages: usize,
        interest: Arc<dyn GroupInterest>,
    ) -> Self {
        Hub {
            groups: Sharded::new(),
            users: Sharded::new(),
            next_id: AtomicU64::new(1),
            connections: AtomicU64::new(0),
            subscriptions: AtomicU64::new(0),
            outbox_limit_bytes,
            max_pages,
            counters: HubCounters::default(),
            interest,
            spaces: Arc::new(NoSpaces),
            closing: OnceLock::new(),
            history: false,
            deflate: None,
        }
    }

    /// A hub whose event frames go compressed to the sockets that agreed to it.
    pub fn with_deflate(mut self, settings: Option<DeflateSettings>) -> Self {
        self.deflate = settings;
        self
    }

    /// An event's frame for `recipients` sockets of this node, ready to go compressed
    /// where a socket agreed to it: per socket when they are few, else once for all.
    pub fn event_frame(&self, payload: &str, id: u64, recipients: usize) -> Frame {
        Frame::event(payload, id).deflatable(self.deflate, recipients)
    }

    /// A hub whose connections can replay: each keeps the ids of its live events, so a
    /// replay leaves out what it already got.
    pub fn with_history(mut self) -> Self {
        self.history = true;
        self
    }

    /// A hub that tells presence when connections leave its spaces.
    pub fn with_presence(mut self, spaces: Arc<dyn SpaceInterest>) -> Self {
        self.spaces = spaces;
        self
    }

    pub fn counters(&self) -> &HubCounters {
        &self.counters
    }

    /// Adds a connection; it receives user-targeted events from now on.
    pub fn connect(&self, web_socket_id: Arc<str>, user_id: i64) -> Arc<Connection> {
        let conn = Arc::new(Connection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            web_socket_id,
            user_id,
            outbox: if self.history {
                Outbox::with_history(self.outbox_limit_bytes)
            } else {
                Outbox::new(self.outbox_limit_bytes)
            },
            pages: Mutex::default(),
        });
        self.users
            .shard(&user_id)
            .entry(user_id)
            .or_default()
            .push(conn.clone());
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.counters
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        // Read after the insert: a `close_all` that walked past this user's shard before
        // the insert had already set it.
        if let Some(reason) = self.closing.get() {
            conn.outbox.close(*reason);
        }
        conn
    }

    /// Removes a connection and every membership it held.
    pub fn disconnect(&self, conn: &Arc<Connection>) {
        let pages = std::mem::take(&mut *lock(&conn.pages));
        let mut left = Vec::new();
        for page in &pages {
            if !left.contains(&page.group) {
                self.leave(&page.group, conn.id);
                left.push(page.group.clone());
            }
        }
        self.subscriptions
            .fetch_sub(left.len() as u64, Ordering::Relaxed);
        self.spaces.disconnected(conn);
        let mut users = self.users.shard(&conn.user_id);
        if let Some(conns) = users.get_mut(&conn.user_id) {
            conns.retain(|c| c.id != conn.id);
            if conns.is_empty() {
                users.remove(&conn.user_id);
            }
        }
        drop(users);
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// The channel groups of the connection's pages (a group twice when two pages map to it).
    pub fn groups_of(&self, conn: &Connection) -> Vec<Arc<str>> {
        lock(&conn.pages).iter().map(|p| p.group.clone()).collect()
    }

    /// Whether the connection holds this page already.
    pub fn holds(&self, conn: &Connection, page: &Page) -> bool {
        lock(&conn.pages).contains(page)
    }

    /// Adds a page to a connection, joining its group unless it holds it already.
    pub fn subscribe(&self, conn: &Arc<Connection>, page: Page) -> Subscribed {
        let mut pages = lock(&conn.pages);
        if pages.contains(&page) {
            return Subscribed::AlreadyHeld;
        }
        if pages.len() >= self.max_pages {
            return Subscribed::TooManyPages;
        }
        let live = if pages.iter().any(|p| p.group == page.group) {
            Box::pin(std::future::ready(())) as BoxFuture<'static, ()>
        } else {
            self.subscriptions.fetch_add(1, Ordering::Relaxed);
            self.join(&page.group, conn)
        };
        pages.push(page);
        Subscribed::Added { live }
    }

    /// Removes a page from a connection and tells the client with `page_discard`, leaving
    /// its group and presence space unless another page of the connection maps to them.
    /// Returns whether the connection held the page.
    pub fn unsubscribe(&self, conn: &Arc<Connection>, page: &Page) -> bool {
        let mut pages = lock(&conn.pages);
        let Some(i) = pages.iter().position(|p| p == page) else {
            return false;
        };
        let page = pages.swap_remove(i);
        if !pages.iter().any(|p| p.group == page.group) {
            self.leave(&page.group, conn.id);
            self.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
        let left_space = page
            .presence_space
            .as_ref()
            .filter(|space| {
                !pages
                    .iter()
                    .any(|p| p.presence_space.as_ref() == Some(space))
            })
            .cloned();
        drop(pages);
        conn.outbox.push(Frame::reply(&server::page_discard(
            &page.page,
            &page.parameters,
        )));
        if let Some(space) = left_space {
            self.spaces
                .left(conn, &space, &|| self.in_space(conn, &space));
        }
        true
    }

    /// Whether the connection holds a page of this presence space.
    pub fn in_space(&self, conn: &Connection, space: &str) -> bool {
        lock(&conn.pages)
            .iter()
            .any(|p| p.presence_space.as_deref() == Some(space))
    }

    /// The connection's own copy of a page it holds (with the presence space it got).
    pub fn held(&self, conn: &Connection, page: &Page) -> Option<Page> {
        lock(&conn.pages).iter().find(|p| *p == page).cloned()
    }

    /// Joins under the shard lock, so a concurrent `leave` cannot drop the group from the
    /// map between finding it and joining it.
    fn join(&self, group: &Arc<str>, conn: &Arc<Connection>) -> BoxFuture<'static, ()> {
        let mut shard = self.groups.shard(group.as_ref());
        let members = shard.entry(group.clone()).or_default();
        lock(members).insert(conn.clone());
        drop(shard);
        self.interest.joined(group)
    }

    fn leave(&self, group: &Arc<str>, conn_id: u64) {
        let mut shard = self.groups.shard(group.as_ref());
        if let Some(members) = shard.get(group) {
            let mut members_guard = lock(members);
            members_guard.remove(conn_id);
            if members_guard.list.is_empty() {
                drop(members_guard);
                shard.remove(group);
            }
        }
        drop(shard);
        self.interest.left(group);
    }

    /// Delivers an event to this node's recipients; returns how many frames were queued.
    pub fn deliver(&self, event: &Event) -> usize {
        let mut unflushed = Unflushed::default();
        let queued = self.queue(event, &mut unflushed);
        unflushed.flush();
        queued
    }

    /// Queues an event for this node's recipients, leaving the frames of idle writers to
    /// `unflushed`; returns how many frames were queued.
    pub fn queue(&self, event: &Event, unflushed: &mut Unflushed) -> usize {
        if event.lost {
            return self.close_where_events_were_lost(&event.target);
        }
        let id = event.id;
        let ignore = event.ignore_web_socket_id.as_deref();
        let skip_socket = |conn: &Connection| ignore == Some(conn.web_socket_id.as_ref());
        let queued = match &event.target {
            Target::Group {
                group,
                exclude_user_ids,
                payload,
            } => {
                let members = self
                    .groups
                    .shard(group.as_str())
                    .get(group.as_str())
                    .cloned();
                // Most groups of a busy backend have nobody watching on this node: frame
                // the payload only for one that has.
                let Some(members) = members else {
                    return 0;
                };
                let members = lock(&members);
                let frame = &self.event_frame(payload, id, members.list.len());
                self.send_all(&members.list, frame, id, unflushed, |c| {
                    skip_socket(c) || exclude_user_ids.contains(&c.user_id)
                })
            }
            Target::Everyone {
                exclude_user_ids,
                payload,
            } => {
                let everyone = self.connections.load(Ordering::Relaxed) as usize;
                let frame = &self.event_frame(payload, id, everyone);
                self.users
                    .each_shard()
                    .map(|shard| {
                        shard
                            .iter()
                            .filter(|(user_id, _)| !exclude_user_ids.contains(user_id))
                            .map(|(_, conns)| {
                                self.send_all(conns, frame, id, unflushed, skip_socket)
                            })
                            .sum::<usize>()
                    })
                    .sum()
            }
            Target::Users { user_ids, payload } => {
                // A user has a few tabs at most: a good enough count of its sockets.
                let frame = &self.event_frame(payload, id, user_ids.len());
                user_ids
                    .iter()
                    .map(|user_id| {
                        self.send_to_user(*user_id, id, || frame.clone(), unflushed, skip_socket)
                    })
                    .sum()
            }
            Target::Individual { payloads } => payloads
                .iter()
                .map(|(user_id, payload)| {
                    self.send_to_user(
                        *user_id,
                        id,
                        || self.event_frame(payload, id, 1),
                        unflushed,
                        skip_socket,
                    )
                })
                .sum(),
        };
        self.counters
            .frames_queued
            .fetch_add(queued as u64, Ordering::Relaxed);
        queued
    }

    /// Sends to a user's connections on this node; `frame` is made only if there are some
    /// (each node hears every user's individual payloads).
    fn send_to_user(
        &self,
        user_id: i64,
        id: u64,
        frame: impl FnOnce() -> Frame,
        unflushed: &mut Unflushed,
        skip: impl Fn(&Connection) -> bool,
    ) -> usize {
        match self.users.shard(&user_id).get(&user_id) {
            Some(conns) => self.send_all(conns, &frame(), id, unflushed, skip),
            None => 0,
        }
    }

    fn send_all(
        &self,
        conns: &[Arc<Connection>],
        frame: &Frame,
        id: u64,
        unflushed: &mut Unflushed,
        skip: impl Fn(&Connection) -> bool,
    ) -> usize {
        // One allocation for the event's recipients, not one per doubling.
        unflushed.0.reserve(conns.len());
        conns
            .iter()
            .filter(|c| !skip(c))
            .filter(|c| c.send(frame, id, &self.counters, unflushed))
            .count()
    }

    /// Every (connection, page) in scope, copied out of the locks.
    pub fn subscriptions(&self, scope: &Scope) -> Vec<(Arc<Connection>, Page)> {
        let mut found = Vec::new();
        let mut collect = |conns: &[Arc<Connection>]| {
            for conn in conns {
                for page in lock(&conn.pages).iter().filter(|p| scope.covers(p)) {
                    found.push((conn.clone(), page.clone()));
                }
            }
        };
        if scope.user_ids.is_empty() {
            for shard in self.users.each_shard() {
                shard.values().for_each(|conns| collect(conns));
            }
        } else {
            for user_id in &scope.user_ids {
                if let Some(conns) = self.users.shard(user_id).get(user_id) {
                    collect(conns);
                }
            }
        }
        found
    }

    /// Sends `force_disconnect` and then a close to every connection of these users,
    /// except the sockets named in `spare`. Returns how many were disconnected.
    pub fn disconnect_users(&self, user_ids: &[i64], spare: &[String]) -> u32 {
        let mut disconnected = 0;
        for user_id in user_ids {
            let conns = self
                .users
                .shard(user_id)
                .get(user_id)
                .cloned()
                .unwrap_or_default();
            for conn in conns {
                if spare
                    .iter()
                    .any(|id| id.as_str() == conn.web_socket_id.as_ref())
                    || conn.outbox.close_reason().is_some()
                {
                    continue;
                }
                conn.outbox.push(Frame::from(server::force_disconnect()));
                conn.outbox.close(CloseReason::Disconnected);
                disconnected += 1;
            }
        }
        disconnected
    }

    /// Asks every connection to close with `reason` once its queued frames are written,
    /// and every connection that joins from now on too (the node is stopping).
    pub fn close_all(&self, reason: CloseReason) {
        let _ = self.closing.set(reason);
        self.close_connections(reason);
    }

    /// Connections this user has open on this node.
    pub fn connections_of(&self, user_id: i64) -> usize {
        self.users.shard(&user_id).get(&user_id).map_or(0, Vec::len)
    }

    /// Every connection, copied out of the locks.
    pub fn connections(&self) -> Vec<Arc<Connection>> {
        self.users
            .each_shard()
            .flat_map(|shard| shard.values().flatten().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Closes every member of a group with `reason`; returns how many.
    pub fn close_group(&self, group: &str, reason: CloseReason) -> usize {
        let members = self.groups.shard(group).get(group).cloned();
        let Some(members) = members else {
            return 0;
        };
        let members = lock(&members).list.clone();
        for conn in &members {
            conn.outbox.close(reason);
        }
        members.len()
    }

    /// A backend lost events for `target` before they reached the gateway: its sockets are
    /// closed with 1012, so their clients reconnect and refresh instead of living with a
    /// silent hole. Returns how many.
    fn close_where_events_were_lost(&self, target: &Target) -> usize {
        let reason = CloseReason::Restart;
        match target {
            Target::Group { group, .. } => self.close_group(group, reason),
            Target::Everyone { .. } => self.close_connections(reason),
            Target::Users { user_ids, .. } => user_ids
                .iter()
                .map(|user_id| {
                    let conns = self.users.shard(user_id).get(user_id).cloned();
                    conns.unwrap_or_default().iter().fold(0, |closed, conn| {
                        conn.outbox.close(reason);
                        closed + 1
                    })
                })
                .sum(),
            // Refused when the mark is made: a mark names a group or users.
            Target::Individual { .. } => 0,
        }
    }

    /// Closes every connection with `reason` (connections that join later stay open);
    /// returns how many.
    pub fn close_connections(&self, reason: CloseReason) -> usize {
        let mut closed = 0;
        for shard in self.users.each_shard() {
            for conn in shard.values().flatten() {
                conn.outbox.close(reason);
                closed += 1;
            }
        }
        closed
    }

    /// The `limit` groups with the most members on this node, most first, for the
    /// console. Each shard's groups are copied out, then each group's lock is taken for a
    /// moment, one at a time, so a fan-out in progress never holds up a shard.
    pub fn busiest_groups(&self, limit: usize) -> Vec<(Arc<str>, usize)> {
        use std::cmp::Reverse;
        let mut top = std::collections::BinaryHeap::with_capacity(limit + 1);
        for index in 0..SHARDS {
            let groups: Vec<_> = lock(&self.groups.shards[index])
                .iter()
                .map(|(name, members)| (name.clone(), members.clone()))
                .collect();
            for (name, members) in groups {
                top.push(Reverse((lock(&members).list.len(), name)));
                if top.len() > limit {
                    top.pop();
                }
            }
        }
        let mut busiest: Vec<_> = top.into_iter().map(|Reverse((n, g))| (g, n)).collect();
        busiest.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        busiest
    }

    pub fn stats(&self) -> HubStats {
        let users = self
            .users
            .each_shard()
            .map(|s| {
                s.keys()
                    .filter(|id| **id != crate::identity::ANONYMOUS_USER_ID)
                    .count()
            })
            .sum::<usize>();
        let groups = self.groups.each_shard().map(|s| s.len()).sum::<usize>();
        HubStats {
            connections: self.connections.load(Ordering::Relaxed),
            users: users as u64,
            groups: groups as u64,
            subscriptions: self.subscriptions.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pages::PageRegistry;
    use serde_json::json;

    fn hub() -> Hub {
        Hub::new(1 << 20, 10, Arc::new(NoInterest))
    }

    fn added(s: Subscribed) -> bool {
        matches!(s, Subscribed::Added { .. })
    }

    fn table(id: i64) -> Page {
        let registry = PageRegistry::new(&PageRegistry::baserow_specs()).unwrap();
        let params = json!({ "table_id": id });
        registry
            .resolve("table", params.as_object().unwrap())
            .unwrap()
    }

    fn group_event(group: &str, text: &str) -> Event {
        Event {
            target: Target::Group {
                group: group.into(),
                exclude_user_ids: vec![],
                payload: text.into(),
            },
            ignore_web_socket_id: None,
            record: true,
            id: 0,
            idempotency_key: None,
            lost: false,
        }
    }

    #[test]
    fn a_stopping_hub_closes_the_connections_it_has_and_those_that_join() {
        let hub = hub();
        let before = hub.connect("a".into(), 1);
        hub.close_all(CloseReason::GoingAway);
        let after = hub.connect("b".into(), 2);
        assert_eq!(before.outbox.close_reason(), Some(CloseReason::GoingAway));
        assert_eq!(after.outbox.close_reason(), Some(CloseReason::GoingAway));
    }

    #[test]
    fn membership_is_counted_once_and_released() {
        let hub = hub();
        let conn = hub.connect("a".into(), 1);
        assert!(added(hub.subscribe(&conn, table(1))));
        assert!(matches!(
            hub.subscribe(&conn, table(1)),
            Subscribed::AlreadyHeld
        ));
        assert_eq!(hub.deliver(&group_event("table-1", "{}")), 1);
        assert_eq!(hub.stats().subscriptions, 1);
        assert!(hub.unsubscribe(&conn, &table(1)));
        assert_eq!(hub.deliver(&group_event("table-1", "{}")), 0);
        assert_eq!(hub.stats().groups, 0);
        hub.disconnect(&conn);
        assert_eq!(hub.stats(), HubStats::default());
    }

    #[test]
    fn busiest_groups_are_listed_most_members_first() {
        let hub = hub();
        let conns: Vec<_> = (0..4)
            .map(|i| hub.connect(i.to_string().into(), i))
            .collect();
        for (n, conn) in conns.iter().enumerate() {
            for id in 0..=n as i64 {
                assert!(added(hub.subscribe(conn, table(id))));
            }
        }
        let busiest = hub.busiest_groups(2);
        let named: Vec<_> = busiest.iter().map(|(g, n)| (g.as_ref(), *n)).collect();
        assert_eq!(named, [("table-0", 4), ("table-1", 3)]);
        assert_eq!(hub.busiest_groups(10).len(), 4);
    }

    #[test]
    fn disconnect_leaves_every_group() {
        let hub = hub();
        let a = hub.connect("a".into(), 1);
        let b = hub.connect("b".into(), 2);
        for id in 0..3 {
            assert!(added(hub.subscribe(&a, table(id))));
        }
        assert!(added(hub.subscribe(&b, table(0))));
        hub.disconnect(&a);
        let stats = hub.stats();
        assert_eq!(
            (stats.connections, stats.groups, stats.subscriptions),
            (1, 1, 1)
        );
        assert_eq!(hub.deliver(&group_event("table-0", "{}")), 1);
    }

    #[test]
    fn page_limit_is_enforced() {
        let hub = Hub::new(1 << 20, 2, Arc::new(NoInterest));
        let conn = hub.connect("a".into(), 1);
        assert!(added(hub.subscribe(&conn, table(1))));
        assert!(added(hub.subscribe(&conn, table(2))));
        assert!(matches!(
            hub.subscribe(&conn, table(3)),
            Subscribed::TooManyPages
        ));
    }
}
