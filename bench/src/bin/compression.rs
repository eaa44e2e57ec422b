//! The compression benchmark's load generator (`bench/compression.sh`): subscribers that
//! offer permessage-deflate as a browser does, count the bytes their TCP sockets read and
//! inflate what they get with their own inflaters, checking every payload.
//!
//! - `wire`: bytes on the wire per delivery of a recorded stream of events
//!   (`bench/compression_streams.py`), each group watched by `--watchers` sockets;
//! - `fanout`: S1 (`loadgen fanout-search`) with subscribers that offer the extension;
//! - `memory`: RSS per idle connection, then per connection once every socket received a
//!   few events of its own (per-socket compression with context), then after they idled.
//!
//! One JSON line per result. It shares the load generator's modules (the lean client, the
//! fan-out machinery).

#[allow(dead_code)]
#[path = "../client.rs"]
mod client;
#[allow(dead_code)]
#[path = "../load.rs"]
mod load;
#[allow(dead_code)]
#[path = "../pusher.rs"]
mod pusher;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::json;

use client::Frame;
use load::{Publisher, Seen, Setup, System};

#[derive(Parser)]
#[command(about = "Compression benchmark: wire bytes, S1 with deflate, memory")]
struct Args {
    #[command(flatten)]
    target: load::Target,
    /// Labels the result: the system as run (e.g. channelgate-auto, uvicorn).
    #[arg(long)]
    label: String,
    /// Offer permessage-deflate (on by default: a browser does).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    deflate: bool,
    #[arg(long, default_value_t = 1)]
    round: u32,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Publishes the events of `--stream` (JSON lines {"group", "payload"}) in order,
    /// `--rate` a second, to groups watched by `--watchers` sockets each (every socket its own
    /// user); reports the bytes the sockets read per delivery and checks every payload.
    Wire {
        #[arg(long)]
        stream: String,
        /// Labels the result.
        #[arg(long)]
        stream_name: String,
        #[arg(long, default_value_t = 1)]
        watchers: usize,
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// After subscribing, ask for the replay baseline as Baserow's browser client does
        /// on its first connect (`replay_events` with `last_seen_id` -1; its answer, like
        /// the authentication and `page_add` frames, is not counted).
        #[arg(long)]
        baseline: bool,
    },
    /// S1 with subscribers offering permessage-deflate: as `loadgen fanout-search`.
    Fanout {
        #[command(flatten)]
        fanout: load::FanoutArgs,
    },
    /// `conns` sockets, each in a group of its own: RSS per connection idle, after `events`
    /// row updates each (about 1.4 KB, each socket's own, so compressed per socket), and
    /// after `idle_secs` more.
    Memory {
        #[arg(long, default_value_t = 5000)]
        conns: usize,
        #[arg(long, default_value_t = 3)]
        events: usize,
        #[arg(long, default_value_t = 12)]
        idle_secs: u64,
        /// Events a second to the Django peer (channelgate's go as fast as they can).
        #[arg(long, default_value_t = 500.0)]
        django_rate: f64,
    },
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    client::offer_deflate(args.deflate);
    let setup = args.target.setup()?;
    match &args.scenario {
        Scenario::Wire {
            stream,
            stream_name,
            watchers,
            rate,
            baseline,
        } => {
            let socket = WireSocket {
                watchers: *watchers,
                baseline: *baseline,
            };
            wire(&args, setup, stream, stream_name, socket, *rate).await
        }
        Scenario::Fanout { fanout } => {
            load::fanout(setup, fanout.plan(None, Some(args.round))).await
        }
        Scenario::Memory {
            conns,
            events,
            idle_secs,
            django_rate,
        } => memory(&args, setup, *conns, *events, *idle_secs, *django_rate).await,
    }
}

/// One stream event.
struct Event {
    group: usize,
    payload: String,
}

fn read_stream(path: &str) -> Result<Vec<Event>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
            Ok(Event {
                group: v["group"].as_u64().ok_or("no group")? as usize,
                payload: v["payload"].as_str().ok_or("no payload")?.to_owned(),
            })
        })
        .collect()
}

/// A payload as it arrived, less the history id channelgate appends as the last key.
fn without_event_id(text: &[u8]) -> Vec<u8> {
    const KEY: &[u8] = b",\"_event_id\":";
    let tail_from = text.len().saturating_sub(40);
    if let Some(at) = text[tail_from..].windows(KEY.len()).rposition(|w| w == KEY) {
        let mut out = text[..tail_from + at].to_vec();
        out.push(b'}');
        return out;
    }
    text.to_vec()
}

/// What one socket read while the stream was published.
#[derive(Default)]
struct SocketTally {
    bytes: u64,
    frames: u64,
    compressed: u64,
    events: u64,
    mismatched: u64,
    plain_bytes: u64,
    extensions: Option<String>,
}

/// Publishes `events` through the system: channelgate with gRPC Publish calls in order,
/// `rate` a second (all in flight at most 64); Django with publisher.py --file.
async fn publish_events(setup: &Setup, events: &[Event], rate: f64) -> Result<(), String> {
    if setup.system == System::Django {
        let dir = std::env::temp_dir().join(format!("cg-compression-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let file = dir.join("events.jsonl");
        let lines: String = events
            .iter()
            .map(|e| json!({"group": e.group, "payload": e.payload}).to_string() + "\n")
            .collect();
        std::fs::write(&file, lines).map_err(|e| e.to_string())?;
        let status = tokio::process::Command::new(&setup.django_publisher[0])
            .args(&setup.django_publisher[1..])
            .args([
                "--file",
                &file.to_string_lossy(),
                "--rate",
                &format!("{rate:.1}"),
            ])
            .status()
            .await
            .map_err(|e| format!("publisher: {e}"))?;
        let _ = std::fs::remove_dir_all(&dir);
        return if status.success() {
            Ok(())
        } else {
            Err(format!("publisher exited with {status}"))
        };
    }
    let Publisher::Grpc(client) = Publisher::connect(setup).await? else {
        return Err("channelgate publishes over gRPC".into());
    };
    let started = Instant::now();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(64));
    for (n, event) in events.iter().enumerate() {
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(n as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let mut client = client.clone();
        let request = load::publish_request(event.group, event.payload.clone());
        // In order within a group when paced: each call is sent before the next is due.
        if rate > 0.0 {
            client
                .publish(request)
                .await
                .map_err(|s| format!("publish: {s}"))?;
            drop(permit);
        } else {
            tokio::spawn(async move {
                if let Err(status) = client.publish(request).await {
                    eprintln!("publish failed: {status}");
                }
                drop(permit);
            });
        }
    }
    let _ = in_flight.acquire_many(64).await;
    Ok(())
}

/// How the wire part's sockets are set up.
#[derive(Clone, Copy)]
struct WireSocket {
    /// Sockets on each group.
    watchers: usize,
    /// Whether each asks for the replay baseline after subscribing.
    baseline: bool,
}

async fn wire(
    args: &Args,
    setup: Setup,
    stream: &str,
    stream_name: &str,
    socket: WireSocket,
    rate: f64,
) -> Result<(), String> {
    let WireSocket { watchers, baseline } = socket;
    let events = read_stream(stream)?;
    let mut groups: Vec<usize> = events.iter().map(|e| e.group).collect();
    groups.sort_unstable();
    groups.dedup();
    let setup = Arc::new(setup);
    let mut tasks = Vec::new();
    let mut index = 0;
    for &group in &groups {
        let expected: VecDeque<Vec<u8>> = events
            .iter()
            .filter(|e| e.group == group)
            .map(|e| e.payload.as_bytes().to_vec())
            .collect();
        for _ in 0..watchers {
            // Every socket its own user.
            let user_id = 1 + index as i64;
            let mut ws = load::connect(&setup, index, user_id).await?;
            ws.subscribe_table(group).await?;
            if baseline {
                ws.send_text(r#"{"type":"replay_events","last_seen_id":-1,"supports_retry":true}"#)
                    .await
                    .map_err(|e| e.to_string())?;
                ws.await_answer(b"replay_events_result", &[]).await?;
            }
            index += 1;
            let mut expected = expected.clone();
            let base = ws.wire_bytes;
            let (base_frames, base_compressed) = (ws.wire_frames, ws.compressed_frames);
            tasks.push(tokio::spawn(async move {
                let mut tally = SocketTally {
                    extensions: ws.extensions.clone(),
                    ..Default::default()
                };
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                while !expected.is_empty() {
                    let mut check = |frame: Frame<'_>| {
                        if let Frame::Text(text) = frame {
                            tally.events += 1;
                            tally.plain_bytes += text.len() as u64;
                            match expected.pop_front() {
                                Some(want) if want == without_event_id(text) => {}
                                _ => tally.mismatched += 1,
                            }
                        }
                    };
                    match ws.read_frames_until(Some(deadline), &mut check).await {
                        Ok(Some(true)) => {}
                        _ => break,
                    }
                }
                tally.bytes = ws.wire_bytes - base;
                tally.frames = ws.wire_frames - base_frames;
                tally.compressed = ws.compressed_frames - base_compressed;
                tally.mismatched += expected.len() as u64;
                tally
            }));
        }
    }
    let (cpu_before, _) = load::proc_sample(&setup.server_pids);
    let started = Instant::now();
    publish_events(&setup, &events, rate).await?;
    let mut total = SocketTally::default();
    for task in tasks {
        let t = task.await.map_err(|e| e.to_string())?;
        total.bytes += t.bytes;
        total.frames += t.frames;
        total.compressed += t.compressed;
        total.events += t.events;
        total.mismatched += t.mismatched;
        total.plain_bytes += t.plain_bytes;
        total.extensions = total.extensions.or(t.extensions);
    }
    let (cpu_after, rss) = load::proc_sample(&setup.server_pids);
    let deliveries = events.len() as u64 * watchers as u64;
    let published_bytes: u64 = events.iter().map(|e| e.payload.len() as u64).sum();
    println!(
        "{}",
        json!({
            "scenario": "wire",
            "label": args.label,
            "round": args.round,
            "stream": stream_name,
            "watchers": watchers,
            "events": events.len(),
            "deliveries": deliveries,
            "received": total.events,
            "mismatched": total.mismatched,
            "published_payload_bytes_per_delivery": published_bytes as f64 / events.len() as f64,
            "received_payload_bytes_per_delivery": total.plain_bytes as f64 / deliveries as f64,
            "wire_bytes": total.bytes,
            "wire_bytes_per_delivery": (total.bytes as f64 / deliveries as f64 * 10.0).round() / 10.0,
            "frames": total.frames,
            "compressed_frames": total.compressed,
            "extensions": total.extensions,
            "server_cpu_secs": (cpu_after - cpu_before) as f64 / load::TICKS_PER_SEC,
            "secs": started.elapsed().as_secs_f64(),
            "rss_kib": rss,
        })
    );
    Ok(())
}

/// A row update for socket `group`'s table, stamped with its send time.
fn row_update(group: usize, n: usize) -> String {
    let mut row = serde_json::Map::new();
    row.insert("id".into(), json!(group));
    row.insert(
        "order".into(),
        json!(format!("{group}.00000000000000000000")),
    );
    for f in 1..=20 {
        row.insert(
            format!("field_{f}"),
            json!(format!("value {f} of row {group}, update {n}")),
        );
    }
    let row = serde_json::Value::Object(row);
    json!({"type": "rows_updated", "table_id": group, "ts": load::now_micros(),
        "rows_before_update": [row], "rows": [row], "metadata": {}, "updated_field_ids": [n % 20 + 1]})
    .to_string()
}

fn rss_kib(setup: &Setup) -> u64 {
    load::proc_sample(&setup.server_pids).1
}

async fn memory(
    args: &Args,
    setup: Setup,
    conns: usize,
    events: usize,
    idle_secs: u64,
    django_rate: f64,
) -> Result<(), String> {
    let setup = Arc::new(setup);
    let seen = Arc::new(Seen::new());
    let before = rss_kib(&setup);
    load::open(&setup, 0..conns, conns, &seen).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_kib(&setup);
    // Socket i is the only one in table-i: each event reaches one socket.
    let mut sent = 0u64;
    for n in 0..events {
        let batch: Vec<Event> = (0..conns)
            .map(|group| Event {
                group,
                payload: row_update(group, n),
            })
            .collect();
        // Django's layer drops what a process cannot take in time (channels_redis's channel
        // capacity): its events are paced.
        let rate = if setup.system == System::Django {
            django_rate
        } else {
            0.0
        };
        publish_events(&setup, &batch, rate).await?;
        sent += batch.len() as u64;
    }
    let received = &seen.received;
    load::drain(received, 0, sent, Duration::from_secs(30), None).await;
    let got = received.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let busy = rss_kib(&setup);
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let after_idle = rss_kib(&setup);
    let per =
        |kib: u64| ((kib.saturating_sub(before)) as f64 / conns as f64 * 100.0).round() / 100.0;
    println!(
        "{}",
        json!({
            "scenario": "memory",
            "label": args.label,
            "round": args.round,
            "conns": conns,
            "events_per_socket": events,
            "delivered": got,
            "expected": sent,
            "closed": seen.closed.load(Ordering::Relaxed),
            "rss_kib_before": before,
            "rss_kib_idle": idle,
            "rss_kib_busy": busy,
            "rss_kib_after_idle": after_idle,
            "kib_per_conn_idle": per(idle),
            "kib_per_conn_busy": per(busy),
            "kib_per_conn_after_idle": per(after_idle),
            "busy_minus_idle_kib_per_conn": ((busy as f64 - idle as f64) / conns as f64 * 100.0).round() / 100.0,
        })
    );
    Ok(())
}
