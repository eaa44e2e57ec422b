//! Revocation is immediate on every node: after `CheckPermission` or `Disconnect` answered
//! OK, no node admits the revoked page or the refused token from a remembered answer, a
//! node whose heartbeat Redis lost is still waited for, and a node that was counted gone
//! catches up before it serves again.

use channelgate::proto::{CheckPermissionRequest, DisconnectRequest};
use serde_json::{Value, json};

use crate::backend::Backend;
use crate::cluster::{Meeting, expect, prefix};
use crate::common::*;
use crate::connect::token_with;
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
    let revoked = node
        .grpc()
        .await
        .check_permission(revoke_user_2())
        .await
        .expect("revoke")
        .into_inner();
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
    let revoked = b
        .grpc()
        .await
        .check_permission(revoke_user_2())
        .await
        .expect("revoke")
        .into_inner();
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
