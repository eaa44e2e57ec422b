//! The in-memory bus of a node running alone: publishing is delivering to the local hub,
//! and recording an event in the in-memory history in the same step.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::{Bus, BusUnavailable, PublishError};
use crate::control::{Answers, ControlHandler, Request};
use crate::event::Event;
use crate::history::{self, memory::MemoryHistory};
use crate::hub::{Hub, Unflushed};
use crate::idempotency::{IdempotencySettings, Remembered};

/// One node, no network: an event is in every recipient's queue when `publish` returns,
/// so sequential publishes keep their order; control requests are answered locally.
pub struct MemoryBus {
    hub: Arc<Hub>,
    control: Arc<ControlHandler>,
    history: Option<Arc<MemoryHistory>>,
    /// Idempotency keys published within the window; held while an event with a key is
    /// published, so a key checked and the event published are one step.
    keys: Mutex<Remembered>,
    ready: watch::Sender<bool>,
}

impl MemoryBus {
    /// `history`: the in-memory event history, when it is on.
    pub fn new(
        hub: Arc<Hub>,
        control: Arc<ControlHandler>,
        history: Option<Arc<MemoryHistory>>,
        idempotency: IdempotencySettings,
    ) -> Self {
        MemoryBus {
            hub,
            control,
            history,
            keys: Mutex::new(Remembered::new(idempotency)),
            ready: watch::Sender::new(true),
        }
    }

    /// Publishes the event unless its idempotency key was published within the window;
    /// returns its id, or the first one's. Its frames for idle writers wait in `unflushed`.
    fn publish_once(&self, mut event: Event, unflushed: &mut Unflushed) -> u64 {
        let Some(key) = event.idempotency_key.take() else {
            return self.deliver(event, unflushed);
        };
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(id) = keys.get(&key, now) {
            return id;
        }
        let id = self.deliver(event, unflushed);
        keys.insert(key, id, now);
        id
    }

    fn deliver(&self, event: Event, unflushed: &mut Unflushed) -> u64 {
        match &self.history {
            Some(history) if event.record => {
                history
                    .record(event, |event| self.hub.queue(event, unflushed))
                    .0
            }
            _ => {
                self.hub.queue(&event, unflushed);
                0
            }
        }
    }

    /// Publishes `events` in order, then writes to the sockets whose writers were idle,
    /// after one yield when there are some: publishes that arrived together queue first,
    /// so each socket gets all their frames in one write.
    async fn publish_all(&self, events: impl IntoIterator<Item = Event>) -> Vec<u64> {
        let mut unflushed = Unflushed::default();
        let ids = events
            .into_iter()
            .map(|event| self.publish_once(event, &mut unflushed))
            .collect();
        if !unflushed.is_empty() {
            tokio::task::yield_now().await;
            unflushed.flush();
        }
        ids
    }
}

impl Bus for MemoryBus {
    fn publish(&self, event: Event) -> BoxFuture<'_, Result<u64, PublishError>> {
        Box::pin(async move { Ok(self.publish_all([event]).await[0]) })
    }

    fn publish_batch(&self, events: Vec<Event>) -> BoxFuture<'_, Result<Vec<u64>, PublishError>> {
        Box::pin(async move { Ok(self.publish_all(events).await) })
    }

    fn ask_all(&self, request: Request) -> BoxFuture<'_, Result<Answers, BusUnavailable>> {
        Box::pin(async move {
            Ok(Answers {
                replies: vec![self.control.answer(request).await],
                missing: Vec::new(),
            })
        })
    }

    fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    fn history(&self) -> Option<Arc<dyn history::Store>> {
        self.history
            .clone()
            .map(|history| history as Arc<dyn history::Store>)
    }
}
