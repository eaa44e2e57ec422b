//! The side-by-side scenarios: many subscriber sockets, a paced publisher per system, and
//! what the sockets and the server's /proc say. Each scenario prints one JSON line.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use channelgate::identity::sign_access_token;
use channelgate::proto::gateway_client::GatewayClient;
use channelgate::proto::{PublishRequest, publish_request::Target as GrpcTarget};
use futures_util::SinkExt;
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Client, Frame};
use crate::pusher;

/// Which system is driven; they differ only in how events are published.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    /// gRPC Publish.
    Channelgate,
    /// Binary frames `<group>\n<payload>` on a WebSocket of the raw broadcaster.
    Raw,
    /// `channel_layer.group_send` from `bench/peers/django/publisher.py`.
    Django,
    /// Sockudo, a Pusher-protocol server: Pusher's signed HTTP API (`bench/src/pusher.rs`).
    Sockudo,
}

impl System {
    /// The name the report keys its rows by.
    pub(crate) fn name(self) -> &'static str {
        match self {
            System::Channelgate => "channelgate",
            System::Raw => "raw",
            System::Django => "django",
            System::Sockudo => "sockudo",
        }
    }
}

/// Where the system listens and how to reach it.
pub struct Setup {
    pub system: System,
    /// Subscribers are spread over these, round robin (two nodes for S5).
    pub ws_addrs: Vec<SocketAddr>,
    pub grpc_addr: String,
    pub jwt_secret: String,
    /// The server processes whose CPU and memory are reported.
    pub server_pids: Vec<u32>,
    /// The command that runs the Django publisher (its flags are appended).
    pub django_publisher: Vec<String>,
}

/// The flags every load generator takes: where the system under test is, and how to
/// reach it.
#[derive(clap::Args)]
pub struct Target {
    /// The node's WebSocket address; several nodes comma-separated (S5).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub ws_addr: String,
    /// The node's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub grpc_addr: String,
    /// The node's --jwt-secret, to sign client tokens.
    #[arg(long)]
    pub jwt_secret: String,
    /// The system under test (the scenarios differ in how they publish, and sockudo's
    /// sockets speak the Pusher protocol).
    #[arg(long, value_enum, default_value = "channelgate")]
    pub system: System,
    /// Server processes whose CPU and RSS are read from /proc (repeatable).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Command running the Django publisher, whitespace-separated (system django).
    #[arg(long, default_value = "")]
    pub django_publisher: String,
}

impl Target {
    /// The setup these flags name.
    pub fn setup(&self) -> Result<Setup, String> {
        Ok(Setup {
            system: self.system,
            ws_addrs: self
                .ws_addr
                .split(',')
                .map(|a| a.trim().parse().map_err(|e| format!("--ws-addr {a}: {e}")))
                .collect::<Result<_, _>>()?,
            grpc_addr: self.grpc_addr.clone(),
            jwt_secret: self.jwt_secret.clone(),
            server_pids: self.server_pids.clone(),
            django_publisher: self
                .django_publisher
                .split_whitespace()
                .map(String::from)
                .collect(),
        })
    }
}

pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// Latencies in 10 µs buckets up to 1 s; shared by every subscriber, lock-free.
pub struct Histogram {
    buckets: Vec<AtomicU64>,
}

const BUCKET_US: u64 = 10;
const BUCKETS: usize = 100_000;

impl Histogram {
    pub(crate) fn new() -> Self {
        Histogram {
            buckets: (0..=BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub(crate) fn record(&self, micros: u64) {
        let i = ((micros / BUCKET_US) as usize).min(BUCKETS);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the counts, leaving zeros.
    pub(crate) fn take(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect()
    }
}

/// p50, p90, p99 and max in milliseconds, from taken counts.
pub(crate) fn percentiles(counts: &[u64]) -> [f64; 4] {
    let total: u64 = counts.iter().sum();
    let at = |p: f64| {
        let rank = ((total as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return (i as u64 * BUCKET_US + BUCKET_US / 2) as f64 / 1000.0;
            }
        }
        0.0
    };
    let max = counts.iter().rposition(|c| *c > 0).unwrap_or(0) as u64 * BUCKET_US;
    if total == 0 {
        return [0.0; 4];
    }
    [
        at(0.5),
        at(0.9),
        at(0.99),
        (max + BUCKET_US) as f64 / 1000.0,
    ]
}

/// What the subscribers have seen so far.
pub struct Seen {
    pub received: AtomicU64,
    pub latency: Histogram,
    pub closed: AtomicUsize,
    /// Deliveries that carried a history id (`"_event_id":N` as the last key).
    pub with_event_id: AtomicU64,
}

impl Seen {
    pub(crate) fn new() -> Self {
        Seen {
            received: AtomicU64::new(0),
            latency: Histogram::new(),
            closed: AtomicUsize::new(0),
            with_event_id: AtomicU64::new(0),
        }
    }
}

/// CPU time (ticks) and RSS (KiB) of the server processes.
pub(crate) fn proc_sample(pids: &[u32]) -> (u64, u64) {
    let (user, kernel) = proc_times(pids);
    let mut rss = 0;
    for pid in pids {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            rss += status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (user + kernel, rss)
}

/// CPU time (ticks) of the processes in user space and in the kernel (utime, stime).
pub(crate) fn proc_times(pids: &[u32]) -> (u64, u64) {
    let mut user = 0;
    let mut kernel = 0;
    for pid in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the command name, which may hold spaces: utime is 14th, stime 15th.
            let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
            let fields: Vec<&str> = after.split_whitespace().collect();
            let field = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            user += field(11);
            kernel += field(12);
        }
    }
    (user, kernel)
}

pub(crate) const TICKS_PER_SEC: f64 = 100.0;

/// The send time stamped in a payload, found without a JSON parser; in a Pusher event
/// (sockudo's), inside the `data` string.
fn stamp(text: &[u8]) -> Option<u64> {
    if pusher::is_event(text) {
        pusher::stamp(text)
    } else {
        number_after(text, b"\"ts\":")
    }
}

/// The non-negative integer that follows the first `key` (`"name":`) in `text`.
pub(crate) fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut value: u64 = 0;
    let mut any = false;
    for digit in digits {
        value = value
            .checked_mul(10)?
            .checked_add(u64::from(digit - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

/// Sockets opened from one source address (it has about 28,000 ephemeral ports).
const SOCKETS_PER_SOURCE: usize = 20_000;

/// What a subscriber socket does with what it receives.
pub(crate) trait Counter: Send + Sync + 'static {
    /// A text frame on the socket subscribed to `table-{group}`.
    fn on_text(&self, text: &[u8], group: usize);
    /// The server closed the socket, or it was lost.
    fn on_closed(&self);
}

impl Counter for Seen {
    fn on_text(&self, text: &[u8], _group: usize) {
        if let Some(ts) = stamp(text) {
            self.latency.record(now_micros().saturating_sub(ts));
            self.received.fetch_add(1, Ordering::Relaxed);
            if has_event_id(text) {
                self.with_event_id.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn on_closed(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Opens one subscriber: connects, authenticates, subscribes to `table-{group}`.
/// Returns once `page_add` (sockudo: `pusher_internal:subscription_succeeded`) arrived; the socket then hands what it receives to `counter`.
async fn subscriber<C: Counter>(
    setup: &Setup,
    index: usize,
    group: usize,
    counter: Arc<C>,
) -> Result<(), String> {
    let user_id = 1 + (index % 1000) as i64;
    let mut ws = connect(setup, index, user_id).await?;
    if setup.system == System::Sockudo {
        pusher::subscribe(&mut ws, &format!("table-{group}")).await?;
    } else {
        ws.subscribe_table(group).await?;
    }
    tokio::spawn(async move {
        let count = |frame: Frame<'_>| {
            if let Frame::Text(text) = frame {
                counter.on_text(text, group);
            }
        };
        while let Ok(true) = ws.read_frames(count).await {}
        counter.on_closed();
    });
    Ok(())
}

/// Opens socket `index` as `user_id` on its node (`setup.ws_addrs`, round robin), up to
/// the end of the WebSocket handshake (sockudo: to `pusher:connection_established`). Past one source address's ephemeral ports, further
/// sockets come from 127.0.1.x.
pub(crate) async fn connect(setup: &Setup, index: usize, user_id: i64) -> Result<Client, String> {
    let server = setup.ws_addrs[index % setup.ws_addrs.len()];
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if index >= SOCKETS_PER_SOURCE {
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 1, (index / SOCKETS_PER_SOURCE) as u8));
        socket.set_reuseaddr(true).map_err(|e| e.to_string())?;
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|e| format!("bind {source}: {e}"))?;
    }
    let stream = socket
        .connect(server)
        .await
        .map_err(|e| format!("connect {server}: {e}"))?;
    let _ = stream.set_nodelay(true);
    if setup.system == System::Sockudo {
        return pusher::connect(stream, &server.to_string()).await;
    }
    let token = sign_access_token(setup.jwt_secret.as_bytes(), "user_id", user_id, 3600)
        .map_err(|e| e.to_string())?;
    Client::connect(
        stream,
        &server.to_string(),
        &format!("/ws/core/?jwt_token={token}"),
    )
    .await
    .map_err(|e| format!("handshake: {e}"))
}

/// Whether a payload ends with the history id the gateway appends (`,"_event_id":N}`);
/// only its tail is looked at.
fn has_event_id(text: &[u8]) -> bool {
    let tail = &text[text.len().saturating_sub(40)..];
    tail.windows(13).any(|w| w == b",\"_event_id\":")
}

/// Handshakes in flight while sockets are opened: enough to keep every system busy.
pub(crate) const OPEN_CONCURRENCY: usize = 512;

/// Opens the subscribers numbered `sockets` over `groups` groups (socket `i` in group
/// `i % groups`), each counting into `counter`.
/// Returns the time the last `page_add` arrived after the start.
pub(crate) async fn open<C: Counter>(
    setup: &Arc<Setup>,
    sockets: std::ops::Range<usize>,
    groups: usize,
    counter: &Arc<C>,
) -> Result<Duration, String> {
    let conns = sockets.len();
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
    let (errors, mut error_rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::with_capacity(conns);
    for index in sockets {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (setup, counter, errors) = (setup.clone(), counter.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(error) = subscriber(&setup, index, index % groups, counter).await {
                let _ = errors.send(error);
            }
            drop(permit);
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    drop(errors);
    if let Some(error) = error_rx.recv().await {
        return Err(format!("opening {conns} sockets: {error}"));
    }
    Ok(started.elapsed())
}

pub(crate) fn payload(n: u64, group: usize, size: usize) -> String {
    let head = json!({"type": "bench", "n": n, "ts": now_micros(), "g": group}).to_string();
    let pad = size.saturating_sub(head.len() + 9);
    format!(
        "{},\"pad\":\"{}\"}}",
        &head[..head.len() - 1],
        "x".repeat(pad)
    )
}

/// A gRPC Publish of `payload` to `table-{group}`.
pub(crate) fn publish_request(group: usize, payload: String) -> PublishRequest {
    PublishRequest {
        target: Some(GrpcTarget::Group(format!("table-{group}"))),
        payload,
        ..Default::default()
    }
}

/// A publisher of one system (channelgate over gRPC, the raw broadcaster over its publisher
/// WebSocket, sockudo over Pusher's HTTP API; Django publishes through a process of its own,
/// see [`publish`]).
pub(crate) enum Publisher {
    Grpc(GatewayClient<tonic::transport::Channel>),
    Raw(Box<WebSocketStream<TcpStream>>),
    Pusher(pusher::Publisher),
}

impl Publisher {
    pub(crate) async fn connect(setup: &Setup) -> Result<Publisher, String> {
        match setup.system {
            System::Channelgate => Ok(Publisher::Grpc(
                GatewayClient::connect(format!("http://{}", setup.grpc_addr))
                    .await
                    .map_err(|e| format!("gRPC connect: {e}"))?,
            )),
            System::Raw => {
                let url = format!("ws://{}/pub", setup.ws_addrs[0]);
                let stream = TcpStream::connect(setup.ws_addrs[0])
                    .await
                    .map_err(|e| format!("raw publisher: {e}"))?;
                // Without it Nagle holds each tick's frames for the last ones' ACK (tonic's
                // gRPC publisher sets it too).
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
                let (ws, _) = tokio_tungstenite::client_async(url, stream)
                    .await
                    .map_err(|e| format!("raw publisher: {e}"))?;
                Ok(Publisher::Raw(Box::new(ws)))
            }
            System::Django => Err("the Django peer publishes through its own process".into()),
            System::Sockudo => Ok(Publisher::Pusher(pusher::Publisher::new(setup.ws_addrs[0]))),
        }
    }

    /// Publishes `(group, payload)` events to `table-{group}` all at once (gRPC and HTTP: one
    /// call each, all in flight together; raw: the frames in one write) and waits for every
    /// answer (gRPC, HTTP) or for the write (raw).
    pub(crate) async fn publish_burst(
        &mut self,
        events: Vec<(usize, String)>,
    ) -> Result<(), String> {
        match self {
            Publisher::Grpc(client) => {
                let calls: Vec<_> = events
                    .into_iter()
                    .map(|(group, body)| {
                        let mut client = client.clone();
                        let request = publish_request(group, body);
                        tokio::spawn(async move {
                            tokio::time::timeout(PUBLISH_TIMEOUT, client.publish(request)).await
                        })
                    })
                    .collect();
                for call in calls {
                    call.await
                        .map_err(|e| e.to_string())?
                        .map_err(|_| "publish timed out".to_string())?
                        .map_err(|status| format!("publish failed: {status}"))?;
                }
                Ok(())
            }
            Publisher::Raw(ws) => {
                for (group, body) in events {
                    let frame = format!("table-{group}\n{body}").into_bytes();
                    ws.feed(Message::binary(frame))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                ws.flush().await.map_err(|e| e.to_string())
            }
            Publisher::Pusher(http) => {
                let calls: Vec<_> = events
                    .into_iter()
                    .map(|(group, body)| {
                        let call = http.publish(&format!("table-{group}"), &body);
                        tokio::spawn(tokio::time::timeout(PUBLISH_TIMEOUT, call))
                    })
                    .collect();
                for call in calls {
                    call.await
                        .map_err(|e| e.to_string())?
                        .map_err(|_| "publish timed out".to_string())?
                        .map_err(|e| format!("publish failed: {e}"))?;
                }
                Ok(())
            }
        }
    }
}

/// How long one publish call may take.
pub(crate) const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes `events_per_sec` for `duration`, round robin over `groups` groups.
async fn publish(
    setup: &Setup,
    groups: usize,
    events_per_sec: f64,
    duration: Duration,
    size: usize,
) -> Result<u64, String> {
    let total = (events_per_sec * duration.as_secs_f64()).round() as u64;
    if setup.system == System::Django {
        let mut command = tokio::process::Command::new(&setup.django_publisher[0]);
        command.args(&setup.django_publisher[1..]).args([
            "--groups",
            &groups.to_string(),
            "--rate",
            &format!("{events_per_sec:.1}"),
            "--count",
            &total.to_string(),
            "--size",
            &size.to_string(),
        ]);
        let status = command
            .status()
            .await
            .map_err(|e| format!("publisher: {e}"))?;
        return if status.success() {
            Ok(total)
        } else {
            Err(format!("publisher exited with {status}"))
        };
    }
    let started = Instant::now();
    let mut sent = 0u64;
    let mut publisher = Publisher::connect(setup).await?;
    let in_flight = Arc::new(Semaphore::new(256));
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * events_per_sec) as u64).min(total);
        while sent < due {
            let group = (sent as usize) % groups;
            let body = payload(sent, group, size);
            match &mut publisher {
                Publisher::Grpc(client) => {
                    let permit = in_flight
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|e| e.to_string())?;
                    let mut client = client.clone();
                    let request = publish_request(group, body);
                    tokio::spawn(async move {
                        match tokio::time::timeout(PUBLISH_TIMEOUT, client.publish(request)).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(status)) => eprintln!("publish failed: {status}"),
                            Err(_) => eprintln!("publish timed out"),
                        }
                        drop(permit);
                    });
                }
                Publisher::Raw(ws) => {
                    let frame = format!("table-{group}\n{body}").into_bytes();
                    ws.feed(Message::binary(frame))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Publisher::Pusher(http) => {
                    let permit = in_flight
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|e| e.to_string())?;
                    let call = http.publish(&format!("table-{group}"), &body);
                    tokio::spawn(async move {
                        match tokio::time::timeout(PUBLISH_TIMEOUT, call).await {
                            Ok(Ok(())) => {}
                            Ok(Err(error)) => eprintln!("publish failed: {error}"),
                            Err(_) => eprintln!("publish timed out"),
                        }
                        drop(permit);
                    });
                }
            }
            sent += 1;
        }
        if let Publisher::Raw(ws) = &mut publisher {
            ws.flush().await.map_err(|e| e.to_string())?;
        }
    }
    // Every publish has been answered once all permits are back.
    let _ = in_flight.acquire_many(256).await;
    Ok(sent)
}

/// One paced run: what was expected, what arrived, how fast and how late.
#[derive(Clone)]
pub(crate) struct Step {
    pub deliveries_per_sec: f64,
    pub expected: u64,
    pub received: u64,
    pub latency_ms: [f64; 4],
    pub cpu_percent: f64,
    /// Events published, and the server CPU seconds the step took (of them, in the kernel).
    pub events: u64,
    pub cpu_secs: f64,
    pub kernel_secs: f64,
}

pub(crate) async fn step(
    setup: &Setup,
    seen: &Seen,
    groups: usize,
    members_per_group: usize,
    deliveries_per_sec: f64,
    duration: Duration,
    size: usize,
) -> Result<Step, String> {
    let events_per_sec = deliveries_per_sec / members_per_group as f64;
    let before = seen.received.load(Ordering::Relaxed);
    seen.latency.take();
    let (user_before, kernel_before) = proc_times(&setup.server_pids);
    let started = Instant::now();
    let events = publish(setup, groups, events_per_sec, duration, size).await?;
    let expected = events * members_per_group as u64;
    // Stragglers: wait until everything arrived, or for three seconds of silence.
    let quiet = Duration::from_secs(3);
    drain(&seen.received, before, expected, quiet, None).await;
    let elapsed = started.elapsed().as_secs_f64();
    let (user_after, kernel_after) = proc_times(&setup.server_pids);
    let received = seen.received.load(Ordering::Relaxed) - before;
    let kernel_secs = kernel_after.saturating_sub(kernel_before) as f64 / TICKS_PER_SEC;
    let cpu_secs = user_after.saturating_sub(user_before) as f64 / TICKS_PER_SEC + kernel_secs;
    Ok(Step {
        events,
        cpu_secs,
        kernel_secs,
        deliveries_per_sec: received as f64 / elapsed.max(duration.as_secs_f64()),
        expected,
        received,
        latency_ms: percentiles(&seen.latency.take()),
        cpu_percent: cpu_secs / elapsed * 100.0,
    })
}

/// Waits for stragglers: until `received` has grown by `expected` since it read `before`,
/// or for `quiet` without a delivery, or (given one) until `deadline`.
pub(crate) async fn drain(
    received: &AtomicU64,
    before: u64,
    expected: u64,
    quiet: Duration,
    deadline: Option<Instant>,
) {
    let mut last = received.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    while last - before < expected
        && quiet_since.elapsed() < quiet
        && deadline.is_none_or(|d| Instant::now() < d)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = received.load(Ordering::Relaxed);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
}

pub(crate) fn log_step(setup: &Setup, scenario: &str, rate: f64, result: &Step) {
    eprintln!(
        "{scenario} {} target {rate:.0}/s: {:.0}/s, {} of {}, p99 {:.2} ms, cpu {:.0}%",
        setup.system.name(),
        result.deliveries_per_sec,
        result.received,
        result.expected,
        result.latency_ms[2],
        result.cpu_percent
    );
}

/// Whether a step kept up: nothing lost and p99 within the limit.
fn sustains(result: &Step, max_p99_ms: f64) -> bool {
    result.received == result.expected && result.latency_ms[2] <= max_p99_ms
}

/// Steps below the start rate a search may take when the first step fails (1.4x each).
const MAX_STEPS_DOWN: u32 = 3;

/// What a fan-out run (S1, S3, S5) measures.
/// The flags of a fan-out run, shared by the load generators.
#[derive(clap::Args)]
pub struct FanoutArgs {
    #[arg(long)]
    pub scenario: String,
    /// Fixed rates in deliveries per second, comma-separated, measured in this order.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    #[arg(long, default_value_t = 4.0)]
    pub rate_secs: f64,
    /// The server's worker threads (only labels the result).
    #[arg(long)]
    pub workers: Option<u32>,
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    #[arg(long, default_value_t = 100)]
    pub groups: usize,
    /// Deliveries per second of the search's first step (with `--rates`: the least it
    /// goes on from when every fixed rate held).
    #[arg(long, default_value_t = 20_000.0)]
    pub start_rate: f64,
    #[arg(long, default_value_t = 100.0)]
    pub max_p99_ms: f64,
    #[arg(long, default_value_t = 3.0)]
    pub step_secs: f64,
    #[arg(long, default_value_t = 200)]
    pub size: usize,
}

impl FanoutArgs {
    /// The run these flags describe, with its connect-storm label and round.
    pub fn plan(&self, storm_scenario: Option<String>, round: Option<u32>) -> FanoutPlan {
        FanoutPlan {
            scenario: self.scenario.clone(),
            storm_scenario,
            conns: self.conns,
            groups: self.groups,
            size: self.size,
            rates: self.rates.clone(),
            rate_secs: self.rate_secs,
            start_rate: self.start_rate,
            step_secs: self.step_secs,
            max_p99_ms: self.max_p99_ms,
            workers: self.workers,
            round,
        }
    }
}

pub struct FanoutPlan {
    pub scenario: String,
    /// Also report the opening of the sockets as this connect storm (S4).
    pub storm_scenario: Option<String>,
    pub conns: usize,
    pub groups: usize,
    pub size: usize,
    /// Fixed rates (deliveries/s), measured first and in this order, each for `rate_secs`.
    pub rates: Vec<f64>,
    pub rate_secs: f64,
    /// The search for the highest sustained rate: its first step when there are no fixed
    /// rates, its steps' length, and the p99 a sustained step stays within.
    pub start_rate: f64,
    pub step_secs: f64,
    pub max_p99_ms: f64,
    /// Labels of the result: the server's worker threads and the round.
    pub workers: Option<u32>,
    pub round: Option<u32>,
}

/// Between two steps, for the server's queues to settle.
const PAUSE: Duration = Duration::from_millis(500);
/// Steps a search may take at most (it ends much sooner: on a failure or a publisher that
/// cannot keep up).
const MAX_SEARCH_STEPS: u32 = 30;

/// Deliveries per CPU-second of the server, or null when it used none that /proc shows.
fn per_cpu_sec(delivered: u64, cpu_secs: f64) -> serde_json::Value {
    if cpu_secs > 0.0 {
        json!((delivered as f64 / cpu_secs).round())
    } else {
        serde_json::Value::Null
    }
}

/// One step as the result lists it.
fn step_json(rate: f64, step: &Step) -> serde_json::Value {
    json!({
        "rate": rate.round(),
        "expected": step.expected,
        "received": step.received,
        "deliveries_per_sec": step.deliveries_per_sec.round(),
        "p50_ms": step.latency_ms[0],
        "p90_ms": step.latency_ms[1],
        "p99_ms": step.latency_ms[2],
        "max_ms": step.latency_ms[3],
        "cpu_percent": (step.cpu_percent * 10.0).round() / 10.0,
        "cpu_secs": step.cpu_secs,
        "kernel_secs": step.kernel_secs,
        "deliveries_per_cpu_sec": per_cpu_sec(step.received, step.cpu_secs),
    })
}

/// Fan-out (S1, S3, S5): opens the sockets, measures each fixed rate (after a second's
/// warm-up at the first), then searches for the highest sustained rate (no loss, p99
/// within `max_p99_ms`): upwards by 1.4x when every fixed rate held, downwards when the
/// first failed, and in any case two geometric halvings between the last rate that held
/// and the first that failed. Without fixed rates the search starts at `start_rate` and
/// latency is then measured at half the best sustained rate.
///
/// The per-CPU figure is deliveries per server CPU-second over all the fixed steps
/// together: every system under test gets the same schedule, so it is the same work.
pub async fn fanout(setup: Setup, plan: FanoutPlan) -> Result<(), String> {
    if plan.groups == 0 || plan.conns < plan.groups {
        return Err(format!(
            "fan-out needs at least one socket per group ({} sockets, {} groups)",
            plan.conns, plan.groups
        ));
    }
    let setup = Arc::new(setup);
    let seen = Arc::new(Seen::new());
    let storm = plan.storm_scenario.as_deref();
    let labels = (plan.workers, plan.round);
    open_as_storm(&setup, plan.conns, plan.groups, &seen, storm, labels).await?;
    let members = plan.conns / plan.groups;
    let groups = plan.groups;
    let closed = || seen.closed.load(Ordering::Relaxed);
    let search_step = Duration::from_secs_f64(plan.step_secs);

    let mut fixed: Vec<(f64, Step)> = Vec::with_capacity(plan.rates.len());
    if let Some(&first) = plan.rates.first() {
        // Not reported: the first allocations, the caches, the publisher's connection.
        let warm = Duration::from_secs(1);
        step(&setup, &seen, groups, members, first, warm, plan.size).await?;
        tokio::time::sleep(PAUSE).await;
        let duration = Duration::from_secs_f64(plan.rate_secs);
        for &rate in &plan.rates {
            let result = step(&setup, &seen, groups, members, rate, duration, plan.size).await?;
            log_step(&setup, &plan.scenario, rate, &result);
            fixed.push((rate, result));
            tokio::time::sleep(PAUSE).await;
        }
    }

    // The fixed steps seed the search: the last that held below the first that failed.
    let mut best: Option<Step> = None;
    let mut low = 0.0;
    let mut failed_rate = None;
    let mut lost = 0;
    for (rate, result) in &fixed {
        if sustains(result, plan.max_p99_ms) && result.expected > 0 {
            best = Some(result.clone());
            low = *rate;
        } else {
            failed_rate = Some(*rate);
            lost = result.expected.saturating_sub(result.received);
            break;
        }
    }
    let mut steps_down = 0;
    let next = match (fixed.last(), &best, failed_rate) {
        (None, _, _) => Some(plan.start_rate),
        // Every fixed rate held: on upwards (from the start rate if that is higher), unless
        // the publisher already fell behind.
        (Some((rate, last)), Some(_), None) => (last.deliveries_per_sec >= rate * 0.9
            || setup.system == System::Django)
            .then_some((low * 1.4).max(plan.start_rate)),
        (Some(_), Some(_), Some(_)) => None,
        (Some(_), None, failed) => {
            let (first_rate, first) = &fixed[0];
            if closed() > 0 {
                return report_unsustained(&setup, &plan, *first_rate, first, &fixed, closed());
            }
            steps_down = 1;
            Some(failed.unwrap_or(*first_rate) / 1.4)
        }
    };
    if let Some(mut rate) = next.filter(|_| closed() == 0) {
        for _ in 0..MAX_SEARCH_STEPS {
            let result = step(&setup, &seen, groups, members, rate, search_step, plan.size).await?;
            log_step(&setup, &plan.scenario, rate, &result);
            if result.expected == 0 {
                // Too slow to publish a single event in a step: not a measurement.
                rate *= 1.4;
                continue;
            }
            if !sustains(&result, plan.max_p99_ms) {
                lost = result.expected.saturating_sub(result.received);
                failed_rate = Some(rate);
                if best.is_none() {
                    // The machine is slower today than the start rate assumes: step down.
                    if steps_down < MAX_STEPS_DOWN && closed() == 0 {
                        steps_down += 1;
                        rate /= 1.4;
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        continue;
                    }
                    return report_unsustained(&setup, &plan, rate, &result, &fixed, closed());
                }
                break;
            }
            // The Django publisher is a process whose start-up counts in the step's time, so
            // its measured rate trails the target even when every event arrived.
            let keep_going =
                result.deliveries_per_sec >= rate * 0.9 || setup.system == System::Django;
            best = Some(result);
            low = rate;
            // Found by stepping down: the step above it failed already.
            if !keep_going || failed_rate.is_some() || closed() > 0 {
                break;
            }
            rate *= 1.4;
        }
    }
    // Two geometric halvings between the last sustained rate and the failed one narrow the
    // limit to a quarter of their ratio's logarithm (9 % of a 1.4x step).
    if let (Some(mut high), Some(_)) = (failed_rate, &best) {
        for _ in 0..2 {
            if closed() > 0 || high / low < 1.04 {
                break;
            }
            // Let the failed step's backlog drain first.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let middle = (low * high).sqrt();
            let result = step(
                &setup,
                &seen,
                groups,
                members,
                middle,
                search_step,
                plan.size,
            )
            .await?;
            log_step(&setup, &plan.scenario, middle, &result);
            if sustains(&result, plan.max_p99_ms) && result.expected > 0 {
                low = middle;
                best = Some(result);
            } else {
                high = middle;
                lost = result.expected.saturating_sub(result.received);
            }
        }
    }
    let Some(best) = best else {
        return Err(format!("not even {}/s was sustained", plan.start_rate));
    };
    let half = if plan.rates.is_empty() {
        // Let the backlog of the failed step drain before measuring at half rate.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rate = best.deliveries_per_sec / 2.0;
        Some(step(&setup, &seen, groups, members, rate, search_step, plan.size).await?)
    } else {
        None
    };
    let (_, rss_kib) = proc_sample(&setup.server_pids);
    let mut result = result_head(&setup, &plan, &fixed);
    let fields = [
        ("deliveries_per_sec", json!(best.deliveries_per_sec.round())),
        ("sustained_rate", json!(low.round())),
        ("cpu_percent_at_best", json!(best.cpu_percent.round())),
        (
            "deliveries_per_cpu_sec_at_best",
            per_cpu_sec(best.received, best.cpu_secs),
        ),
        ("p50_ms_at_best", json!(best.latency_ms[0])),
        ("p99_ms_at_best", json!(best.latency_ms[2])),
        ("lost_in_failed_step", json!(lost)),
        ("rss_kib", json!(rss_kib)),
        ("slow_consumer_closes", json!(closed())),
    ];
    extend(&mut result, fields);
    if let Some(half) = half {
        let fields = [
            ("half_rate", json!((best.deliveries_per_sec / 2.0).round())),
            ("half_expected", json!(half.expected)),
            ("half_received", json!(half.received)),
            ("p50_ms_at_half", json!(half.latency_ms[0])),
            ("p90_ms_at_half", json!(half.latency_ms[1])),
            ("p99_ms_at_half", json!(half.latency_ms[2])),
            ("max_ms_at_half", json!(half.latency_ms[3])),
            ("cpu_percent_at_half", json!(half.cpu_percent.round())),
        ];
        extend(&mut result, fields);
    }
    println!("{result}");
    Ok(())
}

/// What every fan-out result starts with: what ran, and the fixed steps.
fn result_head(setup: &Setup, plan: &FanoutPlan, fixed: &[(f64, Step)]) -> serde_json::Value {
    let delivered = fixed.iter().map(|(_, s)| s.received).sum();
    let cpu_secs: f64 = fixed.iter().map(|(_, s)| s.cpu_secs).sum();
    let kernel_secs: f64 = fixed.iter().map(|(_, s)| s.kernel_secs).sum();
    json!({
        "scenario": plan.scenario,
        "system": setup.system.name(),
        "workers": plan.workers,
        "round": plan.round,
        "conns": plan.conns,
        "groups": plan.groups,
        "rate_secs": plan.rate_secs,
        "fixed": fixed.iter().map(|(rate, s)| step_json(*rate, s)).collect::<Vec<_>>(),
        "deliveries_per_cpu_sec": if fixed.is_empty() { serde_json::Value::Null } else { per_cpu_sec(delivered, cpu_secs) },
        "kernel_share": if cpu_secs > 0.0 { json!((kernel_secs / cpu_secs * 1000.0).round() / 1000.0) } else { serde_json::Value::Null },
    })
}

fn extend<const N: usize>(object: &mut serde_json::Value, fields: [(&str, serde_json::Value); N]) {
    if let Some(map) = object.as_object_mut() {
        for (key, value) in fields {
            map.insert(key.to_owned(), value);
        }
    }
}

/// The first step already failed, and the steps below it too: report it, so the table
/// says how far off it was.
fn report_unsustained(
    setup: &Setup,
    plan: &FanoutPlan,
    rate: f64,
    first: &Step,
    fixed: &[(f64, Step)],
    closes: usize,
) -> Result<(), String> {
    let (_, rss_kib) = proc_sample(&setup.server_pids);
    let mut result = result_head(setup, plan, fixed);
    let fields = [
        ("deliveries_per_sec", json!(0)),
        ("unsustained_rate", json!(rate.round())),
        ("unsustained_received", json!(first.received)),
        ("unsustained_expected", json!(first.expected)),
        ("unsustained_p50_ms", json!(first.latency_ms[0])),
        ("unsustained_p99_ms", json!(first.latency_ms[2])),
        ("cpu_percent_at_best", json!(first.cpu_percent.round())),
        (
            "deliveries_per_cpu_sec_at_best",
            per_cpu_sec(first.received, first.cpu_secs),
        ),
        ("rss_kib", json!(rss_kib)),
        ("slow_consumer_closes", json!(closes)),
    ];
    extend(&mut result, fields);
    println!("{result}");
    Ok(())
}

/// Lock-step fan-out, for counting instructions (`bench/callgrind.sh`): `sockets`
/// subscribers in `groups` groups, and `events` published `burst` at a time (round robin
/// over the groups, all of a burst at once), each burst once the previous one reached every
/// member of its groups (then `gap`). With bursts of one, no run batches writes more than
/// another; bursts of several events per group make every socket's writes queue up, as
/// under load. Channelgate and the raw broadcaster.
pub async fn lockstep(
    setup: Setup,
    sockets: usize,
    groups: usize,
    events: u64,
    burst: u64,
    gap: Duration,
) -> Result<(), String> {
    if groups == 0 || !sockets.is_multiple_of(groups) || burst == 0 {
        return Err(format!(
            "{sockets} sockets do not make {groups} groups of the same size, or bursts of {burst}"
        ));
    }
    let setup = Arc::new(setup);
    let seen = Arc::new(Seen::new());
    let took = open(&setup, 0..sockets, groups, &seen).await?;
    eprintln!(
        "{sockets} sockets subscribed in {:.2} s",
        took.as_secs_f64()
    );
    let members = (sockets / groups) as u64;
    let mut publisher = Publisher::connect(&setup).await?;
    let started = Instant::now();
    let mut first = 0;
    while first < events {
        let end = (first + burst).min(events);
        let bodies = (first..end)
            .map(|n| {
                let group = (n as usize) % groups;
                (group, payload(n, group, 200))
            })
            .collect();
        publisher.publish_burst(bodies).await?;
        let due = end * members;
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.received.load(Ordering::Relaxed) < due {
            if Instant::now() > deadline || seen.closed.load(Ordering::Relaxed) > 0 {
                return Err(format!(
                    "events {first}..{end}: {} of {due} deliveries, {} sockets closed",
                    seen.received.load(Ordering::Relaxed),
                    seen.closed.load(Ordering::Relaxed)
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        first = end;
    }
    let [p50, _, p99, max] = percentiles(&seen.latency.take());
    println!(
        "{} deliveries of {events} events ({burst} at a time) to {sockets} sockets in {groups} \
         groups in {:.2} s; p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
        seen.received.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Idle sockets (S2): RSS per authenticated connection holding one page, read as the
/// sockets reach each count in `counts` (ascending; one server, opened once).
pub async fn idle(setup: Setup, counts: &[usize]) -> Result<(), String> {
    let setup = Arc::new(setup);
    let seen = Arc::new(Seen::new());
    let (_, before) = proc_sample(&setup.server_pids);
    let mut opened = 0;
    for &conns in counts {
        open(&setup, opened..conns.max(opened), 100, &seen).await?;
        opened = opened.max(conns);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (_, after) = proc_sample(&setup.server_pids);
        let result = json!({
            "scenario": "S2",
            "system": setup.system.name(),
            "conns": conns,
            "rss_kib_before": before,
            "rss_kib_after": after,
            "kib_per_conn": ((after.saturating_sub(before)) as f64 / conns as f64 * 100.0).round() / 100.0,
        });
        println!("{result}");
    }
    Ok(())
}

/// Connect storm (S4): every socket connects and subscribes as fast as it goes.
pub async fn storm(setup: Setup, conns: usize) -> Result<(), String> {
    open_as_storm(
        &Arc::new(setup),
        conns,
        100,
        &Arc::new(Seen::new()),
        Some("S4"),
        (None, None),
    )
    .await
}

/// Opens `conns` sockets; with `scenario`, reports the opening as a connect storm (S1's
/// 10,000 sockets are S4's storm, so one opening serves both).
async fn open_as_storm(
    setup: &Arc<Setup>,
    conns: usize,
    groups: usize,
    seen: &Arc<Seen>,
    scenario: Option<&str>,
    (workers, round): (Option<u32>, Option<u32>),
) -> Result<(), String> {
    let (cpu_before, _) = proc_sample(&setup.server_pids);
    let took = open(setup, 0..conns, groups, seen).await?;
    let (cpu_after, rss) = proc_sample(&setup.server_pids);
    if let Some(scenario) = scenario {
        let result = json!({
            "scenario": scenario,
            "system": setup.system.name(),
            "workers": workers,
            "round": round,
            "conns": conns,
            "seconds_to_last_page_add": (took.as_secs_f64() * 1000.0).round() / 1000.0,
            "handshakes_per_sec": (conns as f64 / took.as_secs_f64()).round(),
            "cpu_percent": ((cpu_after - cpu_before) as f64 / TICKS_PER_SEC / took.as_secs_f64() * 100.0).round(),
            "rss_kib": rss,
        });
        println!("{result}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_and_percentiles() {
        assert_eq!(
            stamp(br#"{"type":"bench","n":1,"ts":1234,"g":0}"#),
            Some(1234)
        );
        assert_eq!(stamp(br#"{"type":"x"}"#), None);
        assert_eq!(
            stamp(br#"{"event":"bench","channel":"table-0","data":"{\"n\":1,\"ts\":99}"}"#),
            Some(99)
        );
        let h = Histogram::new();
        for us in [100, 200, 300, 400, 10_000] {
            h.record(us);
        }
        let [p50, _, p99, max] = percentiles(&h.take());
        assert!((0.3..0.32).contains(&p50), "{p50}");
        assert!((10.0..10.02).contains(&p99), "{p99}");
        assert!((10.0..10.02).contains(&max), "{max}");
        assert!(has_event_id(
            br#"{"type":"bench","ts":1,"_event_id":1800000000000000}"#
        ));
        assert!(!has_event_id(br#"{"type":"bench","ts":1}"#));
        let body = payload(7, 3, 200);
        assert_eq!(body.len(), 200);
        assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok());
    }
}
