//! One client's conversation: what each frame it sends does to the hub, and the answer.
//!
//! Transport-free: the WebSocket reader hands text in, and answers go into the
//! connection's outbox, in the same queue as events, so a client sees them in order.
//! Frames are handled one at a time: a subscribe is finished (membership in place and
//! `page_add` queued) before the next frame of that client is looked at.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::Semaphore;

use crate::authorizer::{AuthorizeRequest, Authorizer};
use crate::history::{self, Cursor, Outcome, RefreshReason, StreamKey};
use crate::hub::{Connection, Hub, Subscribed};
use crate::metrics::Metrics;
use crate::outbox::Frame;
use crate::pages::{Page, PageError, PageRegistry, is_space_name};
use crate::presence::Presence;
use crate::protocol::{ClientFrame, FrameError, RejectReason, parse_client_frame, server};

/// How long a client told to retry a replay waits first: a second on average, spread
/// over 500–1,500 ms so that a refused crowd does not come back all at once.
fn replay_retry_after_ms() -> u64 {
    500 + (uuid::Uuid::new_v4().as_u128() % 1001) as u64
}

/// How long a replay waits for a free slot before its client is told to retry: a slot
/// frees every few milliseconds in a storm, so a short wait serves the crowd in one pass.
const REPLAY_SLOT_WAIT: Duration = Duration::from_secs(1);

/// What a session needs from its node.
pub struct SessionContext {
    pub hub: Arc<Hub>,
    /// The node's counters, which sessions and the transports add to.
    pub metrics: Arc<Metrics>,
    pub pages: PageRegistry,
    pub authorizer: Arc<dyn Authorizer>,
    /// Replays from the event history; `None` when history is off.
    pub replays: Option<Replays>,
    /// Who else is in a space; `None` when presence is off.
    pub presence: Option<Arc<Presence>>,
}

/// What a node needs to serve replays.
pub struct Replays {
    pub store: Arc<dyn history::Store>,
    /// Events one replay sends at most.
    pub limit: usize,
    /// How long the store has to answer.
    pub timeout: Duration,
    /// One per replay being served; none left means overload.
    pub permits: Semaphore,
}

/// The protocol state of one connection.
pub struct Session {
    ctx: Arc<SessionContext>,
    conn: Arc<Connection>,
}

impl Session {
    pub fn new(ctx: Arc<SessionContext>, conn: Arc<Connection>) -> Self {
        Session { ctx, conn }
    }

    fn send(&self, text: String) {
        self.conn.outbox.push(Frame::reply(&text));
    }

    /// Handles one text frame. A frame that cannot be understood is answered with an
    /// `error` frame and reported back, so the transport can count repeated abuse.
    pub async fn handle_text(&self, text: &str) -> Result<(), FrameError> {
        match parse_client_frame(text) {
            Ok(frame) => {
                self.handle(frame).await;
                Ok(())
            }
            Err(error) => {
                self.reject_frame(&error);
                Err(error)
            }
        }
    }

    /// Answers a frame the gateway could not understand.
    pub fn reject_frame(&self, error: &FrameError) {
        self.ctx
            .metrics
            .invalid_frames
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.send(server::error(error.code(), &error.message()));
    }

    async fn handle(&self, frame: ClientFrame) {
        match frame {
            ClientFrame::Subscribe { page, params } => self.subscribe(page, params).await,
            ClientFrame::Unsubscribe { page, params } => self.unsubscribe(page, params),
            ClientFrame::Ping => self.send(server::pong()),
            ClientFrame::PresenceFocus {
                page,
                params,
                focus,
            } => self.focus(&page, &params, focus),
            ClientFrame::ReplayEvents {
                last_seen_id,
                supports_retry,
            } => match &self.ctx.replays {
                Some(replays) => {
                    self.replay(
                        replays,
                        Cursor::from_last_seen(last_seen_id),
                        supports_retry,
                    )
                    .await
                }
                None => self.send(server::error(
                    "replay_disabled",
                    "event history is off on this gateway (replay_enabled is false)",
                )),
            },
        }
    }

    /// Answers `replay_events` (DESIGN §6). Event frames that arrive while the history is
    /// read are held back and sent after the replay, and any id the socket already got
    /// live is left out of it, so each id reaches the socket once.
    async fn replay(&self, replays: &Replays, cursor: Cursor, supports_retry: bool) {
        let metrics = &self.ctx.metrics;
        let refresh = |reason: RefreshReason, latest: i64| {
            metrics.replay_refreshed(reason);
            Frame::reply(&server::replay_result(true, latest))
        };
        let overloaded = || {
            if supports_retry {
                metrics.replay_retries.fetch_add(1, Ordering::Relaxed);
                Frame::reply(&server::replay_retry(replay_retry_after_ms()))
            } else {
                refresh(RefreshReason::Overloaded, history::NO_REPLAY_AVAILABLE)
            }
        };
        let after = match cursor {
            Cursor::FirstConnect | Cursor::Lost => {
                let latest = tokio::time::timeout(replays.timeout, replays.store.latest()).await;
                let answer = match (cursor, latest) {
                    (Cursor::FirstConnect, Ok(Ok(latest))) => {
                        Frame::reply(&server::replay_result(false, latest as i64))
                    }
                    (_, Ok(Ok(latest))) => refresh(RefreshReason::LostCursor, latest as i64),
                    (_, Ok(Err(error))) => {
                        tracing::warn!(%error, "replay baseline not read");
                        overloaded()
                    }
                    (_, Err(_)) => overloaded(),
                };
                self.conn.outbox.push(answer);
                return;
            }
            Cursor::After(after) => after,
        };
        let wait = REPLAY_SLOT_WAIT.min(replays.timeout);
        let Ok(Ok(_permit)) = tokio::time::timeout(wait, replays.permits.acquire()).await else {
            self.conn.outbox.push(overloaded());
            return;
        };
        if !self.conn.outbox.hold() {
            let answer = refresh(RefreshReason::TooLate, history::NO_REPLAY_AVAILABLE);
            self.conn.outbox.push(answer);
            return;
        }
        let keys = StreamKey::of_socket(self.ctx.hub.groups_of(&self.conn));
        let read = tokio::time::timeout(replays.timeout, replays.store.read(keys, after)).await;
        let snapshot = match read {
            Ok(Ok(snapshot)) => snapshot,
            Ok(Err(error)) => {
                tracing::warn!(%error, "replay not read");
                self.conn.outbox.release(Vec::new(), overloaded(), 0);
                return;
            }
            Err(_) => {
                self.conn.outbox.release(Vec::new(), overloaded(), 0);
                return;
            }
        };
        let socket = history::Socket {
            web_socket_id: &self.conn.web_socket_id,
            user_id: self.conn.user_id,
        };
        match history::plan(after, &snapshot, socket, replays.limit) {
            Outcome::Replay {
                events,
                latest_event_id,
            } => {
                let frames = events
                    .iter()
                    .map(|(id, payload)| (*id, self.ctx.hub.event_frame(payload, *id, 1)))
                    .collect();
                let result = Frame::reply(&server::replay_result(false, latest_event_id as i64));
                let sent = self.conn.outbox.release(frames, result, after);
                metrics.replays_served.fetch_add(1, Ordering::Relaxed);
                metrics
                    .events_replayed
                    .fetch_add(sent as u64, Ordering::Relaxed);
            }
            Outcome::Refresh {
                reason,
                latest_event_id,
            } => {
                let answer = refresh(reason, latest_event_id);
                self.conn.outbox.release(Vec::new(), answer, 0);
            }
        }
    }

    async fn subscribe(&self, page_name: String, params: Map<String, Value>) {
        let reject = |reason: RejectReason, params: &Value| {
            self.ctx.metrics.page_rejected(reason);
            self.send(server::page_rejected(&page_name, params, reason));
        };
        let page = match self.ctx.pages.resolve(&page_name, &params) {
            Ok(page) => page,
            Err(error) => {
                let reason = match error {
                    PageError::UnknownPage => RejectReason::UnknownPage,
                    PageError::InvalidParameter(_) => RejectReason::InvalidParameters,
                };
                return reject(reason, &Value::Object(params));
            }
        };
        if self.conn.user_id == crate::identity::ANONYMOUS_USER_ID && !page.anonymous {
            return reject(RejectReason::PermissionDenied, &page.parameters);
        }
        let mut page = page;
        if !self.ctx.hub.holds(&self.conn, &page) {
            let request = AuthorizeRequest {
                user_id: self.conn.user_id,
                web_socket_id: self.conn.web_socket_id.to_string(),
                page: page_name.clone(),
                parameters: page.parameters.clone(),
                group: page.group.to_string(),
                permission_group: page.permission_group.as_deref().map(str::to_string),
            };
            match self.ctx.authorizer.authorize(request).await {
                Ok(decision) if decision.allowed => {
                    if let Some(space) = decision.presence_space {
                        if is_space_name(&space) {
                            page.presence_space = Some(space.into());
                        } else {
                            tracing::warn!(%space, "the authorizer named an invalid presence space; ignored");
                        }
                    }
                }
                Ok(_) => return reject(RejectReason::PermissionDenied, &page.parameters),
                Err(error) => {
                    tracing::warn!(user_id = self.conn.user_id, group = %page.group, %error, "subscribe denied");
                    return reject(RejectReason::AuthorizerUnavailable, &page.parameters);
                }
            }
        }
        let answer = server::page_add(&page_name, &page.parameters);
        match self.ctx.hub.subscribe(&self.conn, page.clone()) {
            Subscribed::Added { live } => {
                // page_add promises events: wait until the bus brings the group here.
                live.await;
                self.send(answer);
                self.join_space(&page);
            }
            Subscribed::AlreadyHeld => self.send(answer),
            Subscribed::TooManyPages => reject(RejectReason::TooManyPages, &page.parameters),
        }
    }

    /// Joins the page's presence space, after its `page_add`.
    fn join_space(&self, page: &Page) {
        let (Some(presence), Some(space)) = (&self.ctx.presence, &page.presence_space) else {
            return;
        };
        let hub = &self.ctx.hub;
        presence.join(&self.conn, space, || hub.in_space(&self.conn, space));
    }

    /// Relays a focus in a held page's presence space; anything else is dropped quietly
    /// (a focus is a hint, and a client that sends a bad one loses nothing by it).
    fn focus(&self, page_name: &str, params: &Map<String, Value>, focus: Value) {
        let Some(presence) = &self.ctx.presence else {
            return;
        };
        let held = self
            .ctx
            .pages
            .resolve(page_name, params)
            .ok()
            .and_then(|page| self.ctx.hub.held(&self.conn, &page));
        match held.and_then(|page| page.presence_space) {
            Some(space) => {
                let _ = presence.focus(&self.conn, &space, focus);
            }
            None => presence.dropped_focus(),
        }
    }

    fn unsubscribe(&self, page_name: String, params: Map<String, Value>) {
        if !self.ctx.pages.contains(&page_name) {
            return self.reject_frame(&FrameError::UnknownPage(page_name));
        }
        let parameters = match self.ctx.pages.resolve(&page_name, &params) {
            // The hub tells the client of a page it held.
            Ok(page) if self.ctx.hub.unsubscribe(&self.conn, &page) => return,
            Ok(page) => page.parameters,
            // Nothing with invalid parameters can be held; the client still learns it is gone.
            Err(_) => Value::Object(params),
        };
        self.send(server::page_discard(&page_name, &parameters));
    }
}
