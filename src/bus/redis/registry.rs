//! The node registry: each node keeps an expiring heartbeat key and its id in the set of
//! nodes, so a cluster-wide request knows which nodes to wait for ([`Shared::live_nodes`])
//! and presence can sweep the members of nodes that died. Shared by one Redis and a cluster.

use std::sync::Arc;
use std::time::Duration;

use super::link::Shared;
use crate::bus::BusUnavailable;

/// How often a node renews its heartbeat, and how long one lives.
pub(super) const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const HEARTBEAT_TTL: Duration = Duration::from_secs(3);

impl Shared {
    /// Nodes whose heartbeat is alive; forgets the others.
    pub(super) async fn live_nodes(&self) -> Result<Vec<String>, BusUnavailable> {
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

    pub(super) async fn heartbeat(&self) -> Result<(), BusUnavailable> {
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
}

/// Renews this node's heartbeat; a node whose heartbeat expired is no longer waited for.
pub(super) async fn heartbeats(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(error) = shared.heartbeat().await {
            tracing::debug!(%error, "heartbeat not written");
        }
    }
}
