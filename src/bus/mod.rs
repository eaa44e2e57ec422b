//! The bus carries published events and control requests to every node.
//!
//! The gRPC service publishes into the bus and never into a hub directly, so the same code
//! serves one node (the in-memory bus) and many (Redis). Each node's hub tells the bus
//! which groups it has members of ([`GroupInterest`]), and the bus delivers events for
//! those groups, user-targeted events and control requests into it.

mod memory;
mod redis;

pub use memory::MemoryBus;
pub use redis::{PendingCommands, RedisBus, RedisSettings, Subscriptions, subscriptions};

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use crate::event::Event;
use crate::proto::control_reply::Reply;
use crate::proto::control_request::Request;

/// The bus could not take a request; the gRPC API answers `UNAVAILABLE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusUnavailable(pub String);

impl std::fmt::Display for BusUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bus unavailable: {}", self.0)
    }
}

/// Moves events and control requests between nodes.
pub trait Bus: Send + Sync + 'static {
    /// Completes once the bus has accepted the event for delivery to every node. Events
    /// published one after another to one group are delivered in that order everywhere.
    fn publish(&self, event: Event) -> BoxFuture<'_, Result<(), BusUnavailable>>;

    /// Asks every live node, this one included, and returns the replies that arrived
    /// within the bus's deadline.
    fn ask_all(&self, request: Request) -> BoxFuture<'_, Result<Vec<Reply>, BusUnavailable>>;

    /// Whether the bus works now (`/readyz`, health); changes are announced.
    fn readiness(&self) -> watch::Receiver<bool>;

    /// The node is stopping: stop listening and tell the other nodes not to wait for it.
    fn leave(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// Told by the hub of each (connection, group) membership added and removed.
pub trait GroupInterest: Send + Sync + 'static {
    /// A membership was added. The future completes once the group's events reach this
    /// node; it never fails (a bus that is down restores its subscriptions when back).
    fn joined(&self, group: &Arc<str>) -> BoxFuture<'static, ()>;

    /// A membership was removed.
    fn left(&self, group: &Arc<str>);
}

/// For a node alone: every event is local, so there is nothing to subscribe to.
pub struct NoInterest;

impl GroupInterest for NoInterest {
    fn joined(&self, _group: &Arc<str>) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }

    fn left(&self, _group: &Arc<str>) {}
}
