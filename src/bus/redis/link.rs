//! The link to Redis: how a node reaches one Redis or a cluster ([`Link`]), the command
//! connection it gets from it ([`Connection`]), and the state the bus handle and its
//! tasks share ([`Shared`]), with publishing and readiness; and the timings both
//! listeners keep to (command timeout, reconnect backoff, pings). The node registry adds
//! its methods to [`Shared`] in `registry.rs`.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use tokio::sync::{Notify, mpsc, watch};

use super::lock;
use super::names::Names;
use super::registry::Liveness;
use crate::bus::{BusUnavailable, PublishError};
use crate::control::Reply;

/// Reconnect backoff bounds.
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long one Redis command may take before the bus counts Redis as unavailable.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the pub/sub connection pings Redis: a frozen or silent Redis sends nothing,
/// so without it the node would not notice. No pong within `COMMAND_TIMEOUT` breaks the
/// connection: the node turns not ready and reconnects.
pub(super) const WATCHDOG_EVERY: Duration = Duration::from_secs(1);

/// What a failed publish command says about the event: a command Redis refused, or that
/// never reached it, published nothing; one that timed out or lost its connection after
/// it was sent may have run.
pub(super) fn publish_failed(error: redis::RedisError, what: &str) -> PublishError {
    let message = format!("{what} failed: {error}");
    if !error.is_connection_refusal()
        && (error.is_timeout() || error.is_io_error() || error.is_connection_dropped())
    {
        PublishError::Unknown(message)
    } else {
        PublishError::Unavailable(message)
    }
}

/// How a node reaches Redis.
pub(super) enum Link {
    /// One Redis: a connection made on first use (Redis may be down at start), which
    /// then reconnects by itself; the pub/sub connection is the listener's own.
    Single {
        client: redis::Client,
        manager: Mutex<Option<ConnectionManager>>,
    },
    /// A Redis Cluster: one connection, made once by the cluster listener (it follows
    /// the cluster by itself), carries commands and the sharded pub/sub messages
    /// ([`cluster`](super::cluster)).
    Cluster(OnceLock<ClusterConnection>),
}

/// A connection for commands, to one Redis or to a cluster.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// State shared by the bus handle and its tasks.
pub(super) struct Shared {
    pub(super) names: Names,
    pub(super) link: Link,
    pub(super) ready: watch::Sender<bool>,
    /// Control requests this node asked, by id, waiting for replies.
    pub(super) asking: Mutex<HashMap<String, mpsc::UnboundedSender<(String, Reply)>>>,
    pub(super) control_timeout: Duration,
    /// What this node knows of who is live, itself included.
    pub(super) liveness: Mutex<Liveness>,
    /// Rung when this node finds its heartbeat lapsed, so its listener catches up even
    /// when no message comes.
    pub(super) counted_gone: Notify,
}

impl Shared {
    pub(super) async fn publisher(&self) -> Result<Connection, BusUnavailable> {
        let (client, manager) = match &self.link {
            Link::Cluster(connection) => {
                return connection
                    .get()
                    .cloned()
                    .map(Connection::Cluster)
                    .ok_or_else(|| {
                        BusUnavailable("not connected to the Redis Cluster yet".into())
                    });
            }
            Link::Single { client, manager } => (client, manager),
        };
        if let Some(connection) = lock(manager).clone() {
            return Ok(Connection::Single(connection));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_MAX);
        let connection = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| BusUnavailable(format!("cannot connect to Redis: {e}")))?;
        *lock(manager) = Some(connection.clone());
        Ok(Connection::Single(connection))
    }

    pub(super) async fn publish_bytes(
        &self,
        channel: &str,
        bytes: Vec<u8>,
    ) -> Result<i64, BusUnavailable> {
        let mut connection = self.publisher().await?;
        redis::cmd(self.names.publish_command())
            .arg(channel)
            .arg(bytes)
            .query_async(&mut connection)
            .await
            .map_err(|e| BusUnavailable(format!("Redis PUBLISH failed: {e}")))
    }

    pub(super) fn set_ready(&self, ready: bool) {
        self.ready.send_if_modified(|current| {
            let changed = *current != ready;
            *current = ready;
            changed
        });
    }
}
