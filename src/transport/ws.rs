//! `/ws/core/`: the WebSocket handshake and the I/O of one socket.
//!
//! A socket runs as two futures in one task: the reader hands frames to the [`Session`]
//! one at a time, the writer drains the connection's outbox and flushes once per batch.
//! Whichever ends first asks the other to finish, within a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, handshake::derive_accept_key};

use crate::bus::Bus;
use crate::identity::{Identity, IdentityError, TokenVerifier};
use crate::outbox::{Frame, Outbox};
use crate::protocol::{CloseReason, FrameError, server};
use crate::rate_limit::TokenBucket;
use crate::session::{Session, SessionContext};

/// How long a closing socket may take to write its close frame.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the gateway waits for the client's answer to its close frame before dropping
/// the TCP connection (dropping it with unread input would reset it and lose the frame).
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Malformed frames in a row that close a connection (1008).
const MAX_GARBAGE_IN_A_ROW: u32 = 20;
/// tungstenite reads in chunks of this size; small keeps idle sockets cheap (see DESIGN §7).
const READ_BUFFER_BYTES: usize = 1024;
/// Frames are written to the socket once this much is buffered, or at the end of a batch.
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// Everything the WebSocket side of a node needs.
pub struct WsContext {
    pub session: Arc<SessionContext>,
    pub verifier: TokenVerifier,
    pub bus: Arc<dyn Bus>,
    pub allowed_origins: Option<Vec<String>>,
    pub max_message_bytes: usize,
    pub inbound_burst: u32,
    pub inbound_rate: u32,
    pub shutdown: watch::Receiver<bool>,
}

/// An accepted handshake, waiting for hyper to hand over the connection.
pub struct Upgrade {
    on_upgrade: hyper::upgrade::OnUpgrade,
    identity: Result<Identity, IdentityError>,
    web_socket_id: Option<String>,
}

pub fn is_ws_path(path: &str) -> bool {
    path == "/ws/core/" || path == "/ws/core"
}

fn plain(status: http::StatusCode, text: &'static str) -> warp::reply::Response {
    let mut response =
        warp::reply::Response::new(bytes::Bytes::from_static(text.as_bytes()).into());
    *response.status_mut() = status;
    response
}

/// Checks an upgrade request and answers it: `101` with an [`Upgrade`] to run, or an error.
///
/// A bad token still gets a WebSocket, so that the client reads Baserow's
/// `authentication` failure frame and a 1008 close rather than a bare HTTP error.
pub fn handshake(
    ctx: &WsContext,
    mut request: http::Request<Incoming>,
) -> (warp::reply::Response, Option<Upgrade>) {
    use http::{StatusCode, header};
    let headers = request.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if request.method() != http::Method::GET
        || !has_token(header::UPGRADE, "websocket")
        || !has_token(header::CONNECTION, "upgrade")
    {
        return (
            plain(
                StatusCode::UPGRADE_REQUIRED,
                "/ws/core/ takes a WebSocket upgrade\n",
            ),
            None,
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return (
            plain(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Version must be 13\n",
            ),
            None,
        );
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return (
            plain(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing\n"),
            None,
        );
    };
    if let (Some(allowed), Some(origin)) = (&ctx.allowed_origins, headers.get(header::ORIGIN))
        && !allowed.iter().any(|a| a.as_bytes() == origin.as_bytes())
    {
        return (plain(StatusCode::FORBIDDEN, "Origin not allowed\n"), None);
    }
    let accept = derive_accept_key(key.as_bytes());
    let mut token = None;
    let mut web_socket_id = None;
    for (name, value) in form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes()) {
        match name.as_ref() {
            "jwt_token" => token = Some(value.into_owned()),
            "web_socket_id" if is_valid_web_socket_id(&value) => {
                web_socket_id = Some(value.into_owned())
            }
            _ => {}
        }
    }
    let identity = ctx.verifier.verify(token.as_deref());
    let upgrade = Upgrade {
        on_upgrade: hyper::upgrade::on(&mut request),
        identity,
        web_socket_id,
    };
    let mut response = plain(StatusCode::SWITCHING_PROTOCOLS, "");
    let response_headers = response.headers_mut();
    response_headers.insert(header::UPGRADE, http::HeaderValue::from_static("websocket"));
    response_headers.insert(
        header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(accept) = http::HeaderValue::from_str(&accept) {
        response_headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    (response, Some(upgrade))
}

/// A client-chosen id is kept when it is 1–64 chars of `[A-Za-z0-9_-]`.
fn is_valid_web_socket_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Runs one WebSocket from the upgrade to the end.
pub async fn run(ctx: Arc<WsContext>, upgrade: Upgrade) {
    let upgraded = match upgrade.on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::debug!(%error, "WebSocket upgrade failed");
            return;
        }
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_message_size(Some(ctx.max_message_bytes))
        .max_frame_size(Some(ctx.max_message_bytes));
    let mut socket: Socket =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    let identity = match upgrade.identity {
        Ok(identity) => identity,
        Err(error) => {
            tracing::debug!(%error, "authentication failed");
            ctx.session
                .hub
                .metrics()
                .authentication_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = socket
                .send(Message::Text(server::authentication_failed().into()))
                .await;
            let _ = socket
                .send(close_message(CloseReason::AuthenticationFailed))
                .await;
            return;
        }
    };
    let web_socket_id = upgrade
        .web_socket_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let hub = ctx.session.hub.clone();
    let conn = hub.connect(web_socket_id.as_str().into(), identity.user_id);
    // A node stopping closes every connection in the hub; one that joined after it did so
    // sees the flag (it was raised before the hub was walked).
    if *ctx.shutdown.borrow() {
        conn.outbox.close(CloseReason::GoingAway);
    }
    conn.outbox
        .push(Frame::from(server::authenticated(&web_socket_id, false)));
    let session = Session::new(ctx.session.clone(), conn.clone());
    let (mut sink, mut stream) = socket.split();

    let writer = write_loop(&mut sink, &conn.outbox);
    let reader = read_loop(&mut stream, &session, &ctx);
    tokio::pin!(writer, reader);
    tokio::select! {
        _ = &mut writer => {
            // Our close frame is out: give the client a moment to answer it.
            let _ = tokio::time::timeout(CLOSE_LINGER, &mut reader).await;
        }
        reason = &mut reader => {
            conn.outbox.close(reason);
            let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, &mut writer).await;
        }
    }
    hub.disconnect(&conn);
}

fn close_message(reason: CloseReason) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(reason.code()),
        reason: reason.text().into(),
    }))
}

/// Writes queued frames, a batch at a time with one flush, until a close is requested.
async fn write_loop(
    sink: &mut futures_util::stream::SplitSink<Socket, Message>,
    outbox: &Outbox,
) -> CloseReason {
    let mut batch = Vec::new();
    loop {
        if let Some(reason) = outbox.next_batch(&mut batch).await {
            // A slow consumer may never take this frame; the timeout bounds the wait.
            let _ =
                tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.send(close_message(reason))).await;
            return reason;
        }
        let write = async {
            for frame in batch.drain(..) {
                sink.feed(Message::Text(frame)).await?;
            }
            sink.flush().await
        };
        let written = tokio::select! {
            written = write => written,
            // A write stuck on a socket nobody reads is abandoned; the loop then closes.
            _ = outbox.overflow() => Ok(()),
        };
        batch.clear();
        if let Err(error) = written {
            tracing::debug!(%error, "socket write failed");
            return CloseReason::Normal;
        }
    }
}

/// Reads and handles client frames until the client leaves or must be closed.
async fn read_loop(
    stream: &mut futures_util::stream::SplitStream<Socket>,
    session: &Session,
    ctx: &WsContext,
) -> CloseReason {
    let mut bucket = TokenBucket::new(ctx.inbound_burst, ctx.inbound_rate, Instant::now());
    let mut garbage_in_a_row = 0;
    while let Some(message) = stream.next().await {
        let message = match message {
            Ok(message) => message,
            Err(WsError::Utf8(_)) => return CloseReason::InvalidUtf8,
            Err(WsError::Capacity(_)) => return CloseReason::MessageTooBig,
            Err(WsError::Protocol(error)) => {
                tracing::debug!(%error, "WebSocket protocol error");
                return CloseReason::ProtocolError;
            }
            Err(error) => {
                tracing::debug!(%error, "socket read failed");
                return CloseReason::Normal;
            }
        };
        let handled = match message {
            Message::Text(text) => {
                if !bucket.take(Instant::now()) {
                    return CloseReason::RateLimited;
                }
                session.handle_text(&text).await
            }
            Message::Binary(_) => {
                if !bucket.take(Instant::now()) {
                    return CloseReason::RateLimited;
                }
                session.reject_frame(&FrameError::Binary);
                Err(FrameError::Binary)
            }
            Message::Close(_) => return CloseReason::Normal,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
        };
        if handled.is_ok() {
            garbage_in_a_row = 0;
        } else {
            garbage_in_a_row += 1;
            if garbage_in_a_row >= MAX_GARBAGE_IN_A_ROW {
                return CloseReason::RepeatedGarbage;
            }
        }
    }
    CloseReason::Normal
}
