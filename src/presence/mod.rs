//! Presence (DESIGN §10): who else is in a space, and which cell they are in.
//!
//! A page may map to a presence space (a table and its rows share `table-{table_id}`).
//! A connection is a member of a space while it holds at least one page of it; each
//! connection has its own `presence_id`, so two tabs of one user are two members.
//!
//! Every node keeps a view of every space's members, on every node: its own members it
//! changes itself, and the other nodes tell it theirs through a [`PresenceLink`] (nothing
//! to tell on a node alone). Each change becomes frames for this node's members of the
//! space, pushed into their outboxes under one lock, so every socket sees a space's
//! changes in one order. No network I/O happens here.
//!
//! Anonymous members show as user -1; they receive no join, leave or focus frames, only
//! `presence.editors_active` whenever "a signed-in member is here" flips.

mod focus;

pub use focus::{FocusError, FocusTypeSpec, FocusTypes, MAX_FOCUS_BYTES};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::hub::{Connection, SpaceInterest};
use crate::identity::ANONYMOUS_USER_ID;
use crate::outbox::Frame;
use crate::protocol::server;
use crate::rate_limit::TokenBucket;

/// The user id anonymous members are shown as.
pub const ANONYMOUS_MEMBER: i64 = -1;

/// One member of a space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub presence_id: Arc<str>,
    /// [`ANONYMOUS_MEMBER`] for an anonymous connection.
    pub user_id: i64,
    /// The last focus it sent; null for none.
    #[serde(default)]
    pub focus: Value,
    /// The node that holds its connection: its members leave when it dies.
    pub node: Arc<str>,
}

impl Member {
    fn is_anonymous(&self) -> bool {
        self.user_id == ANONYMOUS_MEMBER
    }
}

/// A change to a space, as nodes tell each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    Join {
        space: Arc<str>,
        member: Member,
    },
    Leave {
        space: Arc<str>,
        presence_id: Arc<str>,
        node: Arc<str>,
    },
    Focus {
        space: Arc<str>,
        presence_id: Arc<str>,
        user_id: i64,
        focus: Value,
        node: Arc<str>,
    },
}

impl Change {
    /// The node whose member changed.
    pub fn node(&self) -> &str {
        match self {
            Change::Join { member, .. } => &member.node,
            Change::Leave { node, .. } | Change::Focus { node, .. } => node,
        }
    }
}

/// Carries this node's changes to the other nodes.
pub trait PresenceLink: Send + Sync + 'static {
    /// Tells every other node, in the order of the calls.
    fn announce(&self, change: Change);
}

/// Bounds on what presence costs.
#[derive(Debug, Clone, Copy)]
pub struct PresenceLimits {
    /// Members a space holds; a connection joining a full space gets no presence there.
    pub max_members: usize,
    /// Focus frames per second a socket may send (and as a burst); more are dropped.
    pub focus_rate: u32,
}

/// Why a focus frame was not relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FocusDropped {
    Invalid(FocusError),
    /// The socket is not a member of the space (no page of it held, or the space is full).
    NotInSpace,
    RateLimited,
}

/// Counters of presence on this node, for `Info` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PresenceStats {
    /// Spaces with members on this node.
    pub spaces: u64,
    /// This node's members (a connection in two spaces counts twice).
    pub members: u64,
    /// Focus frames dropped: invalid, for a page not held, or over the rate.
    pub focus_dropped: u64,
    /// Joins refused because the space was full.
    pub full: u64,
}

/// The presence state of one node.
pub struct Presence {
    node_id: Arc<str>,
    limits: PresenceLimits,
    focus_types: FocusTypes,
    state: Mutex<State>,
    link: OnceLock<Arc<dyn PresenceLink>>,
    focus_dropped: AtomicU64,
    full: AtomicU64,
}

#[derive(Default)]
struct State {
    spaces: HashMap<Arc<str>, Space>,
    /// This node's connections that were in a space, by connection id.
    local: HashMap<u64, Local>,
    /// While a snapshot of the other nodes' members is read, their changes wait here.
    loading: Option<Vec<Change>>,
}

/// A connection of this node that was in a space.
struct Local {
    presence_id: Arc<str>,
    spaces: Vec<Arc<str>>,
    focus_bucket: TokenBucket,
}

/// One space: every member, and this node's members' connections.
#[derive(Default)]
struct Space {
    members: HashMap<Arc<str>, Member>,
    local: HashMap<Arc<str>, Arc<Connection>>,
    /// Members that are not anonymous.
    editors: usize,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Space {
    /// Sends `frame` to this node's members that are signed in, but `except`.
    fn to_editors(&self, except: &str, frame: &Frame) {
        for (presence_id, conn) in &self.local {
            if presence_id.as_ref() != except && conn.user_id != ANONYMOUS_USER_ID {
                conn.outbox.push(frame.clone());
            }
        }
    }

    /// Tells this node's anonymous members whether a signed-in member is here.
    fn to_anonymous(&self, name: &str) {
        let frame = Frame::from(server::presence_editors_active(name, self.editors > 0));
        for conn in self.local.values() {
            if conn.user_id == ANONYMOUS_USER_ID {
                conn.outbox.push(frame.clone());
            }
        }
    }

    /// Adds a member and tells the others; an existing one only gets its focus updated.
    fn insert(&mut self, name: &str, member: Member, conn: Option<Arc<Connection>>) {
        if self.members.contains_key(&member.presence_id) {
            self.set_focus(name, &member.presence_id, member.focus);
            return;
        }
        let frame = Frame::from(server::presence_join(
            name,
            member.user_id,
            &member.presence_id,
        ));
        self.to_editors(&member.presence_id, &frame);
        if let Some(conn) = conn {
            self.local.insert(member.presence_id.clone(), conn);
        }
        if !member.is_anonymous() {
            self.editors += 1;
            if self.editors == 1 {
                self.to_anonymous(name);
            }
        }
        self.members.insert(member.presence_id.clone(), member);
    }

    /// Removes a member and tells the others.
    fn remove(&mut self, name: &str, presence_id: &str) -> Option<Member> {
        let member = self.members.remove(presence_id)?;
        self.local.remove(presence_id);
        let frame = Frame::from(server::presence_leave(
            name,
            member.user_id,
            &member.presence_id,
        ));
        self.to_editors(presence_id, &frame);
        if !member.is_anonymous() {
            self.editors -= 1;
            if self.editors == 0 {
                self.to_anonymous(name);
            }
        }
        Some(member)
    }

    fn set_focus(&mut self, name: &str, presence_id: &str, focus: Value) {
        let Some(member) = self.members.get_mut(presence_id) else {
            return;
        };
        if member.focus == focus {
            return;
        }
        let frame = Frame::from(server::presence_focus(
            name,
            member.user_id,
            presence_id,
            &focus,
        ));
        member.focus = focus;
        self.to_editors(presence_id, &frame);
    }

    /// `presence.members` for a joiner: everyone but itself, with their last focus.
    fn listing(&self, name: &str) -> Frame {
        let entries = self
            .members
            .values()
            .map(|m| server::presence_entry(m.user_id, &m.presence_id, &m.focus))
            .collect();
        Frame::from(server::presence_members(name, entries))
    }
}

impl State {
    /// Applies another node's change.
    fn apply(&mut self, change: Change) {
        match change {
            Change::Join { space, member } => {
                self.spaces
                    .entry(space.clone())
                    .or_default()
                    .insert(&space, member, None);
            }
            Change::Leave {
                space, presence_id, ..
            } => self.remove(&space, &presence_id),
            Change::Focus {
                space,
                presence_id,
                focus,
                ..
            } => {
                if let Some(s) = self.spaces.get_mut(&space) {
                    s.set_focus(&space, &presence_id, focus);
                }
            }
        }
    }

    fn remove(&mut self, space: &Arc<str>, presence_id: &str) {
        if let Some(s) = self.spaces.get_mut(space) {
            s.remove(space, presence_id);
            if s.members.is_empty() {
                self.spaces.remove(space);
            }
        }
    }
}

impl Presence {
    pub fn new(node_id: &str, limits: PresenceLimits, focus_types: FocusTypes) -> Presence {
        Presence {
            node_id: node_id.into(),
            limits,
            focus_types,
            state: Mutex::default(),
            link: OnceLock::new(),
            focus_dropped: AtomicU64::new(0),
            full: AtomicU64::new(0),
        }
    }

    /// Connects this node's presence to the other nodes'. Set once, before sockets join.
    pub fn link(&self, link: Arc<dyn PresenceLink>) {
        let _ = self.link.set(link);
    }

    pub fn node_id(&self) -> &Arc<str> {
        &self.node_id
    }

    fn announce(&self, change: Change) {
        if let Some(link) = self.link.get() {
            link.announce(change);
        }
    }

    /// Makes a connection a member of a space, unless it is one already (several pages
    /// of one space count once) or `still_held` says it no longer holds a page of it.
    /// The joiner learns who is there; the others learn of the joiner.
    pub fn join(
        &self,
        conn: &Arc<Connection>,
        space: &Arc<str>,
        still_held: impl FnOnce() -> bool,
    ) {
        let mut state = lock(&self.state);
        if state
            .local
            .get(&conn.id)
            .is_some_and(|l| l.spaces.contains(space))
            || !still_held()
        {
            return;
        }
        let s = state.spaces.entry(space.clone()).or_default();
        if s.members.len() >= self.limits.max_members {
            self.full.fetch_add(1, Ordering::Relaxed);
            if s.members.is_empty() {
                state.spaces.remove(space);
            }
            return;
        }
        if conn.user_id == ANONYMOUS_USER_ID {
            let active = s.editors > 0;
            conn.outbox
                .push(Frame::from(server::presence_editors_active(space, active)));
        } else {
            conn.outbox.push(s.listing(space));
        }
        let limits = self.limits;
        let local = state.local.entry(conn.id).or_insert_with(|| Local {
            presence_id: uuid::Uuid::new_v4().to_string().into(),
            spaces: Vec::new(),
            focus_bucket: TokenBucket::new(limits.focus_rate, limits.focus_rate, Instant::now()),
        });
        local.spaces.push(space.clone());
        let member = Member {
            presence_id: local.presence_id.clone(),
            user_id: if conn.user_id == ANONYMOUS_USER_ID {
                ANONYMOUS_MEMBER
            } else {
                conn.user_id
            },
            focus: Value::Null,
            node: self.node_id.clone(),
        };
        let s = state.spaces.entry(space.clone()).or_default();
        s.insert(space, member.clone(), Some(conn.clone()));
        // Under the lock, like every announcement: a member's changes leave in order.
        self.announce(Change::Join {
            space: space.clone(),
            member,
        });
    }

    /// Takes a connection out of a space; `discard` tells it so (it is still connected).
    fn leave(&self, state: &mut State, conn: &Connection, space: &Arc<str>, discard: bool) {
        let Some(local) = state.local.get_mut(&conn.id) else {
            return;
        };
        let Some(i) = local.spaces.iter().position(|s| s == space) else {
            return;
        };
        local.spaces.swap_remove(i);
        let presence_id = local.presence_id.clone();
        state.remove(space, &presence_id);
        if discard {
            conn.outbox
                .push(Frame::from(server::presence_space_discard(space)));
        }
        self.announce(Change::Leave {
            space: space.clone(),
            presence_id,
            node: self.node_id.clone(),
        });
    }

    /// Relays a member's focus to the others in the space; this node's own member, a
    /// valid focus, within the socket's rate, or dropped.
    pub fn focus(
        &self,
        conn: &Connection,
        space: &Arc<str>,
        focus: Value,
    ) -> Result<(), FocusDropped> {
        let result = self.try_focus(conn, space, focus);
        if result.is_err() {
            self.focus_dropped.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Counts a focus frame dropped before it reached a space (no such page held).
    pub fn dropped_focus(&self) {
        self.focus_dropped.fetch_add(1, Ordering::Relaxed);
    }

    fn try_focus(
        &self,
        conn: &Connection,
        space: &Arc<str>,
        focus: Value,
    ) -> Result<(), FocusDropped> {
        self.focus_types
            .check(&focus)
            .map_err(FocusDropped::Invalid)?;
        let mut state = lock(&self.state);
        let local = state
            .local
            .get_mut(&conn.id)
            .filter(|l| l.spaces.contains(space))
            .ok_or(FocusDropped::NotInSpace)?;
        if !local.focus_bucket.take(Instant::now()) {
            return Err(FocusDropped::RateLimited);
        }
        let presence_id = local.presence_id.clone();
        let Some(s) = state.spaces.get_mut(space) else {
            return Err(FocusDropped::NotInSpace);
        };
        let user_id = s
            .members
            .get(&presence_id)
            .map_or(ANONYMOUS_MEMBER, |m| m.user_id);
        s.set_focus(space, &presence_id, focus.clone());
        self.announce(Change::Focus {
            space: space.clone(),
            presence_id,
            user_id,
            focus,
            node: self.node_id.clone(),
        });
        Ok(())
    }

    /// Applies another node's change (this node's own come back from the bus too, and
    /// are skipped: they were applied when made).
    pub fn apply(&self, change: Change) {
        if change.node() == self.node_id.as_ref() {
            return;
        }
        let mut state = lock(&self.state);
        match &mut state.loading {
            Some(waiting) => waiting.push(change),
            None => state.apply(change),
        }
    }

    /// A snapshot of the other nodes' members is about to be read: their changes wait
    /// until [`Presence::reconcile`].
    pub fn begin_loading(&self) {
        // A fresh list: changes held for a load that failed predate the snapshot to come,
        // and replaying them after it could bring back a member that left meanwhile.
        lock(&self.state).loading = Some(Vec::new());
    }

    /// Makes the view of the other nodes' members match `snapshot` (what the store held
    /// after [`Presence::begin_loading`]), telling this node's members what changed, then
    /// applies the changes that arrived meanwhile.
    pub fn reconcile(&self, snapshot: Vec<(Arc<str>, Member)>) {
        let mut state = lock(&self.state);
        let remote: HashSet<(Arc<str>, Arc<str>)> = snapshot
            .iter()
            .filter(|(_, m)| m.node != self.node_id)
            .map(|(space, m)| (space.clone(), m.presence_id.clone()))
            .collect();
        let gone: Vec<(Arc<str>, Arc<str>)> = state
            .spaces
            .iter()
            .flat_map(|(space, s)| {
                s.members
                    .values()
                    .filter(|m| m.node != self.node_id)
                    .map(move |m| (space.clone(), m.presence_id.clone()))
            })
            .filter(|key| !remote.contains(key))
            .collect();
        for (space, presence_id) in gone {
            state.remove(&space, &presence_id);
        }
        for (space, member) in snapshot {
            if member.node != self.node_id {
                state.apply(Change::Join { space, member });
            }
        }
        for change in state.loading.take().unwrap_or_default() {
            state.apply(change);
        }
    }

    /// The snapshot could not be read: the changes that waited are applied to the view
    /// as it is, and the next load tries again.
    pub fn reconcile_failed(&self) {
        let mut state = lock(&self.state);
        for change in state.loading.take().unwrap_or_default() {
            state.apply(change);
        }
    }

    /// Removes the members of nodes that are not in `live` (dead ones: their members
    /// would otherwise stay listed for ever), telling this node's members. Returns them.
    pub fn sweep(&self, live: &HashSet<String>) -> Vec<(Arc<str>, Member)> {
        let mut state = lock(&self.state);
        let dead: Vec<(Arc<str>, Member)> = state
            .spaces
            .iter()
            .flat_map(|(space, s)| {
                s.members
                    .values()
                    .filter(|m| m.node != self.node_id && !live.contains(m.node.as_ref()))
                    .map(move |m| (space.clone(), m.clone()))
            })
            .collect();
        for (space, member) in &dead {
            state.remove(space, &member.presence_id);
        }
        dead
    }

    /// This node's members, to tell the other nodes again after a cut.
    pub fn local_members(&self) -> Vec<(Arc<str>, Member)> {
        let state = lock(&self.state);
        state
            .spaces
            .iter()
            .flat_map(|(space, s)| {
                s.local
                    .keys()
                    .filter_map(|id| s.members.get(id))
                    .map(move |m| (space.clone(), m.clone()))
            })
            .collect()
    }

    /// The `limit` spaces with the most members, most first: (space, members on every
    /// node, members on this node), for the console.
    pub fn busiest_spaces(&self, limit: usize) -> Vec<(Arc<str>, usize, usize)> {
        let state = lock(&self.state);
        let mut spaces: Vec<_> = state
            .spaces
            .iter()
            .map(|(name, s)| (name.clone(), s.members.len(), s.local.len()))
            .collect();
        drop(state);
        spaces.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        spaces.truncate(limit);
        spaces
    }

    pub fn stats(&self) -> PresenceStats {
        let state = lock(&self.state);
        let spaces = state.spaces.values().filter(|s| !s.local.is_empty());
        let (spaces, members) = spaces.fold((0, 0), |(n, m), s| (n + 1, m + s.local.len() as u64));
        PresenceStats {
            spaces,
            members,
            focus_dropped: self.focus_dropped.load(Ordering::Relaxed),
            full: self.full.load(Ordering::Relaxed),
        }
    }
}

impl SpaceInterest for Presence {
    fn left(&self, conn: &Connection, space: &Arc<str>, still_held: &dyn Fn() -> bool) {
        let mut state = lock(&self.state);
        // A page of the space subscribed while the last one went found the member still
        // there and did not join again: it must not be taken out now.
        if !still_held() {
            self.leave(&mut state, conn, space, true);
        }
    }

    fn disconnected(&self, conn: &Connection) {
        let mut state = lock(&self.state);
        let Some(local) = state.local.get(&conn.id) else {
            return;
        };
        for space in local.spaces.clone() {
            self.leave(&mut state, conn, &space, false);
        }
        state.local.remove(&conn.id);
    }
}

#[cfg(test)]
mod tests;
