//! S6, publish ingest: how many events a second the gRPC API takes in and the sockets get,
//! when every event goes to a different group. `groups` groups with one subscriber socket
//! each (spread over the `--ws-addr` nodes, round robin; socket `i` holds `table-{i}`), and
//! two phases through `--grpc-addr`, on one HTTP/2 connection:
//!
//! - `publish`: `in_flight` tasks each call Publish (one event, the next group round robin)
//!   and call again when it answers, for `secs`;
//! - `batch`: `batch_in_flight` tasks each call PublishBatch with `batch` events (the next
//!   groups round robin) the same way.
//!
//! Every event carries its number, its group and its send time; each socket checks that an
//! event is of its group and times it. An event accepted (the call answered OK) and never
//! delivered counts as missing, one delivered twice as a duplicate. Prints a JSON line per
//! phase.
//!
//! With `keys`, every event carries an idempotency key of its own (32 hex characters, as a
//! client's uuid4 hex), so the server checks and records one key per event; without, none.
//!
//! [`count`] publishes a fixed number of events instead, for counts that do not depend on
//! time (instructions under callgrind, Redis memory per key).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use channelgate::proto::gateway_client::GatewayClient;
use channelgate::proto::{PublishBatchRequest, PublishRequest};
use serde_json::json;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::load::{self, Counter, Histogram, Setup};

/// What S6 runs.
pub struct Plan {
    pub groups: usize,
    pub secs: f64,
    pub in_flight: usize,
    pub batch: usize,
    pub batch_in_flight: usize,
    pub size: usize,
    pub round: u32,
    /// An idempotency key on every event.
    pub keys: bool,
    /// Labels the result: where the events go between nodes (memory, redis, cluster).
    pub bus: String,
}

/// A key for event `n` of a run seeded with `seed`: 32 hex characters that look random,
/// like a client's `uuid.uuid4().hex`, and differ for every event of the run.
/// Publish requests numbered `numbers`, to the groups round robin, each payload stamped
/// with its send time; with `key_seed`, each with its idempotency key.
fn numbered_requests(
    numbers: std::ops::Range<u64>,
    groups: u64,
    size: usize,
    key_seed: Option<u64>,
) -> Vec<PublishRequest> {
    numbers
        .map(|n| {
            let group = (n % groups) as usize;
            let mut request = load::publish_request(group, load::payload(n, group, size));
            if let Some(seed) = key_seed {
                request.idempotency_key = idempotency_key(seed, n);
            }
            request
        })
        .collect()
}

pub(crate) fn idempotency_key(seed: u64, n: u64) -> String {
    fn mix(mut z: u64) -> u64 {
        // splitmix64's finaliser: a bijection, so distinct inputs give distinct halves.
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let high = mix(n ^ seed);
    format!("{high:016x}{:016x}", mix(high ^ seed.rotate_left(32)))
}

/// A seed for a run's keys, so that runs against the same Redis never share a key.
pub(crate) fn key_seed() -> u64 {
    load::now_micros() ^ (u64::from(std::process::id()) << 40)
}

/// Event numbers checked for loss and duplicates (two bits each): 16.7 million, far more
/// than a phase publishes on a machine like this one; those past it are only counted.
const CHECKED_EVENTS: usize = 1 << 24;
/// Stragglers: a phase ends when every accepted event arrived, or after this long without
/// a delivery, or at `DRAIN_MAX` in any case.
const QUIET: Duration = Duration::from_secs(3);
const DRAIN_MAX: Duration = Duration::from_secs(60);
/// Between the phases, for the server's queues to settle.
const PAUSE: Duration = Duration::from_secs(1);

/// A bit per event number.
struct Bits(Vec<AtomicU64>);

impl Bits {
    fn new() -> Self {
        Bits(
            (0..CHECKED_EVENTS / 64)
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }

    /// Sets bit `n`; whether it was set already (`None` past the end).
    fn set(&self, n: u64) -> Option<bool> {
        let word = self.0.get((n / 64) as usize)?;
        let bit = 1 << (n % 64);
        Some(word.fetch_or(bit, Ordering::Relaxed) & bit != 0)
    }

    fn get(&self, n: u64) -> bool {
        self.0
            .get((n / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (n % 64)) != 0)
    }
}

/// What the sockets and the publisher have seen, shared.
struct Tally {
    received: AtomicU64,
    latency: Histogram,
    /// `now_micros()` of the latest delivery.
    last_at_us: AtomicU64,
    delivered: Bits,
    accepted: Bits,
    duplicates: AtomicU64,
    /// Events that reached a socket not of their group.
    wrong_socket: AtomicU64,
    /// Sockets the server closed (or lost).
    closed: AtomicUsize,
}

impl Tally {
    fn new() -> Self {
        Tally {
            received: AtomicU64::new(0),
            latency: Histogram::new(),
            last_at_us: AtomicU64::new(0),
            delivered: Bits::new(),
            accepted: Bits::new(),
            duplicates: AtomicU64::new(0),
            wrong_socket: AtomicU64::new(0),
            closed: AtomicUsize::new(0),
        }
    }
}

impl Counter for Tally {
    fn on_text(&self, text: &[u8], group: usize) {
        let (Some(ts), Some(n), Some(g)) = (
            load::number_after(text, b"\"ts\":"),
            load::number_after(text, b"\"n\":"),
            load::number_after(text, b"\"g\":"),
        ) else {
            return;
        };
        let now = load::now_micros();
        self.latency.record(now.saturating_sub(ts));
        self.last_at_us.fetch_max(now, Ordering::Relaxed);
        self.received.fetch_add(1, Ordering::Relaxed);
        if g != group as u64 {
            self.wrong_socket.fetch_add(1, Ordering::Relaxed);
        }
        if self.delivered.set(n) == Some(true) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_closed(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// One phase's publishing: calls, events accepted, calls failed and the first failure.
#[derive(Default)]
struct Calls {
    calls: AtomicU64,
    accepted: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Calls {
    fn fail(&self, error: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(error);
    }
}

/// One phase: `tasks` callers, each sending `batch` events per call (Publish when 1,
/// PublishBatch otherwise) until `secs` have passed, then the stragglers.
#[allow(clippy::too_many_arguments)]
async fn phase(
    setup: &Setup,
    plan: &Plan,
    tally: &Arc<Tally>,
    grpc: &GatewayClient<Channel>,
    next: &Arc<AtomicU64>,
    mode: &str,
    batch: usize,
    tasks: usize,
) -> Result<serde_json::Value, String> {
    let groups = plan.groups as u64;
    let received_before = tally.received.load(Ordering::Relaxed);
    tally.latency.take();
    let first_event = next.load(Ordering::Relaxed);
    let (user_before, kernel_before) = load::proc_times(&setup.server_pids);
    let (own_before, _) = load::proc_sample(&[std::process::id()]);
    let calls = Arc::new(Calls::default());
    let seed = key_seed();
    let started = Instant::now();
    let started_us = load::now_micros();
    let deadline = started + Duration::from_secs_f64(plan.secs);
    let mut callers = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let (mut grpc, next, calls, tally) =
            (grpc.clone(), next.clone(), calls.clone(), tally.clone());
        let (size, keys) = (plan.size, plan.keys);
        callers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let first = next.fetch_add(batch as u64, Ordering::Relaxed);
                let mut events = numbered_requests(
                    first..first + batch as u64,
                    groups,
                    size,
                    keys.then_some(seed),
                );
                calls.calls.fetch_add(1, Ordering::Relaxed);
                let answer = if batch == 1 {
                    let request = events.pop().unwrap_or_default();
                    tokio::time::timeout(load::PUBLISH_TIMEOUT, grpc.publish(request))
                        .await
                        .map(|r| r.map(|_| ()))
                } else {
                    let request = PublishBatchRequest { events };
                    tokio::time::timeout(load::PUBLISH_TIMEOUT, grpc.publish_batch(request))
                        .await
                        .map(|r| r.map(|_| ()))
                };
                match answer {
                    Ok(Ok(())) => {
                        calls.accepted.fetch_add(batch as u64, Ordering::Relaxed);
                        for n in first..first + batch as u64 {
                            tally.accepted.set(n);
                        }
                    }
                    Ok(Err(status)) => {
                        calls.fail(format!("{:?}: {}", status.code(), status.message()))
                    }
                    Err(_) => calls.fail("timed out".into()),
                }
            }
        }));
    }
    for caller in callers {
        caller.await.map_err(|e| format!("publisher task: {e}"))?;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let accepted = calls.accepted.load(Ordering::Relaxed);
    let last_event = next.load(Ordering::Relaxed);

    let deadline = Some(started + DRAIN_MAX);
    load::drain(&tally.received, received_before, accepted, QUIET, deadline).await;
    let window_secs = started.elapsed().as_secs_f64();
    let (user_after, kernel_after) = load::proc_times(&setup.server_pids);
    let (_, rss_kib) = load::proc_sample(&setup.server_pids);
    let (own_after, _) = load::proc_sample(&[std::process::id()]);
    let delivered = tally.received.load(Ordering::Relaxed) - received_before;
    let kernel_secs = kernel_after.saturating_sub(kernel_before) as f64 / load::TICKS_PER_SEC;
    let cpu_secs =
        user_after.saturating_sub(user_before) as f64 / load::TICKS_PER_SEC + kernel_secs;
    let own_secs = (own_after - own_before) as f64 / load::TICKS_PER_SEC;
    let checked_end = last_event.min(CHECKED_EVENTS as u64);
    let missing = (first_event.min(checked_end)..checked_end)
        .filter(|&n| tally.accepted.get(n) && !tally.delivered.get(n))
        .count();
    let unchecked = last_event.saturating_sub(CHECKED_EVENTS as u64);
    let delivered_secs = (tally
        .last_at_us
        .load(Ordering::Relaxed)
        .saturating_sub(started_us)) as f64
        / 1e6;
    let latency = load::percentiles(&tally.latency.take());
    let per_sec = |count: u64, secs: f64| if secs > 0.0 { count as f64 / secs } else { 0.0 };
    let first_error = calls
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    eprintln!(
        "S6 {mode}{} ({} node(s), {}): {:.0} accepted/s, {delivered} of {accepted} delivered, \
         p99 {:.2} ms, server cpu {:.0}%, loadgen cpu {:.0}%",
        if plan.keys { " with keys" } else { "" },
        setup.ws_addrs.len(),
        plan.bus,
        per_sec(accepted, publish_secs),
        latency[2],
        cpu_secs / window_secs * 100.0,
        own_secs / window_secs * 100.0,
    );
    Ok(json!({
        "scenario": "S6",
        "system": setup.system.name(),
        "nodes": setup.ws_addrs.len(),
        "bus": plan.bus,
        "keys": plan.keys,
        "round": plan.round,
        "mode": mode,
        "batch": batch,
        "in_flight": tasks,
        "groups": plan.groups,
        "secs": plan.secs,
        "calls": calls.calls.load(Ordering::Relaxed),
        "failed_calls": calls.failed.load(Ordering::Relaxed),
        "first_error": first_error,
        "accepted": accepted,
        "accepted_per_sec": per_sec(accepted, publish_secs).round(),
        "delivered": delivered,
        "delivered_per_sec": per_sec(delivered, delivered_secs.max(publish_secs)).round(),
        "missing": missing,
        "unchecked": unchecked,
        "duplicates": tally.duplicates.load(Ordering::Relaxed),
        "wrong_socket": tally.wrong_socket.load(Ordering::Relaxed),
        "p50_ms": latency[0],
        "p90_ms": latency[1],
        "p99_ms": latency[2],
        "max_ms": latency[3],
        "server_cpu_percent": (cpu_secs / window_secs * 1000.0).round() / 10.0,
        "server_cpu_secs": cpu_secs,
        "server_kernel_secs": kernel_secs,
        "events_per_cpu_sec": if cpu_secs > 0.0 { json!((delivered as f64 / cpu_secs).round()) } else { json!(null) },
        "loadgen_cpu_percent": (own_secs / window_secs * 1000.0).round() / 10.0,
        "rss_kib": rss_kib,
        "slow_consumer_closes": tally.closed.load(Ordering::Relaxed),
    }))
}

/// S6: opens the sockets, then the Publish phase and the PublishBatch phase.
pub async fn run(setup: Setup, plan: Plan) -> Result<(), String> {
    if plan.groups == 0 || plan.in_flight == 0 || plan.batch == 0 || plan.batch_in_flight == 0 {
        return Err("S6 needs groups, in-flight calls and batches of at least 1".into());
    }
    let setup = Arc::new(setup);
    let tally = Arc::new(Tally::new());
    let took = load::open(&setup, 0..plan.groups, plan.groups, &tally).await?;
    eprintln!(
        "S6: {} sockets, one per group, in {:.2} s",
        plan.groups,
        took.as_secs_f64()
    );
    let grpc = GatewayClient::connect(format!("http://{}", setup.grpc_addr))
        .await
        .map_err(|e| format!("gRPC connect: {e}"))?;
    let next = Arc::new(AtomicU64::new(0));
    tokio::time::sleep(PAUSE).await;
    let publish = phase(
        &setup,
        &plan,
        &tally,
        &grpc,
        &next,
        "publish",
        1,
        plan.in_flight,
    )
    .await?;
    println!("{publish}");
    tokio::time::sleep(PAUSE).await;
    let batch = phase(
        &setup,
        &plan,
        &tally,
        &grpc,
        &next,
        "batch",
        plan.batch,
        plan.batch_in_flight,
    )
    .await?;
    println!("{batch}");
    Ok(())
}

/// What [`count`] publishes.
pub struct CountPlan {
    /// Groups with one socket each (0: no sockets, the events reach nobody).
    pub groups: usize,
    pub events: u64,
    /// Events per call: 1 calls Publish, more PublishBatch.
    pub batch: usize,
    pub in_flight: usize,
    pub size: usize,
    pub keys: bool,
    /// Sent as `authorization: Bearer <api key>` with every call.
    pub api_key: Option<String>,
    /// Labels the result.
    pub label: String,
}

/// `request` with `authorization: Bearer <api key>` when there is a key.
fn authorized<T>(request: T, bearer: &Option<MetadataValue<Ascii>>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(request);
    if let Some(bearer) = bearer {
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
    }
    request
}

/// UNAVAILABLE answers [`count`] retries, in all, before it counts them as failures.
const MAX_RETRIES: u64 = 1000;

/// A fixed number of events: `events` published `batch` per call with `in_flight` calls at
/// once, with or without a key each, then (with sockets) until every accepted event
/// arrived. For counts that time cannot move: a server's instructions under callgrind for
/// two event counts, or Redis's memory before and after. Prints one JSON line.
pub async fn count(setup: Setup, plan: CountPlan) -> Result<(), String> {
    if plan.batch == 0 || plan.in_flight == 0 {
        return Err("count needs batches and in-flight calls of at least 1".into());
    }
    let setup = Arc::new(setup);
    let tally = Arc::new(Tally::new());
    if plan.groups > 0 {
        load::open(&setup, 0..plan.groups, plan.groups, &tally).await?;
    }
    let grpc = GatewayClient::connect(format!("http://{}", setup.grpc_addr))
        .await
        .map_err(|e| format!("gRPC connect: {e}"))?;
    let next = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(Calls::default());
    let retries = Arc::new(AtomicU64::new(0));
    let seed = key_seed();
    let bearer = match &plan.api_key {
        Some(key) => Some(
            format!("Bearer {key}")
                .parse::<MetadataValue<Ascii>>()
                .map_err(|e| format!("--api-key: {e}"))?,
        ),
        None => None,
    };
    let (user_before, kernel_before) = load::proc_times(&setup.server_pids);
    let started = Instant::now();
    let mut callers = Vec::with_capacity(plan.in_flight);
    for _ in 0..plan.in_flight {
        let (mut grpc, next, calls, retries, bearer) = (
            grpc.clone(),
            next.clone(),
            calls.clone(),
            retries.clone(),
            bearer.clone(),
        );
        let (events, batch, size, keys) = (plan.events, plan.batch as u64, plan.size, plan.keys);
        let groups = plan.groups.max(1) as u64;
        callers.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(batch, Ordering::Relaxed);
                if first >= events {
                    break;
                }
                let last = (first + batch).min(events);
                let requests = numbered_requests(first..last, groups, size, keys.then_some(seed));
                // UNAVAILABLE means not published (retry freely): a node under callgrind
                // can be that slow to find its Redis ready. Retried, the same keys, counted.
                let answer = loop {
                    calls.calls.fetch_add(1, Ordering::Relaxed);
                    let answer = if batch == 1 {
                        let request = authorized(requests[0].clone(), &bearer);
                        grpc.publish(request).await.map(|_| ())
                    } else {
                        let request = PublishBatchRequest {
                            events: requests.clone(),
                        };
                        let request = authorized(request, &bearer);
                        grpc.publish_batch(request).await.map(|_| ())
                    };
                    match answer {
                        Err(status)
                            if status.code() == tonic::Code::Unavailable
                                && retries.fetch_add(1, Ordering::Relaxed) < MAX_RETRIES =>
                        {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        answer => break answer,
                    }
                };
                match answer {
                    Ok(()) => {
                        calls.accepted.fetch_add(last - first, Ordering::Relaxed);
                    }
                    Err(status) => calls.fail(format!("{:?}: {}", status.code(), status.message())),
                }
            }
        }));
    }
    for caller in callers {
        caller.await.map_err(|e| format!("publisher task: {e}"))?;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let accepted = calls.accepted.load(Ordering::Relaxed);
    if plan.groups > 0 {
        load::drain(
            &tally.received,
            0,
            accepted,
            QUIET,
            Some(started + DRAIN_MAX),
        )
        .await;
    }
    let (user_after, kernel_after) = load::proc_times(&setup.server_pids);
    let cpu_secs = (user_after + kernel_after).saturating_sub(user_before + kernel_before) as f64
        / load::TICKS_PER_SEC;
    let first_error = calls
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    println!(
        "{}",
        json!({
            "scenario": "count",
            "label": plan.label,
            "keys": plan.keys,
            "events": plan.events,
            "batch": plan.batch,
            "in_flight": plan.in_flight,
            "groups": plan.groups,
            "calls": calls.calls.load(Ordering::Relaxed),
            "accepted": accepted,
            "failed_calls": calls.failed.load(Ordering::Relaxed),
            "unavailable_retries": retries.load(Ordering::Relaxed),
            "first_error": first_error,
            "delivered": tally.received.load(Ordering::Relaxed),
            "duplicates": tally.duplicates.load(Ordering::Relaxed),
            "publish_secs": publish_secs,
            "events_per_sec": (accepted as f64 / publish_secs).round(),
            "server_cpu_secs": cpu_secs,
        })
    );
    if calls.failed.load(Ordering::Relaxed) > 0 {
        return Err(format!(
            "failed calls; the first: {}",
            first_error.unwrap_or_default()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_and_events() {
        let bits = Bits::new();
        assert_eq!(bits.set(70), Some(false));
        assert_eq!(bits.set(70), Some(true));
        assert!(bits.get(70) && !bits.get(71));
        assert_eq!(bits.set(CHECKED_EVENTS as u64), None);
        let tally = Tally::new();
        let body = load::payload(12, 3, 200);
        tally.on_text(body.as_bytes(), 3);
        tally.on_text(body.as_bytes(), 4);
        tally.on_text(br#"{"type":"page_add"}"#, 3);
        assert_eq!(tally.received.load(Ordering::Relaxed), 2);
        assert_eq!(tally.duplicates.load(Ordering::Relaxed), 1);
        assert_eq!(tally.wrong_socket.load(Ordering::Relaxed), 1);
        assert!(tally.delivered.get(12));
    }

    #[test]
    fn keys_are_32_hex_and_differ() {
        let seed = key_seed();
        let keys: std::collections::HashSet<String> =
            (0..10_000).map(|n| idempotency_key(seed, n)).collect();
        assert_eq!(keys.len(), 10_000);
        assert!(
            keys.iter()
                .all(|k| k.len() == 32 && k.bytes().all(|b| b.is_ascii_hexdigit()))
        );
    }
}
