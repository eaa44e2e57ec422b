//! The event-history scenarios: what recording every event costs a publish (H1, history on
//! against off), how fast one socket replays a long backlog (R1), and a replay storm after
//! a node is lost (R2). Each prints JSON lines like the other scenarios.
//!
//! Replaying sockets speak the replay protocol themselves (DESIGN §6): every frame is either
//! an event, whose history id is the last key the gateway appended (`,"_event_id":N}`), or a
//! control frame, parsed as JSON. Anything else is an error naming the socket and the frame.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use channelgate::identity::sign_access_token;
use channelgate::proto::gateway_client::GatewayClient;
use channelgate::proto::{PublishBatchRequest, PublishRequest, publish_request::Target};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tonic::transport::Channel;

use crate::client::{Client, Frame};
use crate::load::{self, Seen, Setup};

/// How long one connect, handshake, authentication or subscribe may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one replay may take, retries included.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(60);
/// Retries one replay may be told before it counts as failed.
const MAX_RETRIES: u32 = 30;
/// The longest `retry_after_ms` honoured; a larger one is an error, not a wait.
const MAX_RETRY_AFTER_MS: u64 = 10_000;
/// Events per PublishBatch call when a backlog is published.
const BATCH: usize = 500;
/// How long a socket keeps listening after its `replay_events_result`, for events still
/// owed to it (live ones held back during the replay are sent after the result).
const DRAIN: Duration = Duration::from_millis(300);

/// H1: the cost of a publish with history on or off, at one fixed fan-out rate. Opens the
/// sockets, warms up for a second, then measures `secs` at `deliveries_per_sec`.
#[allow(clippy::too_many_arguments)]
pub async fn publish_cost(
    setup: Setup,
    conns: usize,
    groups: usize,
    deliveries_per_sec: f64,
    secs: f64,
    size: usize,
    history: &str,
    round: u32,
) -> Result<(), String> {
    let setup = Arc::new(setup);
    let seen = Arc::new(Seen::new());
    if groups == 0 || conns < groups {
        return Err(format!(
            "H1 needs at least one socket per group ({conns} sockets, {groups} groups)"
        ));
    }
    load::open(&setup, 0..conns, groups, &seen).await?;
    let members = conns / groups;
    let warm = Duration::from_secs(1);
    load::step(
        &setup,
        &seen,
        groups,
        members,
        deliveries_per_sec,
        warm,
        size,
    )
    .await?;
    let ids_before = seen.with_event_id.load(Ordering::Relaxed);
    let duration = Duration::from_secs_f64(secs);
    let step = load::step(
        &setup,
        &seen,
        groups,
        members,
        deliveries_per_sec,
        duration,
        size,
    )
    .await?;
    let with_ids = seen.with_event_id.load(Ordering::Relaxed) - ids_before;
    let label = format!("H1 history {history}, {} node(s)", setup.ws_addrs.len());
    load::log_step(&setup, &label, deliveries_per_sec, &step);
    let (_, rss_kib) = load::proc_sample(&setup.server_pids);
    let per_1000 = if step.events > 0 {
        step.cpu_secs * 1000.0 * 1000.0 / step.events as f64
    } else {
        0.0
    };
    let result = json!({
        "scenario": "H1",
        "system": setup.system.name(),
        "nodes": setup.ws_addrs.len(),
        "history": history,
        "round": round,
        "conns": conns,
        "groups": groups,
        "target_deliveries_per_sec": deliveries_per_sec.round(),
        "secs": secs,
        "events": step.events,
        "expected": step.expected,
        "received": step.received,
        "deliveries_with_event_id": with_ids,
        "cpu_percent": (step.cpu_percent * 10.0).round() / 10.0,
        "cpu_ms_per_1000_events": (per_1000 * 10.0).round() / 10.0,
        "p50_ms": step.latency_ms[0],
        "p99_ms": step.latency_ms[2],
        "max_ms": step.latency_ms[3],
        "rss_kib": rss_kib,
        "slow_consumer_closes": seen.closed.load(Ordering::Relaxed),
    });
    println!("{result}");
    Ok(())
}

/// R1: `events` events published to one group nobody listens to, then `replays` sockets,
/// one after another, replay them all from a cursor taken before them. The first address
/// of `setup.ws_addrs` serves the replays; `setup.grpc_addr` publishes (another node on
/// Redis shows a replay on a node other than the publisher's).
pub async fn replay_one(
    setup: Setup,
    events: usize,
    replays: usize,
    size: usize,
    store: &str,
) -> Result<(), String> {
    let addr = setup.ws_addrs[0];
    let table = 1;
    // The cursor: the highest id before the backlog, as a first connect gets it. This
    // socket holds no page: had it subscribed, its node would still be receiving the
    // backlog from Redis pub/sub when the replaying socket subscribes, which would get the
    // tail of it live.
    let mut first = Conn::open(addr, &setup.jwt_secret, 1, "r1-cursor").await?;
    let baseline = first.replay(-1, Duration::ZERO).await?;
    let cursor = baseline.latest;
    if !baseline.events.is_empty() || baseline.force_refresh {
        return Err(format!(
            "R1: the baseline replay was not empty: {baseline:?}"
        ));
    }
    drop(first);

    let mut grpc = grpc(&setup.grpc_addr).await?;
    let bodies: Vec<_> = (0..events)
        .map(|n| {
            (
                format!("table-{table}"),
                load::payload(n as u64, table, size),
            )
        })
        .collect();
    let started = Instant::now();
    let ids = publish_all(&mut grpc, bodies).await?;
    let publish_secs = started.elapsed().as_secs_f64();
    check_increasing(&ids, cursor)?;

    let mut replay_ms = Vec::with_capacity(replays);
    let mut first_event_ms = Vec::with_capacity(replays);
    let mut retries = 0;
    let mut problems = Vec::new();
    for i in 0..replays {
        let mut conn = Conn::open(addr, &setup.jwt_secret, 1, &format!("r1-{i}")).await?;
        conn.subscribe(table).await?;
        let replay = conn.replay(cursor, DRAIN).await?;
        retries += replay.retries;
        replay_ms.push(ms(replay.took));
        first_event_ms.push(replay.first_event.map(ms).unwrap_or(0.0));
        if let Some(problem) = check_replay(&replay, &ids, cursor) {
            eprintln!("R1 {store}, replay {i}: {problem}");
            problems.push(problem);
        }
    }
    let median_ms = median(&replay_ms);
    let result = json!({
        "scenario": "R1",
        "system": setup.system.name(),
        "store": store,
        "events": events,
        "replays": replays,
        "replay_ms": replay_ms,
        "median_ms": median_ms,
        "events_per_sec": if median_ms > 0.0 { (events as f64 / median_ms * 1000.0).round() } else { 0.0 },
        "first_event_ms_median": median(&first_event_ms),
        "retries": retries,
        "bad_replays": problems.len(),
        "problems": problems.iter().take(3).collect::<Vec<_>>(),
        "publish_batched_events_per_sec": (events as f64 / publish_secs).round(),
    });
    eprintln!("R1 {store}: {events} events replayed in {median_ms:.1} ms (median of {replays})");
    println!("{result}");
    Ok(())
}

/// R2: `sockets` sockets on node A (`setup.ws_addrs[0]`), each with its own web_socket_id,
/// over `groups` groups, take a baseline; node A is killed (`kill_pid`, SIGKILL: no
/// goodbye); `per_group` events per group are published through node B
/// (`setup.grpc_addr`); then every socket reconnects to node B (`setup.ws_addrs[1]`) at
/// once, subscribes again and replays, retrying when told to.
pub async fn replay_storm(
    setup: Setup,
    sockets: usize,
    groups: usize,
    per_group: usize,
    kill_pid: u32,
) -> Result<(), String> {
    let [node_a, node_b] = setup.ws_addrs[..] else {
        return Err("R2 needs --ws-addr NODE_A,NODE_B".into());
    };
    if groups == 0 || sockets == 0 {
        return Err("R2 needs at least one socket and one group".into());
    }
    let secret = Arc::new(setup.jwt_secret.clone());
    let ws_id = |i: usize| format!("r2-socket-{i}");
    let user = |i: usize| 1 + i as i64;
    let table = move |i: usize| i % groups;

    // Before the loss: every socket on A, subscribed, with its baseline.
    let mut opened = Vec::with_capacity(sockets);
    for i in 0..sockets {
        let secret = secret.clone();
        opened.push(tokio::spawn(async move {
            let mut conn = Conn::open(node_a, &secret, user(i), &ws_id(i)).await?;
            conn.subscribe(table(i)).await?;
            let baseline = conn.replay(-1, Duration::ZERO).await?;
            if baseline.force_refresh || !baseline.events.is_empty() {
                return Err(format!("{}: baseline {baseline:?}", conn.name));
            }
            Ok::<_, String>((conn, baseline.latest))
        }));
    }
    let mut cursors = Vec::with_capacity(sockets);
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
    for task in opened {
        let (mut conn, cursor) = task.await.map_err(|e| format!("R2 opening: {e}"))??;
        cursors.push(cursor);
        // Held until the node dies; anything it still sends is a problem.
        let closed = closed_tx.clone();
        tokio::spawn(async move {
            let mut stray = None;
            let deadline = Instant::now() + Duration::from_secs(120);
            while let Ok(incoming) = conn.next(deadline).await {
                stray.get_or_insert(format!("{}: got {incoming:?} before the loss", conn.name));
            }
            let _ = closed.send(stray);
        });
    }
    drop(closed_tx);
    eprintln!("R2: {sockets} sockets on node A with their baselines; killing it");

    let killed = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &kill_pid.to_string()])
        .status()
        .map_err(|e| format!("kill {kill_pid}: {e}"))?;
    if !status.success() {
        return Err(format!("kill -KILL {kill_pid}: {status}"));
    }
    let mut problems = Vec::new();
    let mut seen_closed = 0;
    while seen_closed < sockets {
        match tokio::time::timeout(Duration::from_secs(10), closed_rx.recv()).await {
            Ok(Some(stray)) => {
                seen_closed += 1;
                problems.extend(stray);
            }
            Ok(None) => break,
            Err(_) => {
                return Err(format!(
                    "R2: only {seen_closed} of {sockets} sockets saw node A go within 10 s"
                ));
            }
        }
    }
    let all_closed_secs = killed.elapsed().as_secs_f64();

    // While they are away: per_group events per group, the groups interleaved, through B.
    let mut grpc = grpc(&setup.grpc_addr).await?;
    let bodies: Vec<_> = (0..per_group * groups)
        .map(|n| {
            let g = n % groups;
            (format!("table-{g}"), load::payload(n as u64, g, 200))
        })
        .collect();
    let ids = publish_all(&mut grpc, bodies).await?;
    let highest_cursor = cursors.iter().copied().max().unwrap_or(0);
    check_increasing(&ids, highest_cursor)?;
    let mut expected = vec![Vec::with_capacity(per_group); groups];
    for (n, id) in ids.into_iter().enumerate() {
        expected[n % groups].push(id);
    }
    let expected = Arc::new(expected);

    // The storm: everyone back at once, on B.
    let (cpu_before, _) = load::proc_sample(&setup.server_pids);
    let storm = Instant::now();
    let mut back = Vec::with_capacity(sockets);
    for (i, cursor) in cursors.into_iter().enumerate() {
        let (secret, expected) = (secret.clone(), expected.clone());
        back.push(tokio::spawn(async move {
            let mut conn = Conn::open(node_b, &secret, user(i), &ws_id(i)).await?;
            conn.subscribe(table(i)).await?;
            let replay = conn.replay(cursor, DRAIN).await?;
            let problem = check_replay(&replay, &expected[table(i)], cursor)
                .map(|p| format!("{}: {p}", conn.name));
            let done = replay.result_at.duration_since(storm);
            Ok::<_, String>((replay.took, replay.served, replay.retries, done, problem))
        }));
    }
    let mut took_ms = Vec::with_capacity(sockets);
    let mut served_ms = Vec::with_capacity(sockets);
    let mut max_retries = 0;
    let mut retries = 0;
    let mut with_retries = 0;
    let mut wall = Duration::ZERO;
    let mut failed = 0;
    for task in back {
        match task.await.map_err(|e| format!("R2 storm: {e}"))? {
            Ok((took, served, n, done, problem)) => {
                took_ms.push(ms(took));
                served_ms.push(ms(served));
                max_retries = max_retries.max(n);
                retries += n;
                with_retries += usize::from(n > 0);
                wall = wall.max(done);
                if let Some(problem) = problem {
                    failed += 1;
                    problems.push(problem);
                }
            }
            Err(error) => {
                failed += 1;
                problems.push(error);
            }
        }
    }
    let (cpu_after, rss_kib) = load::proc_sample(&setup.server_pids);
    for problem in problems.iter().take(5) {
        eprintln!("R2 problem: {problem}");
    }
    let pick = |p: f64| quantile(&took_ms, p);
    let result = json!({
        "scenario": "R2",
        "system": setup.system.name(),
        "sockets": sockets,
        "groups": groups,
        "events_per_group": per_group,
        "sockets_closed_after_kill_secs": round3(all_closed_secs),
        "p50_ms": pick(0.5),
        "p99_ms": pick(0.99),
        "max_ms": pick(1.0),
        "wall_secs": round3(wall.as_secs_f64()),
        "served_p50_ms": quantile(&served_ms, 0.5),
        "served_p99_ms": quantile(&served_ms, 0.99),
        "retries": retries,
        "sockets_that_retried": with_retries,
        "max_retries_of_a_socket": max_retries,
        "bad_sockets": failed,
        "problems": problems.iter().take(5).collect::<Vec<_>>(),
        "cpu_percent": ((cpu_after.saturating_sub(cpu_before)) as f64 / load::TICKS_PER_SEC
            / storm.elapsed().as_secs_f64() * 100.0).round(),
        "rss_kib": rss_kib,
    });
    eprintln!(
        "R2: {sockets} replays in {:.2} s, p99 {:.1} ms, {retries} retries, {failed} bad sockets",
        wall.as_secs_f64(),
        pick(0.99)
    );
    println!("{result}");
    Ok(())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1000.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The value at rank `p` (0 to 1) of `values`, nearest rank.
fn quantile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0.0)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

async fn grpc(addr: &str) -> Result<GatewayClient<Channel>, String> {
    GatewayClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| format!("gRPC connect {addr}: {e}"))
}

/// Publishes `(group, payload)` in order, `BATCH` per PublishBatch; the ids, in order.
async fn publish_all(
    grpc: &mut GatewayClient<Channel>,
    bodies: Vec<(String, String)>,
) -> Result<Vec<u64>, String> {
    let mut ids = Vec::with_capacity(bodies.len());
    let mut bodies = bodies.into_iter().peekable();
    while bodies.peek().is_some() {
        let events: Vec<_> = bodies
            .by_ref()
            .take(BATCH)
            .map(|(group, payload)| PublishRequest {
                target: Some(Target::Group(group)),
                payload,
                ..Default::default()
            })
            .collect();
        let sent = events.len();
        let answer = grpc
            .publish_batch(PublishBatchRequest { events })
            .await
            .map_err(|status| format!("PublishBatch of {sent} events: {status}"))?
            .into_inner();
        if answer.event_ids.len() != sent {
            return Err(format!(
                "PublishBatch of {sent} events answered {} ids",
                answer.event_ids.len()
            ));
        }
        ids.extend(answer.event_ids);
    }
    Ok(ids)
}

/// Published ids must all be above the cursor and increase (DESIGN §6).
fn check_increasing(ids: &[u64], cursor: i64) -> Result<(), String> {
    let mut last = cursor.max(0) as u64;
    for (n, &id) in ids.iter().enumerate() {
        if id <= last {
            return Err(format!(
                "published event {n} got id {id}, not above {last} (the cursor or the previous id)"
            ));
        }
        last = id;
    }
    Ok(())
}

/// What is wrong with a replay that should have brought exactly `expected`, if anything.
fn check_replay(replay: &Replay, expected: &[u64], cursor: i64) -> Option<String> {
    if replay.force_refresh {
        return Some(format!(
            "force_refresh with latest_event_id {} after {} events (cursor {cursor})",
            replay.latest,
            replay.events.len()
        ));
    }
    // Each id once, replayed or (held back during the replay) sent after the result.
    let all: Vec<u64> = replay.events.iter().chain(&replay.late).copied().collect();
    let mut sorted = all.clone();
    sorted.sort_unstable();
    sorted.dedup();
    let duplicates = all.len() - sorted.len();
    let missing = expected
        .iter()
        .filter(|id| sorted.binary_search(id).is_err())
        .count();
    let foreign = sorted
        .iter()
        .filter(|id| expected.binary_search(id).is_err())
        .count();
    let mut problems = Vec::new();
    if replay.events.len() != expected.len() {
        problems.push(format!(
            "{} events before the result, not {}",
            replay.events.len(),
            expected.len()
        ));
    }
    if !replay.late.is_empty() {
        problems.push(format!("{} more after it", replay.late.len()));
    }
    if duplicates > 0 {
        problems.push(format!("{duplicates} duplicates"));
    }
    if missing > 0 {
        problems.push(format!("{missing} missing"));
    }
    if foreign > 0 {
        problems.push(format!("{foreign} not of its group or not published"));
    }
    if problems.is_empty()
        && let Some(at) = all.iter().zip(expected).position(|(a, b)| a != b)
    {
        problems.push(format!(
            "out of id order: event {at} of {} is id {}, not {} (cursor {cursor}, ids from {} to {})",
            expected.len(),
            all[at],
            expected[at],
            expected[0],
            expected[expected.len() - 1],
        ));
    }
    let last = expected.last().map_or(cursor, |&id| id as i64);
    if replay.latest != last {
        problems.push(format!("latest_event_id {}, not {last}", replay.latest));
    }
    (!problems.is_empty()).then(|| problems.join(", "))
}

/// One frame a replaying socket got.
#[derive(Debug)]
enum Incoming {
    /// An event, by its history id.
    Event(u64),
    /// Any other frame, parsed.
    Control(Value),
}

/// What one `replay_events` brought, retries included.
#[derive(Debug)]
struct Replay {
    /// The ids of the events before the result, in arrival order.
    events: Vec<u64>,
    /// Events after the result, within the drain time asked for.
    late: Vec<u64>,
    result_at: Instant,
    latest: i64,
    force_refresh: bool,
    retries: u32,
    /// From the first `replay_events` sent to the result, and to the first event.
    took: Duration,
    first_event: Option<Duration>,
    /// From the last `replay_events` sent (the one served) to the result.
    served: Duration,
}

/// A socket that speaks the replay protocol.
struct Conn {
    ws: Client,
    queue: VecDeque<Incoming>,
    name: String,
}

/// The history id at the end of an event frame: `,"_event_id":N}`. `None` when the frame
/// has none (a control frame), an error when it has one that is not a number.
fn event_id(text: &[u8]) -> Option<Result<u64, String>> {
    const KEY: &[u8] = b",\"_event_id\":";
    let tail_start = text.len().saturating_sub(40);
    let at = text[tail_start..]
        .windows(KEY.len())
        .rposition(|w| w == KEY)?
        + tail_start;
    let digits = &text[at + KEY.len()..];
    let digits = digits.strip_suffix(b"}").unwrap_or(digits);
    let parsed = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<u64>().ok());
    Some(parsed.ok_or_else(|| format!("an _event_id that is not a number: {}", snippet(text))))
}

fn snippet(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let mut short: String = text.chars().take(200).collect();
    if short.len() < text.len() {
        short.push_str("...");
    }
    short
}

impl Conn {
    /// Connects, handshakes and checks the authentication frame: success, replay enabled,
    /// and our own `web_socket_id` kept.
    async fn open(
        addr: SocketAddr,
        secret: &str,
        user_id: i64,
        web_socket_id: &str,
    ) -> Result<Conn, String> {
        let name = format!("socket {web_socket_id} on {addr}");
        let token = sign_access_token(secret.as_bytes(), "user_id", user_id, 3600)
            .map_err(|e| format!("{name}: token: {e}"))?;
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let ws = tokio::time::timeout_at(deadline.into(), async {
            let stream = TcpStream::connect(addr).await?;
            let _ = stream.set_nodelay(true);
            let path = format!("/ws/core/?jwt_token={token}&web_socket_id={web_socket_id}");
            Client::connect(stream, &addr.to_string(), &path).await
        })
        .await
        .map_err(|_| format!("{name}: no handshake within {SETUP_TIMEOUT:?}"))?
        .map_err(|e| format!("{name}: connect: {e}"))?;
        let mut conn = Conn {
            ws,
            queue: VecDeque::new(),
            name,
        };
        let auth = conn.control(deadline, &mut Vec::new()).await?;
        let field = |key: &str| auth.get(key).cloned().unwrap_or(Value::Null);
        if field("type") != "authentication" || field("success") != true {
            return Err(format!("{}: authentication failed: {auth}", conn.name));
        }
        if field("replay_enabled") != true {
            return Err(format!("{}: replay_enabled is not true: {auth}", conn.name));
        }
        if field("web_socket_id") != web_socket_id {
            return Err(format!("{}: web_socket_id not kept: {auth}", conn.name));
        }
        Ok(conn)
    }

    /// Subscribes to the page of table `table_id`; events before its `page_add` are errors.
    async fn subscribe(&mut self, table_id: usize) -> Result<(), String> {
        let page = format!(r#"{{"page":"table","table_id":{table_id}}}"#);
        self.send(&page).await?;
        let mut events = Vec::new();
        let answer = self
            .control(Instant::now() + SETUP_TIMEOUT, &mut events)
            .await?;
        if answer.get("type").and_then(Value::as_str) != Some("page_add") || !events.is_empty() {
            return Err(format!(
                "{}: subscribe to table {table_id} answered {answer} after {} events",
                self.name,
                events.len()
            ));
        }
        Ok(())
    }

    /// Sends `replay_events` from `last_seen_id` with `supports_retry`, resending after
    /// `retry_after_ms` when told to, until `replay_events_result`; then listens for `drain`
    /// for events that come after it.
    async fn replay(&mut self, last_seen_id: i64, drain: Duration) -> Result<Replay, String> {
        let request = json!({"type": "replay_events", "last_seen_id": last_seen_id,
            "supports_retry": true})
        .to_string();
        let started = Instant::now();
        let deadline = started + REPLAY_TIMEOUT;
        let mut events = Vec::new();
        let mut first_event = None;
        let mut retries = 0;
        let mut sent = started;
        self.send(&request).await?;
        loop {
            let incoming = self.next(deadline).await?;
            let frame = match incoming {
                Incoming::Event(id) => {
                    first_event.get_or_insert_with(|| started.elapsed());
                    events.push(id);
                    continue;
                }
                Incoming::Control(frame) => frame,
            };
            match frame.get("type").and_then(Value::as_str) {
                Some("replay_events_result") => {
                    let latest = frame.get("latest_event_id").and_then(Value::as_i64);
                    let force_refresh = frame.get("force_refresh").and_then(Value::as_bool);
                    let (Some(latest), Some(force_refresh)) = (latest, force_refresh) else {
                        return Err(format!("{}: malformed result: {frame}", self.name));
                    };
                    let result_at = Instant::now();
                    let took = result_at - started;
                    let served = result_at - sent;
                    let late = self.drain(result_at + drain).await?;
                    return Ok(Replay {
                        events,
                        late,
                        result_at,
                        latest,
                        force_refresh,
                        retries,
                        took,
                        first_event,
                        served,
                    });
                }
                Some("replay_events_retry") => {
                    let after = frame.get("retry_after_ms").and_then(Value::as_u64);
                    let Some(after) = after.filter(|ms| *ms <= MAX_RETRY_AFTER_MS) else {
                        return Err(format!("{}: malformed retry: {frame}", self.name));
                    };
                    retries += 1;
                    if retries > MAX_RETRIES {
                        return Err(format!("{}: told to retry {retries} times", self.name));
                    }
                    tokio::time::sleep(Duration::from_millis(after)).await;
                    sent = Instant::now();
                    self.send(&request).await?;
                }
                _ => {
                    return Err(format!(
                        "{}: during a replay from {last_seen_id}: {frame}",
                        self.name
                    ));
                }
            }
        }
    }

    /// Events that arrive until `until`; any other frame is an error.
    async fn drain(&mut self, until: Instant) -> Result<Vec<u64>, String> {
        let mut late = Vec::new();
        while Instant::now() < until {
            match self.next(until).await {
                Ok(Incoming::Event(id)) => late.push(id),
                Ok(Incoming::Control(frame)) => {
                    return Err(format!("{}: after the replay's result: {frame}", self.name));
                }
                Err(_) if Instant::now() >= until => break,
                Err(error) => return Err(error),
            }
        }
        Ok(late)
    }

    /// The next control frame; events before it go to `events`.
    async fn control(&mut self, deadline: Instant, events: &mut Vec<u64>) -> Result<Value, String> {
        loop {
            match self.next(deadline).await? {
                Incoming::Event(id) => events.push(id),
                Incoming::Control(frame) => return Ok(frame),
            }
        }
    }

    async fn send(&mut self, text: &str) -> Result<(), String> {
        self.ws
            .send_text(text)
            .await
            .map_err(|e| format!("{}: send: {e}", self.name))
    }

    /// The next frame, reading more when none is buffered.
    async fn next(&mut self, deadline: Instant) -> Result<Incoming, String> {
        loop {
            if let Some(incoming) = self.queue.pop_front() {
                return Ok(incoming);
            }
            let Conn { ws, queue, name } = self;
            let mut error = None;
            let mut closed = false;
            let read = ws.read_frames(|frame| match frame {
                Frame::Text(text) => match event_id(text) {
                    Some(Ok(id)) => queue.push_back(Incoming::Event(id)),
                    Some(Err(e)) => {
                        error.get_or_insert(e);
                    }
                    None => match serde_json::from_slice(text) {
                        Ok(value) => queue.push_back(Incoming::Control(value)),
                        Err(e) => {
                            error.get_or_insert(format!("not JSON ({e}): {}", snippet(text)));
                        }
                    },
                },
                Frame::Close => closed = true,
                Frame::Other => {}
            });
            let open = tokio::time::timeout_at(deadline.into(), read)
                .await
                .map_err(|_| format!("{name}: nothing more arrived in time"))?
                .map_err(|e| format!("{name}: read: {e}"))?;
            if let Some(error) = error {
                return Err(format!("{name}: {error}"));
            }
            if (!open || closed) && queue.is_empty() {
                return Err(format!("{name}: closed by the server"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_and_replay_checks() {
        assert_eq!(
            event_id(br#"{"type":"bench","n":1,"_event_id":1800000000000001}"#),
            Some(Ok(1_800_000_000_000_001))
        );
        assert_eq!(
            event_id(br#"{"type":"replay_events_result","latest_event_id":5}"#),
            None
        );
        assert!(matches!(
            event_id(br#"{"type":"bench","_event_id":"x"}"#),
            Some(Err(_))
        ));
        let replay = |events: Vec<u64>, latest| Replay {
            events,
            late: Vec::new(),
            result_at: Instant::now(),
            latest,
            force_refresh: false,
            retries: 0,
            took: Duration::ZERO,
            first_event: None,
            served: Duration::ZERO,
        };
        assert_eq!(check_replay(&replay(vec![2, 3], 3), &[2, 3], 1), None);
        assert_eq!(
            check_replay(&replay(vec![2, 2, 3], 3), &[2, 3], 1).as_deref(),
            Some("3 events before the result, not 2, 1 duplicates")
        );
        assert_eq!(
            check_replay(&replay(vec![3, 2], 3), &[2, 3], 1).as_deref(),
            Some("out of id order: event 0 of 2 is id 3, not 2 (cursor 1, ids from 2 to 3)")
        );
        assert_eq!(check_replay(&replay(vec![], 1), &[], 1), None);
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
    }
}
