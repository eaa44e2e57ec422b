//! The bus carries published events to the hubs of every node.
//!
//! The gRPC service publishes into the bus and never into a hub directly, so the same code
//! serves one node (the in-memory bus) and many.

mod memory;

pub use memory::MemoryBus;

use futures_util::future::BoxFuture;

use crate::event::Event;

/// The bus could not accept an event; `Publish` answers `UNAVAILABLE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusUnavailable(pub String);

impl std::fmt::Display for BusUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bus unavailable: {}", self.0)
    }
}

/// Moves events from publishers to every node's hub.
pub trait Bus: Send + Sync + 'static {
    /// Completes once the bus has accepted the event for delivery to every node. Events
    /// published one after another to one group are delivered in that order.
    fn publish(&self, event: Event) -> BoxFuture<'_, Result<(), BusUnavailable>>;

    /// Whether the bus accepts events now (`/readyz`, health).
    fn is_ready(&self) -> bool;
}
