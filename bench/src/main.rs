//! loadgen: drives a running channelgate node with real WebSocket clients and a real
//! gRPC publisher, and reports what the clients saw.
//!
//! Every payload carries its send time (`ts`, microseconds since the Unix epoch); each
//! client computes publish-to-receive latency when the frame arrives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use channelgate::identity::sign_access_token;
use channelgate::proto::gateway_client::GatewayClient;
use channelgate::proto::{PublishRequest, publish_request::Target};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

mod client;
mod history;
mod ingest;
mod load;
mod presence;
mod pusher;

use client::{Client, Frame};
use load::now_micros;

#[derive(Parser)]
#[command(about = "Load generator for channelgate")]
struct Args {
    #[command(flatten)]
    target: load::Target,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// One subscriber; events published one after another, each awaited.
    Latency {
        #[arg(long, default_value_t = 2000)]
        events: u64,
    },
    /// One socket subscribes to `count` different tables, one after another: the cost of a
    /// subscribe, authorizer included.
    Subscribe {
        #[arg(long, default_value_t = 2000)]
        count: u64,
    },
    /// Fan-out (S1, S3, S5): each of `--rates` for `--rate-secs` (delivered, latency, server
    /// CPU, deliveries per server CPU-second), then the highest sustained rate (no loss, p99
    /// within `--max-p99-ms`), searched from the fixed rates' outcome; without `--rates`,
    /// from `--start-rate`, with p50/p99 at half the best. `--ws-addr` may list several
    /// nodes, comma-separated.
    FanoutSearch {
        #[command(flatten)]
        fanout: load::FanoutArgs,
        /// Labels the result.
        #[arg(long)]
        round: Option<u32>,
        /// Also report the opening of the sockets as this connect-storm scenario (S4).
        #[arg(long)]
        storm_scenario: Option<String>,
    },
    /// Idle sockets (S2): server RSS per authenticated connection with one page, read at
    /// each count given (comma-separated, ascending), the sockets opened once.
    Idle {
        #[arg(long, value_delimiter = ',', default_value = "10000")]
        conns: Vec<usize>,
    },
    /// Connect storm (S4): connects and subscribes as fast as they go.
    Storm {
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
    },
    /// H1: server CPU, latency and RSS of a fixed-rate fan-out (one node, or several given
    /// in `--ws-addr`), for one history setting of the server; pass every server pid.
    PublishCost {
        /// The server's `--history` (only labels the result; `on` also expects ids).
        #[arg(long)]
        history: String,
        #[arg(long, default_value_t = 1)]
        round: u32,
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        #[arg(long, default_value_t = 100)]
        groups: usize,
        /// Deliveries per second (events per second times the members of a group).
        #[arg(long, default_value_t = 30_000.0)]
        rate: f64,
        #[arg(long, default_value_t = 4.0)]
        secs: f64,
        #[arg(long, default_value_t = 200)]
        size: usize,
    },
    /// R1: `events` published to a group nobody listens to, then replayed to one socket on
    /// the first `--ws-addr`, `replays` times; the node needs `--replay-limit` and
    /// `--history-size` of at least `events`.
    ReplayOne {
        #[arg(long, default_value_t = 10_000)]
        events: usize,
        #[arg(long, default_value_t = 3)]
        replays: usize,
        #[arg(long, default_value_t = 200)]
        size: usize,
        /// Where the history lives (labels the result: memory or redis).
        #[arg(long)]
        store: String,
    },
    /// R2: sockets on node A (first `--ws-addr`) take baselines, A is killed, events are
    /// published through `--grpc-addr` (node B's), and every socket reconnects to node B
    /// (second `--ws-addr`) at once and replays.
    ReplayStorm {
        #[arg(long, default_value_t = 1000)]
        sockets: usize,
        #[arg(long, default_value_t = 10)]
        groups: usize,
        #[arg(long, default_value_t = 200)]
        events_per_group: usize,
        /// Node A's pid, killed with SIGKILL once the sockets are in place.
        #[arg(long)]
        kill_pid: u32,
    },
    /// P1: one presence space (table 1) of `sockets` members over the `--ws-addr` nodes,
    /// round robin: a join storm timed to the last `presence.members`, then `senders` members
    /// each send `rate` focus frames a second for `secs`, timed by every other member. The
    /// nodes need `--presence on` and `--presence-max-members` of at least `sockets`;
    /// `--expect-presence false` times a storm against presence off to its last `page_add`.
    Presence {
        #[arg(long, default_value_t = 1000)]
        sockets: usize,
        #[arg(long, default_value_t = 10)]
        senders: usize,
        /// Focus frames per second per sender (the node drops those over
        /// `--presence-focus-rate`, 10 by default).
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        expect_presence: bool,
        /// Labels the result.
        #[arg(long, default_value_t = 1)]
        round: u32,
    },
    /// Serve an allow-all authorizer backend (HTTP and gRPC) until killed.
    ServeAuthorizer {
        #[arg(long, default_value = "127.0.0.1:18001")]
        http_addr: String,
        #[arg(long, default_value = "127.0.0.1:18002")]
        grpc_addr: String,
    },
    /// Lock-step fan-out for instruction counts (bench/callgrind.sh): `sockets` subscribers
    /// in `groups` groups; `events` published `burst` at a time (round robin over the
    /// groups, a burst all at once), each burst once the previous one reached all its
    /// sockets, then `gap_ms`. `--system channelgate` publishes over gRPC, `raw` over the
    /// raw broadcaster's publisher socket, `sockudo` over Pusher's HTTP API.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        sockets: usize,
        #[arg(long, default_value_t = 10)]
        groups: usize,
        #[arg(long, default_value_t = 100)]
        events: u64,
        #[arg(long, default_value_t = 1)]
        burst: u64,
        #[arg(long, default_value_t = 0)]
        gap_ms: u64,
    },
    /// S6, publish ingest: `groups` groups with one socket each (over the `--ws-addr` nodes,
    /// round robin); `in_flight` Publish calls (one event each, the groups round robin) kept
    /// in flight for `secs`, then `batch_in_flight` PublishBatch calls of `batch` events for
    /// `secs`, through `--grpc-addr`: events accepted and delivered a second, publish to
    /// socket latency, server CPU. Channelgate only.
    Ingest {
        #[arg(long, default_value_t = 10_000)]
        groups: usize,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        #[arg(long, default_value_t = 32)]
        in_flight: usize,
        #[arg(long, default_value_t = 100)]
        batch: usize,
        #[arg(long, default_value_t = 4)]
        batch_in_flight: usize,
        #[arg(long, default_value_t = 200)]
        size: usize,
        /// Labels the result.
        #[arg(long, default_value_t = 1)]
        round: u32,
        /// Gives every event an idempotency key of its own (32 hex characters, as a
        /// client's uuid4 hex).
        #[arg(long)]
        keys: bool,
        /// Labels the result: how the nodes share events (memory: one node; redis; cluster).
        #[arg(long)]
        bus: Option<String>,
    },
    /// A fixed number of events, for counts that time cannot move (instructions under
    /// callgrind, Redis memory per idempotency key): `groups` groups with one socket each (0:
    /// none), `events` events round robin over them, `batch` per call (1: Publish, more:
    /// PublishBatch), `in_flight` calls at once, each event with its own idempotency key
    /// with `--keys`; waits until every event arrived. Channelgate only.
    PublishCount {
        #[arg(long, default_value_t = 10)]
        groups: usize,
        #[arg(long, default_value_t = 1000)]
        events: u64,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 1)]
        in_flight: usize,
        #[arg(long, default_value_t = 200)]
        size: usize,
        #[arg(long)]
        keys: bool,
        /// Sends `authorization: Bearer <api key>` with every call (for a node started with
        /// `--api-key`).
        #[arg(long)]
        api_key: Option<String>,
        /// Labels the result.
        #[arg(long, default_value = "")]
        label: String,
    },
}

/// One received event: its number and how long it took to arrive.
struct Received {
    n: u64,
    latency_us: u64,
}

/// Opens a socket of `user_id`, subscribes to `table-1` and reports every event it gets.
async fn subscriber(
    args: &Args,
    user_id: i64,
    tx: mpsc::UnboundedSender<Received>,
) -> Result<(), String> {
    let token = sign_access_token(args.target.jwt_secret.as_bytes(), "user_id", user_id, 3600)
        .map_err(|e| e.to_string())?;
    let stream = tokio::net::TcpStream::connect(&args.target.ws_addr)
        .await
        .map_err(|e| format!("connect {}: {e}", args.target.ws_addr))?;
    let _ = stream.set_nodelay(true);
    let path = format!("/ws/core/?jwt_token={token}");
    let mut ws = Client::connect(stream, &args.target.ws_addr, &path)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    ws.subscribe_table(1).await?;
    tokio::spawn(async move {
        let forward = |frame: Frame<'_>| {
            let Frame::Text(text) = frame else {
                return;
            };
            let Ok(frame) = serde_json::from_slice::<serde_json::Value>(text) else {
                return;
            };
            if let (Some(n), Some(ts)) = (frame["n"].as_u64(), frame["ts"].as_u64()) {
                let _ = tx.send(Received {
                    n,
                    latency_us: now_micros().saturating_sub(ts),
                });
            }
        };
        while let Ok(true) = ws.read_frames(forward).await {}
    });
    Ok(())
}

fn payload(n: u64) -> String {
    serde_json::json!({"type": "bench", "n": n, "ts": now_micros(), "pad": "x".repeat(120)})
        .to_string()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn report(label: &str, mut latencies: Vec<u64>) {
    latencies.sort_unstable();
    println!(
        "{label}: n={} p50={}us p90={}us p99={}us max={}us",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
}

/// Allows everything, as fast as it can: the backend's own cost is not what is measured.
async fn serve_authorizer(http_addr: &str, grpc_addr: &str) -> Result<(), String> {
    use channelgate::proto::authorizer_server::{Authorizer, AuthorizerServer};
    use channelgate::proto::{AuthorizeRequest, AuthorizeResponse, ConnectRequest};

    struct AllowAll;
    fn allowed() -> Result<tonic::Response<AuthorizeResponse>, tonic::Status> {
        Ok(tonic::Response::new(AuthorizeResponse {
            allowed: true,
            presence_space: String::new(),
        }))
    }
    #[tonic::async_trait]
    impl Authorizer for AllowAll {
        async fn authorize(
            &self,
            _: tonic::Request<AuthorizeRequest>,
        ) -> Result<tonic::Response<AuthorizeResponse>, tonic::Status> {
            allowed()
        }

        async fn authorize_connect(
            &self,
            _: tonic::Request<ConnectRequest>,
        ) -> Result<tonic::Response<AuthorizeResponse>, tonic::Status> {
            allowed()
        }
    }

    let http = tokio::net::TcpListener::bind(http_addr)
        .await
        .map_err(|e| e.to_string())?;
    let grpc = tokio::net::TcpListener::bind(grpc_addr)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AuthorizerServer::new(AllowAll))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
    );
    loop {
        let (stream, _) = http.accept().await.map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_request| async {
                let body =
                    http_body_util::Full::new(bytes::Bytes::from_static(b"{\"allowed\":true}"));
                Ok::<_, std::convert::Infallible>(http::Response::new(body))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Arc::new(Args::parse());
    let setup = || args.target.setup();
    match &args.scenario {
        Scenario::ServeAuthorizer {
            http_addr,
            grpc_addr,
        } => return serve_authorizer(http_addr, grpc_addr).await,
        Scenario::FanoutSearch {
            fanout,
            round,
            storm_scenario,
        } => {
            let plan = fanout.plan(storm_scenario.clone(), *round);
            return load::fanout(setup()?, plan).await;
        }
        Scenario::Fanout {
            sockets,
            groups,
            events,
            burst,
            gap_ms,
        } => {
            let gap = Duration::from_millis(*gap_ms);
            return load::lockstep(setup()?, *sockets, *groups, *events, *burst, gap).await;
        }
        Scenario::Ingest {
            groups,
            secs,
            in_flight,
            batch,
            batch_in_flight,
            size,
            round,
            keys,
            bus,
        } => {
            if args.target.system != load::System::Channelgate {
                return Err("ingest (S6) drives channelgate only".into());
            }
            let nodes = args.target.ws_addr.split(',').count();
            let plan = ingest::Plan {
                groups: *groups,
                secs: *secs,
                in_flight: *in_flight,
                batch: *batch,
                batch_in_flight: *batch_in_flight,
                size: *size,
                round: *round,
                keys: *keys,
                bus: bus
                    .clone()
                    .unwrap_or_else(|| if nodes == 1 { "memory" } else { "redis" }.into()),
            };
            return ingest::run(setup()?, plan).await;
        }
        Scenario::PublishCount {
            groups,
            events,
            batch,
            in_flight,
            size,
            keys,
            api_key,
            label,
        } => {
            if args.target.system != load::System::Channelgate {
                return Err("publish-count drives channelgate only".into());
            }
            let plan = ingest::CountPlan {
                groups: *groups,
                events: *events,
                batch: *batch,
                in_flight: *in_flight,
                size: *size,
                keys: *keys,
                api_key: api_key.clone(),
                label: label.clone(),
            };
            return ingest::count(setup()?, plan).await;
        }
        Scenario::PublishCost {
            history,
            round,
            conns,
            groups,
            rate,
            secs,
            size,
        } => {
            return history::publish_cost(
                setup()?,
                *conns,
                *groups,
                *rate,
                *secs,
                *size,
                history,
                *round,
            )
            .await;
        }
        Scenario::ReplayOne {
            events,
            replays,
            size,
            store,
        } => return history::replay_one(setup()?, *events, *replays, *size, store).await,
        Scenario::ReplayStorm {
            sockets,
            groups,
            events_per_group,
            kill_pid,
        } => {
            return history::replay_storm(
                setup()?,
                *sockets,
                *groups,
                *events_per_group,
                *kill_pid,
            )
            .await;
        }
        Scenario::Presence {
            sockets,
            senders,
            rate,
            secs,
            expect_presence,
            round,
        } => {
            let plan = presence::Plan {
                sockets: *sockets,
                senders: *senders,
                rate: *rate,
                secs: *secs,
                presence: *expect_presence,
                round: *round,
            };
            return presence::run(setup()?, plan).await;
        }
        Scenario::Idle { conns } => return load::idle(setup()?, conns).await,
        Scenario::Storm { conns } => return load::storm(setup()?, *conns).await,
        _ => {}
    }
    let mut grpc = GatewayClient::connect(format!("http://{}", args.target.grpc_addr))
        .await
        .map_err(|e| format!("gRPC connect: {e}"))?;
    let publish = |n: u64| PublishRequest {
        target: Some(Target::Group("table-1".into())),
        payload: payload(n),
        ..Default::default()
    };
    match args.scenario {
        Scenario::Latency { events } => {
            let (tx, mut rx) = mpsc::unbounded_channel();
            subscriber(&args, 1, tx).await?;
            let mut latencies = Vec::with_capacity(events as usize);
            for n in 0..events {
                grpc.publish(publish(n)).await.map_err(|e| e.to_string())?;
                let got = rx.recv().await.ok_or("subscriber gone")?;
                if got.n != n {
                    return Err(format!("expected event {n}, got {}", got.n));
                }
                latencies.push(got.latency_us);
            }
            report("publish-to-receive, 1 subscriber", latencies);
        }
        Scenario::ServeAuthorizer { .. }
        | Scenario::FanoutSearch { .. }
        | Scenario::Fanout { .. }
        | Scenario::Ingest { .. }
        | Scenario::PublishCount { .. }
        | Scenario::Idle { .. }
        | Scenario::PublishCost { .. }
        | Scenario::Presence { .. }
        | Scenario::ReplayOne { .. }
        | Scenario::ReplayStorm { .. }
        | Scenario::Storm { .. } => unreachable!("handled above"),
        Scenario::Subscribe { count } => {
            let token = sign_access_token(args.target.jwt_secret.as_bytes(), "user_id", 1, 3600)
                .map_err(|e| e.to_string())?;
            let url = format!("ws://{}/ws/core/?jwt_token={token}", args.target.ws_addr);
            let (mut ws, _) = tokio_tungstenite::connect_async(url)
                .await
                .map_err(|e| e.to_string())?;
            ws.next().await; // authentication
            let mut latencies = Vec::with_capacity(count as usize);
            for table in 0..count {
                let started = Instant::now();
                let page = format!(r#"{{"page":"table","table_id":{table}}}"#);
                ws.send(Message::text(page))
                    .await
                    .map_err(|e| e.to_string())?;
                let Some(Ok(Message::Text(answer))) = ws.next().await else {
                    return Err("socket closed".into());
                };
                if !answer.contains("page_add") {
                    return Err(format!("subscribe refused: {answer}"));
                }
                latencies.push(started.elapsed().as_micros() as u64);
                let remove = format!(r#"{{"remove_page":"table","table_id":{table}}}"#);
                ws.send(Message::text(remove))
                    .await
                    .map_err(|e| e.to_string())?;
                ws.next().await; // page_discard
                // Stay under the inbound rate limit (200 frames/s, burst 100).
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            report("subscribe to page_add", latencies);
        }
    }
    Ok(())
}
