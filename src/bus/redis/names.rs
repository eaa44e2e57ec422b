//! Channel and key names, made once per node from `--redis-prefix` and the node id: every
//! part of the bus (listeners, history, presence, registry, control) names what it uses
//! through [`Names`], so the naming scheme (and the cluster's hash tags) lives in one place.

use std::sync::Arc;

use super::cluster;
use crate::history::lanes;

/// Channel and key names. The channels every message is told apart by are made once: the
/// listener compares each message's channel with them before it delivers an event.
///
/// On a Redis Cluster, the keys and channels that must share a slot carry a hash tag: the
/// node registry, control requests and presence share `{P}` (they are little traffic, and
/// the presence and sweep scripts read a node's heartbeat with its members), and a group's
/// channel is on its history lane's slot ([`cluster`]).
#[derive(Clone)]
pub(super) struct Names {
    pub(super) prefix: String,
    /// `P`, or `{P}` on a cluster.
    registry: String,
    pub(super) node_id: String,
    control: String,
    presence: String,
    pub(super) own_reply: String,
    /// The lanes' hash tags on a cluster; empty on one Redis.
    pub(super) lanes: Arc<[String]>,
}

impl Names {
    pub(super) fn new(prefix: &str, node_id: &str, cluster: bool) -> Names {
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
    pub(super) fn group(&self, group: &str) -> String {
        match self.lanes.get(lanes::lane_of_group(group)) {
            Some(tag) => format!("{}:g:{{{tag}}}:{group}", self.prefix),
            None => format!("{}:g:{group}", self.prefix),
        }
    }
    pub(super) fn broadcast(&self) -> String {
        format!("{}:broadcast", self.prefix)
    }
    pub(super) fn control(&self) -> &str {
        &self.control
    }
    pub(super) fn reply(&self, node_id: &str) -> String {
        format!("{}:reply:{node_id}", self.prefix)
    }
    pub(super) fn heartbeat(&self, node_id: &str) -> String {
        format!("{}:node:{node_id}", self.registry)
    }
    pub(super) fn nodes(&self) -> String {
        format!("{}:nodes", self.registry)
    }
    /// When the registry was made: a Redis that lost its keys makes it anew.
    pub(super) fn registry_born(&self) -> String {
        format!("{}:registry", self.registry)
    }
    /// A node's mark that it left, and the set of nodes with one.
    pub(super) fn left(&self, node_id: &str) -> String {
        format!("{}:left:{node_id}", self.registry)
    }
    pub(super) fn left_nodes(&self) -> String {
        format!("{}:left", self.registry)
    }
    /// The revokes and Disconnects of the last minutes, for a node that was counted gone.
    pub(super) fn control_log(&self) -> String {
        format!("{}:control-log", self.registry)
    }
    pub(super) fn presence(&self) -> &str {
        &self.presence
    }
    pub(super) fn presence_members(&self) -> String {
        format!("{}:presence:members", self.registry)
    }
    /// The publish command for these channels: sharded on a cluster, so a message goes
    /// to one shard and not to every node of the cluster.
    pub(super) fn publish_command(&self) -> &'static str {
        if self.cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }
    /// The channels every node listens on whatever its members, but for those that bring
    /// it every node's events (one Redis: broadcast; a cluster: the lanes).
    pub(super) fn fixed(&self, presence: bool) -> Vec<String> {
        let mut channels = vec![self.control.clone(), self.own_reply.clone()];
        if presence {
            channels.push(self.presence().to_string());
        }
        channels
    }
}
