//! The HTTP listener: `/ws/core/` upgrades are taken here, everything else is routed by warp
//! (`/healthz`, `/readyz`, `/metrics`).
//!
//! warp's own `ws()` filter cannot set tungstenite's read buffer, and its 128 KiB default
//! costs about 137 KiB per idle socket. So upgrades of `/ws/core/` are answered by
//! [`super::ws`] with the gateway's own `WebSocketConfig`, and the socket session then runs
//! in the same task that accepted the TCP connection, holding its connection permit.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use warp::Filter;

use super::ws::{self, Upgrade, WsContext};

/// Serves HTTP and WebSocket connections until `shutdown` turns true.
///
/// Connections are bounded by `permits`: one is taken before each `accept` and held until
/// the connection ends, so acquiring all of them again means every connection is gone.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<WsContext>,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let routes = warp::service(routes(ctx.clone()));
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = crate::stopped(&mut shutdown) => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: log, breathe, keep serving.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::stopped(&mut shutdown) => return,
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let routes = routes.clone();
        tokio::spawn(async move {
            if let Err(error) = serve_connection(stream, ctx, routes, permit).await {
                tracing::debug!(%peer, %error, "HTTP connection ended with an error");
            }
        });
    }
}

async fn serve_connection<R>(
    stream: TcpStream,
    ctx: Arc<WsContext>,
    routes: R,
    permit: OwnedSemaphorePermit,
) -> Result<(), hyper::Error>
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
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await?;
    let upgrade = accepted.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(upgrade) = upgrade {
        ws::run(ctx, upgrade).await;
    }
    drop(permit);
    Ok(())
}

/// The plain HTTP endpoints.
fn routes(
    ctx: Arc<WsContext>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone + Send + Sync + 'static
{
    use warp::Reply;
    let healthz = warp::path!("healthz").map(|| "ok\n".into_response());
    let ready_ctx = ctx.clone();
    let readyz = warp::path!("readyz").map(move || {
        if *ready_ctx.bus.readiness().borrow() {
            "ready\n".into_response()
        } else {
            warp::reply::with_status("bus unavailable\n", http::StatusCode::SERVICE_UNAVAILABLE)
                .into_response()
        }
    });
    let metrics = warp::path!("metrics").map(move || {
        let hub = &ctx.session.hub;
        warp::reply::with_header(
            hub.metrics().render(hub.stats()),
            "content-type",
            "text/plain; version=0.0.4",
        )
        .into_response()
    });
    warp::get()
        .and(healthz.or(readyz).unify().or(metrics).unify())
        .recover(|_rejection: warp::Rejection| async {
            Ok::<_, Infallible>(
                warp::reply::with_status("not found\n", http::StatusCode::NOT_FOUND)
                    .into_response(),
            )
        })
        .unify()
}
