//! One client's conversation: what each frame it sends does to the hub, and the answer.
//!
//! Transport-free: the WebSocket reader hands text in, and answers go into the
//! connection's outbox, in the same queue as events, so a client sees them in order.
//! Frames are handled one at a time: a subscribe is finished (membership in place and
//! `page_add` queued) before the next frame of that client is looked at.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::authorizer::{AuthorizeRequest, Authorizer};
use crate::hub::{Connection, Hub, Subscribed};
use crate::outbox::Frame;
use crate::pages::{PageError, PageRegistry};
use crate::protocol::{ClientFrame, FrameError, RejectReason, parse_client_frame, server};

/// What a session needs from its node.
pub struct SessionContext {
    pub hub: Arc<Hub>,
    pub pages: PageRegistry,
    pub authorizer: Arc<dyn Authorizer>,
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
        self.conn.outbox.push(Frame::from(text));
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
            .hub
            .metrics()
            .invalid_frames
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.send(server::error(error.code(), &error.message()));
    }

    async fn handle(&self, frame: ClientFrame) {
        match frame {
            ClientFrame::Subscribe { page, params } => self.subscribe(page, params).await,
            ClientFrame::Unsubscribe { page, params } => self.unsubscribe(page, params),
            ClientFrame::Ping => self.send(server::pong()),
            ClientFrame::ReplayEvents { .. } => self.send(server::error(
                "replay_disabled",
                "event history is off on this gateway (replay_enabled is false)",
            )),
        }
    }

    async fn subscribe(&self, page_name: String, params: Map<String, Value>) {
        let reject = |reason: RejectReason, params: &Value| {
            self.ctx.hub.metrics().page_rejected(reason);
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
        if !self.ctx.hub.holds(&self.conn, &page) {
            let request = AuthorizeRequest {
                user_id: self.conn.user_id,
                web_socket_id: self.conn.web_socket_id.to_string(),
                page: page_name.clone(),
                parameters: page.parameters.clone(),
                group: page.group.to_string(),
            };
            match self.ctx.authorizer.authorize(request).await {
                Ok(true) => {}
                Ok(false) => return reject(RejectReason::PermissionDenied, &page.parameters),
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
                self.send(answer)
            }
            Subscribed::AlreadyHeld => self.send(answer),
            Subscribed::TooManyPages => reject(RejectReason::TooManyPages, &page.parameters),
        }
    }

    fn unsubscribe(&self, page_name: String, params: Map<String, Value>) {
        if !self.ctx.pages.contains(&page_name) {
            return self.reject_frame(&FrameError::UnknownPage(page_name));
        }
        let parameters = match self.ctx.pages.resolve(&page_name, &params) {
            Ok(page) => {
                self.ctx.hub.unsubscribe(&self.conn, &page);
                page.parameters
            }
            // Nothing with invalid parameters can be held; the client still learns it is gone.
            Err(_) => Value::Object(params),
        };
        self.send(server::page_discard(&page_name, &parameters));
    }
}
