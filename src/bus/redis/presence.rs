//! Presence across nodes through Redis.
//!
//! - hash `P:presence:members`: field `<space> <presence id>`, value the member as JSON
//!   (with its node): what a node reads to learn every other node's members;
//! - channel `P:presence`: every change, as JSON, for every node.
//!
//! A member lives as long as its node's heartbeat (`P:node:<id>`, a few seconds): each
//! node sweeps, once a second, the members of nodes whose heartbeat expired, so the
//! members of a killed node leave everyone's lists within seconds, with a
//! `presence.leave`. One task per node writes its changes, in order, each hash update
//! and its message in one MULTI, so that a snapshot of the hash and the stream of
//! messages after it agree. After a cut it writes its members again (a node whose
//! heartbeat lapsed was swept by the others) and reads everyone else's anew.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

use super::link::Shared;
use super::registry::HEARTBEAT_EVERY;
use crate::presence::{Change, Member, Presence, PresenceLink};

/// Changes written in one round trip at most.
const BATCH: usize = 256;
/// Fields one conditional delete takes at most (Lua's argument stack is limited).
const SWEEP_CHUNK: usize = 1000;

/// Deletes a dead node's members, unless its heartbeat came back meanwhile.
const SWEEP_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
return redis.call('HDEL', KEYS[1], unpack(ARGV))
";

/// What the writing task does, in order.
enum Job {
    Change(Change),
    /// Write every member of this node again, and delete its entries that are stale.
    Rewrite,
}

/// This node's side of presence on Redis.
pub struct RedisPresence {
    shared: Arc<Shared>,
    presence: Arc<Presence>,
    jobs: mpsc::UnboundedSender<Job>,
    /// A write failed: the others may have missed a change until the next rewrite.
    dirty: AtomicBool,
    sweep: redis::Script,
}

/// Hands this node's changes to the writing task.
struct Link(mpsc::UnboundedSender<Job>);

impl PresenceLink for Link {
    fn announce(&self, change: Change) {
        // Fails only when the node is stopping.
        let _ = self.0.send(Job::Change(change));
    }
}

impl RedisPresence {
    /// Links `presence` to Redis and starts the writing and sweeping tasks.
    pub fn start(
        shared: Arc<Shared>,
        presence: Arc<Presence>,
    ) -> (Arc<RedisPresence>, Vec<tokio::task::JoinHandle<()>>) {
        let (jobs, queue) = mpsc::unbounded_channel();
        presence.link(Arc::new(Link(jobs.clone())));
        let redis_presence = Arc::new(RedisPresence {
            shared,
            presence,
            jobs,
            dirty: AtomicBool::new(false),
            sweep: redis::Script::new(SWEEP_SCRIPT),
        });
        let tasks = vec![
            tokio::spawn(redis_presence.clone().write(queue)),
            tokio::spawn(redis_presence.clone().keep()),
        ];
        (redis_presence, tasks)
    }

    fn field(space: &str, presence_id: &str) -> String {
        format!("{space} {presence_id}")
    }

    /// A message from the presence channel.
    pub fn received(&self, payload: &[u8]) {
        match serde_json::from_slice::<Change>(payload) {
            Ok(change) => self.presence.apply(change),
            Err(error) => tracing::warn!(%error, "undecodable presence change"),
        }
    }

    /// Reads every other node's members anew (after a connect, before the node is
    /// ready), and has this node's own written again.
    pub async fn load(&self) -> Result<(), String> {
        self.presence.begin_loading();
        let result = self.snapshot().await;
        let snapshot = match result {
            Ok(snapshot) => snapshot,
            Err(error) => {
                // The changes that waited are applied; the next connect loads again.
                self.presence.reconcile_failed();
                return Err(error);
            }
        };
        let live: HashSet<String> = self
            .shared
            .live_nodes()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect();
        let (alive, dead): (Vec<_>, Vec<_>) = snapshot.into_iter().partition(|(_, m)| {
            live.contains(m.node.as_ref()) || m.node == *self.presence.node_id()
        });
        self.presence.reconcile(alive);
        self.delete_dead(&dead).await;
        let _ = self.jobs.send(Job::Rewrite);
        Ok(())
    }

    /// Every member in the hash, by space.
    async fn snapshot(&self) -> Result<Vec<(Arc<str>, Member)>, String> {
        let mut connection = self.shared.publisher().await.map_err(|e| e.to_string())?;
        let entries: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.shared.names.presence_members())
            .query_async(&mut connection)
            .await
            .map_err(|e| format!("presence members not read: {e}"))?;
        Ok(entries
            .into_iter()
            .filter_map(|(field, member)| {
                let (space, _) = field.split_once(' ')?;
                let member: Member = serde_json::from_str(&member).ok()?;
                Some((Arc::from(space), member))
            })
            .collect())
    }

    /// Writes this node's changes in order, a batch per round trip.
    async fn write(self: Arc<Self>, mut queue: mpsc::UnboundedReceiver<Job>) {
        let mut jobs = Vec::with_capacity(BATCH);
        while queue.recv_many(&mut jobs, BATCH).await > 0 {
            let mut changes = Vec::new();
            for job in jobs.drain(..) {
                match job {
                    Job::Change(change) => changes.push(change),
                    Job::Rewrite => {
                        self.send(std::mem::take(&mut changes)).await;
                        let rewrite = self.rewrite().await;
                        self.done(rewrite);
                    }
                }
            }
            self.send(changes).await;
        }
    }

    fn done(&self, result: Result<(), String>) {
        if let Err(error) = result {
            self.dirty.store(true, Ordering::Release);
            tracing::warn!(%error, "presence not written to Redis; written again once it is back");
        }
    }

    async fn send(&self, changes: Vec<Change>) {
        if !changes.is_empty() {
            let result = self.write_changes(&changes).await;
            self.done(result);
        }
    }

    async fn write_changes(&self, changes: &[Change]) -> Result<(), String> {
        let names = &self.shared.names;
        let (hash, channel) = (names.presence_members(), names.presence());
        let mut pipe = redis::pipe();
        pipe.atomic();
        for change in changes {
            match change {
                Change::Join { space, member } => {
                    pipe.hset(
                        &hash,
                        Self::field(space, &member.presence_id),
                        to_json(member)?,
                    );
                }
                Change::Leave {
                    space, presence_id, ..
                } => {
                    pipe.hdel(&hash, Self::field(space, presence_id));
                }
                Change::Focus {
                    space,
                    presence_id,
                    user_id,
                    focus,
                    node,
                } => {
                    let member = Member {
                        presence_id: presence_id.clone(),
                        user_id: *user_id,
                        focus: focus.clone(),
                        node: node.clone(),
                    };
                    pipe.hset(&hash, Self::field(space, presence_id), to_json(&member)?);
                }
            }
            pipe.ignore()
                .cmd(names.publish_command())
                .arg(channel)
                .arg(to_json(change)?)
                .ignore();
        }
        let mut connection = self.shared.publisher().await.map_err(|e| e.to_string())?;
        pipe.query_async::<()>(&mut connection)
            .await
            .map_err(|e| e.to_string())
    }

    /// Writes every member of this node again (announced as joins: the others add those
    /// they swept, and take a changed focus), and removes its entries that are stale.
    async fn rewrite(&self) -> Result<(), String> {
        let node = self.presence.node_id().clone();
        let local = self.presence.local_members();
        let held: HashSet<String> = local
            .iter()
            .map(|(space, m)| Self::field(space, &m.presence_id))
            .collect();
        let stale = self
            .snapshot()
            .await?
            .into_iter()
            .filter(|(space, m)| {
                m.node == node && !held.contains(&Self::field(space, &m.presence_id))
            })
            .map(|(space, m)| Change::Leave {
                space,
                presence_id: m.presence_id,
                node: node.clone(),
            });
        let joins = local
            .into_iter()
            .map(|(space, member)| Change::Join { space, member });
        let changes: Vec<Change> = stale.chain(joins).collect();
        for chunk in changes.chunks(BATCH) {
            self.write_changes(chunk).await?;
        }
        Ok(())
    }

    /// Once a second: sweeps the members of dead nodes, and writes this node's members
    /// again after a failed write.
    async fn keep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !*self.shared.ready.borrow() {
                continue;
            }
            let live = match self.shared.live_nodes().await {
                Ok(live) => live.into_iter().collect(),
                Err(error) => {
                    tracing::debug!(%error, "live nodes not read; no presence sweep");
                    continue;
                }
            };
            let dead = self.presence.sweep(&live);
            if !dead.is_empty() {
                tracing::info!(
                    members = dead.len(),
                    "presence: members of dead nodes removed"
                );
                self.delete_dead(&dead).await;
            }
            if self.dirty.swap(false, Ordering::AcqRel) {
                let _ = self.jobs.send(Job::Rewrite);
            }
        }
    }

    /// Deletes dead nodes' entries from the hash (any node may; each checks that the
    /// node's heartbeat is still gone).
    async fn delete_dead(&self, dead: &[(Arc<str>, Member)]) {
        let Ok(mut connection) = self.shared.publisher().await else {
            return;
        };
        let mut by_node: HashMap<&str, Vec<String>> = HashMap::new();
        for (space, member) in dead {
            by_node
                .entry(&member.node)
                .or_default()
                .push(Self::field(space, &member.presence_id));
        }
        let names = &self.shared.names;
        for (node, fields) in by_node {
            for chunk in fields.chunks(SWEEP_CHUNK) {
                let deleted: Result<i64, _> = self
                    .sweep
                    .key(names.presence_members())
                    .key(names.heartbeat(node))
                    .arg(chunk)
                    .invoke_async(&mut connection)
                    .await;
                if let Err(error) = deleted {
                    tracing::debug!(%error, node, "dead node's presence not deleted");
                }
            }
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, String> {
    serde_json::to_string(value).map_err(|e| format!("presence not encoded: {e}"))
}
