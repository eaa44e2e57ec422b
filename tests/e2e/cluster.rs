//! Many nodes through a real redis-server: every delivery rule across nodes, per-group
//! subscriptions, order, cluster-wide control requests, and Redis or a node going away.

use std::time::{Duration, Instant};

use channelgate::proto::publish_request::Target;
use channelgate::proto::{
    CheckPermissionRequest, DisconnectRequest, IndividualTarget, InfoRequest, PublishRequest,
    UserTarget,
};
use serde_json::json;
use tonic::Code;

use crate::common::*;
use crate::redis_server::{RedisServer, free_port};

/// Where test nodes meet: one redis-server, or a Redis Cluster.
pub trait Meeting {
    /// The flags that point a node at it.
    fn flags(&self) -> [String; 2];
}

impl Meeting for RedisServer {
    fn flags(&self) -> [String; 2] {
        ["--redis-url".into(), self.url()]
    }
}

/// A node of the cluster on `redis`, ready to serve.
pub async fn node_on(redis: &impl Meeting, prefix: &str, node_id: &str) -> TestNode {
    node_on_with(redis, prefix, node_id, &[]).await
}

/// A node of the cluster on `redis` with extra flags, ready to serve.
pub async fn node_on_with(
    redis: &impl Meeting,
    prefix: &str,
    node_id: &str,
    extra: &[&str],
) -> TestNode {
    let [flag, value] = redis.flags();
    let mut args = vec![
        flag.as_str(),
        &value,
        "--redis-prefix",
        prefix,
        "--node-id",
        node_id,
    ];
    args.extend_from_slice(extra);
    let node = TestNode::start_with(&args).await;
    assert!(
        node.node.ready(PATIENCE).await,
        "{node_id} connects to Redis"
    );
    node
}

/// Three nodes on `redis`, `a`, `b` and `c`, with a gRPC client of `a`.
pub async fn three_nodes_on(redis: &impl Meeting, test: &str) -> ([TestNode; 3], Grpc) {
    let p = prefix(test);
    let nodes = [
        node_on(redis, &p, "a").await,
        node_on(redis, &p, "b").await,
        node_on(redis, &p, "c").await,
    ];
    let grpc = nodes[0].grpc().await;
    (nodes, grpc)
}

/// A redis-server and three nodes on it, `a`, `b` and `c`, with a gRPC client of `a`.
async fn three_nodes(test: &str) -> (RedisServer, [TestNode; 3], Grpc) {
    let redis = RedisServer::start();
    let (nodes, grpc) = three_nodes_on(&redis, test).await;
    (redis, nodes, grpc)
}

/// A prefix of its own for each test.
pub fn prefix(test: &str) -> String {
    format!("cgtest-{test}-{}", std::process::id())
}

/// Polls `check` until it holds, or fails the test after `PATIENCE`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < PATIENCE, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Retries `request` until the gateway accepts it (after Redis came back).
pub async fn publishes_again(grpc: &Grpc, request: PublishRequest) {
    eventually("Publish works again", async || {
        grpc.clone().publish(request.clone()).await.is_ok()
    })
    .await;
}

pub async fn expect(client: &mut Client, kind: &str) {
    let frame = client.recv().await;
    assert_eq!(frame["type"], kind, "{frame}");
}

pub async fn mark(grpc: &mut Grpc) {
    grpc.publish(group_request("users", event("marker", 0)))
        .await
        .expect("marker");
}

#[tokio::test]
async fn every_delivery_rule_holds_from_node_a_to_sockets_on_b_and_c() {
    let (_redis, [_a, b, c], mut grpc) = three_nodes("rules").await;
    delivery_rules(&b, &c, &mut grpc).await;
}

/// Every delivery rule, published through `grpc` to sockets on `b` and `c`.
pub async fn delivery_rules(b: &TestNode, c: &TestNode, grpc: &mut Grpc) {
    let mut author = b.client(1).await;
    let mut colleague = c.client(2).await;
    let mut excluded = b.client(3).await;
    let mut anonymous = c.client(0).await;
    let mut second_tab = b.client(2).await;
    for s in [&mut author, &mut colleague, &mut excluded] {
        s.join(json!({"page": "table", "table_id": 7})).await;
    }

    // Group, sparing the author's socket and user 3.
    let request = PublishRequest {
        ignore_web_socket_id: author.web_socket_id.clone(),
        exclude_user_ids: vec![3],
        ..group_request("table-7", event("rows_created", 1))
    };
    grpc.publish(request).await.expect("publish");
    // Users 2 (both tabs), individual payloads, all users.
    let users = PublishRequest {
        target: Some(Target::Users(UserTarget {
            user_ids: vec![2],
            all_users: false,
        })),
        payload: event("user_updated", 2),
        ..Default::default()
    };
    grpc.publish(users).await.expect("publish");
    let individual = PublishRequest {
        target: Some(Target::Individual(IndividualTarget {
            payloads: [(1, event("for_one", 3)), (3, event("for_three", 3))].into(),
        })),
        ..Default::default()
    };
    grpc.publish(individual).await.expect("publish");
    let everyone = PublishRequest {
        target: Some(Target::Users(UserTarget {
            user_ids: vec![],
            all_users: true,
        })),
        payload: event("everyone", 4),
        ..Default::default()
    };
    grpc.publish(everyone).await.expect("publish");
    mark(grpc).await;

    expect(&mut colleague, "rows_created").await;
    expect(&mut colleague, "user_updated").await;
    expect(&mut colleague, "everyone").await;
    expect(&mut colleague, "marker").await;
    expect(&mut second_tab, "user_updated").await;
    expect(&mut second_tab, "everyone").await;
    expect(&mut second_tab, "marker").await;
    expect(&mut author, "for_one").await;
    expect(&mut author, "everyone").await;
    expect(&mut author, "marker").await;
    expect(&mut excluded, "for_three").await;
    expect(&mut excluded, "everyone").await;
    expect(&mut excluded, "marker").await;
    expect(&mut anonymous, "everyone").await;
    expect(&mut anonymous, "marker").await;
}

#[tokio::test]
async fn a_node_subscribes_only_to_groups_it_has_members_for() {
    let redis = RedisServer::start();
    let p = prefix("numsub");
    let a = node_on(&redis, &p, "a").await;
    let b = node_on(&redis, &p, "b").await;
    let mut redis_client = redis.client().await;
    let numsub = async |conn: &mut redis::aio::MultiplexedConnection, group: &str| -> i64 {
        let channel = format!("{p}:g:{group}");
        let reply: (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async(conn)
            .await
            .expect("PUBSUB NUMSUB");
        reply.1
    };
    let mut on_b = b.client(1).await;
    let mut also_on_b = b.client(2).await;
    let mut on_a = a.client(3).await;
    on_b.join(json!({"page": "table", "table_id": 1})).await;
    also_on_b
        .join(json!({"page": "table", "table_id": 1}))
        .await;
    assert_eq!(
        numsub(&mut redis_client, "table-1").await,
        1,
        "one channel per node, not per socket"
    );
    on_a.join(json!({"page": "table", "table_id": 1})).await;
    assert_eq!(numsub(&mut redis_client, "table-1").await, 2);
    assert_eq!(numsub(&mut redis_client, "table-2").await, 0);

    for c in [&mut on_b, &mut also_on_b] {
        c.send(json!({"remove_page": "table", "table_id": 1})).await;
        expect(c, "page_discard").await;
    }
    eventually("node b unsubscribes table-1", async || {
        numsub(&mut redis_client.clone(), "table-1").await == 1
    })
    .await;
    drop(on_a);
    eventually(
        "node a unsubscribes table-1 once its socket is gone",
        async || numsub(&mut redis_client.clone(), "table-1").await == 0,
    )
    .await;
}

#[tokio::test]
async fn a_thousand_publishes_on_a_arrive_in_order_on_b() {
    let redis = RedisServer::start();
    let p = prefix("order");
    let a = node_on(&redis, &p, "a").await;
    let b = node_on(&redis, &p, "b").await;
    thousand_in_order(&a, &b).await;
}

/// A thousand publishes through `a` to one group arrive in order on both nodes.
pub async fn thousand_in_order(a: &TestNode, b: &TestNode) {
    let mut grpc = a.grpc().await;
    let mut on_b = b.client(1).await;
    let mut on_a = a.client(2).await;
    on_b.join(json!({"page": "table", "table_id": 1})).await;
    on_a.join(json!({"page": "table", "table_id": 1})).await;
    for n in 0..1000 {
        grpc.publish(group_request("table-1", event("tick", n)))
            .await
            .expect("publish");
    }
    for c in [&mut on_b, &mut on_a] {
        for n in 0..1000 {
            assert_eq!(c.recv().await["n"], n);
        }
    }
}

#[tokio::test]
async fn check_permission_disconnect_and_info_act_on_every_node() {
    let (_redis, [_a, b, c], mut grpc) = three_nodes("control").await;
    control_on_every_node(&b, &c, &mut grpc).await;
}

/// CheckPermission, Disconnect and Info through `grpc` (node `a`) act on `b` and `c`.
pub async fn control_on_every_node(b: &TestNode, c: &TestNode, grpc: &mut Grpc) {
    let mut on_b = b.client(2).await;
    let mut on_c = c.client(2).await;
    let mut keeper = c.client(1).await;
    for s in [&mut on_b, &mut on_c, &mut keeper] {
        s.join(json!({"page": "table", "table_id": 1})).await;
    }

    let info = grpc.info(InfoRequest {}).await.expect("info").into_inner();
    let ids: Vec<_> = info.nodes.iter().map(|n| n.node_id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_eq!(info.nodes.iter().map(|n| n.connections).sum::<u64>(), 3);

    let checked = grpc
        .check_permission(CheckPermissionRequest {
            user_ids: vec![2],
            permission_group: "permissions-table-1".into(),
            revoke: true,
            ..Default::default()
        })
        .await
        .expect("check")
        .into_inner();
    assert_eq!(
        (checked.checked, checked.revoked.len(), checked.nodes),
        (2, 2, 3)
    );
    expect(&mut on_b, "page_discard").await;
    expect(&mut on_c, "page_discard").await;
    grpc.publish(group_request("table-1", event("after", 1)))
        .await
        .expect("publish");
    expect(&mut keeper, "after").await;
    mark(grpc).await;
    expect(&mut on_b, "marker").await;
    expect(&mut on_c, "marker").await;

    let gone = grpc
        .disconnect(DisconnectRequest {
            user_ids: vec![2],
            ignore_web_socket_ids: vec![on_c.web_socket_id.clone()],
        })
        .await
        .expect("disconnect")
        .into_inner();
    assert_eq!((gone.disconnected, gone.nodes), (1, 3));
    expect(&mut on_b, "force_disconnect").await;
    assert_eq!(
        on_b.recv_close().await.map(|f| u16::from(f.code)),
        Some(1000)
    );
    on_c.send(json!({"type": "ping"})).await;
    expect(&mut on_c, "pong").await;
}

#[tokio::test]
async fn when_redis_dies_publishes_fail_and_when_it_returns_events_flow_again() {
    let mut redis = RedisServer::start();
    let p = prefix("restart");
    let a = node_on(&redis, &p, "a").await;
    let b = node_on(&redis, &p, "b").await;
    let mut grpc = a.grpc().await;
    let mut on_a = a.client(1).await;
    let mut on_b = b.client(2).await;
    for s in [&mut on_a, &mut on_b] {
        s.join(json!({"page": "table", "table_id": 1})).await;
    }

    redis.kill();
    eventually("Publish fails with UNAVAILABLE", async || {
        let result = grpc
            .clone()
            .publish(group_request("table-1", event("lost", 0)))
            .await;
        matches!(result, Err(status) if status.code() == Code::Unavailable)
    })
    .await;
    let health = health_of(&a).await;
    assert_eq!(
        health,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );

    redis.restart();
    assert!(
        a.node.ready(PATIENCE).await && b.node.ready(PATIENCE).await,
        "nodes reconnect"
    );
    // The restarted Redis lost the event history, so nothing proves the sockets missed
    // nothing: they are told to reconnect (1012), and their clients replay or refresh.
    for s in [&mut on_a, &mut on_b] {
        let close = s.recv_close().await.expect("a close frame");
        assert_eq!(u16::from(close.code), 1012);
    }
    let mut on_a = a.client(1).await;
    let mut on_b = b.client(2).await;
    for s in [&mut on_a, &mut on_b] {
        s.join(json!({"page": "table", "table_id": 1})).await;
    }
    publishes_again(&grpc, group_request("table-1", event("back", 1))).await;
    for s in [&mut on_a, &mut on_b] {
        expect(s, "back").await;
    }
    grpc.publish(group_request("table-1", event("still", 2)))
        .await
        .expect("publish");
    expect(&mut on_b, "still").await;
}

/// Drops the pub/sub connection that listens on `channels` channels, as Redis does to a
/// subscriber that lags behind.
async fn kill_pubsub_with(redis: &RedisServer, channels: usize) {
    let mut admin = redis.client().await;
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut admin)
        .await
        .expect("CLIENT LIST");
    let wanted = format!(" sub={channels} ");
    let id = clients
        .lines()
        .find(|line| line.contains(&wanted))
        .and_then(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
        .unwrap_or_else(|| panic!("a pub/sub connection on {channels} channels in {clients}"))
        .to_string();
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&id)
        .query_async(&mut admin)
        .await
        .expect("CLIENT KILL");
}

#[tokio::test]
async fn without_history_a_dropped_subscription_closes_the_sockets_that_may_have_missed_events() {
    let redis = RedisServer::start();
    let p = prefix("no-catch-up");
    let args = |id: &'static str| {
        vec![
            "--redis-url".to_string(),
            redis.url(),
            "--redis-prefix".into(),
            p.clone(),
            "--node-id".into(),
            id.into(),
            "--history".into(),
            "off".into(),
        ]
    };
    let nodes = [args("a"), args("b")];
    let mut started = Vec::new();
    for args in &nodes {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let node = TestNode::start_with(&args).await;
        assert!(node.node.ready(PATIENCE).await);
        started.push(node);
    }
    let mut on_b = started[1].client(2).await;
    on_b.join(json!({"page": "table", "table_id": 1})).await;
    kill_pubsub_with(&redis, 4).await;
    let close = on_b.recv_close().await.expect("a close frame");
    assert_eq!(
        u16::from(close.code),
        1012,
        "reconnect: events may have been missed"
    );
    let mut again = started[1].client(2).await;
    again.join(json!({"page": "table", "table_id": 1})).await;
    // The close came once node b was subscribed again: events flow to the new socket.
    let mut grpc = started[0].grpc().await;
    grpc.publish(group_request("table-1", event("back", 1)))
        .await
        .expect("publish");
    expect(&mut again, "back").await;
}

#[tokio::test]
async fn a_revoke_that_misses_a_node_fails_naming_it_and_its_retry_reaches_it() {
    let redis = RedisServer::start();
    let p = prefix("revoke-missed");
    let extra = ["--control-timeout-ms", "500"];
    let start = async |id: &str| {
        let url = redis.url();
        let args = [
            &["--redis-url", &url, "--redis-prefix", &p, "--node-id", id][..],
            &extra,
        ]
        .concat();
        let node = TestNode::start_with(&args).await;
        assert!(node.node.ready(PATIENCE).await);
        node
    };
    let a = start("a").await;
    let b = start("b").await;
    let mut on_b = b.client(2).await;
    on_b.join(json!({"page": "table", "table_id": 1})).await;
    let grpc = a.grpc().await;
    let revoke = CheckPermissionRequest {
        user_ids: vec![2],
        permission_group: "permissions-table-1".into(),
        revoke: true,
        ..Default::default()
    };
    // A first request waits until the new registry names every live node.
    grpc.clone().info(InfoRequest {}).await.expect("info");
    // Node b's pub/sub connection drops; the revoke goes out before b is back.
    kill_pubsub_with(&redis, 4).await;
    let status = grpc
        .clone()
        .check_permission(revoke.clone())
        .await
        .expect_err("a node did not answer");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(" b "),
        "names node b: {}",
        status.message()
    );
    // The backend retries; once b is back, it applies it.
    let started = Instant::now();
    let revoked = loop {
        match grpc.clone().check_permission(revoke.clone()).await {
            Ok(response) => break Some(response.into_inner()),
            Err(_) if started.elapsed() < PATIENCE => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(_) => break None,
        }
    };
    let revoked = revoked.expect("an answer");
    assert_eq!(revoked.nodes, 2);
    assert_eq!(revoked.revoked.len(), 1, "{revoked:?}");
    expect(&mut on_b, "page_discard").await;
}

#[tokio::test]
async fn a_node_cut_off_from_redis_re_checks_its_pages_before_serving_again() {
    let redis = RedisServer::start();
    let backend = crate::backend::Backend::new(|_, _| true);
    let url = backend.serve_http().await;
    let p = prefix("revalidate");
    let node = TestNode::start_with(&[
        "--redis-url",
        &redis.url(),
        "--redis-prefix",
        &p,
        "--node-id",
        "b",
        "--authorizer",
        &url,
        "--authorizer-secret",
        "s3cret",
    ])
    .await;
    assert!(node.node.ready(PATIENCE).await);
    let mut socket = node.client(2).await;
    socket.join(json!({"page": "table", "table_id": 1})).await;
    // The backend takes table 1 away from user 2, and its CheckPermission never reached
    // this node: the node was cut off.
    backend.set_policy(|user, group| !(user == 2 && group == "table-1"));
    kill_pubsub_with(&redis, 4).await;
    let discard = socket.recv().await;
    assert_eq!(
        discard,
        json!({"type": "page_discard", "page": "table", "parameters": {"table_id": 1}})
    );
}

#[tokio::test]
async fn a_frozen_redis_makes_the_node_not_ready_within_seconds_and_it_recovers() {
    let redis = RedisServer::start();
    let p = prefix("frozen");
    let node = node_on(&redis, &p, "a").await;
    let mut socket = node.client(1).await;
    socket.join(json!({"page": "table", "table_id": 1})).await;
    redis.freeze();
    let frozen = Instant::now();
    let mut ready = node.node.ready(Duration::ZERO).await;
    while ready && frozen.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = node.node.ready(Duration::ZERO).await;
    }
    let noticed = frozen.elapsed();
    redis.thaw();
    assert!(!ready, "still ready {noticed:?} after Redis froze");
    assert!(
        noticed < Duration::from_secs(5),
        "noticed after {noticed:?}"
    );
    assert!(
        node.node.ready(PATIENCE).await,
        "ready again once Redis answers"
    );
    let mut grpc = node.grpc().await;
    let id = publish(&mut grpc, group_request("table-1", event("back", 1))).await;
    let frame = socket.recv().await;
    assert_eq!(frame["_event_id"], id, "{frame}");
}

#[tokio::test]
async fn a_node_whose_subscription_drops_catches_up_from_the_history() {
    let redis = RedisServer::start();
    let p = prefix("catch-up");
    let a = node_on(&redis, &p, "a").await;
    let b = node_on(&redis, &p, "b").await;
    let mut on_b = b.client(2).await;
    on_b.join(json!({"page": "table", "table_id": 1})).await;
    let mut grpc = a.grpc().await;
    let publisher = tokio::spawn(async move {
        let mut ids = Vec::new();
        for n in 0..400 {
            let request = group_request("table-1", event("e", n));
            if let Ok(response) = grpc.publish(request).await {
                ids.push(response.into_inner().event_id);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ids
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // What Redis does to a subscriber that lags: drop its pub/sub connection. Node b's
    // is the one with four channels (broadcast, control, its replies and table-1).
    kill_pubsub_with(&redis, 4).await;
    let published = publisher.await.expect("publisher");
    let last = *published.last().expect("some publishes succeeded");
    let mut got = Vec::new();
    while got.last() != Some(&last) {
        let frame = on_b.recv().await;
        got.push(frame["_event_id"].as_u64().expect("an event"));
    }
    let missing: Vec<&u64> = published.iter().filter(|id| !got.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} accepted events never arrived: {missing:?}",
        missing.len()
    );
    assert_eq!(got.len(), published.len(), "no event twice");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order");
}

async fn health_of(node: &TestNode) -> i32 {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", node.node.grpc_addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health")
        .into_inner()
        .status
}

/// A node as its own OS process, as in production.
pub struct NodeProcess {
    pub child: tokio::process::Child,
    pub ws_addr: String,
    grpc_addr: String,
}

impl NodeProcess {
    async fn start(redis: &RedisServer, prefix: &str, node_id: &str) -> NodeProcess {
        NodeProcess::start_with(redis, prefix, node_id, &[]).await
    }

    /// A node process with extra flags.
    pub async fn start_with(
        redis: &RedisServer,
        prefix: &str,
        node_id: &str,
        extra: &[&str],
    ) -> NodeProcess {
        let ws_addr = format!("127.0.0.1:{}", free_port());
        let grpc_addr = format!("127.0.0.1:{}", free_port());
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_channelgate"))
            .args(["--ws-addr", &ws_addr, "--grpc-addr", &grpc_addr])
            .args(["--jwt-secret", SECRET, "--api-key", API_KEY])
            .args([
                "--redis-url",
                &redis.url(),
                "--redis-prefix",
                prefix,
                "--node-id",
                node_id,
            ])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the channelgate binary runs");
        let process = NodeProcess {
            child,
            ws_addr,
            grpc_addr,
        };
        let ready = format!("http://{}/readyz", process.ws_addr);
        eventually(&format!("{node_id} is ready"), async || {
            http_ok(&ready).await
        })
        .await;
        process
    }

    pub async fn grpc(&self) -> Grpc {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.grpc_addr))
            .expect("uri")
            .connect()
            .await
            .expect("gRPC connects");
        channelgate::proto::gateway_client::GatewayClient::with_interceptor(
            channel,
            ApiKey(Some(API_KEY)),
        )
    }

    /// Sends a signal to the process (`-STOP`, `-CONT`): a stalled host, and its return.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("a running node").to_string();
        let status = std::process::Command::new("bash")
            .args(["-c", &format!("kill {signal} {pid}")])
            .status()
            .expect("bash runs");
        assert!(status.success(), "kill {signal} {pid}");
    }

    pub async fn client(&self, user_id: i64) -> Client {
        let token =
            channelgate::identity::sign_access_token(SECRET.as_bytes(), "user_id", user_id, 600)
                .expect("sign");
        let mut client =
            Client::open(&format!("ws://{}/ws/core/?jwt_token={token}", self.ws_addr)).await;
        assert_eq!(client.recv().await["success"], true);
        client
    }
}

async fn http_ok(url: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (addr, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let request = format!("GET /{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    answer.starts_with("HTTP/1.1 200")
}

#[tokio::test]
async fn separate_processes_serve_together_and_a_killed_node_drops_out() {
    let redis = RedisServer::start();
    let p = prefix("processes");
    let a = NodeProcess::start(&redis, &p, "a").await;
    let mut b = NodeProcess::start(&redis, &p, "b").await;
    let mut grpc = a.grpc().await;
    let mut on_a = a.client(1).await;
    let mut on_b = b.client(2).await;
    for s in [&mut on_a, &mut on_b] {
        s.join(json!({"page": "table", "table_id": 9})).await;
    }
    grpc.publish(group_request("table-9", event("across", 1)))
        .await
        .expect("publish");
    expect(&mut on_a, "across").await;
    expect(&mut on_b, "across").await;
    let info = grpc.info(InfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.nodes.len(), 2);

    b.child.kill().await.expect("kill node b");
    grpc.publish(group_request("table-9", event("a_serves_on", 2)))
        .await
        .expect("publish");
    expect(&mut on_a, "a_serves_on").await;
    eventually("Info drops the killed node", async || {
        let info = grpc
            .clone()
            .info(InfoRequest {})
            .await
            .expect("info")
            .into_inner();
        info.nodes
            .iter()
            .map(|n| n.node_id.as_str())
            .collect::<Vec<_>>()
            == ["a"]
    })
    .await;
}
