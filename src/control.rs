//! Cluster-wide requests: every node answers `CheckPermission`, `Disconnect` and `Info` for
//! its own sockets, and the asker merges the answers.
//!
//! The bus carries the question to each live node and brings the replies back; this module
//! is what a node does with a question, and how answers add up.

use std::sync::Arc;
use std::time::Instant;

use crate::authorizer::Authorizer;
use crate::hub::Hub;
use crate::hub::Scope;
use crate::permissions;
use crate::presence::Presence;
use crate::proto;
pub use crate::proto::{control_reply::Reply, control_request::Request};

/// What the nodes said to a cluster-wide request.
#[derive(Debug, Default)]
pub struct Answers {
    pub replies: Vec<Reply>,
    /// Live nodes that did not answer within the deadline: the request may not have
    /// reached their sockets.
    pub missing: Vec<String>,
}

/// Answers control requests against this node's hub.
pub struct ControlHandler {
    pub hub: Arc<Hub>,
    pub authorizer: Arc<dyn Authorizer>,
    pub node_id: String,
    pub started: Instant,
    /// Presence, for `Info`; `None` when off.
    pub presence: Option<Arc<Presence>>,
}

impl ControlHandler {
    /// This node's answer.
    pub async fn answer(&self, request: Request) -> Reply {
        match request {
            Request::CheckPermission(request) => {
                let non_empty = |s: String| Some(s).filter(|s| !s.is_empty());
                let scope = Scope {
                    user_ids: request.user_ids,
                    permission_group: non_empty(request.permission_group),
                    group: non_empty(request.group),
                };
                let outcome = permissions::check(
                    &self.hub,
                    self.authorizer.as_ref(),
                    &scope,
                    request.revoke,
                    request.dry_run,
                )
                .await;
                Reply::CheckPermission(proto::CheckPermissionResponse {
                    checked: outcome.checked,
                    revoked: outcome
                        .revoked
                        .into_iter()
                        .map(|r| proto::Subscription {
                            web_socket_id: r.web_socket_id,
                            user_id: r.user_id,
                            page: r.page,
                            parameters: r.parameters.to_string(),
                            group: r.group,
                        })
                        .collect(),
                    nodes: 1,
                })
            }
            Request::Disconnect(request) => {
                // Before the sockets go, so none of them can come back on a remembered
                // answer about its token.
                self.authorizer.forget_connects(&request.user_ids);
                Reply::Disconnect(proto::DisconnectResponse {
                    disconnected: self
                        .hub
                        .disconnect_users(&request.user_ids, &request.ignore_web_socket_ids),
                    nodes: 1,
                })
            }
            Request::Info(_) => {
                let stats = self.hub.stats();
                let presence = self
                    .presence
                    .as_ref()
                    .map(|p| p.stats())
                    .unwrap_or_default();
                Reply::Info(proto::NodeInfo {
                    presence_spaces: presence.spaces,
                    presence_members: presence.members,
                    node_id: self.node_id.clone(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    connections: stats.connections,
                    users: stats.users,
                    groups: stats.groups,
                    subscriptions: stats.subscriptions,
                    uptime_seconds: self.started.elapsed().as_secs(),
                })
            }
        }
    }
}

/// Adds up the nodes' `CheckPermission` answers; `nodes` counts the answers.
pub fn merge_check(replies: Vec<Reply>) -> proto::CheckPermissionResponse {
    let mut merged = proto::CheckPermissionResponse::default();
    for reply in replies {
        if let Reply::CheckPermission(answer) = reply {
            merged.checked += answer.checked;
            merged.revoked.extend(answer.revoked);
            merged.nodes += 1;
        }
    }
    merged
}

/// Adds up the nodes' `Disconnect` answers.
pub fn merge_disconnect(replies: Vec<Reply>) -> proto::DisconnectResponse {
    let mut merged = proto::DisconnectResponse::default();
    for reply in replies {
        if let Reply::Disconnect(answer) = reply {
            merged.disconnected += answer.disconnected;
            merged.nodes += 1;
        }
    }
    merged
}

/// The nodes' `Info` answers, sorted by node id.
pub fn merge_info(replies: Vec<Reply>) -> proto::InfoResponse {
    let mut nodes: Vec<_> = replies
        .into_iter()
        .filter_map(|reply| match reply {
            Reply::Info(info) => Some(info),
            _ => None,
        })
        .collect();
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    proto::InfoResponse { nodes }
}
