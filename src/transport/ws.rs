//! `/ws/core/`: the WebSocket handshake and the I/O of one socket.
//!
//! A socket runs as futures in one task, sharing its TCP stream without a lock: the reader
//! decodes client frames ([`super::frames`]) from each read and hands messages to the
//! [`Session`] one at a time; the writer takes the connection's outbox a batch at a time and
//! hands the frames, framed once per event for every socket, to the kernel in one write.
//! Whichever ends first asks the other to finish, within a deadline. The writer is polled on
//! every wake-up, the reader and the pinger only when they have news ([`race`]).

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::deflate::{self, Agreement, DeflateSettings};

use crate::authorizer::ConnectRequest;
use crate::bus::Bus;
use crate::identity::{Credentials, IdentityError, TokenVerifier};
use crate::outbox::{Frame, Outbox};
use crate::protocol::{CloseReason, FrameError, server};
use crate::rate_limit::TokenBucket;
use crate::session::{Session, SessionContext};
use crate::sink::{Sink, Written, write_some};
use crate::transport::frames::{Decoder, Message};
use crate::transport::keepalive::{Heard, keep_alive};
use crate::transport::race::{self, First};

/// How long a closing socket may take to write its close frame.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the gateway waits for the client's answer to its close frame before dropping
/// the TCP connection (dropping it with unread input would reset it and lose the frame).
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Malformed frames in a row that close a connection (1008).
const MAX_GARBAGE_IN_A_ROW: u32 = 20;

/// Everything the WebSocket side of a node needs.
pub struct WsContext {
    pub session: Arc<SessionContext>,
    pub verifier: TokenVerifier,
    pub bus: Arc<dyn Bus>,
    pub allowed_origins: Option<Vec<String>>,
    /// permessage-deflate, for the clients that offer it; `None`: off.
    pub compression: Option<DeflateSettings>,
    pub max_message_bytes: usize,
    /// With `--authorize-connect`, how long the connect check may take; `None`: no check.
    pub connect_check: Option<Duration>,
    /// How long a client has to send its request headers (the handshake, or any HTTP
    /// request); a connection that sends nothing, or too slowly, is closed.
    pub handshake_timeout: Duration,
    /// How often the server pings each socket; a client silent for two intervals is gone.
    pub ping_interval: Duration,
    /// Where the node's ping grid starts: every ping goes out on one of its slots.
    pub ping_grid: tokio::time::Instant,
    /// Sockets one user may hold on this node; more are closed with 1008.
    pub max_connections_per_user: usize,
    /// Connections one client address may hold; more get 503.
    pub max_connections_per_ip: usize,
    /// Set when the node starts draining: `/readyz` answers 503 from then on.
    pub draining: std::sync::atomic::AtomicBool,
    pub inbound_burst: u32,
    pub inbound_rate: u32,
}

/// An accepted handshake, waiting for hyper to hand over the connection.
pub struct Upgrade {
    on_upgrade: hyper::upgrade::OnUpgrade,
    credentials: Result<Credentials, IdentityError>,
    web_socket_id: Option<String>,
    /// permessage-deflate, when agreed.
    deflate: Option<Agreement>,
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
    let credentials = ctx.verifier.verify_credentials(token.as_deref());
    let offers = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|value| value.to_str().ok());
    let deflate = ctx
        .compression
        .and_then(|settings| deflate::negotiate(offers, settings.context_fanout > 0));
    let upgrade = Upgrade {
        on_upgrade: hyper::upgrade::on(&mut request),
        credentials,
        web_socket_id,
        deflate: deflate.as_ref().map(|(agreement, _)| *agreement),
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
    if let Some(Ok(extension)) = deflate.map(|(_, answer)| http::HeaderValue::from_str(&answer)) {
        response_headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, extension);
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

/// Runs one WebSocket from the upgrade to the end.
pub async fn run(ctx: Arc<WsContext>, upgrade: Upgrade) {
    let upgraded = match upgrade.on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::debug!(%error, "WebSocket upgrade failed");
            return;
        }
    };
    let web_socket_id = upgrade
        .web_socket_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let credentials = match upgrade.credentials {
        Ok(credentials) => credentials,
        Err(error) => {
            tracing::debug!(%error, "authentication failed");
            refuse(upgraded, &ctx, CloseReason::AuthenticationFailed).await;
            return;
        }
    };
    if let Err(reason) = check_connect(&ctx, &credentials, &web_socket_id).await {
        refuse(upgraded, &ctx, reason).await;
        return;
    }
    let identity = credentials.identity;
    // The TCP stream itself: its reader and its writer share it without a lock.
    let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => parts,
        Err(_) => {
            tracing::warn!("WebSocket upgraded over an unexpected transport; dropped");
            return;
        }
    };
    let tcp = Arc::new(parts.io.into_inner());
    // Copied out and dropped: the slice would hold hyper's whole read buffer (8 KiB and
    // more) for the socket's life.
    let early = Bytes::copy_from_slice(&parts.read_buf);
    drop(parts.read_buf);
    let hub = ctx.session.hub.clone();
    let conn = hub.connect(web_socket_id.as_str().into(), identity.user_id);
    if let (Some(agreement), Some(settings)) = (upgrade.deflate, ctx.compression) {
        conn.outbox.compress(agreement, settings);
    }
    if identity.user_id != crate::identity::ANONYMOUS_USER_ID
        && hub.connections_of(identity.user_id) > ctx.max_connections_per_user
    {
        // Counted after joining, so two racing connections cannot both slip in.
        conn.outbox.close(CloseReason::TooManyConnections);
    }
    conn.outbox.push(Frame::reply(&server::authenticated(
        &web_socket_id,
        ctx.session.replays.is_some(),
    )));
    let session = Session::new(ctx.session.clone(), conn.clone());
    // Fan-out writes to the socket itself while the writer below is idle.
    conn.outbox.attach(tcp.clone());

    let heard = Heard::new();
    let writer = write_loop(&tcp, &conn.outbox);
    let mut decoder = Decoder::new(ctx.max_message_bytes);
    if upgrade.deflate.is_some() {
        decoder = decoder.inflating();
    }
    let reader = read_loop(&tcp, early, decoder, &conn.outbox, &session, &ctx, &heard);
    let pinger = keep_alive(
        &conn.outbox,
        &heard,
        ctx.ping_grid,
        ctx.ping_interval,
        conn.id,
    );
    tokio::pin!(writer, reader, pinger);
    match race::first(writer.as_mut(), reader.as_mut(), pinger.as_mut()).await {
        First::Writer(_) => {
            // Our close frame is out: give the client a moment to answer it.
            let _ = tokio::time::timeout(CLOSE_LINGER, &mut reader).await;
        }
        First::Reader(reason) => {
            conn.outbox.close(reason);
            let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, &mut writer).await;
        }
        First::Pinger(reason) => {
            // A peer that answers nothing will not read a close frame either: brief.
            conn.outbox.close(reason);
            let _ = tokio::time::timeout(CLOSE_LINGER, &mut writer).await;
        }
    }
    conn.outbox.detach();
    hub.disconnect(&conn);
}

/// The connect check (`--authorize-connect`): the backend confirms a signed-in user's
/// token before the socket is served. Anonymous sockets have no token to check. A denial
/// is an authentication failure (1008); no answer in time is one the client may retry
/// (1011), never a pass.
async fn check_connect(
    ctx: &WsContext,
    credentials: &Credentials,
    web_socket_id: &str,
) -> Result<(), CloseReason> {
    let Some(deadline) = ctx.connect_check else {
        return Ok(());
    };
    if credentials.identity.is_anonymous() {
        return Ok(());
    }
    let question = ConnectRequest {
        user_id: credentials.identity.user_id,
        web_socket_id: web_socket_id.to_string(),
        token_issued_at: credentials.issued_at,
        token_id: credentials.token_id.clone(),
    };
    let answer = ctx.session.authorizer.authorize_connect(question);
    match tokio::time::timeout(deadline, answer).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => {
            tracing::debug!(
                user_id = credentials.identity.user_id,
                "connect check denied"
            );
            Err(CloseReason::AuthenticationFailed)
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "connect check failed; connection refused");
            Err(CloseReason::ConnectUnconfirmed)
        }
        Err(_) => {
            tracing::warn!(
                ?deadline,
                "connect check not answered in time; connection refused"
            );
            Err(CloseReason::ConnectUnconfirmed)
        }
    }
}

/// Tells a client its token was refused (Baserow's `authentication` frame), then closes.
async fn refuse(upgraded: hyper::upgrade::Upgraded, ctx: &WsContext, reason: CloseReason) {
    ctx.session
        .metrics
        .authentication_failures
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut socket = TokioIo::new(upgraded);
    let frames = [
        Frame::text(&server::authentication_failed()),
        Frame::close(reason),
    ];
    let write = async {
        for frame in &frames {
            socket.write_all(frame.wire()).await?;
        }
        socket.flush().await
    };
    if let Ok(Err(error)) = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, write).await {
        tracing::debug!(%error, "authentication failure not written");
    }
    // The client answers the close; a moment for it, so the close is not lost to a reset.
    let mut rest = [0u8; 256];
    let _ = tokio::time::timeout(
        CLOSE_LINGER,
        tokio::io::AsyncReadExt::read(&mut socket, &mut rest),
    )
    .await;
}

/// How long a socket's own deflate stream is kept with nothing to send: then it is
/// dropped (an idle socket holds no compressor) and the next message starts a new one.
const OWN_STREAM_IDLE: Duration = Duration::from_secs(10);

/// Writes queued frames, a batch at a time, until a close is requested; then the close
/// frame. A write stuck on a socket nobody reads is abandoned once the outbox overflows.
async fn write_loop(tcp: &TcpStream, outbox: &Outbox) -> CloseReason {
    let mut batch = Vec::new();
    // The rest of a frame whose beginning is on the wire: it must go out before any other.
    let mut unfinished = None;
    loop {
        let next = if outbox.holds_stream() {
            match tokio::time::timeout(OWN_STREAM_IDLE, outbox.next_batch(&mut batch)).await {
                Ok(next) => next,
                Err(_) => {
                    outbox.idle();
                    continue;
                }
            }
        } else {
            outbox.next_batch(&mut batch).await
        };
        if let Some(reason) = next {
            let last: Vec<Frame> = unfinished
                .take()
                .into_iter()
                .chain([Frame::close(reason)])
                .collect();
            // A slow consumer may never take these; the timeout bounds the wait.
            let mut written = Written::default();
            let close = write_frames(tcp, &last, &mut written);
            let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, close).await;
            return reason;
        }
        let mut written = Written::default();
        // Most batches go out in one write; only a socket that pushes back is waited on,
        // racing the outbox's overflow.
        let result = match write_some(tcp, &batch, &mut written) {
            Ok(()) if written.frames == batch.len() => Ok(()),
            Err(error) if error.kind() != io::ErrorKind::WouldBlock => Err(error),
            _ => tokio::select! {
                result = write_frames(tcp, &batch, &mut written) => result,
                _ = outbox.overflow() => Ok(()),
            },
        };
        if let Err(error) = result {
            tracing::debug!(%error, "socket write failed");
            return CloseReason::Normal;
        }
        // Cut short by an overflow: the frame at the head may have begun on the wire, here
        // or in a fan-out's flush before the batch was taken. It is finished before the
        // close, or the stream would be garbled.
        if let Some(frame) = batch.get(written.frames) {
            unfinished = Some(Frame::framed(frame.wire().slice(written.bytes..)));
        }
        batch.clear();
        if batch.capacity() > 64 {
            // As the outbox does: a burst's capacity is not kept for the socket's life.
            batch = Vec::new();
        }
    }
}

/// Writes `frames` in as few system calls as the socket takes, recording progress.
async fn write_frames(tcp: &TcpStream, frames: &[Frame], written: &mut Written) -> io::Result<()> {
    while written.frames < frames.len() {
        tcp.writable().await?;
        match write_some(tcp, frames, written) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

impl Sink for TcpStream {
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, bytes)
    }

    fn try_write_vectored(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, slices)
    }
}

/// Bytes read from a socket per system call, on the stack of a synchronous function:
/// an idle socket keeps no read buffer.
const READ_CHUNK: usize = 4096;

/// Reads and handles client frames until the client leaves or must be closed. `early`
/// is what the client sent right behind its handshake.
async fn read_loop(
    tcp: &TcpStream,
    early: Bytes,
    mut decoder: Decoder,
    outbox: &Outbox,
    session: &Session,
    ctx: &WsContext,
    heard: &Heard,
) -> CloseReason {
    let mut bucket = TokenBucket::new(ctx.inbound_burst, ctx.inbound_rate, Instant::now());
    let mut garbage_in_a_row = 0;
    let mut incoming = Vec::new();
    let mut decoded = decoder.feed(&early, &mut incoming);
    drop(early);
    loop {
        for message in std::mem::take(&mut incoming) {
            heard.now();
            // Every frame but a close counts, pings too: each costs a pong.
            if message != Message::Close && !bucket.take(Instant::now()) {
                return CloseReason::RateLimited;
            }
            let handled = match message {
                Message::Text(text) => session.handle_text(&text).await,
                Message::Binary => {
                    session.reject_frame(&FrameError::Binary);
                    Err(FrameError::Binary)
                }
                Message::Ping(payload) => {
                    outbox.push(Frame::pong(&payload));
                    Ok(())
                }
                Message::Pong => Ok(()),
                Message::Close => return CloseReason::Normal,
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
        // The messages before a broken rule were handled; then the connection ends.
        if let Err(reason) = decoded {
            return reason;
        }
        decoded = loop {
            match read_some(tcp, &mut decoder, &mut incoming) {
                Ok(Some(decoded)) => break decoded,
                Ok(None) => return CloseReason::Normal,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(error) = std::future::poll_fn(|cx| tcp.poll_read_ready(cx)).await {
                        tracing::debug!(%error, "socket read failed");
                        return CloseReason::Normal;
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "socket read failed");
                    return CloseReason::Normal;
                }
            }
        };
    }
}

/// One read, decoded; `None` at the end of the stream.
///
/// A read that fills less than the buffer has drained the socket, so tokio is told the
/// socket would block, as its own `poll_read` does: the reader then waits for the next
/// edge from epoll rather than making a second read only to learn it would block (a pong,
/// or any client frame, costs one system call, not two).
fn read_some(
    tcp: &TcpStream,
    decoder: &mut Decoder,
    incoming: &mut Vec<Message>,
) -> io::Result<Option<Result<(), CloseReason>>> {
    let mut buf = [0u8; READ_CHUNK];
    let mut drained = 0;
    let read = tcp.try_io(Interest::READABLE, || match tcp.try_read(&mut buf)? {
        n if n > 0 && n < READ_CHUNK => {
            drained = n;
            Err(io::ErrorKind::WouldBlock.into())
        }
        n => Ok(n),
    });
    let n = match read {
        Err(error) if error.kind() == io::ErrorKind::WouldBlock && drained > 0 => drained,
        read => read?,
    };
    match n {
        0 => Ok(None),
        n => Ok(Some(decoder.feed(&buf[..n], incoming))),
    }
}
