//! channelgate: a real-time gateway that holds browsers' WebSockets for a backend.
//!
//! The pure middle ([`protocol`], [`pages`], [`event`], [`hub`], [`session`]) knows nothing
//! of sockets; the edges ([`transport`], [`bus`], [`authorizer`]) do the I/O. [`Node`]
//! assembles one gateway node from [`config::Settings`].

#![forbid(unsafe_code)]

pub mod authorizer;
pub mod bus;
pub mod config;
pub mod console;
pub mod control;
pub mod deflate;
pub mod event;
pub mod history;
pub mod hub;
pub mod idempotency;
pub mod identity;
pub mod metrics;
pub mod outbox;
pub mod pages;
pub mod permissions;
pub mod presence;
pub mod proto;
pub mod protocol;
pub mod rate_limit;
pub mod session;
pub mod sink;
pub mod transport;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::authorizer::{
    Authorizer, CachedAuthorizer, CountedAuthorizer, GrpcAuthorizer, HttpAuthorizer,
    StaticAuthorizer,
};
use crate::bus::{Bus, MemoryBus, Receivers, RedisBus};
use crate::config::{AuthorizerKind, Settings};
use crate::console::Console;
use crate::console::recent::Recent;
use crate::control::ControlHandler;
use crate::history::memory::MemoryHistory;
use crate::hub::{GroupInterest, Hub, NoInterest};
use crate::identity::TokenVerifier;
use crate::metrics::Metrics;
use crate::pages::PageRegistry;
use crate::presence::{FocusTypes, Presence};
use crate::session::{Replays, SessionContext};
use crate::transport::grpc::{GatewayApi, gateway_service};
use crate::transport::ws::WsContext;

/// Connections the kernel may hold for `accept` (capped by `net.core.somaxconn`). The usual
/// 128 overflows in a reconnect storm, and each dropped handshake costs its client a
/// one-second SYN retransmit.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// File descriptors kept for what is not a WebSocket: listeners, gRPC calls, Redis, the
/// authorizer (64 calls at most by default), and the sockets being refused with 503.
fn reserved_fds(limit: u64) -> u64 {
    (limit / 4).min(256)
}

/// Raises the open-file soft limit to the hard one, and caps `wanted` connections below
/// it, so that the node refuses the excess with 503 instead of running out of descriptors.
fn connection_limit(wanted: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!(%error, "cannot read the open-file limit; --max-connections is not capped");
            return wanted;
        }
    };
    let room = usize::try_from(limit - reserved_fds(limit))
        .unwrap_or(usize::MAX)
        .max(1);
    if wanted > room {
        tracing::info!(
            max_connections = wanted,
            open_file_limit = limit,
            capped_at = room,
            "connections capped below the open-file limit; more get 503"
        );
    }
    wanted.min(room)
}

/// How long before the shutdown deadline publishes still waiting are answered, so that
/// their answers reach the callers before the connections go.
const CUT_CALLS_BEFORE: Duration = Duration::from_millis(250);

/// Completes once the node's shutdown signal turns true (at once if it already has).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // An error means the node is gone, which is a stop too.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Keeps the health service in step with the bus: not serving while it is down.
async fn report_health(
    health: tonic_health::server::HealthReporter,
    mut ready: watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    type Gateway = proto::gateway_server::GatewayServer<GatewayApi>;
    loop {
        let status = if *ready.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        match status {
            ServingStatus::Serving => health.set_serving::<Gateway>().await,
            _ => health.set_not_serving::<Gateway>().await,
        }
        if ready.changed().await.is_err() {
            return;
        }
    }
}

/// Answers cached at most, whatever the TTL: bounds memory under many users and groups.
const AUTHORIZER_CACHE_ENTRIES: usize = 100_000;

/// The authorizer `--authorizer` names; the backend kinds behind the cache, their calls
/// counted.
fn build_authorizer(
    settings: &Settings,
    metrics: &Arc<Metrics>,
) -> Result<Arc<dyn Authorizer>, String> {
    let secret = settings.authorizer_secret.as_deref();
    let (timeout, concurrency) = (settings.authorizer_timeout, settings.authorizer_concurrency);
    let backend: Arc<dyn Authorizer> = match &settings.authorizer {
        AuthorizerKind::Static => return Ok(Arc::new(StaticAuthorizer)),
        AuthorizerKind::Http(url) => {
            Arc::new(HttpAuthorizer::new(url, secret, timeout, concurrency)?)
        }
        AuthorizerKind::Grpc(url) => {
            Arc::new(GrpcAuthorizer::new(url, secret, timeout, concurrency)?)
        }
    };
    let backend = Arc::new(CountedAuthorizer::new(backend, metrics.clone()));
    Ok(Arc::new(CachedAuthorizer::new(
        backend,
        settings.authorizer_cache,
        AUTHORIZER_CACHE_ENTRIES,
    )))
}

/// Reflection over the Gateway and Health services; grpcurl 1.8 speaks v1alpha, newer
/// clients v1, so both are served.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// A node that failed to start, with what it was doing.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// A running gateway node.
pub struct Node {
    /// Where `/ws/core/` and the HTTP endpoints listen.
    pub ws_addr: SocketAddr,
    /// Where the gRPC API listens.
    pub grpc_addr: SocketAddr,
    pub hub: Arc<Hub>,
    /// Who else is in a space; `None` when presence is off.
    pub presence: Option<Arc<Presence>>,
    /// The node's own counters (the hub and presence keep theirs).
    pub metrics: Arc<Metrics>,
    bus: Arc<dyn Bus>,
    settings: Settings,
    shutdown: watch::Sender<bool>,
    /// Ends the publishes still waiting when the shutdown is about to drop them, so they
    /// answer DEADLINE_EXCEEDED (they may have been published) instead of a broken call.
    cut_calls: watch::Sender<bool>,
    permits: Arc<Semaphore>,
    /// `--max-connections`, capped below the open-file limit.
    max_connections: usize,
    ws_ctx: Arc<WsContext>,
    ws_task: JoinHandle<()>,
    grpc_task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Node {
    /// Binds both listeners and starts serving.
    pub async fn start(settings: Settings) -> Result<Node, StartError> {
        let ws_listener = listen(settings.ws_addr).map_err(|e| {
            StartError(format!(
                "cannot listen on --ws-addr {}: {e}",
                settings.ws_addr
            ))
        })?;
        let grpc_listener = listen(settings.grpc_addr).map_err(|e| {
            StartError(format!(
                "cannot listen on --grpc-addr {}: {e}",
                settings.grpc_addr
            ))
        })?;
        let local = |l: &TcpListener| {
            l.local_addr()
                .map_err(|e| StartError(format!("listener address: {e}")))
        };
        let ws_addr = local(&ws_listener)?;
        let grpc_addr = local(&grpc_listener)?;

        let pages = PageRegistry::new(&settings.pages)
            .map_err(|e| StartError(format!("page table: {e}")))?;
        let metrics = Arc::new(Metrics::default());
        let authorizer = build_authorizer(&settings, &metrics).map_err(StartError)?;
        let redis = settings
            .redis
            .as_ref()
            .map(|redis| (redis, bus::subscriptions(redis.unsubscribe_delay)));
        let interest: Arc<dyn GroupInterest> = match &redis {
            Some((_, (subscriptions, _))) => subscriptions.clone(),
            None => Arc::new(NoInterest),
        };
        let hub = Hub::new(settings.max_queue_bytes, settings.max_pages, interest)
            .with_deflate(settings.deflate);
        let hub = match settings.history {
            Some(_) => hub.with_history(),
            None => hub,
        };
        let presence = match &settings.presence {
            Some(presence) => Some(Arc::new(Presence::new(
                &settings.node_id,
                presence.limits,
                FocusTypes::new(&presence.focus_types)
                    .map_err(|e| StartError(format!("focus types: {e}")))?,
            ))),
            None => None,
        };
        let hub = Arc::new(match &presence {
            Some(presence) => hub.with_presence(presence.clone()),
            None => hub,
        });
        let control = Arc::new(ControlHandler {
            hub: hub.clone(),
            authorizer: authorizer.clone(),
            node_id: settings.node_id.clone(),
            started: Instant::now(),
            presence: presence.clone(),
        });
        let bus: Arc<dyn Bus> = match redis {
            Some((redis, (subscriptions, commands))) => Arc::new(
                RedisBus::start(
                    redis,
                    settings.history.as_ref(),
                    &settings.node_id,
                    Receivers {
                        hub: hub.clone(),
                        control,
                        presence: presence.clone(),
                    },
                    subscriptions,
                    commands,
                )
                .map_err(StartError)?,
            ),
            None => Arc::new(MemoryBus::new(
                hub.clone(),
                control,
                settings
                    .history
                    .map(|history| Arc::new(MemoryHistory::new(history.retention))),
                settings.idempotency,
            )),
        };
        let (shutdown, shutdown_rx) = watch::channel(false);

        let ws_ctx = Arc::new(WsContext {
            session: Arc::new(SessionContext {
                hub: hub.clone(),
                metrics: metrics.clone(),
                pages,
                authorizer: authorizer.clone(),
                replays: bus
                    .history()
                    .zip(settings.history)
                    .map(|(store, history)| Replays {
                        store,
                        limit: history.replay_limit,
                        timeout: history.timeout,
                        permits: Semaphore::new(history.replay_concurrency),
                    }),
                presence: presence.clone(),
            }),
            verifier: TokenVerifier::new(
                settings.jwt_secret.as_bytes(),
                &settings.jwt_user_id_claim,
            )
            .map_err(StartError)?,
            bus: bus.clone(),
            allowed_origins: settings.allowed_origins.clone(),
            compression: settings.deflate,
            max_message_bytes: settings.max_message_bytes,
            connect_check: settings.connect_check,
            handshake_timeout: settings.handshake_timeout,
            ping_interval: settings.ping_interval,
            ping_grid: tokio::time::Instant::now(),
            inbound_burst: settings.inbound_burst,
            inbound_rate: settings.inbound_rate,
            draining: std::sync::atomic::AtomicBool::new(false),
            max_connections_per_user: settings.max_connections_per_user,
            max_connections_per_ip: settings.max_connections_per_ip,
        });
        let (cut_calls, calls_cut) = watch::channel(false);
        // What was published lately, for the console; not kept when it is off.
        let recent = settings
            .console
            .is_on()
            .then(|| Arc::new(Recent::default()));
        let api = Arc::new(GatewayApi {
            bus: bus.clone(),
            calls_cut,
            metrics: metrics.clone(),
            max_payload_bytes: settings.max_payload_bytes,
            max_batch_events: settings.max_batch_events,
            max_batch_bytes: settings.max_batch_bytes,
            recent: recent.clone(),
        });
        let console = match recent {
            Some(recent) => Console::new(
                &settings,
                console::Parts {
                    api: api.clone(),
                    bus: bus.clone(),
                    hub: hub.clone(),
                    presence: presence.clone(),
                    metrics: metrics.clone(),
                    recent,
                },
            )
            .map_err(|e| StartError(format!("console: {e}")))?,
            None => None,
        };
        if let Some(console) = &console {
            tokio::spawn(console.sample(shutdown_rx.clone()));
        }
        let max_connections = connection_limit(settings.max_connections);
        let permits = Arc::new(Semaphore::new(max_connections));
        let ws_task = tokio::spawn(transport::http::serve(
            ws_listener,
            ws_ctx.clone(),
            console,
            permits.clone(),
            shutdown_rx.clone(),
        ));

        let reflection_error =
            |e: tonic_reflection::server::Error| StartError(format!("gRPC reflection: {e}"));
        let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
        let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;
        let (health, health_service) = tonic_health::server::health_reporter();
        tokio::spawn(report_health(health, bus.readiness()));
        let mut grpc_shutdown = shutdown_rx;
        let mut grpc_server = tonic::transport::Server::builder();
        if let Some((cert, key)) = &settings.grpc_tls {
            let read = |path: &std::path::PathBuf, what: &str| {
                std::fs::read(path).map_err(|e| {
                    StartError(format!("cannot read the gRPC TLS {what} {path:?}: {e}"))
                })
            };
            let identity =
                tonic::transport::Identity::from_pem(read(cert, "certificate")?, read(key, "key")?);
            grpc_server = grpc_server
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .map_err(|e| StartError(format!("gRPC TLS: {e}")))?;
        }
        let grpc_task = tokio::spawn(
            grpc_server
                .layer(tower::util::MapResponseLayer::new(
                    transport::grpc::oversize_is_resource_exhausted,
                ))
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(gateway_service(
                    api,
                    settings.api_key.as_deref(),
                    settings.max_grpc_message_bytes,
                ))
                .serve_with_incoming_shutdown(
                    transport::http::incoming(grpc_listener),
                    async move { stopped(&mut grpc_shutdown).await },
                ),
        );
        tracing::info!(node_id = %settings.node_id, %ws_addr, %grpc_addr, authorizer = %authorizer.describe(), "channelgate node started");
        Ok(Node {
            ws_addr,
            grpc_addr,
            hub,
            presence,
            metrics,
            bus,
            settings,
            shutdown,
            cut_calls,
            permits,
            max_connections,
            ws_ctx,
            ws_task,
            grpc_task,
        })
    }

    /// Completes once the bus works (at once on the in-memory bus; on Redis, once
    /// connected). `false` if `timeout` passed first.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let mut ready = self.bus.readiness();
        tokio::time::timeout(timeout, ready.wait_for(|ready| *ready))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// What `/metrics` serves.
    pub fn metrics_text(&self) -> String {
        transport::http::metrics_text(&self.ws_ctx.session)
    }

    /// `--drain-seconds`: `/readyz` turns 503 so that load balancers stop sending, then the
    /// sockets are closed with 1012 (restart: reconnect) a few at a time over `period`, so
    /// that their clients do not all reconnect at once.
    async fn drain(&self, period: std::time::Duration) {
        self.ws_ctx
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let connections = self.hub.connections();
        tracing::info!(connections = connections.len(), ?period, "draining");
        const TICK: std::time::Duration = std::time::Duration::from_millis(50);
        let ticks = (period.as_millis() / TICK.as_millis()).max(1) as usize;
        let per_tick = connections.len().div_ceil(ticks).max(1);
        let mut interval = tokio::time::interval(TICK);
        // A late tick must not bring a burst of closes: the point is to spread them.
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for batch in connections.chunks(per_tick) {
            interval.tick().await;
            for conn in batch {
                conn.outbox.close(protocol::CloseReason::Restart);
            }
        }
    }

    /// Stops accepting, closes every socket with 1001 and lets in-flight gRPC calls finish,
    /// all within `--shutdown-timeout`.
    pub async fn shutdown(self) {
        if !self.settings.drain.is_zero() {
            self.drain(self.settings.drain).await;
        }
        let _ = self.shutdown.send(true);
        self.hub.close_all(protocol::CloseReason::GoingAway);
        let deadline = self.settings.shutdown_timeout;
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        // Calls still waiting just before the deadline are answered, not dropped.
        let cut_calls = self.cut_calls.clone();
        tokio::spawn(async move {
            tokio::time::sleep(deadline.saturating_sub(CUT_CALLS_BEFORE)).await;
            let _ = cut_calls.send(true);
        });
        let drained = tokio::time::timeout(deadline, async {
            let _ = self.ws_task.await;
            // Every connection holds a permit until it ends.
            let _ = self.permits.acquire_many(all).await;
            let _ = self.grpc_task.await;
        })
        .await;
        self.bus.leave().await;
        match drained {
            Ok(()) => tracing::info!("channelgate node stopped"),
            Err(_) => tracing::warn!(
                connections = self.hub.stats().connections,
                "shutdown timeout reached; dropping what is left"
            ),
        }
    }
}
