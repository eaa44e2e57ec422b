//! A real Redis Cluster for one test: six cluster-enabled redis-servers on free ports, three
//! primaries with one replica each, their nodes.conf in a temporary directory; everything is
//! killed and removed when dropped. Every wait is bounded and panics saying what it waited for.

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

/// How long any wait on the cluster may take before the test fails.
const CLUSTER_PATIENCE: Duration = Duration::from_secs(20);
/// How long one command to one node may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
const SLOTS: u16 = 16384;
const NODES: usize = 6;

struct Server {
    port: u16,
    id: String,
    child: Option<Child>,
}

pub struct RedisCluster {
    dir: PathBuf,
    servers: Vec<Server>,
}

/// The slot of a key: CRC16 (XMODEM) of the key, or of the first non-empty `{...}` in it,
/// modulo 16384, as Redis Cluster computes it.
pub fn slot_of(key: &str) -> u16 {
    let key = key.as_bytes();
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let len = rest.iter().position(|&b| b == b'}')?;
            (len > 0).then(|| &rest[..len])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// One line of CLUSTER NODES.
struct NodeLine {
    port: u16,
    myself: bool,
    primary: bool,
    failed: bool,
    slots: Vec<(u16, u16)>,
}

fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let address = fields[1].split(['@', ',']).next().expect("an address");
            let port = address
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("a port in {line:?}"));
            let flags: Vec<&str> = fields[2].split(',').collect();
            let slots = fields[8..]
                .iter()
                .filter(|range| !range.starts_with('['))
                .map(|range| {
                    let (from, to) = range.split_once('-').unwrap_or((range, range));
                    (from.parse().expect("a slot"), to.parse().expect("a slot"))
                })
                .collect();
            NodeLine {
                port,
                myself: flags.contains(&"myself"),
                primary: flags.contains(&"master"),
                failed: flags.contains(&"fail") || flags.contains(&"fail?"),
                slots,
            }
        })
        .collect()
}

/// Six free ports whose cluster bus ports (port + 10000) are free too.
fn free_cluster_ports() -> Vec<u16> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..1000 {
        if ports.len() == NODES {
            return ports;
        }
        let Ok(listener) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let port = listener.local_addr().expect("an address").port();
        if u32::from(port) + 10000 >= 65536 {
            continue;
        }
        if let Ok(bus) = TcpListener::bind(("127.0.0.1", port + 10000)) {
            held.push((listener, bus));
            ports.push(port);
        }
    }
    panic!("no six free ports with their cluster bus ports free");
}

/// Polls `poll` every 50 ms until it gives a value; panics after [`CLUSTER_PATIENCE`].
async fn until<T, F, Fut>(what: &str, mut poll: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = poll().await {
            return value;
        }
        assert!(
            started.elapsed() < CLUSTER_PATIENCE,
            "Redis Cluster: no {what} after {CLUSTER_PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl RedisCluster {
    /// Starts the six servers, creates the cluster and waits until every node says
    /// cluster_state:ok, knows all six and every replica is in sync with its primary.
    pub async fn start() -> RedisCluster {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "channelgate-redis-cluster-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cluster = RedisCluster {
            dir,
            servers: Vec::new(),
        };
        // Another test may take a port between the pick and redis-server's bind: try anew.
        for attempt in 1.. {
            if cluster.spawn_servers().await {
                break;
            }
            cluster.kill_all();
            assert!(attempt < 3, "Redis Cluster: the servers did not start");
        }
        cluster.create().await;
        cluster
    }

    /// Spawns the servers on fresh ports and waits until each answers as itself; false when
    /// one did not (its port was taken).
    async fn spawn_servers(&mut self) -> bool {
        for port in free_cluster_ports() {
            let dir = self.dir.join(port.to_string());
            std::fs::create_dir_all(&dir).expect("a directory for nodes.conf");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .arg("--dir")
                .arg(&dir)
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "1000"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--repl-diskless-sync-delay", "0"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server runs (`make test` installs it)");
            self.servers.push(Server {
                port,
                id: String::new(),
                child: Some(child),
            });
        }
        let started = Instant::now();
        for i in 0..self.servers.len() {
            let (port, pid) = (self.servers[i].port, self.servers[i].child_pid());
            loop {
                let info: Option<String> = self.query(port, redis::cmd("INFO").arg("server")).await;
                let serving = info
                    .as_deref()
                    .and_then(|info| info_field(info, "process_id"))
                    .is_some_and(|id| id == pid.to_string());
                if serving {
                    break;
                }
                let exited = self.servers[i]
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                if exited || started.elapsed() > CLUSTER_PATIENCE {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.servers[i].id = self
                .query(port, redis::cmd("CLUSTER").arg("MYID"))
                .await
                .expect("CLUSTER MYID");
        }
        true
    }

    async fn create(&self) {
        let mut create = tokio::process::Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        create.args(self.servers.iter().map(|s| format!("127.0.0.1:{}", s.port)));
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        create.stdin(Stdio::null()).kill_on_drop(true);
        let output = tokio::time::timeout(CLUSTER_PATIENCE, create.output())
            .await
            .expect("redis-cli --cluster create finishes in time")
            .expect("redis-cli runs (it comes with redis-server)");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        until(
            "cluster_state:ok with six known nodes on every node",
            || self.all_ok(NODES),
        )
        .await;
        until("replicas in sync", || async {
            for port in self.live_ports() {
                let info: String = self
                    .query(port, redis::cmd("INFO").arg("replication"))
                    .await?;
                if info_field(&info, "role") == Some("slave")
                    && info_field(&info, "master_link_status") != Some("up")
                {
                    return None;
                }
            }
            Some(())
        })
        .await;
    }

    /// Every node, primaries and replicas: `127.0.0.1:p1,127.0.0.1:p2,...`.
    pub fn nodes_arg(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The ports of the servers still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.servers
            .iter()
            .filter(|s| s.child.is_some())
            .map(|s| s.port)
            .collect()
    }

    /// A connection to the node on `port`, for raw commands (`redis::cmd(...)`); it follows
    /// no redirections.
    pub async fn client(&self, port: u16) -> MultiplexedConnection {
        self.try_client(port)
            .await
            .unwrap_or_else(|| panic!("connects to the Redis Cluster node on {port}"))
    }

    /// A connection whose commands may take [`COMMAND_TIMEOUT`], not the client's default
    /// of 500 ms, which the whole suite's load can outlast.
    async fn try_client(&self, port: u16) -> Option<MultiplexedConnection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .ok()
    }

    /// One command on one node; None when it fails or the node does not answer in time.
    async fn query<T: redis::FromRedisValue>(&self, port: u16, cmd: &redis::Cmd) -> Option<T> {
        // The connection's own timeouts bound the wait (COMMAND_TIMEOUT).
        let mut connection = self.try_client(port).await?;
        cmd.query_async(&mut connection).await.ok()
    }

    async fn view(&self, port: u16) -> Option<Vec<NodeLine>> {
        let text: String = self.query(port, redis::cmd("CLUSTER").arg("NODES")).await?;
        Some(parse_nodes(&text))
    }

    /// The current primaries, sorted: the live nodes that say they are one.
    pub async fn primaries(&self) -> Vec<u16> {
        let mut primaries = Vec::new();
        for port in self.live_ports() {
            let view = until(&format!("CLUSTER NODES from {port}"), || self.view(port)).await;
            if view.iter().any(|n| n.myself && n.primary) {
                primaries.push(port);
            }
        }
        primaries
    }

    /// The current replicas: the live nodes that are not primaries.
    pub async fn replicas(&self) -> Vec<u16> {
        let primaries = self.primaries().await;
        self.live_ports()
            .into_iter()
            .filter(|port| !primaries.contains(port))
            .collect()
    }

    /// The slot ranges the node on `port` says it serves (none for a replica).
    pub async fn slots_of(&self, port: u16) -> Vec<(u16, u16)> {
        let view = until(&format!("CLUSTER NODES from {port}"), || self.view(port)).await;
        view.into_iter()
            .find(|n| n.myself)
            .map(|n| n.slots)
            .unwrap_or_default()
    }

    /// `PUBSUB SHARDNUMSUB channels...` on the node on `port`: the subscribers it has itself.
    pub async fn shard_numsub(&self, port: u16, channels: &[String]) -> Vec<(String, i64)> {
        let mut connection = self.client(port).await;
        redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(channels)
            .query_async(&mut connection)
            .await
            .expect("PUBSUB SHARDNUMSUB")
    }

    /// The live primary serving `slot`, once every live node agrees on it.
    pub async fn primary_of_slot(&self, slot: u16) -> u16 {
        until(&format!("agreement on the primary of slot {slot}"), || {
            self.agreed_owner(slot)
        })
        .await
    }

    /// The owner of `slot` when every live node names the same live, unfailed primary.
    async fn agreed_owner(&self, slot: u16) -> Option<u16> {
        let live = self.live_ports();
        let mut agreed = None;
        for &port in &live {
            let view = self.view(port).await?;
            let owner = view
                .iter()
                .find(|n| {
                    n.primary && !n.failed && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
                })?
                .port;
            if !live.contains(&owner) || agreed.is_some_and(|a| a != owner) {
                return None;
            }
            agreed = Some(owner);
        }
        agreed
    }

    /// Whether every live node says cluster_state:ok and knows `known` nodes.
    async fn all_ok(&self, known: usize) -> Option<()> {
        for port in self.live_ports() {
            let info: String = self.query(port, redis::cmd("CLUSTER").arg("INFO")).await?;
            let known_now: usize = info_field(&info, "cluster_known_nodes")?.parse().ok()?;
            if info_field(&info, "cluster_state") != Some("ok") || known_now != known {
                return None;
            }
        }
        Some(())
    }

    /// A primary other than the one that serves `slot`: where to move it.
    pub async fn another_primary_than_of(&self, slot: u16) -> u16 {
        let from = self.primary_of_slot(slot).await;
        *self
            .primaries()
            .await
            .iter()
            .find(|p| **p != from)
            .expect("another primary")
    }

    /// Kills the primary serving `slot` (SIGKILL, as a crash) and waits until another node
    /// serves the slot as primary, every live node agrees and says cluster_state:ok. Returns
    /// the killed port.
    pub async fn kill_primary_of_slot(&mut self, slot: u16) -> u16 {
        let old = self.primary_of_slot(slot).await;
        let server = self
            .servers
            .iter_mut()
            .find(|s| s.port == old)
            .expect("a server");
        server.kill();
        let this = &*self;
        until(
            &format!("failover of slot {slot} away from {old}"),
            || async move {
                let owner = this.agreed_owner(slot).await?;
                this.all_ok(NODES).await?;
                (owner != old).then_some(owner)
            },
        )
        .await;
        old
    }

    /// Moves `slot` with its keys to the primary on `to_port`, as redis-cli's resharding
    /// does: IMPORTING on the target, MIGRATING on the source, MIGRATE of the keys in
    /// batches, then SETSLOT NODE on the target, the source and every other primary; waits
    /// until every live node names the target. Clients may go on using the slot meanwhile
    /// (they get ASK redirections).
    pub async fn migrate_slot(&self, slot: u16, to_port: u16) {
        let from_port = self.primary_of_slot(slot).await;
        assert_ne!(from_port, to_port, "slot {slot} is on {to_port} already");
        let (from_id, to_id) = (self.id_of(from_port), self.id_of(to_port));
        let mut from = self.client(from_port).await;
        let mut to = self.client(to_port).await;
        let setslot = |state: &str, id: &str| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
            cmd
        };
        let ok = |result: redis::RedisResult<()>, what: &str| {
            result.unwrap_or_else(|e| panic!("migrating slot {slot}: {what}: {e}"))
        };
        ok(
            setslot("IMPORTING", from_id).query_async(&mut to).await,
            "IMPORTING",
        );
        ok(
            setslot("MIGRATING", to_id).query_async(&mut from).await,
            "MIGRATING",
        );
        let started = Instant::now();
        loop {
            let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query_async(&mut from)
                .await
                .expect("CLUSTER GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            assert!(
                started.elapsed() < CLUSTER_PATIENCE,
                "Redis Cluster: slot {slot} still has keys on {from_port} after {CLUSTER_PATIENCE:?}"
            );
            let _: redis::Value = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to_port)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut from)
                .await
                .unwrap_or_else(|e| panic!("MIGRATE of slot {slot}: {e}"));
        }
        ok(
            setslot("NODE", to_id).query_async(&mut to).await,
            "NODE on the target",
        );
        ok(
            setslot("NODE", to_id).query_async(&mut from).await,
            "NODE on the source",
        );
        for port in self.primaries().await {
            if port != from_port && port != to_port {
                let mut other = self.client(port).await;
                ok(
                    setslot("NODE", to_id).query_async(&mut other).await,
                    "NODE on another primary",
                );
            }
        }
        until(
            &format!("every node naming {to_port} for slot {slot}"),
            || async { (self.agreed_owner(slot).await? == to_port).then_some(()) },
        )
        .await;
    }

    /// The live replicas of the primary on `port`, as that primary lists them.
    pub async fn replicas_of(&self, port: u16) -> Vec<u16> {
        let mut nodes = redis::cmd("CLUSTER");
        nodes.arg("NODES");
        let nodes = &nodes;
        let text: String = until(&format!("CLUSTER NODES from {port}"), || {
            self.query(port, nodes)
        })
        .await;
        let id = self.id_of(port);
        text.lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .filter(|f| {
                f.len() > 3 && f[2].contains("slave") && !f[2].contains("fail") && f[3] == id
            })
            .filter_map(|f| {
                f[1].split(['@', ','])
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// Stops the node on `port` without closing its sockets (SIGSTOP), as a frozen host would.
    pub fn freeze(&self, port: u16) {
        self.signal(port, "-STOP");
    }

    /// Lets a frozen node go on (SIGCONT).
    pub fn thaw(&self, port: u16) {
        self.signal(port, "-CONT");
    }

    fn signal(&self, port: u16, signal: &str) {
        let server = self
            .servers
            .iter()
            .find(|s| s.port == port)
            .expect("a server");
        let pid = server.child_pid().to_string();
        let status = Command::new("bash")
            .args(["-c", &format!("kill {signal} {pid}")])
            .status()
            .expect("bash runs");
        assert!(status.success(), "kill {signal} {pid}");
    }

    fn id_of(&self, port: u16) -> &str {
        &self
            .servers
            .iter()
            .find(|s| s.port == port)
            .unwrap_or_else(|| panic!("no node on {port}"))
            .id
    }

    fn kill_all(&mut self) {
        for server in &mut self.servers {
            server.kill();
        }
        self.servers.clear();
    }
}

impl Server {
    fn child_pid(&self) -> u32 {
        self.child.as_ref().expect("a running server").id()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The value of `name:value` in an INFO-style text.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

#[tokio::test]
async fn a_local_cluster_starts_spreads_slots_and_fails_over() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let started = Instant::now();
    let mut cluster = RedisCluster::start().await;
    println!("cluster ready in {:?}", started.elapsed());
    assert_eq!(cluster.nodes_arg().split(',').count(), 6);

    // Three primaries; their slots cover 0..16384 exactly once.
    let primaries = cluster.primaries().await;
    assert_eq!(primaries.len(), 3, "{primaries:?}");
    let mut ranges = Vec::new();
    for &port in &primaries {
        ranges.extend(cluster.slots_of(port).await);
    }
    ranges.sort();
    let mut next = 0;
    for (from, to) in ranges {
        assert_eq!(from, next, "slots from {next} are covered once, in order");
        next = to + 1;
    }
    assert_eq!(next, SLOTS);

    // slot_of is Redis's own: hash tags included.
    let mut first = cluster.client(primaries[0]).await;
    for key in [
        "",
        "123456789",
        "table-1",
        "channelgate:group:table-42",
        "{user1000}.following",
        "{user1000}.followers",
        "foo{}{bar}",
        "foo{{bar}}zap",
        "foo{bar}{zap}",
        "{",
        "a}b{c",
        "räksmörgås",
    ] {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut first)
            .await
            .expect("CLUSTER KEYSLOT");
        assert_eq!(slot_of(key), slot, "slot of {key:?}");
    }
    assert_eq!(slot_of("123456789"), 0x31C3 % SLOTS);

    // A shard channel's subscriber shows in SHARDNUMSUB on its primary.
    let channel = "table-1".to_string();
    let owner = cluster.primary_of_slot(slot_of(&channel)).await;
    let mut subscriber = tokio::net::TcpStream::connect(("127.0.0.1", owner))
        .await
        .expect("connects");
    subscriber
        .write_all(format!("SSUBSCRIBE {channel}\r\n").as_bytes())
        .await
        .expect("writes");
    let mut reply = [0; 128];
    let n = subscriber.read(&mut reply).await.expect("reads");
    assert!(
        String::from_utf8_lossy(&reply[..n]).contains("ssubscribe"),
        "{:?}",
        String::from_utf8_lossy(&reply[..n])
    );
    assert_eq!(
        cluster
            .shard_numsub(owner, std::slice::from_ref(&channel))
            .await,
        vec![(channel.clone(), 1)]
    );
    drop(subscriber);

    // A write acknowledged by the replica survives its primary's crash.
    let key = "failover-key";
    let slot = slot_of(key);
    let old = cluster.primary_of_slot(slot).await;
    let mut connection = cluster.client(old).await;
    let () = redis::cmd("SET")
        .arg(key)
        .arg("kept")
        .query_async(&mut connection)
        .await
        .expect("SET");
    // WAIT may take its whole wait under the suite's load: within the connection's
    // COMMAND_TIMEOUT, so that Redis answers before the client gives up.
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(4000)
        .query_async(&mut connection)
        .await
        .expect("WAIT");
    assert_eq!(acked, 1, "the replica has the key");
    let failover = Instant::now();
    assert_eq!(cluster.kill_primary_of_slot(slot).await, old);
    println!("failover took {:?}", failover.elapsed());
    let promoted = cluster.primary_of_slot(slot).await;
    assert!(
        promoted != old && !primaries.contains(&promoted),
        "slot {slot} moved from {old} to {promoted}, a former replica"
    );
    assert_eq!(cluster.primaries().await.len(), 3);
    let mut connection = cluster.client(promoted).await;
    let value: String = redis::cmd("GET")
        .arg(key)
        .query_async(&mut connection)
        .await
        .expect("GET on the promoted replica");
    assert_eq!(value, "kept");

    // A slot migrates with its key to another primary.
    let key = "{migrating}:key";
    let slot = slot_of(key);
    let from = cluster.primary_of_slot(slot).await;
    let to = *cluster
        .primaries()
        .await
        .iter()
        .find(|&&p| p != from)
        .expect("another primary");
    let mut source = cluster.client(from).await;
    let () = redis::cmd("SET")
        .arg(key)
        .arg("moved")
        .query_async(&mut source)
        .await
        .expect("SET");
    // More keys than one MIGRATE batch takes.
    let mut mset = redis::cmd("MSET");
    for n in 0..250 {
        mset.arg(format!("{{migrating}}:{n}")).arg(n);
    }
    let () = mset.query_async(&mut source).await.expect("MSET");
    let migration = Instant::now();
    cluster.migrate_slot(slot, to).await;
    println!("migration took {:?}", migration.elapsed());
    assert_eq!(cluster.primary_of_slot(slot).await, to);
    let mut target = cluster.client(to).await;
    let value: String = redis::cmd("GET")
        .arg(key)
        .query_async(&mut target)
        .await
        .expect("GET on the new primary");
    assert_eq!(value, "moved");
    let count: i64 = redis::cmd("CLUSTER")
        .arg("COUNTKEYSINSLOT")
        .arg(slot)
        .query_async(&mut target)
        .await
        .expect("CLUSTER COUNTKEYSINSLOT");
    assert_eq!(count, 251, "every key of the slot moved");
    let moved: redis::RedisResult<String> =
        redis::cmd("GET").arg(key).query_async(&mut source).await;
    let error = moved.expect_err("the old primary redirects");
    let target_address = format!("127.0.0.1:{to}");
    assert_eq!(
        error.redirect_node(),
        Some((target_address.as_str(), slot)),
        "{error}"
    );
    println!("whole test {:?}", started.elapsed());
}
