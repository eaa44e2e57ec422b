//! The in-memory bus of a node running alone: publishing is delivering to the local hub.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::{Bus, BusUnavailable};
use crate::control::ControlHandler;
use crate::event::Event;
use crate::hub::Hub;
use crate::proto::control_reply::Reply;
use crate::proto::control_request::Request;

/// One node, no network: an event is in every recipient's queue when `publish` returns,
/// so sequential publishes keep their order; control requests are answered locally.
pub struct MemoryBus {
    hub: Arc<Hub>,
    control: Arc<ControlHandler>,
    ready: watch::Sender<bool>,
}

impl MemoryBus {
    pub fn new(hub: Arc<Hub>, control: Arc<ControlHandler>) -> Self {
        MemoryBus {
            hub,
            control,
            ready: watch::Sender::new(true),
        }
    }
}

impl Bus for MemoryBus {
    fn publish(&self, event: Event) -> BoxFuture<'_, Result<(), BusUnavailable>> {
        self.hub.deliver(&event);
        Box::pin(std::future::ready(Ok(())))
    }

    fn ask_all(&self, request: Request) -> BoxFuture<'_, Result<Vec<Reply>, BusUnavailable>> {
        Box::pin(async move { Ok(vec![self.control.answer(request).await]) })
    }

    fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }
}
