//! The in-memory bus of a node running alone: publishing is delivering to the local hub.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{Bus, BusUnavailable};
use crate::event::Event;
use crate::hub::Hub;

/// One node, no network: an event is in every recipient's queue when `publish` returns,
/// so sequential publishes keep their order.
pub struct MemoryBus {
    hub: Arc<Hub>,
}

impl MemoryBus {
    pub fn new(hub: Arc<Hub>) -> Self {
        MemoryBus { hub }
    }
}

impl Bus for MemoryBus {
    fn publish(&self, event: Event) -> BoxFuture<'_, Result<(), BusUnavailable>> {
        self.hub.deliver(&event);
        Box::pin(std::future::ready(Ok(())))
    }

    fn is_ready(&self) -> bool {
        true
    }
}
