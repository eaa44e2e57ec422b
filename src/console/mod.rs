//! The web console (DESIGN §13): `/console/` on the WebSocket port, for the people who run
//! the gateway.
//!
//! The page is plain HTML, CSS and JavaScript embedded in the binary ([`assets`]); it asks
//! this module's small JSON API for what to show and draws it itself:
//! - `GET api/setup`: what does not change (this node, its settings' shape, the page table);
//! - `GET api/state`: every node (`Info` through the bus), this node's rates over the last
//!   minutes ([`rates`]), its busiest groups, presence spaces, recent publishes ([`recent`]);
//! - `POST api/publish`: a publish, through the gRPC API's own `Publish`, so the same checks
//!   apply and the event is counted as any other;
//! - `POST api/token`: under `--dev` only, a short-lived token for the test socket (the dev
//!   banner prints the JWT secret anyway); otherwise the person pastes a token.
//!
//! The test socket is the browser's own WebSocket to `/ws/core/`, an ordinary client. So the
//! console can do nothing the gRPC API with the API key could not, and shows no secret:
//! not the API key, the JWT secret or the console token, and tokens only cut short.
//! [`access`] decides who may use it.

pub mod access;
mod api;
mod assets;
pub mod rates;
pub mod recent;

pub use access::ConsoleAccess;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::bus::Bus;
use crate::config::Settings;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::transport::grpc::GatewayApi;
use access::Gate;
use rates::{Rates, Reading};
use recent::Recent;

/// What the console reads and calls.
pub struct Console {
    gate: Gate,
    api: Arc<GatewayApi>,
    bus: Arc<dyn Bus>,
    hub: Arc<Hub>,
    presence: Option<Arc<Presence>>,
    metrics: Arc<Metrics>,
    rates: Arc<Rates>,
    recent: Arc<Recent>,
    /// `api/setup`'s answer, made once.
    setup: Bytes,
    /// Signs test-socket tokens under `--dev`; `None` otherwise.
    minter: Option<api::Minter>,
    /// Largest request body: a payload of `--max-payload-bytes`, escaped in JSON.
    max_body_bytes: usize,
    /// Whether `/` redirects here (`--dev`).
    redirect_root: bool,
}

/// The node's parts the console uses.
pub struct Parts {
    pub api: Arc<GatewayApi>,
    pub bus: Arc<dyn Bus>,
    pub hub: Arc<Hub>,
    pub presence: Option<Arc<Presence>>,
    pub metrics: Arc<Metrics>,
    pub recent: Arc<Recent>,
}

impl Console {
    /// The console of a node; `None` when the settings turn it off.
    pub fn new(settings: &Settings, parts: Parts) -> Result<Option<Arc<Console>>, String> {
        if !settings.console.is_on() {
            return Ok(None);
        }
        let gate = Gate::new(settings.console.clone())?;
        let setup = api::setup(settings, gate.needs_token());
        Ok(Some(Arc::new(Console {
            gate,
            api: parts.api,
            bus: parts.bus,
            hub: parts.hub,
            presence: parts.presence,
            metrics: parts.metrics,
            rates: Arc::default(),
            recent: parts.recent,
            setup,
            minter: settings.dev.then(|| api::Minter::new(settings)),
            max_body_bytes: settings.max_payload_bytes.saturating_mul(2) + 4096,
            redirect_root: settings.dev,
        })))
    }

    /// The counters the charts show, in [`rates::SERIES`] order.
    fn reading(&self) -> Reading {
        let hub = self.hub.counters();
        let m = &self.metrics;
        let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let replays = count(&m.replays_served)
            + count(&m.replay_retries)
            + m.replay_refreshes.iter().map(count).sum::<u64>();
        [
            hub.frames_queued(),
            count(&m.events_published),
            hub.connections_opened(),
            hub.slow_consumers(),
            replays,
            count(&m.authorizer_calls),
            count(&m.authorizer_failures),
        ]
    }

    /// Samples the charts' counters until `shutdown` turns true.
    pub fn sample(
        self: &Arc<Self>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + use<> {
        let console = self.clone();
        rates::sample(self.rates.clone(), move || console.reading(), shutdown)
    }

    /// Answers one console request; `tail` is the path after `/console`.
    async fn handle(
        &self,
        method: Method,
        tail: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        if tail.is_empty() {
            return redirect("/console/");
        }
        if method == Method::POST && !same_origin(&headers) {
            self.count(false);
            return text(
                StatusCode::FORBIDDEN,
                "cross-origin console request refused\n",
            );
        }
        if method == Method::POST && tail == "/login" {
            self.count(true);
            return self.login(&body);
        }
        if !self.gate.allows(&headers) {
            self.count(false);
            return match tail.starts_with("/api/") {
                true => api::error(StatusCode::UNAUTHORIZED, "the console token is required"),
                false => assets::login_page(StatusCode::UNAUTHORIZED, false),
            };
        }
        self.count(true);
        match (method, tail) {
            (Method::GET, "/") => assets::index(),
            (Method::GET, path) if assets::is_asset(path) => assets::asset(path),
            (Method::POST, "/logout") => {
                let mut response = redirect("/console/");
                set_cookie(&mut response, &Gate::logout());
                response
            }
            (Method::GET, "/api/setup") => api::json_bytes(StatusCode::OK, self.setup.clone()),
            (Method::GET, "/api/state") => api::state(self).await,
            (Method::POST, "/api/publish") if is_json(&headers) => {
                api::publish(&self.api, &body).await
            }
            (Method::POST, "/api/token") if is_json(&headers) => api::mint(&self.minter, &body),
            (Method::POST, path) if path.starts_with("/api/") => api::error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the request as application/json",
            ),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    fn count(&self, served: bool) {
        let counter = match served {
            true => &self.metrics.console_requests,
            false => &self.metrics.console_refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The login form's answer: a session cookie and the console, or the form again.
    fn login(&self, body: &[u8]) -> Response {
        let given = form_urlencoded::parse(body)
            .find(|(name, _)| name == "token")
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default();
        match self.gate.login(&given) {
            Some(cookie) => {
                tracing::info!("console login");
                let mut response = redirect("/console/");
                set_cookie(&mut response, &cookie);
                response
            }
            None => {
                self.metrics.console_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("console login refused: wrong token");
                assets::login_page(StatusCode::UNAUTHORIZED, true)
            }
        }
    }
}

/// The console's routes: `/console` and below, and `/` under `--dev`. With the console
/// off, every request is passed on (and ends as 404).
pub fn routes(console: Option<Arc<Console>>) -> BoxedFilter<(Response,)> {
    let Some(console) = console else {
        return warp::any()
            .and_then(|| async { Err::<Response, _>(warp::reject::not_found()) })
            .boxed();
    };
    let redirect_root = console.redirect_root;
    let root = warp::path::end()
        .and(warp::get())
        .and_then(move || async move {
            match redirect_root {
                true => Ok(redirect("/console/")),
                false => Err(warp::reject::not_found()),
            }
        });
    let pages = warp::path("console")
        .and(warp::method())
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method: Method, path: warp::path::FullPath, headers, body| {
                let console = console.clone();
                async move {
                    let Some(tail) = path.as_str().strip_prefix("/console") else {
                        return text(StatusCode::NOT_FOUND, "not found\n");
                    };
                    let body = match method == Method::POST {
                        true => match read_body(body, console.max_body_bytes).await {
                            Ok(body) => body,
                            Err(response) => return response,
                        },
                        false => Bytes::new(),
                    };
                    let mut response = console.handle(method, tail, headers, body).await;
                    secure(response.headers_mut());
                    response
                }
            },
        );
    root.or(pages).unify().boxed()
}

/// A request body, up to `limit` bytes.
async fn read_body<B: bytes::Buf>(
    body: impl Stream<Item = Result<B, warp::Error>>,
    limit: usize,
) -> Result<Bytes, Response> {
    let mut body = std::pin::pin!(body);
    let mut read = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            text(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request body: {e}\n"),
            )
        })?;
        if read.len() + chunk.remaining() > limit {
            return Err(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the request body is over {limit} bytes\n"),
            ));
        }
        read.extend_from_slice(chunk.chunk());
    }
    Ok(read.into())
}

/// Whether a POST comes from a page of this node: its `Origin`, if any, names the host
/// it was sent to. Browsers send `Origin` on every POST, so a page elsewhere cannot act
/// with a console session (the cookie's `SameSite=Strict` says the same).
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, host)| host);
    host.is_some() && origin_host == host
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"))
}

fn text(status: StatusCode, body: &str) -> Response {
    respond(
        status,
        "text/plain; charset=utf-8",
        Bytes::from(body.to_string()),
    )
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn redirect(to: &'static str) -> Response {
    let mut response = respond(StatusCode::SEE_OTHER, "text/plain", Bytes::new());
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    response
}

fn set_cookie(response: &mut Response, cookie: &str) {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
}

/// Headers on every console answer: nothing cached, nothing framed, nothing loaded from
/// elsewhere (the page needs only itself, and WebSockets to this node for the test
/// socket), no referrer. No CORS header: other origins cannot read any of it.
fn secure(headers: &mut HeaderMap) {
    // A page that set its own (the login form) keeps it.
    let set = |headers: &mut HeaderMap, name: header::HeaderName, value: &'static str| {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    };
    set(headers, header::CACHE_CONTROL, "no-store");
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    set(headers, header::REFERRER_POLICY, "no-referrer");
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self' ws: wss:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), HeaderValue::from_str(v).unwrap()))
            .collect()
    }

    #[test]
    fn posts_from_another_origin_are_refused() {
        assert!(same_origin(&headers(&[(header::HOST, "127.0.0.1:8080")])));
        assert!(same_origin(&headers(&[
            (header::HOST, "127.0.0.1:8080"),
            (header::ORIGIN, "http://127.0.0.1:8080"),
        ])));
        assert!(!same_origin(&headers(&[
            (header::HOST, "127.0.0.1:8080"),
            (header::ORIGIN, "http://evil.example"),
        ])));
        assert!(!same_origin(&headers(&[(header::ORIGIN, "http://x")])));
    }
}
