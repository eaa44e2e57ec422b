//! The bus carries published events and control requests to every node.
//!
//! The gRPC service publishes into the bus and never into a hub directly, so the same code
//! serves one node (the in-memory bus) and many (Redis). Each node's hub tells the bus
//! which groups it has members of ([`crate::hub::GroupInterest`]), and the bus delivers
//! events for those groups, user-targeted events and control requests into it.

mod memory;
mod redis;

pub use memory::MemoryBus;
pub use redis::{
    PendingCommands, Receivers, RedisBus, RedisSettings, RedisTarget, Subscriptions, subscriptions,
};

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use crate::control::{Answers, Request};
use crate::event::Event;
use crate::history;

/// The bus could not take a request; the gRPC API answers `UNAVAILABLE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusUnavailable(pub String);

impl std::fmt::Display for BusUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bus unavailable: {}", self.0)
    }
}

/// Why a publish failed, as its caller must know it: whether the event may have gone out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    /// Certainly not published (the bus is down, or refused it before it ran): a retry is
    /// safe (`UNAVAILABLE`).
    Unavailable(String),
    /// The node gave up waiting, and the event may have been published: a retry with the
    /// same idempotency key publishes it at most once (`DEADLINE_EXCEEDED`).
    Unknown(String),
}

impl From<BusUnavailable> for PublishError {
    fn from(error: BusUnavailable) -> Self {
        PublishError::Unavailable(error.0)
    }
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishError::Unavailable(why) => write!(f, "not published: {why}"),
            PublishError::Unknown(why) => write!(f, "may have been published: {why}"),
        }
    }
}

/// Moves events and control requests between nodes, and keeps the event history.
pub trait Bus: Send + Sync + 'static {
    /// Completes once the bus has accepted the event for delivery to every node, and
    /// returns its history id (0: not recorded). With history on, giving the id, storing
    /// the event and publishing it are one step, so a group's live order is its id order.
    /// Events published one after another to one group are delivered in that order
    /// everywhere. An event whose idempotency key was published within the window is not
    /// published again: the first one's id is returned, checked in the same step.
    fn publish(&self, event: Event) -> BoxFuture<'_, Result<u64, PublishError>>;

    /// Publishes events in order, as one step where the bus can, and returns their ids,
    /// which increase in request order.
    fn publish_batch(&self, events: Vec<Event>) -> BoxFuture<'_, Result<Vec<u64>, PublishError>>;

    /// Asks every live node, this one included, and returns the replies that arrived
    /// within the bus's deadline, and which live nodes did not answer.
    fn ask_all(&self, request: Request) -> BoxFuture<'_, Result<Answers, BusUnavailable>>;

    /// Whether the bus works now (`/readyz`, health); changes are announced.
    fn readiness(&self) -> watch::Receiver<bool>;

    /// Where replays read the event history; `None` when history is off.
    fn history(&self) -> Option<Arc<dyn history::Store>>;

    /// The node is stopping: stop listening and tell the other nodes not to wait for it.
    fn leave(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}
