//! The control inbox: what a node receives besides events (cluster-wide control requests,
//! which it answers, replies to its own requests, and presence changes), taken from the
//! listener's messages by channel. Shared by one Redis's listener and the cluster's.

use std::sync::Arc;

use prost::Message as _;
use tokio::time::Instant;

use super::control_log::CONTROL_LOG_KEEP;
use super::link::Shared;
use super::lock;
use super::presence::RedisPresence;
use crate::control::{ControlHandler, Reply, Request};
use crate::proto;
use crate::protocol::CloseReason;

/// What a node receives besides events: cluster-wide requests, replies to its own, and
/// presence changes.
pub(super) struct Inbox {
    pub(super) shared: Arc<Shared>,
    pub(super) control: Arc<ControlHandler>,
    pub(super) presence: Option<Arc<RedisPresence>>,
}

impl Inbox {
    /// A node cut off from Redis may have missed a revoke: it asks the authorizer again
    /// about every page its sockets hold, as a `CheckPermission` would.
    pub(super) async fn revalidate(&self) {
        let request = Request::CheckPermission(proto::CheckPermissionRequest::default());
        if let Reply::CheckPermission(outcome) = self.control.answer(request).await {
            tracing::info!(
                checked = outcome.checked,
                revoked = outcome.revoked.len(),
                "pages re-checked after the Redis reconnect"
            );
        }
    }

    /// Whether the other nodes may have stopped waiting for this one (its heartbeat
    /// lapsed): then it must deliver nothing until it has caught up.
    pub(super) fn is_counted_gone(&self) -> bool {
        lock(&self.shared.liveness)
            .counted_gone(Instant::now())
            .is_some()
    }

    /// Makes up for what this node may have missed while the others did not wait for it
    /// (its heartbeat lapsed: Redis was away, or the process stalled), before its listener
    /// delivers anything again: it forgets every remembered authorizer answer, applies the
    /// logged revokes and Disconnects since its last heartbeat, and re-checks every page
    /// with the authorizer. When the log cannot cover the gap (Redis lost its keys, or the
    /// gap is longer than the log keeps), it closes its sockets with 1012 instead, so
    /// their clients reconnect through the checks.
    pub(super) async fn catch_up_if_counted_gone(&self) -> Result<(), String> {
        let Some(since) = lock(&self.shared.liveness).counted_gone(Instant::now()) else {
            return Ok(());
        };
        tracing::warn!(
            "this node's heartbeat lapsed, so the other nodes stopped waiting for it: catching up before serving again"
        );
        // Live again first: every request from now on waits for this node.
        let view = self.shared.heartbeat().await.map_err(|e| e.0)?;
        self.control.authorizer.forget_all();
        let log_covers =
            view.born_ms <= since && since + CONTROL_LOG_KEEP.as_millis() as u64 > view.now_ms;
        if log_covers {
            let missed = self.shared.logged_since(since).await?;
            let applied = missed.len();
            for request in missed {
                self.control.answer(request).await;
            }
            self.revalidate().await;
            tracing::info!(applied, "missed revokes and Disconnects applied");
        } else {
            let closed = self.control.hub.close_connections(CloseReason::Restart);
            tracing::warn!(
                closed,
                "the control log does not reach back to this node's last heartbeat: sockets closed to reconnect"
            );
        }
        lock(&self.shared.liveness).caught_up(since);
        Ok(())
    }

    /// Takes a message of the control, reply or presence channels; `false` for others.
    pub(super) fn take(&self, channel: &str, payload: &[u8]) -> bool {
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
            return false;
        }
        true
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
            if let Err(error) = shared.publish_bytes(&channel, reply.encode_to_vec()).await {
                tracing::warn!(%error, "control reply not sent");
            }
        });
    }
}
