//! P1, presence in one space (issue 12). Two phases against one node or several (the
//! sockets spread over `--ws-addr` round robin):
//!
//! - a join storm: `sockets` signed-in members (each its own user) connect and subscribe to
//!   table 1 at once, at most [`load::OPEN_CONCURRENCY`] in flight, timed from the start to
//!   the last `presence.members` (presence off: the last `page_add`). Each socket counts
//!   what it learnt of the others: the entries of its `presence.members` and the
//!   `presence.join` frames after it, which must add up to every other member, once;
//! - focus fan-out (presence on): `senders` of the members each send a `row` focus `rate`
//!   times a second for `secs`, and every member times each `presence.focus` it gets. A
//!   focus carries its send time in `row_id` (microseconds since the generator's start, on
//!   its monotonic clock), so a receiver reads its latency off the frame.
//!
//! Frames are told apart by their bytes, without a JSON parser: the generator reads some
//! 50,000 focus frames a second on its one core. Prints one JSON line.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;

use crate::client::{Client, Frame};
use crate::load::{self, Histogram, Setup};

/// The page every member subscribes to, and the focus frame around a `row_id`.
const SUBSCRIBE: &str = r#"{"page":"table","table_id":1}"#;
const FOCUS_HEAD: &str =
    r#"{"type":"presence.focus","page":"table","table_id":1,"focus":{"type":"row","row_id":"#;
/// How long the storm may take before the run fails, naming what is missing.
const STORM_TIMEOUT: Duration = Duration::from_secs(60);
/// Stragglers: a phase ends when everything arrived or after this long without a frame.
const QUIET: Duration = Duration::from_secs(3);
/// How often a sender that waits for the go looks up from its socket.
const GO_POLL: Duration = Duration::from_millis(10);

/// What P1 runs.
pub struct Plan {
    pub sockets: usize,
    pub senders: usize,
    /// Focus frames per second per sender.
    pub rate: f64,
    pub secs: f64,
    /// Whether the node runs `--presence on`: the storm then waits for `presence.members`
    /// and the focus phase runs.
    pub presence: bool,
    pub round: u32,
}

/// What one socket has seen.
#[derive(Default)]
struct Socket {
    /// Other members it learnt of: `presence.members` entries and `presence.join` frames.
    known: AtomicU64,
    /// `presence.focus` frames received, and focus frames it sent.
    focus: AtomicU64,
    sent: AtomicU64,
}

/// What every socket has seen, shared.
struct Tally {
    /// The generator's clock: storm times and `row_id`s count from here.
    epoch: Instant,
    sockets: Vec<Socket>,
    /// Sockets past their storm (`presence.members`, or `page_add` with presence off), and
    /// when each got there (µs since `epoch`).
    ready: AtomicUsize,
    ready_at: Mutex<Vec<u64>>,
    page_adds: AtomicU64,
    listings: AtomicU64,
    entries: AtomicU64,
    joins: AtomicU64,
    /// The last frame that told a socket of another member (µs since `epoch`).
    last_known_at: AtomicU64,
    focus: AtomicU64,
    last_focus_at: AtomicU64,
    latency: Histogram,
    /// Anything else (a leave, a rejection, ...), and the first of them.
    unexpected: AtomicU64,
    first_unexpected: Mutex<Option<String>>,
    /// Sockets the server closed (or lost) after their storm.
    closed: AtomicUsize,
}

/// A server frame, by its `"type"`.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Authentication,
    PageAdd,
    Members,
    Join,
    Focus,
    Other,
}

fn kind(text: &[u8]) -> Kind {
    const PRESENCE: &[u8] = br#""type":"presence."#;
    if let Some(at) = find(text, PRESENCE) {
        let rest = &text[at + PRESENCE.len()..];
        return if rest.starts_with(b"focus\"") {
            Kind::Focus
        } else if rest.starts_with(b"join\"") {
            Kind::Join
        } else if rest.starts_with(b"members\"") {
            Kind::Members
        } else {
            Kind::Other
        };
    }
    if find(text, br#""type":"page_add""#).is_some() {
        Kind::PageAdd
    } else if find(text, br#""type":"authentication""#).is_some() {
        Kind::Authentication
    } else {
        Kind::Other
    }
}

/// Where `needle` (two bytes or more) first occurs; two bytes are compared before the rest,
/// as a `presence.members` of a thousand entries is read whole.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|w| w[0] == needle[0] && w[1] == needle[1] && w == needle)
}

fn count(haystack: &[u8], needle: &[u8]) -> u64 {
    haystack
        .windows(needle.len())
        .filter(|w| w[0] == needle[0] && w[1] == needle[1] && *w == needle)
        .count() as u64
}

fn micros_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

impl Tally {
    fn new(sockets: usize) -> Tally {
        Tally {
            epoch: Instant::now(),
            sockets: (0..sockets).map(|_| Socket::default()).collect(),
            ready: AtomicUsize::new(0),
            ready_at: Mutex::new(Vec::with_capacity(sockets)),
            page_adds: AtomicU64::new(0),
            listings: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            joins: AtomicU64::new(0),
            last_known_at: AtomicU64::new(0),
            focus: AtomicU64::new(0),
            last_focus_at: AtomicU64::new(0),
            latency: Histogram::new(),
            unexpected: AtomicU64::new(0),
            first_unexpected: Mutex::new(None),
            closed: AtomicUsize::new(0),
        }
    }

    /// Counts one frame of socket `index`; sets `ready` once its storm is over.
    fn frame(&self, index: usize, presence: bool, frame: Frame<'_>, ready: &mut bool) {
        let Frame::Text(text) = frame else {
            return;
        };
        let now = micros_since(self.epoch);
        let socket = &self.sockets[index];
        match kind(text) {
            Kind::Focus => {
                match load::number_after(text, br#""row_id":"#) {
                    Some(sent) => self.latency.record(now.saturating_sub(sent)),
                    None => self.unexpect(text),
                }
                socket.focus.fetch_add(1, Ordering::Relaxed);
                self.focus.fetch_add(1, Ordering::Relaxed);
                self.last_focus_at.fetch_max(now, Ordering::Relaxed);
            }
            Kind::Join => {
                socket.known.fetch_add(1, Ordering::Relaxed);
                self.joins.fetch_add(1, Ordering::Relaxed);
                self.last_known_at.fetch_max(now, Ordering::Relaxed);
            }
            Kind::Members if presence && !*ready => {
                let entries = count(text, br#""presence_id":"#);
                socket.known.fetch_add(entries, Ordering::Relaxed);
                self.entries.fetch_add(entries, Ordering::Relaxed);
                self.listings.fetch_add(1, Ordering::Relaxed);
                self.last_known_at.fetch_max(now, Ordering::Relaxed);
                self.now_ready(now, ready);
            }
            Kind::PageAdd if !*ready => {
                self.page_adds.fetch_add(1, Ordering::Relaxed);
                if !presence {
                    self.now_ready(now, ready);
                }
            }
            Kind::Authentication => {}
            // A second listing or page_add, a listing with presence off, or anything else.
            Kind::Members | Kind::PageAdd | Kind::Other => self.unexpect(text),
        }
    }

    fn now_ready(&self, now: u64, ready: &mut bool) {
        *ready = true;
        self.ready_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(now);
        self.ready.fetch_add(1, Ordering::Relaxed);
    }

    fn unexpect(&self, text: &[u8]) {
        self.unexpected.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_unexpected
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            let shown = &text[..text.len().min(200)];
            *first = Some(String::from_utf8_lossy(shown).into_owned());
        }
    }
}

/// When the senders start, once the storm has settled.
type Go = watch::Receiver<Option<Instant>>;

/// One member: opens, subscribes, reads until its storm is over (holding `permit`), sends
/// its focus frames if it is a sender, then reads until the run ends.
async fn member(
    setup: Arc<Setup>,
    tally: Arc<Tally>,
    plan: Arc<Plan>,
    index: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
    go: Go,
) -> Result<(), String> {
    let mut ws = load::connect(&setup, index, 1 + index as i64).await?;
    let name = format!("socket {index}");
    ws.send_text(SUBSCRIBE)
        .await
        .map_err(|e| format!("{name}: {e}"))?;
    let mut ready = false;
    while !ready {
        let open = ws
            .read_frames(|f| tally.frame(index, plan.presence, f, &mut ready))
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        if !open {
            return Err(format!("{name}: closed during the storm"));
        }
    }
    drop(permit);
    if index < plan.senders && plan.presence {
        send_focus(&mut ws, &tally, &plan, index, go)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
    }
    let mut ready = true;
    while let Ok(true) = ws
        .read_frames(|f| tally.frame(index, plan.presence, f, &mut ready))
        .await
    {}
    // The run aborts its sockets when it ends: this one went before.
    tally.closed.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// A sender: waits for the go, then sends `rate * secs` focus frames evenly, reading
/// between them. Senders start a fraction of a period apart.
async fn send_focus(
    ws: &mut Client,
    tally: &Tally,
    plan: &Plan,
    index: usize,
    mut go: Go,
) -> std::io::Result<()> {
    let mut ready = true;
    let mut each = |f: Frame<'_>| tally.frame(index, plan.presence, f, &mut ready);
    let start = loop {
        if let Some(start) = *go.borrow_and_update() {
            break start;
        }
        if ws
            .read_frames_until(Some(Instant::now() + GO_POLL), &mut each)
            .await?
            == Some(false)
        {
            return Ok(());
        }
    };
    let period = Duration::from_secs_f64(1.0 / plan.rate);
    let mut next = start + period.mul_f64(index as f64 / plan.senders as f64);
    let total = (plan.rate * plan.secs).round() as u64;
    for _ in 0..total {
        while Instant::now() < next {
            if ws.read_frames_until(Some(next), &mut each).await? == Some(false) {
                return Ok(());
            }
        }
        let row_id = micros_since(tally.epoch);
        ws.send_text(&format!("{FOCUS_HEAD}{row_id}}}}}")).await?;
        tally.sockets[index].sent.fetch_add(1, Ordering::Relaxed);
        next += period;
    }
    Ok(())
}

/// Waits until `done` or `QUIET` without `progress` moving, up to `limit`.
async fn settle(limit: Duration, progress: impl Fn() -> u64, done: impl Fn() -> bool) {
    let started = Instant::now();
    let mut last = progress();
    let mut quiet_since = Instant::now();
    while !done() && quiet_since.elapsed() < QUIET && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = progress();
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
}

fn secs(micros: u64) -> f64 {
    (micros as f64 / 1000.0).round() / 1000.0
}

pub async fn run(setup: Setup, plan: Plan) -> Result<(), String> {
    if plan.sockets < 2 || plan.senders > plan.sockets || plan.rate.is_nan() || plan.rate <= 0.0 {
        return Err("P1 needs 2 sockets or more, no more senders than sockets, a rate".into());
    }
    let setup = Arc::new(setup);
    let plan = Arc::new(plan);
    let n = plan.sockets;
    let tally = Arc::new(Tally::new(n));
    let (go_tx, go) = watch::channel(None);
    let (errors_tx, mut errors) = mpsc::unbounded_channel();
    let label = format!(
        "P1 presence {}, {} node(s), round {}",
        if plan.presence { "on" } else { "off" },
        setup.ws_addrs.len(),
        plan.round
    );

    // The join storm. The generator's own CPU is read too: near 100 % it, not the server,
    // may be what a phase measures.
    let me = [std::process::id()];
    let (cpu_before, _) = load::proc_sample(&setup.server_pids);
    let (own_before, _) = load::proc_sample(&me);
    let storm_start = micros_since(tally.epoch);
    let permits = Arc::new(Semaphore::new(load::OPEN_CONCURRENCY));
    let mut tasks = Vec::with_capacity(n);
    for index in 0..n {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (setup, tally, plan, go) = (setup.clone(), tally.clone(), plan.clone(), go.clone());
        let errors = errors_tx.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(error) = member(setup, tally, plan, index, permit, go).await {
                let _ = errors.send(error);
            }
        }));
    }
    let storm_deadline = Instant::now() + STORM_TIMEOUT;
    while tally.ready.load(Ordering::Relaxed) < n {
        if let Ok(error) = errors.try_recv() {
            return Err(format!("{label}: {error}"));
        }
        if Instant::now() > storm_deadline {
            return Err(format!(
                "{label}: after {}s only {} of {n} sockets done ({} page_add, {} presence.members)",
                STORM_TIMEOUT.as_secs(),
                tally.ready.load(Ordering::Relaxed),
                tally.page_adds.load(Ordering::Relaxed),
                tally.listings.load(Ordering::Relaxed),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (cpu_after, _) = load::proc_sample(&setup.server_pids);
    let (own_after, _) = load::proc_sample(&me);
    let mut ready_at: Vec<u64> = tally
        .ready_at
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|t| t.saturating_sub(storm_start))
        .collect();
    ready_at.sort_unstable();
    let storm_us = ready_at.last().copied().unwrap_or(0).max(1);
    let percent =
        |ticks: u64, secs: f64| (ticks as f64 / load::TICKS_PER_SEC / secs * 100.0).round();
    let storm_cpu = percent(cpu_after - cpu_before, secs(storm_us));
    let storm_own_cpu = percent(own_after - own_before, secs(storm_us));

    // Everyone should learn of everyone else: n - 1 each, listings and joins together.
    let want_known = if plan.presence {
        (n * (n - 1)) as u64
    } else {
        0
    };
    let known = || tally.entries.load(Ordering::Relaxed) + tally.joins.load(Ordering::Relaxed);
    settle(Duration::from_secs(30), known, || known() >= want_known).await;
    let full_view_us = tally
        .last_known_at
        .load(Ordering::Relaxed)
        .saturating_sub(storm_start);
    let short = tally
        .sockets
        .iter()
        .filter(|s| s.known.load(Ordering::Relaxed) < (n as u64 - 1) * u64::from(plan.presence))
        .count();
    let over = tally
        .sockets
        .iter()
        .filter(|s| s.known.load(Ordering::Relaxed) > (n as u64 - 1) * u64::from(plan.presence))
        .count();
    eprintln!(
        "{label}: storm of {n} to the last {} in {:.3} s (median socket {:.3} s), {} joins + {} listed = {} of {want_known}, full view at {:.3} s",
        if plan.presence {
            "presence.members"
        } else {
            "page_add"
        },
        secs(storm_us),
        secs(ready_at[ready_at.len() / 2]),
        tally.joins.load(Ordering::Relaxed),
        tally.entries.load(Ordering::Relaxed),
        known(),
        secs(full_view_us),
    );
    let mut result = json!({
        "scenario": "P1",
        "system": setup.system.name(),
        "nodes": setup.ws_addrs.len(),
        "presence": if plan.presence { "on" } else { "off" },
        "round": plan.round,
        "sockets": n,
        "storm_secs": secs(storm_us),
        "storm_median_socket_secs": secs(ready_at[ready_at.len() / 2]),
        "storm_sockets_per_sec": (n as f64 / secs(storm_us)).round(),
        "storm_cpu_percent": storm_cpu,
        "loadgen_storm_cpu_percent": storm_own_cpu,
        "page_adds": tally.page_adds.load(Ordering::Relaxed),
        "members_frames": tally.listings.load(Ordering::Relaxed),
        "members_entries": tally.entries.load(Ordering::Relaxed),
        "join_frames": tally.joins.load(Ordering::Relaxed),
        "expected_known": want_known,
        "full_view_secs": plan.presence.then(|| secs(full_view_us)),
        "sockets_knowing_fewer": short,
        "sockets_knowing_more": over,
    });

    if plan.presence && plan.senders > 0 && plan.secs > 0.0 {
        let (cpu_before, _) = load::proc_sample(&setup.server_pids);
        let (own_before, _) = load::proc_sample(&me);
        let cpu_since = Instant::now();
        tally.latency.take();
        let start = Instant::now() + Duration::from_millis(100);
        let _ = go_tx.send(Some(start));
        let per_sender = (plan.rate * plan.secs).round() as u64;
        let sent = || {
            tally.sockets[..plan.senders]
                .iter()
                .map(|s| s.sent.load(Ordering::Relaxed))
                .sum::<u64>()
        };
        tokio::time::sleep_until(start + Duration::from_secs_f64(plan.secs)).await;
        // Every sender done (a late one only counts what it sent), then the stragglers.
        let late = Instant::now() + Duration::from_secs(5);
        while sent() < per_sender * plan.senders as u64 && Instant::now() < late {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sent = sent();
        let expected = sent * (n as u64 - 1);
        let focus = || tally.focus.load(Ordering::Relaxed);
        settle(Duration::from_secs(30), focus, || focus() >= expected).await;
        let (cpu_after, rss_kib) = load::proc_sample(&setup.server_pids);
        let (own_after, _) = load::proc_sample(&me);
        let cpu_secs = cpu_since.elapsed().as_secs_f64();
        let received = focus();
        let start_us = (start - tally.epoch).as_micros() as u64;
        let took = secs(
            tally
                .last_focus_at
                .load(Ordering::Relaxed)
                .saturating_sub(start_us),
        )
        .max(plan.secs);
        let [p50, p90, p99, max] = load::percentiles(&tally.latency.take());
        // Each socket should get every focus but its own, once.
        let wrong = tally
            .sockets
            .iter()
            .filter(|s| s.focus.load(Ordering::Relaxed) != sent - s.sent.load(Ordering::Relaxed))
            .count();
        eprintln!(
            "{label}: {sent} focus frames from {} senders, {received} of {expected} delivered ({:.0}/s), p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
            plan.senders,
            received as f64 / took,
        );
        let extra = json!({
            "focus_senders": plan.senders,
            "focus_rate_per_sender": plan.rate,
            "focus_secs": plan.secs,
            "focus_sent": sent,
            "focus_expected": expected,
            "focus_received": received,
            "focus_per_sec": (received as f64 / took).round(),
            "focus_p50_ms": p50,
            "focus_p90_ms": p90,
            "focus_p99_ms": p99,
            "focus_max_ms": max,
            "focus_cpu_percent": percent(cpu_after - cpu_before, cpu_secs),
            "loadgen_focus_cpu_percent": percent(own_after - own_before, cpu_secs),
            "sockets_with_wrong_focus_count": wrong,
            "rss_kib": rss_kib,
        });
        if let (Some(result), Some(extra)) = (result.as_object_mut(), extra.as_object()) {
            result.extend(extra.clone());
        }
    } else {
        let (_, rss_kib) = load::proc_sample(&setup.server_pids);
        result["rss_kib"] = json!(rss_kib);
    }
    if let Ok(error) = errors.try_recv() {
        return Err(format!("{label}: {error}"));
    }
    let first = tally
        .first_unexpected
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    result["unexpected_frames"] = json!(tally.unexpected.load(Ordering::Relaxed));
    result["first_unexpected"] = json!(first);
    result["closed_sockets"] = json!(tally.closed.load(Ordering::Relaxed));
    if let Some(first) = &first {
        eprintln!(
            "{label}: {} unexpected frames, the first: {first}",
            tally.unexpected.load(Ordering::Relaxed)
        );
    }
    println!("{result}");
    for task in tasks {
        task.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_by_type_in_either_key_order() {
        let focus = br#"{"focus":{"row_id":1234,"type":"row"},"presence_id":"a","space":"table-1","type":"presence.focus","user_id":2}"#;
        assert_eq!(kind(focus), Kind::Focus);
        assert_eq!(load::number_after(focus, br#""row_id":"#), Some(1234));
        assert_eq!(
            kind(br#"{"type":"presence.join","space":"table-1","user_id":1,"presence_id":"x"}"#),
            Kind::Join
        );
        let members = br#"{"entries":[{"focus":null,"presence_id":"a","user_id":1},{"focus":{"row_id":3,"type":"row"},"presence_id":"b","user_id":2}],"space":"table-1","type":"presence.members"}"#;
        assert_eq!(kind(members), Kind::Members);
        assert_eq!(count(members, br#""presence_id":"#), 2);
        assert_eq!(
            kind(br#"{"type":"page_add","page":"table","parameters":{"table_id":1}}"#),
            Kind::PageAdd
        );
        assert_eq!(
            kind(br#"{"type":"presence.leave","space":"table-1"}"#),
            Kind::Other
        );
        assert_eq!(kind(br#"{"type":"page_rejected"}"#), Kind::Other);
        assert_eq!(
            kind(br#"{"success":true,"type":"authentication","web_socket_id":"w"}"#),
            Kind::Authentication
        );
        let frame = format!("{FOCUS_HEAD}42}}}}");
        let parsed: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(parsed["focus"]["row_id"], 42);
    }
}
