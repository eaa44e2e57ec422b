//! Baserow's delivery rules, each checked with real sockets and a real gRPC client.
//!
//! "Does not receive" is checked without sleeping: after the event in question, a marker
//! goes to everyone, and the socket's next frame must be that marker.

use channelgate::proto::publish_request::Target;
use channelgate::proto::{IndividualTarget, PublishRequest, UserTarget};
use serde_json::json;

use crate::common::*;

/// Sends the marker to everyone.
async fn mark(grpc: &mut Grpc) {
    publish(grpc, group_request("users", event("marker", 0))).await;
}

async fn expect_event(client: &mut Client, kind: &str) {
    let frame = client.recv().await;
    assert_eq!(frame["type"], kind, "{frame}");
}

#[tokio::test]
async fn group_reaches_members_but_not_the_ignored_socket_nor_excluded_users() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let mut author = node.client(1).await;
    let mut colleague = node.client(2).await;
    let mut excluded = node.client(3).await;
    let mut outsider = node.client(4).await;
    for c in [&mut author, &mut colleague, &mut excluded] {
        c.join(json!({"page": "table", "table_id": 7})).await;
    }
    let request = PublishRequest {
        ignore_web_socket_id: author.web_socket_id.clone(),
        exclude_user_ids: vec![3],
        ..group_request("table-7", event("rows_created", 1))
    };
    let id = publish(&mut grpc, request).await;
    assert_ne!(id, 0, "history is on by default");
    mark(&mut grpc).await;

    let frame = colleague.recv().await;
    assert_eq!(
        frame,
        json!({"type": "rows_created", "n": 1, "_event_id": id})
    );
    expect_event(&mut colleague, "marker").await;
    for c in [&mut author, &mut excluded, &mut outsider] {
        expect_event(c, "marker").await;
    }
}

#[tokio::test]
async fn the_users_group_reaches_every_connection_including_anonymous() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let mut user = node.client(1).await;
    let mut anonymous = node.client(0).await;
    let mut author = node.client(2).await;
    let request = PublishRequest {
        ignore_web_socket_id: author.web_socket_id.clone(),
        ..group_request("users", event("announcement", 1))
    };
    publish(&mut grpc, request).await;
    expect_event(&mut user, "announcement").await;
    expect_event(&mut anonymous, "announcement").await;
    mark(&mut grpc).await;
    expect_event(&mut author, "marker").await;
}

#[tokio::test]
async fn user_ids_reach_every_connection_of_those_users_only() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let mut tab_a = node.client(5).await;
    let mut tab_b = node.client(5).await;
    let mut tab_c = node.client(5).await;
    let mut other = node.client(6).await;
    let mut anonymous = node.client(0).await;
    let request = PublishRequest {
        target: Some(Target::Users(UserTarget {
            user_ids: vec![5, 5, 99],
            all_users: false,
        })),
        payload: event("user_updated", 1),
        ignore_web_socket_id: tab_c.web_socket_id.clone(),
        ..Default::default()
    };
    publish(&mut grpc, request).await;
    mark(&mut grpc).await;
    for tab in [&mut tab_a, &mut tab_b] {
        expect_event(tab, "user_updated").await;
        expect_event(tab, "marker").await;
    }
    for c in [&mut tab_c, &mut other, &mut anonymous] {
        expect_event(c, "marker").await;
    }
}

#[tokio::test]
async fn all_users_reaches_every_connection() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let mut clients = vec![
        node.client(1).await,
        node.client(2).await,
        node.client(0).await,
    ];
    let request = PublishRequest {
        target: Some(Target::Users(UserTarget {
            user_ids: vec![],
            all_users: true,
        })),
        payload: event("settings_updated", 1),
        ..Default::default()
    };
    publish(&mut grpc, request).await;
    for c in &mut clients {
        expect_event(c, "settings_updated").await;
    }
}

#[tokio::test]
async fn individual_payloads_reach_each_user_with_their_own() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let mut alice = node.client(1).await;
    let mut alice_author = node.client(1).await;
    let mut bob = node.client(2).await;
    let mut carol = node.client(3).await;
    let request = PublishRequest {
        target: Some(Target::Individual(IndividualTarget {
            payloads: [
                (1, json!({"type": "notify", "for": "alice"}).to_string()),
                (2, json!({"type": "notify", "for": "bob"}).to_string()),
            ]
            .into(),
        })),
        ignore_web_socket_id: alice_author.web_socket_id.clone(),
        ..Default::default()
    };
    let id = publish(&mut grpc, request).await;
    mark(&mut grpc).await;
    // One id for the publish, carried by each user's own payload.
    assert_eq!(
        alice.recv().await,
        json!({"type": "notify", "for": "alice", "_event_id": id})
    );
    assert_eq!(
        bob.recv().await,
        json!({"type": "notify", "for": "bob", "_event_id": id})
    );
    for c in [&mut alice, &mut bob, &mut alice_author, &mut carol] {
        expect_event(c, "marker").await;
    }
}

#[tokio::test]
async fn a_thousand_publishes_arrive_in_order_at_every_subscriber() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let mut subscribers = Vec::new();
    for user in 1..=3 {
        let mut c = node.client(user).await;
        c.join(json!({"page": "table", "table_id": 1})).await;
        subscribers.push(c);
    }
    for n in 0..1000 {
        publish(&mut grpc, group_request("table-1", event("tick", n))).await;
    }
    for c in &mut subscribers {
        for n in 0..1000 {
            let frame = c.recv().await;
            assert_eq!(frame["n"], n, "subscriber {} out of order", c.web_socket_id);
        }
    }
}

#[tokio::test]
async fn a_duplicate_subscribe_delivers_an_event_once() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let mut c = node.client(1).await;
    c.join(json!({"page": "table", "table_id": 3})).await;
    c.join(json!({"page": "table", "table_id": "3"})).await;
    publish(&mut grpc, group_request("table-3", event("once", 1))).await;
    mark(&mut grpc).await;
    expect_event(&mut c, "once").await;
    expect_event(&mut c, "marker").await;
}

#[tokio::test]
async fn several_pages_on_one_socket_and_remove_page() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let mut c = node.client(1).await;
    c.join(json!({"page": "table", "table_id": 1})).await;
    c.join(json!({"page": "row", "table_id": 1, "row_id": 2}))
        .await;
    c.join(json!({"page": "dashboard", "dashboard_id": 9}))
        .await;
    for group in ["table-1", "table-1-row-2", "dashboard-9"] {
        publish(&mut grpc, group_request(group, event(group, 1))).await;
        expect_event(&mut c, group).await;
    }

    c.send(json!({"remove_page": "row", "table_id": 1, "row_id": "2"}))
        .await;
    let answer = c.recv().await;
    assert_eq!(
        answer,
        json!({"type": "page_discard", "page": "row", "parameters": {"table_id": 1, "row_id": 2}})
    );
    publish(
        &mut grpc,
        group_request("table-1-row-2", event("row_gone", 1)),
    )
    .await;
    publish(&mut grpc, group_request("table-1", event("table_still", 1))).await;
    expect_event(&mut c, "table_still").await;

    // Removing a page never held is still answered.
    c.send(json!({"remove_page": "table", "table_id": 55}))
        .await;
    assert_eq!(c.recv().await["type"], "page_discard");
}
