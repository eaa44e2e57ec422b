//! Presence: who else is on a table, on one node and across nodes through a real
//! redis-server, with real sockets.

use std::time::{Duration, Instant};

use channelgate::proto::{CheckPermissionRequest, InfoRequest};
use serde_json::{Value, json};

use crate::backend::Backend;
use crate::cluster::{Meeting, NodeProcess, eventually, node_on_with, prefix};
use crate::common::*;
use crate::redis_server::RedisServer;

fn table(id: i64) -> Value {
    json!({"page": "table", "table_id": id})
}

/// A public view of table 1: the authorizer puts it in the table's space.
fn public_view() -> Value {
    json!({"page": "view", "slug": "public-1"})
}

/// A backend that allows everything and puts the public view in `table-1`.
async fn backend() -> (std::sync::Arc<Backend>, String) {
    let backend = Backend::new(|_, _| true);
    backend.set_space_policy(|q| (q["page"] == "view").then(|| "table-1".to_string()));
    let url = backend.serve_http().await;
    (backend, url)
}

async fn presence_node(redis: &impl Meeting, prefix: &str, id: &str, authorizer: &str) -> TestNode {
    node_on_with(
        redis,
        prefix,
        id,
        &["--presence", "on", "--authorizer", authorizer],
    )
    .await
}

/// The next frame, which must be of `kind`.
async fn next(client: &mut Client, kind: &str) -> Value {
    let frame = client.recv().await;
    assert_eq!(frame["type"], kind, "{frame}");
    frame
}

/// Nothing more arrives: a ping's pong comes next.
async fn nothing_more(client: &mut Client) {
    client.send(json!({"type": "ping"})).await;
    let frame = client.recv().await;
    assert_eq!(frame, json!({"type": "pong"}), "an unexpected frame");
}

/// Subscribes and reads `page_add`, then `presence.members`; returns the entries.
async fn join_listing(client: &mut Client, page: Value) -> Vec<Value> {
    client.join(page).await;
    let members = next(client, "presence.members").await;
    assert_eq!(members["space"], "table-1");
    let mut entries = members["entries"].as_array().expect("entries").clone();
    entries.sort_by_key(|e| e["user_id"].as_i64());
    entries
}

fn users(entries: &[Value]) -> Vec<i64> {
    entries
        .iter()
        .map(|e| e["user_id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn three_users_and_an_anonymous_viewer_on_two_nodes_see_exactly_the_documented_frames() {
    documented_frames(&RedisServer::start()).await;
}

/// Three users and an anonymous viewer on two nodes meeting on `redis` see exactly the
/// documented presence frames.
pub async fn documented_frames(redis: &impl Meeting) {
    let (_backend, url) = backend().await;
    let p = prefix("presence");
    let a = presence_node(redis, &p, "a", &url).await;
    let b = presence_node(redis, &p, "b", &url).await;

    // User 1 on a: alone.
    let mut one = a.client(1).await;
    assert_eq!(join_listing(&mut one, table(1)).await, Vec::<Value>::new());

    // User 2 on b, through a row of the table: sees user 1; user 1 hears of user 2.
    let mut two = b.client(2).await;
    let listed = join_listing(&mut two, json!({"page": "row", "table_id": 1, "row_id": 5})).await;
    assert_eq!(users(&listed), vec![1]);
    let one_id = listed[0]["presence_id"].clone();
    let joined = next(&mut one, "presence.join").await;
    assert_eq!(joined["user_id"], 2);
    let two_id = joined["presence_id"].clone();
    assert_ne!(one_id, two_id);

    // User 2's second page of the same space changes nothing for anyone.
    two.join(table(1)).await;

    // An anonymous viewer of the public view on a: only editors_active.
    let mut viewer = a.client(0).await;
    viewer.join(public_view()).await;
    assert_eq!(
        next(&mut viewer, "presence.editors_active").await,
        json!({"type": "presence.editors_active", "space": "table-1", "active": true})
    );
    for editor in [&mut one, &mut two] {
        let joined = next(editor, "presence.join").await;
        assert_eq!(joined["user_id"], -1);
    }

    // User 1 focuses a cell: user 2 (other node) sees it; the viewer and user 1 do not.
    let cell = json!({"type": "cell", "row_id": 5, "field_id": 7});
    one.send(json!({"type": "presence.focus", "page": "table", "table_id": 1, "focus": cell}))
        .await;
    let focus = next(&mut two, "presence.focus").await;
    assert_eq!(
        focus,
        json!({"type": "presence.focus", "space": "table-1", "user_id": 1, "presence_id": one_id, "focus": cell})
    );

    // User 3 on b: sees everyone, with user 1's focus.
    let mut three = b.client(3).await;
    let listed = join_listing(&mut three, table(1)).await;
    assert_eq!(users(&listed), vec![-1, 1, 2]);
    assert_eq!(listed[1]["focus"], cell);
    for editor in [&mut one, &mut two] {
        assert_eq!(next(editor, "presence.join").await["user_id"], 3);
    }

    // A second tab of user 1 is a second member.
    let mut tab = b.client(1).await;
    let listed = join_listing(&mut tab, table(1)).await;
    assert_eq!(users(&listed), vec![-1, 1, 2, 3]);
    for editor in [&mut one, &mut two, &mut three] {
        let joined = next(editor, "presence.join").await;
        assert_eq!(joined["user_id"], 1);
        assert_ne!(joined["presence_id"], one_id);
    }

    // User 2 leaves both pages: the space is left once, with the last.
    two.send(json!({"remove_page": "row", "table_id": 1, "row_id": 5}))
        .await;
    next(&mut two, "page_discard").await;
    two.send(json!({"remove_page": "table", "table_id": 1}))
        .await;
    next(&mut two, "page_discard").await;
    assert_eq!(
        next(&mut two, "presence.space_discard").await,
        json!({"type": "presence.space_discard", "space": "table-1"})
    );
    for other in [&mut one, &mut three, &mut tab] {
        let left = next(other, "presence.leave").await;
        assert_eq!(
            (left["user_id"].clone(), left["presence_id"].clone()),
            (json!(2), two_id.clone())
        );
    }

    // User 3 goes away abruptly.
    drop(three);
    for other in [&mut one, &mut tab] {
        assert_eq!(next(other, "presence.leave").await["user_id"], 3);
    }
    let info = a
        .grpc()
        .await
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    let members: Vec<(String, u64)> = info
        .nodes
        .iter()
        .map(|n| (n.node_id.clone(), n.presence_members))
        .collect();
    assert_eq!(members, vec![("a".to_string(), 2), ("b".to_string(), 1)]);

    // The last signed-in members leave: the viewer learns no editor is left.
    drop(one);
    assert_eq!(next(&mut tab, "presence.leave").await["user_id"], 1);
    drop(tab);
    assert_eq!(
        next(&mut viewer, "presence.editors_active").await,
        json!({"type": "presence.editors_active", "space": "table-1", "active": false})
    );
    nothing_more(&mut viewer).await;
    nothing_more(&mut two).await;
}

#[tokio::test]
async fn a_killed_nodes_members_leave_everyone_elses_lists_within_seconds() {
    let redis = RedisServer::start();
    let p = prefix("presence-kill");
    let flags = ["--presence", "on"];
    let a = NodeProcess::start_with(&redis, &p, "a", &flags).await;
    let mut b = NodeProcess::start_with(&redis, &p, "b", &flags).await;
    let mut on_a = a.client(1).await;
    assert_eq!(join_listing(&mut on_a, table(1)).await, Vec::<Value>::new());
    let mut on_b = b.client(2).await;
    assert_eq!(users(&join_listing(&mut on_b, table(1)).await), vec![1]);
    assert_eq!(next(&mut on_a, "presence.join").await["user_id"], 2);

    b.child.kill().await.expect("SIGKILL node b");
    let killed = Instant::now();
    let left = next(&mut on_a, "presence.leave").await;
    assert_eq!(left["user_id"], 2);
    let took = killed.elapsed();
    // The heartbeat lives 3 s and the sweep runs every second.
    assert!(took < Duration::from_secs(6), "the ghost stayed {took:?}");

    // A newcomer sees no ghost.
    let mut newcomer = a.client(3).await;
    assert_eq!(users(&join_listing(&mut newcomer, table(1)).await), vec![1]);
}

#[tokio::test]
async fn invalid_focus_is_dropped_and_the_socket_stays_up() {
    let node = TestNode::start_with(&["--presence", "on"]).await;
    let mut one = node.client(1).await;
    let mut two = node.client(2).await;
    join_listing(&mut one, table(1)).await;
    join_listing(&mut two, table(1)).await;
    next(&mut one, "presence.join").await;
    let focus = |page: Value, focus: Value| {
        let mut frame = page;
        frame["type"] = json!("presence.focus");
        frame["focus"] = focus;
        frame
    };
    let wide = json!({"type": "cell", "row_id": 1, "field_id": 2, "pad": "x".repeat(600)});
    for bad in [
        focus(table(1), json!({"type": "column", "field_id": 1})),
        focus(table(1), json!({"type": "cell", "row_id": 1})),
        focus(
            table(1),
            json!({"type": "cell", "row_id": "1", "field_id": 2}),
        ),
        focus(table(1), wide),
        focus(table(2), json!({"type": "row", "row_id": 1})),
        focus(json!({"page": "nope"}), json!(null)),
    ] {
        one.send(bad).await;
    }
    let good = json!({"type": "row", "row_id": 8});
    one.send(focus(table(1), good.clone())).await;
    assert_eq!(next(&mut two, "presence.focus").await["focus"], good);
    nothing_more(&mut one).await;
    nothing_more(&mut two).await;
    let presence = node.node.presence.as_ref().expect("presence on");
    assert_eq!(presence.stats().focus_dropped, 6);
}

#[tokio::test]
async fn a_focus_flood_is_thinned_not_relayed_in_full() {
    let node = TestNode::start_with(&["--presence", "on", "--presence-focus-rate", "5"]).await;
    let mut one = node.client(1).await;
    let mut two = node.client(2).await;
    join_listing(&mut one, table(1)).await;
    join_listing(&mut two, table(1)).await;
    next(&mut one, "presence.join").await;
    let sent = 80;
    for row in 0..sent {
        one.send(
            json!({"type": "presence.focus", "page": "table", "table_id": 1,
                        "focus": {"type": "row", "row_id": row}}),
        )
        .await;
    }
    nothing_more(&mut one).await;
    two.send(json!({"type": "ping"})).await;
    let mut relayed = 0;
    loop {
        let frame = two.recv().await;
        if frame["type"] == "pong" {
            break;
        }
        assert_eq!(frame["type"], "presence.focus");
        relayed += 1;
    }
    assert!(
        (5..=10).contains(&relayed),
        "{relayed} of {sent} focus frames relayed"
    );
}

#[tokio::test]
async fn with_presence_off_no_presence_frame_is_sent() {
    let node = TestNode::start().await;
    let mut one = node.client(1).await;
    let mut two = node.client(2).await;
    one.join(table(1)).await;
    two.join(table(1)).await;
    one.send(json!({"type": "presence.focus", "page": "table", "table_id": 1, "focus": null}))
        .await;
    nothing_more(&mut one).await;
    nothing_more(&mut two).await;
}

#[tokio::test]
async fn presence_counts_show_in_info_on_one_node() {
    let node = TestNode::start_with(&["--presence", "on"]).await;
    let mut one = node.client(1).await;
    join_listing(&mut one, table(1)).await;
    let grpc = node.grpc().await;
    eventually("Info counts the member", async || {
        let info = grpc
            .clone()
            .info(InfoRequest {})
            .await
            .expect("info")
            .into_inner();
        info.nodes[0].presence_members == 1 && info.nodes[0].presence_spaces == 1
    })
    .await;
}

/// The backend's `users_removed_from_permission_group` for user 2, narrowed to `group`
/// when given.
fn revoke_user_2(permission_group: &str, group: &str) -> CheckPermissionRequest {
    CheckPermissionRequest {
        user_ids: vec![2],
        permission_group: permission_group.into(),
        group: group.into(),
        revoke: true,
        ..Default::default()
    }
}

/// Revokes through `node` and returns the revoked subscriptions' `(user_id, page)`,
/// checking that both nodes answered.
async fn revoke(node: &TestNode, request: CheckPermissionRequest) -> Vec<(i64, String)> {
    let answer = node
        .grpc()
        .await
        .check_permission(request)
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(answer.nodes, 2, "{answer:?}");
    answer
        .revoked
        .iter()
        .map(|s| (s.user_id, s.page.clone()))
        .collect()
}

#[tokio::test]
async fn a_socket_revoked_from_its_last_page_of_a_space_leaves_the_member_list_on_every_node() {
    let redis = RedisServer::start();
    let p = prefix("presence-revoke");
    let a = presence_node(&redis, &p, "a", "static").await;
    let b = presence_node(&redis, &p, "b", "static").await;
    let mut two = a.client(2).await;
    assert_eq!(join_listing(&mut two, table(1)).await, Vec::<Value>::new());
    let mut three = b.client(3).await;
    let listed = join_listing(&mut three, table(1)).await;
    assert_eq!(users(&listed), vec![2]);
    let two_id = listed[0]["presence_id"].clone();
    assert_eq!(next(&mut two, "presence.join").await["user_id"], 3);

    let revoked = revoke(&a, revoke_user_2("permissions-table-1", "")).await;
    assert_eq!(revoked, vec![(2, "table".to_string())]);
    assert_eq!(
        next(&mut two, "page_discard").await,
        json!({"type": "page_discard", "page": "table", "parameters": {"table_id": 1}})
    );
    assert_eq!(
        next(&mut two, "presence.space_discard").await,
        json!({"type": "presence.space_discard", "space": "table-1"})
    );
    let left = next(&mut three, "presence.leave").await;
    assert_eq!(
        left,
        json!({"type": "presence.leave", "space": "table-1", "user_id": 2, "presence_id": two_id})
    );

    // A newcomer on b sees user 3 and no ghost of user 2.
    let mut four = b.client(4).await;
    assert_eq!(users(&join_listing(&mut four, table(1)).await), vec![3]);
    assert_eq!(next(&mut three, "presence.join").await["user_id"], 4);
    nothing_more(&mut two).await;
    nothing_more(&mut three).await;
}

#[tokio::test]
async fn a_revoke_of_one_of_two_pages_of_a_space_keeps_the_member_until_the_last_goes() {
    let redis = RedisServer::start();
    let p = prefix("presence-revoke-two");
    let a = presence_node(&redis, &p, "a", "static").await;
    let b = presence_node(&redis, &p, "b", "static").await;
    let row = json!({"page": "row", "table_id": 1, "row_id": 5});
    let mut two = a.client(2).await;
    assert_eq!(join_listing(&mut two, table(1)).await, Vec::<Value>::new());
    two.join(row.clone()).await;
    let mut three = b.client(3).await;
    let listed = join_listing(&mut three, table(1)).await;
    assert_eq!(users(&listed), vec![2]);
    let two_id = listed[0]["presence_id"].clone();
    assert_eq!(next(&mut two, "presence.join").await["user_id"], 3);

    // Only the row page goes: user 2 still holds table 1, so it stays a member.
    let revoked = revoke(&b, revoke_user_2("", "table-1-row-5")).await;
    assert_eq!(revoked, vec![(2, "row".to_string())]);
    assert_eq!(
        next(&mut two, "page_discard").await,
        json!({"type": "page_discard", "page": "row", "parameters": {"table_id": 1, "row_id": 5}})
    );
    nothing_more(&mut two).await;
    nothing_more(&mut three).await;
    let mut four = b.client(4).await;
    assert_eq!(users(&join_listing(&mut four, table(1)).await), vec![2, 3]);
    for member in [&mut two, &mut three] {
        assert_eq!(next(member, "presence.join").await["user_id"], 4);
    }

    // The permission group goes: the last page of the space with it.
    let revoked = revoke(&b, revoke_user_2("permissions-table-1", "")).await;
    assert_eq!(revoked, vec![(2, "table".to_string())]);
    next(&mut two, "page_discard").await;
    assert_eq!(
        next(&mut two, "presence.space_discard").await,
        json!({"type": "presence.space_discard", "space": "table-1"})
    );
    for other in [&mut three, &mut four] {
        assert_eq!(
            next(other, "presence.leave").await,
            json!({"type": "presence.leave", "space": "table-1", "user_id": 2, "presence_id": two_id})
        );
    }
    let mut five = a.client(5).await;
    assert_eq!(users(&join_listing(&mut five, table(1)).await), vec![3, 4]);
    for member in [&mut three, &mut four] {
        assert_eq!(next(member, "presence.join").await["user_id"], 5);
    }
    nothing_more(&mut two).await;
    nothing_more(&mut three).await;
    nothing_more(&mut four).await;
}
