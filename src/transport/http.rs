//! The HTTP listener: `/ws/core/` upgrades are taken here, everything else is routed by warp
//! (`/healthz`, `/readyz`, `/metrics`, and the console's `/console/` when it is on).
//!
//! warp's own `ws()` filter keeps tungstenite's 128 KiB read buffer, about 137 KiB per idle
//! socket. So upgrades of `/ws/core/` are answered by [`super::ws`], which decodes client
//! frames itself, and the socket session then runs in a task of its own, holding the
//! connection's permit: a task's memory is the size of its largest state for as long as it
//! lives, and the HTTP connection's state is twice a session's.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::AsyncWriteExt;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use warp::Filter;

use super::ws::{self, Upgrade, WsContext};
use crate::console::{self, Console};
use crate::session::SessionContext;

/// Serves HTTP and WebSocket connections until `shutdown` turns true.
///
/// Connections are bounded by `permits`: one is taken before each `accept` and held until
/// the connection ends, so acquiring all of them again means every connection is gone.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<WsContext>,
    console: Option<Arc<Console>>,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let routes = warp::service(routes(ctx.clone(), console));
    let per_ip = Arc::new(PerIp {
        open: Mutex::default(),
        limit: ctx.max_connections_per_ip,
    });
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: log, breathe, keep serving.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = crate::stopped(&mut shutdown) => return,
        };
        // Full, for the node or for this address: say so at once rather than leave the
        // client hanging in the backlog.
        let admitted = permits
            .clone()
            .try_acquire_owned()
            .ok()
            .zip(per_ip.admit(peer.ip()));
        let Some((permit, ip_slot)) = admitted else {
            ctx.session
                .metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let routes = routes.clone();
        tokio::spawn(async move {
            match serve_connection(stream, &ctx, routes).await {
                Ok(Some(upgrade)) => {
                    tokio::spawn(async move {
                        ws::run(ctx, upgrade).await;
                        drop((permit, ip_slot));
                    });
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::debug!(%peer, %error, "HTTP connection ended with an error");
                }
            }
        });
    }
}

/// Open connections per client address, bounded by `--max-connections-per-ip`.
struct PerIp {
    open: Mutex<HashMap<IpAddr, usize>>,
    limit: usize,
}

/// One connection of an address; counted until dropped.
struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_default();
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            per_ip: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.per_ip.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// How long an accept loop waits after a failed accept (out of file descriptors, say), so
/// that it never spins.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Answers a connection over `--max-connections` with 503 and closes it.
async fn refuse(mut stream: TcpStream) {
    const FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 20\r\nconnection: close\r\nretry-after: 1\r\n\r\nconnections at limit";
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(FULL)).await;
}

/// Accepted TCP connections for the gRPC server; a failed accept is logged and retried
/// after a pause (tonic's own listener retries at once, which spins on EMFILE).
pub fn incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((Ok(stream), listener));
                }
                Err(error) => {
                    tracing::warn!(%error, "gRPC accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    })
}

/// Serves one HTTP connection; returns the WebSocket handshake it accepted, if it did.
async fn serve_connection<R>(
    stream: TcpStream,
    ctx: &Arc<WsContext>,
    routes: R,
) -> Result<Option<Upgrade>, hyper::Error>
where
    R: tower::Service<
            http::Request<Incoming>,
            Response = warp::reply::Response,
            Error = Infallible,
            Future: Send,
        > + Clone
        + Send
        + 'static,
{
    // The upgrade handler leaves the accepted handshake here for this task to run.
    let accepted: Arc<Mutex<Option<Upgrade>>> = Arc::default();
    let service = {
        let ctx = ctx.clone();
        let accepted = accepted.clone();
        hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let mut routes = routes.clone();
            let ctx = ctx.clone();
            let accepted = accepted.clone();
            async move {
                if ws::is_ws_path(request.uri().path()) {
                    let (response, upgrade) = ws::handshake(&ctx, request);
                    if let Some(upgrade) = upgrade {
                        *accepted.lock().unwrap_or_else(|e| e.into_inner()) = Some(upgrade);
                    }
                    Ok::<_, Infallible>(response)
                } else {
                    routes.call(request).await
                }
            }
        })
    };
    http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.handshake_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await?;
    let upgrade = accepted.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok(upgrade)
}

/// The `/metrics` text: the node's counters, the hub's, presence's and the history's.
pub fn metrics_text(session: &SessionContext) -> String {
    let history_bytes = session
        .replays
        .as_ref()
        .map_or(0, |replays| replays.store.local_bytes());
    session
        .metrics
        .render(&session.hub, session.presence.as_deref(), history_bytes)
}

/// The plain HTTP endpoints, and the console's.
fn routes(
    ctx: Arc<WsContext>,
    console: Option<Arc<Console>>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone + Send + Sync + 'static
{
    use warp::Reply;
    let healthz = warp::path!("healthz").map(|| "ok\n".into_response());
    let ready_ctx = ctx.clone();
    let readyz = warp::path!("readyz").map(move || {
        if ready_ctx.draining.load(Ordering::Relaxed) {
            warp::reply::with_status("draining\n", http::StatusCode::SERVICE_UNAVAILABLE)
                .into_response()
        } else if *ready_ctx.bus.readiness().borrow() {
            "ready\n".into_response()
        } else {
            warp::reply::with_status("bus unavailable\n", http::StatusCode::SERVICE_UNAVAILABLE)
                .into_response()
        }
    });
    let metrics = warp::path!("metrics").map(move || {
        warp::reply::with_header(
            metrics_text(&ctx.session),
            "content-type",
            "text/plain; version=0.0.4",
        )
        .into_response()
    });
    warp::get()
        .and(healthz.or(readyz).unify().or(metrics).unify())
        .or(console::routes(console))
        .unify()
        .recover(|_rejection: warp::Rejection| async {
            Ok::<_, Infallible>(
                warp::reply::with_status("not found\n", http::StatusCode::NOT_FOUND)
                    .into_response(),
            )
        })
        .unify()
}
