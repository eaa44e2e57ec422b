//! The control log: the revokes and Disconnects of the last minutes, kept in a Redis
//! stream beside the registry. Each is also published to every node, which is how a live
//! node gets it; the log is for a node that was counted gone (its heartbeat lapsed, so no
//! one waited for it) to apply what it missed before it serves again. Stream ids come from
//! Redis's clock, the same clock the node's heartbeats are read with.

use std::time::Duration;

use prost::Message as _;

use super::link::Shared;
use crate::bus::BusUnavailable;
use crate::control::Request;
use crate::proto;

/// How long the log keeps a request: a node counted gone for longer closes its sockets
/// instead of catching up.
pub(super) const CONTROL_LOG_KEEP: Duration = Duration::from_secs(300);

/// Appends a request and trims what is older than `CONTROL_LOG_KEEP` (ARGV[2], ms).
const APPEND_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XADD', KEYS[1], 'MINID', '~', now - tonumber(ARGV[2]), '*', 'r', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// A stream entry as `XRANGE` gives it: its id and its fields.
type LogEntry = (String, Vec<(String, Vec<u8>)>);

/// Whether a node that missed this request must apply it: it takes something away (a
/// re-check is made up for by re-checking every page anyway).
pub(super) fn must_be_logged(request: &Request) -> bool {
    match request {
        Request::CheckPermission(check) => check.revoke && !check.dry_run,
        Request::Disconnect(_) => true,
        Request::Info(_) => false,
    }
}

impl Shared {
    /// Logs an encoded `ControlRequest` before it is published.
    pub(super) async fn log_control(&self, message: &[u8]) -> Result<(), BusUnavailable> {
        let mut connection = self.publisher().await?;
        redis::Script::new(APPEND_SCRIPT)
            .key(self.names.control_log())
            .arg(message)
            .arg(CONTROL_LOG_KEEP.as_millis() as u64)
            .invoke_async::<i64>(&mut connection)
            .await
            .map(|_| ())
            .map_err(|e| BusUnavailable(format!("Redis control log: {e}")))
    }

    /// The logged requests from `since_ms` (Redis's clock) on, in order.
    pub(super) async fn logged_since(&self, since_ms: u64) -> Result<Vec<Request>, String> {
        let mut connection = self.publisher().await.map_err(|e| e.0)?;
        let entries: Vec<LogEntry> = redis::cmd("XRANGE")
            .arg(self.names.control_log())
            .arg(since_ms)
            .arg("+")
            .query_async(&mut connection)
            .await
            .map_err(|e| format!("Redis control log not read: {e}"))?;
        let mut requests = Vec::new();
        for (id, fields) in entries {
            for (_, bytes) in fields {
                match proto::ControlRequest::decode(bytes.as_slice()) {
                    Ok(proto::ControlRequest {
                        request: Some(request),
                        ..
                    }) => requests.push(request),
                    _ => tracing::warn!(%id, "unreadable control log entry skipped"),
                }
            }
        }
        Ok(requests)
    }
}
