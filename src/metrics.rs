//! Counters a node keeps about itself, served as Prometheus text on `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::hub::HubStats;
use crate::protocol::RejectReason;

/// Monotonic counters; gauges come from the hub when rendering.
#[derive(Default)]
pub struct Metrics {
    pub connections_opened: AtomicU64,
    pub authentication_failures: AtomicU64,
    pub events_published: AtomicU64,
    pub frames_queued: AtomicU64,
    /// Connections closed because their outbound queue overflowed.
    pub slow_consumers: AtomicU64,
    pub invalid_frames: AtomicU64,
    pub pages_rejected: [AtomicU64; RejectReason::ALL.len()],
}

impl Metrics {
    pub fn page_rejected(&self, reason: RejectReason) {
        let index = RejectReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or_default();
        self.pages_rejected[index].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of these counters and the hub's gauges.
    pub fn render(&self, stats: HubStats) -> String {
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
            counter(&self.connections_opened),
        );
        line(
            "channelgate_authentication_failures_total",
            "counter",
            "Handshakes refused for a bad token.",
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
            counter(&self.frames_queued),
        );
        line(
            "channelgate_slow_consumers_total",
            "counter",
            "Connections closed because their outbound queue overflowed.",
            counter(&self.slow_consumers),
        );
        line(
            "channelgate_invalid_frames_total",
            "counter",
            "Client frames answered with an error frame.",
            counter(&self.invalid_frames),
        );
        let _ = writeln!(
            out,
            "# HELP channelgate_pages_rejected_total Subscriptions refused, by reason.\n# TYPE channelgate_pages_rejected_total counter"
        );
        for (reason, count) in RejectReason::ALL.iter().zip(&self.pages_rejected) {
            let _ = writeln!(
                out,
                "channelgate_pages_rejected_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                counter(count)
            );
        }
        out
    }
}
