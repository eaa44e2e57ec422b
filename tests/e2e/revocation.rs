//! Revocation is immediate on every node: after `CheckPermission` or `Disconnect` answered
//! OK, no node admits the revoked page or the refused token from a remembered answer, a
//! node whose heartbeat Redis lost is still waited for, and a node that was counted gone
//! catches up before it serves again.

use std::time::{Duration, Instant};

use channelgate::proto::{
    CheckPermissionRequest, CheckPermissionResponse, DisconnectRequest, InfoRequest,
};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tonic::Code;

use crate::backend::Backend;
use crate::cluster::{Meeting, NodeProcess, eventually, expect, node_on, prefix};
use crate::common::*;
use crate::connect::token_with;
use crate::redis_cluster::{RedisCluster, slot_of};
use crate::redis_server::RedisServer;

fn table(id: i64) -> Value {
    json!({"page": "table", "table_id": id})
}

/// The backend's `users_removed_from_permission_group` for user 2 and table 1.
fn revoke_user_2() -> CheckPermissionRequest {
    CheckPermissionRequest {
        user_ids: vec![2],
        permission_group: "permissions-table-1".into(),
        revoke: true,
        ..Default::default()
    }
}

/// Revokes user 2's table 1 through `node`, which must answer OK.
async fn revoke_through(node: &TestNode) -> CheckPermissionResponse {
    node.grpc()
        .await
        .check_permission(revoke_user_2())
        .await
        .expect("revoke")
        .into_inner()
}

/// Waits until `grpc`'s node counts `nodes` live nodes.
async fn until_live(grpc: &Grpc, nodes: usize) {
    eventually(&format!("{nodes} nodes are live"), async || {
        grpc.clone()
            .info(InfoRequest {})
            .await
            .is_ok_and(|info| info.into_inner().nodes.len() == nodes)
    })
    .await;
}

/// A node asking `authorizer` (with the default answer cache), on `redis` when given.
async fn asking_node(
    authorizer: &str,
    redis: Option<(&RedisServer, &str, &str)>,
    extra: &[&str],
) -> TestNode {
    let mut args = vec![
        "--authorizer".to_string(),
        authorizer.to_string(),
        "--authorizer-secret".into(),
        "s3cret".into(),
    ];
    if let Some((redis, prefix, id)) = redis {
        args.extend(redis.flags());
        args.extend([
            "--redis-prefix".into(),
            prefix.into(),
            "--node-id".into(),
            id.into(),
        ]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let node = TestNode::start_with(&args).await;
    assert!(node.node.ready(PATIENCE).await, "the node is ready");
    node
}

/// Subscribes and returns the answer's type and reason.
async fn answer(client: &mut Client, page: Value) -> (String, String) {
    let answer = client.subscribe(page).await;
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (text(&answer["type"]), text(&answer["reason"]))
}

fn rejected() -> (String, String) {
    ("page_rejected".into(), "permission_denied".into())
}

#[tokio::test]
async fn a_revoked_page_subscribed_again_at_once_is_refused_despite_the_cache() {
    let backend = Backend::new(|_, _| true);
    let node = asking_node(&backend.serve_http().await, None, &[]).await;
    let mut socket = node.client(2).await;
    socket.join(table(1)).await;
    // Baserow removes user 2 from the workspace, then tells the gateway.
    backend.set_policy(|user, group| !(user == 2 && group == "table-1"));
    let revoked = revoke_through(&node).await;
    assert_eq!(revoked.revoked.len(), 1, "{revoked:?}");
    expect(&mut socket, "page_discard").await;
    assert_eq!(answer(&mut socket, table(1)).await, rejected());
    // Other users' answers are still remembered.
    let mut other = node.client(3).await;
    other.join(table(1)).await;
    let calls = backend.calls();
    let mut again = node.client(3).await;
    again.join(table(1)).await;
    assert_eq!(
        backend.calls(),
        calls,
        "user 3's answer came from the cache"
    );
}

#[tokio::test]
async fn a_revoke_drops_remembered_answers_on_every_node_not_only_where_the_page_is_held() {
    let redis = RedisServer::start();
    let backend = Backend::new(|_, _| true);
    let url = backend.serve_http().await;
    let p = prefix("revoke-cache");
    let a = asking_node(&url, Some((&redis, &p, "a")), &[]).await;
    let b = asking_node(&url, Some((&redis, &p, "b")), &[]).await;
    // Node a remembers that user 2 may see table 1, though no socket of a holds it now.
    let mut on_a = a.client(2).await;
    on_a.join(table(1)).await;
    on_a.send(json!({"remove_page": "table", "table_id": 1}))
        .await;
    expect(&mut on_a, "page_discard").await;
    let mut on_b = b.client(2).await;
    on_b.join(table(1)).await;

    backend.set_policy(|user, group| !(user == 2 && group == "table-1"));
    let revoked = revoke_through(&b).await;
    assert_eq!(
        (revoked.nodes, revoked.revoked.len()),
        (2, 1),
        "{revoked:?}"
    );
    expect(&mut on_b, "page_discard").await;
    assert_eq!(answer(&mut on_a, table(1)).await, rejected());
    assert_eq!(answer(&mut on_b, table(1)).await, rejected());
}

/// A socket opened with `token`, and its first frame.
async fn open(node: &TestNode, token: &str) -> (Client, Value) {
    let mut client = Client::open(&node.ws_url(&format!("jwt_token={token}"))).await;
    let first = client.recv().await;
    (client, first)
}

#[tokio::test]
async fn a_disconnected_users_old_token_is_refused_at_once_on_every_node() {
    let redis = RedisServer::start();
    let backend = Backend::new(|_, _| true);
    let url = backend.serve_http().await;
    let p = prefix("disconnect-cache");
    let connect = ["--authorize-connect"];
    let a = asking_node(&url, Some((&redis, &p, "a")), &connect).await;
    let b = asking_node(&url, Some((&redis, &p, "b")), &connect).await;
    let old = token_with(2, 1_700_000_000, "old");
    let (mut on_a, first) = open(&a, &old).await;
    assert_eq!(first["success"], true, "{first}");
    let (mut on_b, first) = open(&b, &old).await;
    assert_eq!(first["success"], true, "{first}");

    // The password changed: the backend refuses the old token and disconnects the user.
    backend.set_connect_policy(|q| q["token_id"] != "old");
    let answer = a
        .grpc()
        .await
        .disconnect(DisconnectRequest {
            user_ids: vec![2],
            ..Default::default()
        })
        .await
        .expect("disconnect")
        .into_inner();
    assert_eq!((answer.nodes, answer.disconnected), (2, 2), "{answer:?}");
    for socket in [&mut on_a, &mut on_b] {
        expect(socket, "force_disconnect").await;
        socket.recv_close().await;
    }
    for node in [&a, &b] {
        let (_, first) = open(node, &old).await;
        assert_eq!(first["success"], false, "the old token is refused: {first}");
    }
    let (_, first) = open(&b, &token_with(2, 1_800_000_000, "new")).await;
    assert_eq!(first["success"], true, "a new token is let in: {first}");
}

/// Revokes user 2's table 1 through `grpc` until it answers OK (retrying `UNAVAILABLE`,
/// as the backend does); the answer and how long it took.
async fn revoke_until_ok(grpc: &Grpc, request: CheckPermissionRequest) -> (u32, usize, Duration) {
    let started = Instant::now();
    loop {
        match grpc.clone().check_permission(request.clone()).await {
            Ok(answer) => {
                let answer = answer.into_inner();
                return (answer.nodes, answer.revoked.len(), started.elapsed());
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(
                    started.elapsed() < PATIENCE,
                    "no OK within {PATIENCE:?}: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Two nodes on `redis`; Redis is killed and started again, and at once a revoke is sent
/// through node a: it answers OK only once node b applied it too.
async fn a_revoke_after_a_redis_restart_reaches_both_nodes(mut redis: RedisServer, test: &str) {
    let p = prefix(test);
    let a = node_on(&redis, &p, "a").await;
    let b = node_on(&redis, &p, "b").await;
    let grpc = a.grpc().await;
    until_live(&grpc, 2).await;
    let persistent = redis_keeps_data(&redis).await;
    for round in 0..3 {
        let mut on_b = b.client(2).await;
        on_b.join(table(1)).await;
        redis.kill();
        redis.restart();
        let (nodes, revoked, took) = revoke_until_ok(&grpc, revoke_user_2()).await;
        eprintln!("{test} round {round}: OK after {took:?}, nodes {nodes}, revoked {revoked}");
        assert_eq!(nodes, 2, "round {round}: node b was not waited for");
        if persistent {
            // The history survived, so b's socket stayed, and the revoke reached it.
            assert_eq!(revoked, 1, "round {round}");
            expect(&mut on_b, "page_discard").await;
        } else {
            // Redis lost the history: b closed its sockets to reconnect, or the revoke
            // reached the socket first.
            let first = on_b.ws.next().await;
            let discarded =
                matches!(&first, Some(Ok(Message::Text(t))) if t.contains("page_discard"));
            let closed = matches!(&first, Some(Ok(Message::Close(_))) | None | Some(Err(_)));
            assert!(discarded || closed, "round {round}: {first:?}");
        }
    }
}

/// Whether `redis` keeps its data across a restart (an append-only file).
async fn redis_keeps_data(redis: &RedisServer) -> bool {
    let mut client = redis.client().await;
    let config: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query_async(&mut client)
        .await
        .expect("CONFIG GET");
    config.get(1).is_some_and(|value| value == "yes")
}

#[tokio::test]
async fn a_revoke_right_after_redis_restarted_empty_waits_for_every_live_node() {
    a_revoke_after_a_redis_restart_reaches_both_nodes(RedisServer::start(), "restart-empty").await;
}

#[tokio::test]
async fn a_revoke_right_after_redis_restarted_from_its_append_only_file_reaches_both_nodes() {
    a_revoke_after_a_redis_restart_reaches_both_nodes(
        RedisServer::start_persistent(),
        "restart-aof",
    )
    .await;
}

#[tokio::test]
async fn a_node_frozen_past_its_heartbeat_applies_what_it_missed_before_it_delivers_anything() {
    let redis = RedisServer::start();
    let p = prefix("frozen-node");
    let a = node_on(&redis, &p, "a").await;
    let _b = node_on(&redis, &p, "b").await;
    let c = NodeProcess::start_with(&redis, &p, "c", &[]).await;
    let grpc = a.grpc().await;
    let mut revoked = c.client(5).await;
    let mut disconnected = c.client(6).await;
    let mut kept = c.client(7).await;
    for socket in [&mut revoked, &mut kept] {
        socket.join(table(1)).await;
    }
    until_live(&grpc, 3).await;

    c.signal("-STOP");
    // Node c is missing until its heartbeat expires; then the others answer alone.
    let revoke = CheckPermissionRequest {
        user_ids: vec![5],
        ..revoke_user_2()
    };
    let (nodes, _, took) = revoke_until_ok(&grpc, revoke).await;
    eprintln!("revoke answered OK without the frozen node after {took:?}");
    assert_eq!(nodes, 2);
    let answer = grpc
        .clone()
        .disconnect(DisconnectRequest {
            user_ids: vec![6],
            ..Default::default()
        })
        .await
        .expect("Disconnect answers without the frozen node")
        .into_inner();
    assert_eq!(answer.nodes, 2);
    publish(
        &mut grpc.clone(),
        group_request("table-1", event("after", 1)),
    )
    .await;
    c.signal("-CONT");

    // Before anything else: the revoked page goes, the disconnected user is thrown out.
    let first = revoked.recv().await;
    assert_eq!(first["type"], "page_discard", "{first}");
    expect(&mut disconnected, "force_disconnect").await;
    disconnected.recv_close().await;
    // Nothing lost for the socket that kept its page, and nothing for the revoked one.
    expect(&mut kept, "after").await;
    publish(
        &mut grpc.clone(),
        group_request("users", event("marker", 2)),
    )
    .await;
    expect(&mut revoked, "marker").await;
}

#[tokio::test]
async fn a_revoke_through_a_failover_and_a_slot_move_of_the_registry_reaches_both_nodes() {
    let mut cluster = RedisCluster::start().await;
    let p = prefix("revoke-failover");
    let a = node_on(&cluster, &p, "a").await;
    let b = node_on(&cluster, &p, "b").await;
    let grpc = a.grpc().await;
    until_live(&grpc, 2).await;
    // The registry, control requests and their log share the slot of `{prefix}`.
    let registry = slot_of(&format!("{{{p}}}"));

    let mut on_b = b.client(2).await;
    on_b.join(table(1)).await;
    let killed = cluster.kill_primary_of_slot(registry).await;
    let (nodes, revoked, took) = revoke_until_ok(&grpc, revoke_user_2()).await;
    eprintln!("failover of {killed}: OK after {took:?}, nodes {nodes}, revoked {revoked}");
    assert_eq!(nodes, 2, "node b was not waited for");
    expect(&mut on_b, "page_discard").await;

    let mut on_b = b.client(2).await;
    on_b.join(table(1)).await;
    let to = cluster.another_primary_than_of(registry).await;
    cluster.migrate_slot(registry, to).await;
    let (nodes, revoked, took) = revoke_until_ok(&grpc, revoke_user_2()).await;
    eprintln!("slot move to {to}: OK after {took:?}, nodes {nodes}, revoked {revoked}");
    assert_eq!(nodes, 2, "node b was not waited for");
    expect(&mut on_b, "page_discard").await;
}
