//! Counters a node keeps about itself, served as Prometheus text on `/metrics`.
//!
//! The hub and presence own their counters and this module only reads them, so they do
//! not depend on it.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::deflate;
use crate::history::RefreshReason;
use crate::hub::Hub;
use crate::presence::Presence;
use crate::protocol::RejectReason;

/// Counters of the sessions and the edges, owned by the node and handed to them; the
/// hub's, presence's and the history's come from those when rendering.
#[derive(Default)]
pub struct Metrics {
    /// Connections answered with 503 because the node was at `--max-connections`.
    pub connections_refused: AtomicU64,
    pub authentication_failures: AtomicU64,
    pub events_published: AtomicU64,
    pub invalid_frames: AtomicU64,
    pub pages_rejected: [AtomicU64; RejectReason::ALL.len()],
    /// Events published through this node's API that the event history recorded.
    pub events_recorded: AtomicU64,
    /// Replays answered with their events (`force_refresh: false`).
    pub replays_served: AtomicU64,
    pub events_replayed: AtomicU64,
    pub replay_refreshes: [AtomicU64; RefreshReason::ALL.len()],
    /// Replays told to come back later (`replay_events_retry`).
    pub replay_retries: AtomicU64,
    /// Questions that reached the backend authorizer (answers from its cache not counted).
    pub authorizer_calls: AtomicU64,
    /// Of those, the ones it failed to answer (timeout, error, unreadable answer).
    pub authorizer_failures: AtomicU64,
    /// Console requests served (pages and API calls).
    pub console_requests: AtomicU64,
    /// Console requests refused for want of the console token (401).
    pub console_refused: AtomicU64,
}

impl Metrics {
    pub fn page_rejected(&self, reason: RejectReason) {
        let index = RejectReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or_default();
        self.pages_rejected[index].fetch_add(1, Ordering::Relaxed);
    }

    pub fn replay_refreshed(&self, reason: RefreshReason) {
        let index = RefreshReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or_default();
        self.replay_refreshes[index].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of these counters, the hub's, and presence's when
    /// it is on. `history_bytes`: what the in-memory history holds (0 on Redis, whose
    /// memory is its own).
    pub fn render(&self, hub: &Hub, presence: Option<&Presence>, history_bytes: u64) -> String {
        let stats = hub.stats();
        let hub = hub.counters();
        let presence = presence.map(Presence::stats);
        let mut out = String::new();
        let mut line = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let counter = |c: &AtomicU64| c.load(Ordering::Relaxed);
        line(
            "channelgate_connections",
            "gauge",
            "Open WebSocket connections.",
            stats.connections,
        );
        line(
            "channelgate_users",
            "gauge",
            "Distinct users connected.",
            stats.users,
        );
        line(
            "channelgate_groups",
            "gauge",
            "Channel groups with local members.",
            stats.groups,
        );
        line(
            "channelgate_subscriptions",
            "gauge",
            "Connection-group memberships.",
            stats.subscriptions,
        );
        line(
            "channelgate_connections_opened_total",
            "counter",
            "WebSocket connections accepted.",
            hub.connections_opened(),
        );
        line(
            "channelgate_connections_refused_total",
            "counter",
            "Connections refused with 503 at --max-connections.",
            counter(&self.connections_refused),
        );
        line(
            "channelgate_authentication_failures_total",
            "counter",
            "Handshakes refused: a bad token, a connect check denied (1008) or not answered (1011).",
            counter(&self.authentication_failures),
        );
        line(
            "channelgate_events_published_total",
            "counter",
            "Events accepted from the gRPC API.",
            counter(&self.events_published),
        );
        line(
            "channelgate_frames_queued_total",
            "counter",
            "Event frames queued to sockets.",
            hub.frames_queued(),
        );
        line(
            "channelgate_slow_consumers_total",
            "counter",
            "Connections closed because their outbound queue overflowed.",
            hub.slow_consumers(),
        );
        line(
            "channelgate_invalid_frames_total",
            "counter",
            "Client frames answered with an error frame.",
            counter(&self.invalid_frames),
        );
        line(
            "channelgate_events_recorded_total",
            "counter",
            "Events published through this node that the event history recorded.",
            counter(&self.events_recorded),
        );
        line(
            "channelgate_history_bytes",
            "gauge",
            "Bytes the in-memory event history holds (0 with Redis).",
            history_bytes,
        );
        line(
            "channelgate_replays_served_total",
            "counter",
            "Replays answered with their events (force_refresh false).",
            counter(&self.replays_served),
        );
        line(
            "channelgate_events_replayed_total",
            "counter",
            "Events sent by replays.",
            counter(&self.events_replayed),
        );
        line(
            "channelgate_replay_retries_total",
            "counter",
            "Replays told to retry later (replay_events_retry).",
            counter(&self.replay_retries),
        );
        line(
            "channelgate_authorizer_calls_total",
            "counter",
            "Questions that reached the backend authorizer (cached answers not counted).",
            counter(&self.authorizer_calls),
        );
        line(
            "channelgate_authorizer_failures_total",
            "counter",
            "Authorizer calls that got no answer (timeout, error, unreadable answer).",
            counter(&self.authorizer_failures),
        );
        line(
            "channelgate_console_requests_total",
            "counter",
            "Console pages and API calls served.",
            counter(&self.console_requests),
        );
        line(
            "channelgate_console_refused_total",
            "counter",
            "Console requests refused without the console token (401).",
            counter(&self.console_refused),
        );
        if let Some(presence) = presence {
            line(
                "channelgate_presence_spaces",
                "gauge",
                "Presence spaces with members on this node.",
                presence.spaces,
            );
            line(
                "channelgate_presence_members",
                "gauge",
                "Presence members on this node.",
                presence.members,
            );
            line(
                "channelgate_presence_focus_dropped_total",
                "counter",
                "Focus frames dropped: invalid, for a page not held, or over the rate.",
                presence.focus_dropped,
            );
            line(
                "channelgate_presence_full_total",
                "counter",
                "Presence joins refused because the space was full.",
                presence.full,
            );
        }
        let by_reason = |out: &mut String, name: &str, help: &str, counts: Vec<(&str, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (reason, count) in counts {
                let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {count}");
            }
        };
        let by_mode = |out: &mut String, name: &str, help: &str, counts: &[AtomicU64; 2]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for mode in deflate::Mode::ALL {
                let count = counts[mode as usize].load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{mode=\"{}\"}} {count}", mode.as_str());
            }
        };
        by_mode(
            &mut out,
            "channelgate_deflate_plain_bytes_total",
            "Event payload bytes sent compressed (permessage-deflate), before compression, by mode.",
            &deflate::PLAIN_BYTES,
        );
        by_mode(
            &mut out,
            "channelgate_deflate_compressed_bytes_total",
            "The same payloads' bytes after compression, by mode.",
            &deflate::COMPRESSED_BYTES,
        );
        by_reason(
            &mut out,
            "channelgate_replay_refreshes_total",
            "Replays answered with force_refresh, by reason.",
            RefreshReason::ALL
                .iter()
                .zip(&self.replay_refreshes)
                .map(|(reason, count)| (reason.as_str(), counter(count)))
                .collect(),
        );
        by_reason(
            &mut out,
            "channelgate_pages_rejected_total",
            "Subscriptions refused, by reason.",
            RejectReason::ALL
                .iter()
                .zip(&self.pages_rejected)
                .map(|(reason, count)| (reason.as_str(), counter(count)))
                .collect(),
        );
        out
    }
}
