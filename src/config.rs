//! Settings: flags, `CHANNELGATE_*` environment variables and a TOML config file.
//!
//! Flags win over the environment, the environment over the file. All three are read
//! into the same [`Options`] shape; [`Settings::resolve`] checks them once and fills in
//! defaults, so the rest of the node only sees valid, complete settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::bus::{RedisSettings, RedisTarget};
use crate::console::ConsoleAccess;
use crate::deflate::DeflateSettings;
use crate::history::{HistorySettings, Retention};
use crate::idempotency::IdempotencySettings;
use crate::pages::{PageRegistry, PageSpec};
use crate::presence::{FocusTypeSpec, FocusTypes, PresenceLimits};

/// channelgate: a real-time WebSocket gateway speaking Baserow's `/ws/core/` protocol.
///
/// Browsers subscribe to pages over one WebSocket; the backend publishes events over
/// gRPC (service channelgate.v1.Gateway). Every option below can also be given as the
/// environment variable shown, or as a key of the same name (with underscores) in the
/// file given by --config. Flags win over the environment, the environment over the file.
#[derive(Parser, Debug, Default, Clone, Serialize, Deserialize)]
#[command(name = "channelgate", version, max_term_width = 100)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// TOML config file. Besides these options it may replace the page table with
    /// [[pages]] entries and the presence focus types with [[focus_types]] (see README).
    #[arg(long, env = "CHANNELGATE_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Development mode: a generated JWT secret printed with a sample token, no API key,
    /// the static authorizer, the web console (/console/) open without a token, loud
    /// warnings. Never in production.
    #[arg(long, env = "CHANNELGATE_DEV", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub dev: Option<bool>,

    /// Address of the WebSocket and HTTP listener (/ws/core/, /metrics, /healthz, /readyz,
    /// and the console's /console/) [default: 127.0.0.1:8080]
    #[arg(long, env = "CHANNELGATE_WS_ADDR", value_name = "ADDR")]
    pub ws_addr: Option<SocketAddr>,

    /// Address of the gRPC API [default: 127.0.0.1:50051]
    #[arg(long, env = "CHANNELGATE_GRPC_ADDR", value_name = "ADDR")]
    pub grpc_addr: Option<SocketAddr>,

    /// HS256 key the backend signs its access tokens with. Required unless --dev.
    #[arg(
        long,
        env = "CHANNELGATE_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,

    /// Name of the token claim that holds the user id [default: user_id]
    #[arg(long, env = "CHANNELGATE_JWT_USER_ID_CLAIM", value_name = "CLAIM")]
    pub jwt_user_id_claim: Option<String>,

    /// PEM certificate (chain) of the gRPC API: with --grpc-tls-key, the API speaks TLS,
    /// so the backend can reach it across hosts [default: plaintext]
    #[arg(long, env = "CHANNELGATE_GRPC_TLS_CERT", value_name = "FILE")]
    pub grpc_tls_cert: Option<PathBuf>,

    /// PEM private key for --grpc-tls-cert
    #[arg(long, env = "CHANNELGATE_GRPC_TLS_KEY", value_name = "FILE")]
    pub grpc_tls_key: Option<PathBuf>,

    /// Bearer key every gRPC call must carry (`authorization: Bearer <key>`). Required
    /// unless --dev.
    #[arg(
        long,
        env = "CHANNELGATE_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,

    /// Token that opens the web console (/console/ on --ws-addr) outside --dev: every
    /// console request must carry it (its login form sets an HttpOnly, SameSite=Strict
    /// cookie; scripts send `authorization: Bearer <token>`). At least 16 characters.
    /// Unset: the console is open under --dev and not served otherwise (404)
    #[arg(
        long,
        env = "CHANNELGATE_CONSOLE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub console_token: Option<String>,

    /// Who decides subscriptions: `static` allows every authenticated user every page
    /// (anonymous users only anonymous-ok pages); `http://HOST[:PORT]/PATH` POSTs each
    /// question as JSON; `grpc://HOST:PORT` calls channelgate.v1.Authorizer/Authorize
    /// (and AuthorizeConnect) [default: static]
    #[arg(long, env = "CHANNELGATE_AUTHORIZER", value_name = "KIND")]
    pub authorizer: Option<String>,

    /// Shared secret sent to the authorizer (HTTP header and gRPC metadata
    /// `x-channelgate-secret`)
    #[arg(
        long,
        env = "CHANNELGATE_AUTHORIZER_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub authorizer_secret: Option<String>,

    /// Milliseconds the authorizer has to answer; later means `authorizer_unavailable` for
    /// a subscribe, close 1011 for a connect check [default: 2000]
    #[arg(long, env = "CHANNELGATE_AUTHORIZER_TIMEOUT_MS", value_name = "MS")]
    pub authorizer_timeout_ms: Option<u64>,

    /// Authorizer calls in flight at once [default: 64]
    #[arg(long, env = "CHANNELGATE_AUTHORIZER_CONCURRENCY", value_name = "N")]
    pub authorizer_concurrency: Option<usize>,

    /// Milliseconds an answer is reused for the same user, group and page parameters (a
    /// connect answer: for the same token), unless CheckPermission (or, for connect
    /// answers, Disconnect) drops it first; 0 keeps none (identical questions in flight
    /// are still merged) [default: 5000]
    #[arg(long, env = "CHANNELGATE_AUTHORIZER_CACHE_MS", value_name = "MS")]
    pub authorizer_cache_ms: Option<u64>,

    /// Ask the authorizer once per connection whether the token may connect at all
    /// (`"action":"connect"` with the token's iat and jti; gRPC AuthorizeConnect), before
    /// the authentication frame: for a backend that refuses tokens issued before a
    /// password change, or inactive users. Needs an http:// or grpc:// --authorizer
    /// [default: false]
    #[arg(long, env = "CHANNELGATE_AUTHORIZE_CONNECT", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub authorize_connect: Option<bool>,

    /// Milliseconds the connect check may take, waiting for a free authorizer call
    /// included; a socket not confirmed by then gets the authentication failure frame and
    /// close 1011. Each call is also bounded by --authorizer-timeout-ms: the shorter wins
    /// [default: 5000]
    #[arg(long, env = "CHANNELGATE_AUTHENTICATION_TIMEOUT_MS", value_name = "MS")]
    pub authentication_timeout_ms: Option<u64>,

    /// Redis URL (redis://HOST:PORT/DB); several nodes on one Redis form a cluster.
    /// Unset: the in-memory bus, one node alone
    #[arg(
        long,
        env = "CHANNELGATE_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,

    /// Nodes of a Redis Cluster (HOST:PORT,...; a few are enough, the rest are found):
    /// groups, users and history spread over its shards by slot, with sharded pub/sub,
    /// and a primary replaced by its replica is followed. Not with --redis-url
    #[arg(
        long,
        env = "CHANNELGATE_REDIS_CLUSTER_NODES",
        value_name = "HOST:PORT,...",
        value_delimiter = ','
    )]
    pub redis_cluster_nodes: Option<Vec<String>>,

    /// Prefix of every Redis channel and key this cluster uses; no braces on a Redis
    /// Cluster [default: channelgate]
    #[arg(long, env = "CHANNELGATE_REDIS_PREFIX", value_name = "PREFIX")]
    pub redis_prefix: Option<String>,

    /// Milliseconds a cluster-wide CheckPermission, Disconnect or Info waits for the
    /// other nodes' replies [default: 2000]
    #[arg(long, env = "CHANNELGATE_CONTROL_TIMEOUT_MS", value_name = "MS")]
    pub control_timeout_ms: Option<u64>,

    /// This node's id in Info [default: generated]
    #[arg(long, env = "CHANNELGATE_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// Comma-separated browser Origins allowed to open /ws/core/; a handshake with another
    /// Origin gets HTTP 403, one without an Origin header is allowed [default: any, warned]
    #[arg(
        long,
        env = "CHANNELGATE_ALLOWED_ORIGINS",
        value_name = "ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Option<Vec<String>>,

    /// Bytes a connection may have queued for sending; a client that falls further behind
    /// is closed with code 4008 (slow consumer) [default: 1048576]
    #[arg(long, env = "CHANNELGATE_MAX_QUEUE_BYTES", value_name = "BYTES")]
    pub max_queue_bytes: Option<usize>,

    /// Largest frame a client may send; a larger one closes it with code 1009
    /// [default: 65536]
    #[arg(long, env = "CHANNELGATE_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,

    /// Largest event payload the gRPC API accepts [default: 1048576]
    #[arg(long, env = "CHANNELGATE_MAX_PAYLOAD_BYTES", value_name = "BYTES")]
    pub max_payload_bytes: Option<usize>,

    /// Largest gRPC message the API takes; a larger one fails with RESOURCE_EXHAUSTED
    /// [default: 67108864]
    #[arg(long, env = "CHANNELGATE_MAX_GRPC_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_grpc_message_bytes: Option<usize>,

    /// Events one PublishBatch may carry; more fail with INVALID_ARGUMENT [default: 1000]
    #[arg(long, env = "CHANNELGATE_MAX_BATCH_EVENTS", value_name = "N")]
    pub max_batch_events: Option<usize>,

    /// Payload bytes one PublishBatch may carry; more fail with INVALID_ARGUMENT, so that
    /// one batch cannot overflow a subscriber's queue [default: --max-queue-bytes]
    #[arg(long, env = "CHANNELGATE_MAX_BATCH_BYTES", value_name = "BYTES")]
    pub max_batch_bytes: Option<usize>,

    /// Seconds a publish's idempotency_key is remembered: the same key within it answers
    /// the first event id and publishes nothing [default: 600]
    #[arg(long, env = "CHANNELGATE_IDEMPOTENCY_WINDOW", value_name = "SECS")]
    pub idempotency_window: Option<u64>,

    /// Idempotency keys one node without Redis remembers at most; past it the oldest are
    /// forgotten before their window ends (on Redis, keys live in Redis) [default: 100000]
    #[arg(long, env = "CHANNELGATE_IDEMPOTENCY_KEYS", value_name = "N")]
    pub idempotency_keys: Option<usize>,

    /// Pages one connection may hold; more get `too_many_pages` [default: 100]
    #[arg(long, env = "CHANNELGATE_MAX_PAGES", value_name = "N")]
    pub max_pages: Option<usize>,

    /// Open connections (WebSocket and HTTP) the node serves; more are answered 503 at
    /// once. Capped below the open-file limit, which the node raises to its hard limit
    /// at start [default: 100000]
    #[arg(long, env = "CHANNELGATE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Milliseconds a client has to send its HTTP request headers (the WebSocket
    /// handshake included); a connection that sends nothing, or too slowly, is closed
    /// [default: 10000]
    #[arg(long, env = "CHANNELGATE_HANDSHAKE_TIMEOUT_MS", value_name = "MS")]
    pub handshake_timeout_ms: Option<u64>,

    /// Milliseconds between the server's pings to each socket; a client that answers
    /// nothing for two intervals (a dead or half-open peer) is closed with 1001
    /// [default: 20000]
    #[arg(long, env = "CHANNELGATE_PING_INTERVAL_MS", value_name = "MS")]
    pub ping_interval_ms: Option<u64>,

    /// WebSockets one user may hold on one node; more are closed with 1008 (anonymous
    /// sockets count per address instead) [default: 100]
    #[arg(long, env = "CHANNELGATE_MAX_CONNECTIONS_PER_USER", value_name = "N")]
    pub max_connections_per_user: Option<usize>,

    /// Connections one client address may hold on one node; more get 503
    /// [default: 50000]
    #[arg(long, env = "CHANNELGATE_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<usize>,

    /// Frames a client may send in a burst before the rate limit applies [default: 100]
    #[arg(long, env = "CHANNELGATE_INBOUND_BURST", value_name = "N")]
    pub inbound_burst: Option<u32>,

    /// Sustained frames per second a client may send; faster closes it with code 1008
    /// [default: 200]
    #[arg(long, env = "CHANNELGATE_INBOUND_RATE", value_name = "N")]
    pub inbound_rate: Option<u32>,

    /// Log lines as `text` or as `json` objects, one per line (for log collectors);
    /// `RUST_LOG` sets the level [default: text]
    #[arg(long, env = "CHANNELGATE_LOG_FORMAT", value_name = "text|json")]
    pub log_format: Option<String>,

    /// Seconds over which a stopping node (SIGTERM) closes its sockets with 1012, a few at
    /// a time, after `/readyz` turned 503, so that clients do not all reconnect at once;
    /// 0 closes them all at once with 1001 [default: 0]
    #[arg(long, env = "CHANNELGATE_DRAIN_SECONDS", value_name = "SECS")]
    pub drain_seconds: Option<u64>,

    /// Worker threads that serve sockets and calls [default: one per core]
    #[arg(long, env = "CHANNELGATE_WORKERS", value_name = "N")]
    pub workers: Option<usize>,

    /// Seconds a shutdown waits for sockets to close and gRPC calls to finish
    /// [default: 10]
    #[arg(long, env = "CHANNELGATE_SHUTDOWN_TIMEOUT", value_name = "SECS")]
    pub shutdown_timeout: Option<u64>,

    /// Event history for replay (`on` or `off`): every recorded event gets an id, carried
    /// as `_event_id`, and a reconnecting client gets what it missed [default: on]
    #[arg(long, env = "CHANNELGATE_HISTORY", value_name = "on|off")]
    pub history: Option<String>,

    /// Events kept per channel group, and for everyone (`users`, `all_users`)
    /// [default: 1000]
    #[arg(long, env = "CHANNELGATE_HISTORY_SIZE", value_name = "N")]
    pub history_size: Option<usize>,

    /// Events kept for user-targeted and individual publishes, one stream that all users
    /// share (on a Redis Cluster one in each of the 32 lanes, each keeping N)
    /// [default: 10000]
    #[arg(long, env = "CHANNELGATE_HISTORY_USER_SIZE", value_name = "N")]
    pub history_user_size: Option<usize>,

    /// Seconds an event is kept; a client whose cursor is older refreshes [default: 86400]
    #[arg(long, env = "CHANNELGATE_HISTORY_TTL", value_name = "SECS")]
    pub history_ttl: Option<u64>,

    /// Bytes the in-memory history may hold (one node without Redis); the oldest events
    /// go first [default: 268435456]
    #[arg(long, env = "CHANNELGATE_HISTORY_MAX_BYTES", value_name = "BYTES")]
    pub history_max_bytes: Option<usize>,

    /// Events one replay sends at most; a client that missed more refreshes
    /// [default: 200]
    #[arg(long, env = "CHANNELGATE_REPLAY_LIMIT", value_name = "N")]
    pub replay_limit: Option<usize>,

    /// Replays a node serves at once; more are told to retry in a second
    /// [default: 64]
    #[arg(long, env = "CHANNELGATE_REPLAY_CONCURRENCY", value_name = "N")]
    pub replay_concurrency: Option<usize>,

    /// Milliseconds a replay waits for the history store before the client is told to
    /// retry [default: 2000]
    #[arg(long, env = "CHANNELGATE_HISTORY_TIMEOUT_MS", value_name = "MS")]
    pub history_timeout_ms: Option<u64>,

    /// permessage-deflate for the sockets that offer it (every browser does): `auto`
    /// compresses an event that reaches few sockets of the node per socket, with context
    /// (fewest bytes), and one that reaches many once for all of them (least CPU);
    /// `shared` always the latter; `off` sends every frame plain [default: auto]
    #[arg(long, env = "CHANNELGATE_COMPRESSION", value_name = "auto|shared|off")]
    pub compression: Option<String>,

    /// With `--compression auto`: events that reach at most this many sockets of the node
    /// are compressed per socket [default: 16]
    #[arg(long, env = "CHANNELGATE_COMPRESSION_CONTEXT_FANOUT", value_name = "N")]
    pub compression_context_fanout: Option<usize>,

    /// With `--compression auto`: the window of a socket's own deflate stream, 9 to 15
    /// bits. A 15-bit window sends about half the bytes of an 11-bit one on row updates;
    /// a stream takes about 280 KiB with 15 bits while its socket is busy
    /// [default: 15]
    #[arg(long, env = "CHANNELGATE_COMPRESSION_WINDOW_BITS", value_name = "BITS")]
    pub compression_window_bits: Option<u8>,

    /// Event payloads shorter than this go plain where they would be compressed without
    /// context (an event for many sockets, or a socket that keeps no context); with
    /// context every frame is compressed [default: 64]
    #[arg(long, env = "CHANNELGATE_COMPRESSION_MIN_BYTES", value_name = "BYTES")]
    pub compression_min_bytes: Option<usize>,

    /// zlib's compression level, 1 (fastest) to 9. With context, 9 sends 3 to 7 % fewer
    /// bytes than 6 in the bench, for more CPU per compression [default: 9]
    #[arg(long, env = "CHANNELGATE_COMPRESSION_LEVEL", value_name = "1-9")]
    pub compression_level: Option<u32>,

    /// Presence (`on` or `off`): who else is in a space (a table and its rows), and which
    /// cell they are in, on every node [default: off]
    #[arg(long, env = "CHANNELGATE_PRESENCE", value_name = "on|off")]
    pub presence: Option<String>,

    /// Members one presence space holds; a socket joining a full space gets no presence
    /// there (its page still works) [default: 1000]
    #[arg(long, env = "CHANNELGATE_PRESENCE_MAX_MEMBERS", value_name = "N")]
    pub presence_max_members: Option<usize>,

    /// Focus frames per second one socket may send (and as a burst); more are dropped,
    /// the socket stays [default: 10]
    #[arg(long, env = "CHANNELGATE_PRESENCE_FOCUS_RATE", value_name = "N")]
    pub presence_focus_rate: Option<u32>,

    /// The page table (config file only); Baserow's five page types when absent.
    #[arg(skip)]
    pub pages: Option<Vec<PageSpec>>,

    /// The focus types of presence (config file only); Baserow's `cell` and `row` when
    /// absent.
    #[arg(skip)]
    pub focus_types: Option<Vec<FocusTypeSpec>>,
}

/// Presence and its bounds; `None` in [`Settings`] when off.
#[derive(Debug, Clone)]
pub struct PresenceSettings {
    pub limits: PresenceLimits,
    pub focus_types: Vec<FocusTypeSpec>,
}

/// The longest `--history-ttl`: ten years, so that "now less the age limit" stays a time.
const MAX_HISTORY_TTL_SECS: u64 = 10 * 365 * 86_400;

/// Which authorizer decides subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorizerKind {
    Static,
    /// `http://...`: the URL to POST to.
    Http(String),
    /// `grpc://HOST:PORT`.
    Grpc(String),
}

/// Complete, checked settings of one node.
#[derive(Debug, Clone)]
pub struct Settings {
    pub dev: bool,
    /// Event history and replay; `None`: off.
    pub history: Option<HistorySettings>,
    /// Presence; `None`: off.
    pub presence: Option<PresenceSettings>,
    /// permessage-deflate; `None`: off.
    pub deflate: Option<DeflateSettings>,
    pub ws_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub jwt_secret: String,
    /// Whether `jwt_secret` was generated (dev mode without a secret).
    pub jwt_secret_generated: bool,
    pub jwt_user_id_claim: String,
    pub api_key: Option<String>,
    /// Who may use the web console.
    pub console: ConsoleAccess,
    pub authorizer: AuthorizerKind,
    pub authorizer_secret: Option<String>,
    pub authorizer_timeout: Duration,
    pub authorizer_concurrency: usize,
    pub authorizer_cache: Duration,
    /// The connect check's deadline; `None`: no connect check (`--authorize-connect` off).
    pub connect_check: Option<Duration>,
    /// The Redis bus; `None`: the in-memory bus.
    pub redis: Option<RedisSettings>,
    pub node_id: String,
    pub allowed_origins: Option<Vec<String>>,
    pub max_queue_bytes: usize,
    pub max_message_bytes: usize,
    pub max_payload_bytes: usize,
    pub max_batch_events: usize,
    pub max_batch_bytes: usize,
    pub idempotency: IdempotencySettings,
    pub max_grpc_message_bytes: usize,
    /// The gRPC API's certificate and key, PEM; `None`: plaintext.
    pub grpc_tls: Option<(PathBuf, PathBuf)>,
    pub max_connections_per_user: usize,
    pub max_connections_per_ip: usize,
    pub handshake_timeout: Duration,
    pub ping_interval: Duration,
    /// Spread of the closes of a stopping node; zero: all at once.
    pub drain: Duration,
    /// Logs as JSON lines rather than text.
    pub log_json: bool,
    /// Worker threads; `None`: one per core.
    pub workers: Option<usize>,
    pub max_pages: usize,
    pub max_connections: usize,
    pub inbound_burst: u32,
    pub inbound_rate: u32,
    pub shutdown_timeout: Duration,
    pub pages: Vec<PageSpec>,
}

impl Options {
    /// Reads the config file named by `--config`, if any, beneath these options.
    pub fn with_file(self) -> Result<Options, String> {
        let Some(path) = &self.config else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        let file: Options =
            toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
        self.over(file)
    }

    /// These options, with the gaps filled from `lower`: both become JSON objects, and
    /// every value these options set replaces the lower one.
    fn over(self, lower: Options) -> Result<Options, String> {
        let to_map = |o: &Options| match serde_json::to_value(o) {
            Ok(serde_json::Value::Object(map)) => Ok(map),
            other => Err(format!("cannot merge options: {other:?}")),
        };
        let mut merged = to_map(&lower)?;
        for (key, value) in to_map(&self)? {
            if !value.is_null() {
                merged.insert(key, value);
            }
        }
        let mut options: Options = serde_json::from_value(serde_json::Value::Object(merged))
            .map_err(|e| format!("cannot merge options: {e}"))?;
        options.config = self.config;
        Ok(options)
    }
}

/// One Redis, a Redis Cluster, or neither (the in-memory bus). Empty values count as
/// unset, so an empty variable left in a deployment's environment does not get in the way;
/// both given is an error, from the command line, the environment or the config file.
fn redis_target(
    url: Option<String>,
    cluster_nodes: Option<Vec<String>>,
) -> Result<Option<RedisTarget>, String> {
    let nodes: Vec<String> = cluster_nodes
        .unwrap_or_default()
        .into_iter()
        .map(|node| node.trim().to_string())
        .filter(|node| !node.is_empty())
        .collect();
    let url = url.filter(|url| !url.is_empty());
    match (url, nodes.is_empty()) {
        (Some(_), false) => {
            Err("--redis-url and --redis-cluster-nodes: choose one Redis or a cluster".into())
        }
        (Some(url), true) => Ok(Some(RedisTarget::Url(url))),
        (None, false) => Ok(Some(RedisTarget::Cluster(nodes))),
        (None, true) => Ok(None),
    }
}

/// A count setting: at least 1, `default` when not given.
fn positive(name: &str, value: Option<usize>, default: usize) -> Result<usize, String> {
    match value {
        Some(0) => Err(format!("--{name} must be at least 1")),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

/// `--compression` and its knobs; `None` when it is off.
fn deflate_settings(options: &Options) -> Result<Option<DeflateSettings>, String> {
    let context_fanout = match options.compression.as_deref().unwrap_or("auto") {
        "auto" | "on" => options.compression_context_fanout.unwrap_or(16),
        "shared" => 0,
        "off" => return Ok(None),
        other => {
            return Err(format!(
                "--compression {other:?}: expected auto, shared or off"
            ));
        }
    };
    let level = options.compression_level.unwrap_or(9);
    if !(1..=9).contains(&level) {
        return Err(format!("--compression-level {level}: expected 1 to 9"));
    }
    let window_bits = options.compression_window_bits.unwrap_or(15);
    if !(9..=15).contains(&window_bits) {
        return Err(format!(
            "--compression-window-bits {window_bits}: expected 9 to 15"
        ));
    }
    Ok(Some(DeflateSettings {
        context_fanout,
        window_bits,
        min_bytes: options.compression_min_bytes.unwrap_or(64),
        level,
    }))
}

/// `--presence` and its bounds; `None` when presence is off.
fn presence_settings(options: &Options) -> Result<Option<PresenceSettings>, String> {
    match options.presence.as_deref().unwrap_or("off") {
        "on" | "true" | "1" => {}
        "off" | "false" | "0" => return Ok(None),
        other => return Err(format!("--presence {other:?}: expected on or off")),
    }
    let focus_types = options
        .focus_types
        .clone()
        .unwrap_or_else(FocusTypes::baserow_specs);
    FocusTypes::new(&focus_types).map_err(|e| format!("focus types: {e}"))?;
    let focus_rate = positive(
        "presence-focus-rate",
        options.presence_focus_rate.map(|r| r as usize),
        10,
    )?;
    Ok(Some(PresenceSettings {
        limits: PresenceLimits {
            max_members: positive("presence-max-members", options.presence_max_members, 1000)?,
            focus_rate: u32::try_from(focus_rate)
                .map_err(|_| "--presence-focus-rate is too large".to_string())?,
        },
        focus_types,
    }))
}

/// `--history` and its limits; `None` when history is off.
fn history_settings(options: &Options) -> Result<Option<HistorySettings>, String> {
    let history = match options.history.as_deref().unwrap_or("on") {
        "on" | "true" | "1" => Some(HistorySettings {
            retention: Retention {
                events_per_stream: positive("history-size", options.history_size, 1000)?,
                user_events: positive("history-user-size", options.history_user_size, 10_000)?,
                max_age: Duration::from_secs(match options.history_ttl {
                    Some(0) => return Err("--history-ttl must be at least 1".into()),
                    Some(secs) if secs > MAX_HISTORY_TTL_SECS => {
                        return Err(format!(
                            "--history-ttl {secs} is over ten years ({MAX_HISTORY_TTL_SECS} s)"
                        ));
                    }
                    Some(secs) => secs,
                    None => 86_400,
                }),
                max_bytes: positive("history-max-bytes", options.history_max_bytes, 256 << 20)?,
            },
            replay_limit: positive("replay-limit", options.replay_limit, 200)?,
            replay_concurrency: positive("replay-concurrency", options.replay_concurrency, 64)?,
            timeout: Duration::from_millis(positive(
                "history-timeout-ms",
                options.history_timeout_ms.map(|v| v as usize),
                2000,
            )? as u64),
        }),
        "off" | "false" | "0" => None,
        other => return Err(format!("--history {other:?}: expected on or off")),
    };
    Ok(history)
}

impl Settings {
    /// Checks options and fills in defaults.
    pub fn resolve(options: Options) -> Result<Settings, String> {
        let dev = options.dev.unwrap_or(false);
        let history = history_settings(&options)?;
        let presence = presence_settings(&options)?;
        let deflate = deflate_settings(&options)?;
        let max_queue_bytes = positive("max-queue-bytes", options.max_queue_bytes, 1 << 20)?;
        let (jwt_secret, jwt_secret_generated) = match options.jwt_secret {
            Some(secret) if secret.is_empty() => return Err("--jwt-secret is empty".into()),
            Some(secret) => (secret, false),
            None if dev => (uuid::Uuid::new_v4().simple().to_string(), true),
            None => {
                return Err("--jwt-secret (CHANNELGATE_JWT_SECRET) is required; use --dev to try channelgate without one".into());
            }
        };
        let api_key = match options.api_key {
            Some(key) if key.is_empty() => return Err("--api-key is empty".into()),
            Some(key) => Some(key),
            None if dev => None,
            None => {
                return Err("--api-key (CHANNELGATE_API_KEY) is required outside --dev: the gRPC API must not be open".into());
            }
        };
        let authorizer = match options.authorizer.as_deref().unwrap_or("static") {
            "static" => AuthorizerKind::Static,
            url if url.starts_with("http://") => AuthorizerKind::Http(url.to_string()),
            url if url.starts_with("grpc://") => AuthorizerKind::Grpc(url.to_string()),
            other => {
                return Err(format!(
                    "--authorizer {other:?} is not known; expected static, http://HOST[:PORT]/PATH or grpc://HOST:PORT"
                ));
            }
        };
        let authentication_timeout = Duration::from_millis(positive(
            "authentication-timeout-ms",
            options.authentication_timeout_ms.map(|ms| ms as usize),
            5000,
        )? as u64);
        let connect_check = match (options.authorize_connect.unwrap_or(false), &authorizer) {
            (false, _) => None,
            (true, AuthorizerKind::Static) => {
                return Err(
                    "--authorize-connect needs an http:// or grpc:// --authorizer to ask".into(),
                );
            }
            (true, _) => Some(authentication_timeout),
        };
        let pages = options.pages.unwrap_or_else(PageRegistry::baserow_specs);
        PageRegistry::new(&pages).map_err(|e| format!("page table: {e}"))?;
        let inbound_rate = options.inbound_rate.unwrap_or(200);
        let inbound_burst = options.inbound_burst.unwrap_or(100);
        if inbound_rate == 0 || inbound_burst == 0 {
            return Err("--inbound-rate and --inbound-burst must be at least 1".into());
        }
        let idempotency = IdempotencySettings {
            window: Duration::from_secs(positive(
                "idempotency-window",
                options.idempotency_window.map(|v| v as usize),
                600,
            )? as u64),
            max_keys: positive("idempotency-keys", options.idempotency_keys, 100_000)?,
        };
        Ok(Settings {
            dev,
            deflate,
            history,
            presence,
            ws_addr: options.ws_addr.unwrap_or(([127, 0, 0, 1], 8080).into()),
            grpc_addr: options.grpc_addr.unwrap_or(([127, 0, 0, 1], 50051).into()),
            jwt_secret,
            jwt_secret_generated,
            jwt_user_id_claim: options
                .jwt_user_id_claim
                .unwrap_or_else(|| "user_id".into()),
            api_key,
            console: ConsoleAccess::resolve(options.console_token, dev)?,
            authorizer,
            authorizer_secret: options.authorizer_secret.filter(|s| !s.is_empty()),
            authorizer_timeout: Duration::from_millis(positive(
                "authorizer-timeout-ms",
                options.authorizer_timeout_ms.map(|v| v as usize),
                2000,
            )? as u64),
            authorizer_concurrency: positive(
                "authorizer-concurrency",
                options.authorizer_concurrency,
                64,
            )?,
            authorizer_cache: Duration::from_millis(options.authorizer_cache_ms.unwrap_or(5000)),
            connect_check,
            redis: redis_target(options.redis_url, options.redis_cluster_nodes)?.map(|target| {
                RedisSettings {
                    target,
                    prefix: options.redis_prefix.unwrap_or_else(|| "channelgate".into()),
                    control_timeout: Duration::from_millis(
                        options.control_timeout_ms.unwrap_or(2000),
                    ),
                    unsubscribe_delay: Duration::from_secs(1),
                    idempotency_window: idempotency.window,
                }
            }),
            node_id: options.node_id.unwrap_or_else(|| {
                format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
            }),
            allowed_origins: options.allowed_origins.map(|list| {
                list.into_iter()
                    .map(|o| o.trim().to_string())
                    .filter(|o| !o.is_empty())
                    .collect()
            }),
            max_queue_bytes,
            max_batch_events: positive("max-batch-events", options.max_batch_events, 1000)?,
            idempotency,
            grpc_tls: match (options.grpc_tls_cert, options.grpc_tls_key) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                _ => return Err("--grpc-tls-cert and --grpc-tls-key go together".into()),
            },
            max_grpc_message_bytes: positive(
                "max-grpc-message-bytes",
                options.max_grpc_message_bytes,
                64 << 20,
            )?,
            max_connections_per_user: positive(
                "max-connections-per-user",
                options.max_connections_per_user,
                100,
            )?,
            max_connections_per_ip: positive(
                "max-connections-per-ip",
                options.max_connections_per_ip,
                50_000,
            )?,
            ping_interval: Duration::from_millis(positive(
                "ping-interval-ms",
                options.ping_interval_ms.map(|ms| ms as usize),
                20_000,
            )? as u64),
            handshake_timeout: Duration::from_millis(positive(
                "handshake-timeout-ms",
                options.handshake_timeout_ms.map(|ms| ms as usize),
                10_000,
            )? as u64),
            max_batch_bytes: positive("max-batch-bytes", options.max_batch_bytes, max_queue_bytes)?,
            max_message_bytes: positive("max-message-bytes", options.max_message_bytes, 64 << 10)?,
            max_payload_bytes: positive("max-payload-bytes", options.max_payload_bytes, 1 << 20)?,
            max_pages: positive("max-pages", options.max_pages, 100)?,
            max_connections: positive("max-connections", options.max_connections, 100_000)?,
            inbound_burst,
            inbound_rate,
            shutdown_timeout: Duration::from_secs(options.shutdown_timeout.unwrap_or(10)),
            drain: Duration::from_secs(options.drain_seconds.unwrap_or(0)),
            log_json: match options.log_format.as_deref().unwrap_or("text") {
                "text" => false,
                "json" => true,
                other => return Err(format!("--log-format {other:?}: expected text or json")),
            },
            workers: match options.workers {
                Some(0) => return Err("--workers must be at least 1".into()),
                workers => workers,
            },
            pages,
        })
    }

    /// Parses command-line arguments (and the environment and config file they name).
    pub fn from_args<I, T>(args: I) -> Result<Settings, String>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let options = Options::try_parse_from(args).map_err(|e| e.to_string())?;
        Settings::resolve(options.with_file()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_needs_a_secret_and_an_api_key() {
        let err = Settings::from_args(["channelgate"]).unwrap_err();
        assert!(err.contains("--jwt-secret"), "{err}");
        let err = Settings::from_args(["channelgate", "--jwt-secret", "s"]).unwrap_err();
        assert!(err.contains("--api-key"), "{err}");
        let ok =
            Settings::from_args(["channelgate", "--jwt-secret", "s", "--api-key", "k"]).unwrap();
        assert!(!ok.dev);
        assert_eq!(ok.pages.len(), 5);
    }

    #[test]
    fn history_is_on_by_default_with_baserow_sized_limits() {
        let s = Settings::from_args(["channelgate", "--dev"]).unwrap();
        let history = s.history.expect("history on");
        assert_eq!(history.replay_limit, 200);
        assert_eq!(history.retention.events_per_stream, 1000);
        assert_eq!(history.retention.max_age, Duration::from_secs(86_400));
        let off = Settings::from_args(["channelgate", "--dev", "--history", "off"]).unwrap();
        assert!(off.history.is_none());
        let err = Settings::from_args(["channelgate", "--dev", "--history", "maybe"]).unwrap_err();
        assert!(err.contains("--history"), "{err}");
        let err = Settings::from_args(["channelgate", "--dev", "--replay-limit", "0"]).unwrap_err();
        assert!(err.contains("--replay-limit"), "{err}");
    }

    #[test]
    fn one_redis_or_a_cluster_and_empty_values_count_as_unset() {
        let nodes = || Some(vec!["a:1".to_string(), " b:2 ".to_string()]);
        assert_eq!(
            redis_target(Some(String::new()), nodes()),
            Ok(Some(RedisTarget::Cluster(vec!["a:1".into(), "b:2".into()])))
        );
        assert_eq!(
            redis_target(Some("redis://r/".into()), Some(vec![String::new()])),
            Ok(Some(RedisTarget::Url("redis://r/".into())))
        );
        assert!(redis_target(Some("redis://r/".into()), nodes()).is_err());
        assert_eq!(redis_target(None, None), Ok(None));
        let err = Settings::from_args([
            "channelgate",
            "--dev",
            "--redis-url",
            "redis://r/",
            "--redis-cluster-nodes",
            "a:1",
        ])
        .unwrap_err();
        assert!(err.contains("choose one"), "{err}");
    }

    #[test]
    fn dev_generates_a_secret() {
        let s = Settings::from_args(["channelgate", "--dev"]).unwrap();
        assert!(s.dev && s.jwt_secret_generated && s.api_key.is_none());
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_fills_gaps() {
        let dir = std::env::temp_dir().join(format!("cg-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("channelgate.toml");
        std::fs::write(
            &path,
            r#"
dev = true
max_pages = 7
ws_addr = "127.0.0.1:9999"

[[pages]]
name = "doc"
group = "doc-{doc_id}"
parameters = [{ name = "doc_id", kind = "id" }]
"#,
        )
        .unwrap();
        let s = Settings::from_args([
            "channelgate",
            "--config",
            path.to_str().unwrap(),
            "--ws-addr",
            "127.0.0.1:1234",
        ])
        .unwrap();
        assert_eq!(s.ws_addr.port(), 1234);
        assert_eq!(s.max_pages, 7);
        assert!(s.dev);
        assert_eq!(s.pages.len(), 1);
        assert_eq!(s.pages[0].name, "doc");
        std::fs::write(&path, "no_such_key = 1\n").unwrap();
        let err =
            Settings::from_args(["channelgate", "--config", path.to_str().unwrap()]).unwrap_err();
        assert!(err.contains("no_such_key"), "{err}");
    }
}
