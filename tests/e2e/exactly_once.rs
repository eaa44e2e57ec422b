//! Nothing lost, nothing doubled between the backend and the gateway: idempotency keys
//! on every bus, honest statuses (`UNAVAILABLE` only when nothing was published), lost
//! marks that make a gap loud, and a batch's ids in request order on a Redis Cluster.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use channelgate::proto::publish_request::Target;
use channelgate::proto::{IndividualTarget, PublishBatchRequest, PublishRequest, UserTarget};
use serde_json::json;
use tonic::Code;

use crate::cluster::{Meeting, expect, node_on, prefix};
use crate::common::*;
use crate::redis_cluster::RedisCluster;
use crate::redis_server::RedisServer;
use crate::replay::{assert_refresh, replay};

fn keyed(group: &str, n: i64, key: &str) -> PublishRequest {
    PublishRequest {
        idempotency_key: key.into(),
        ..group_request(group, event("e", n))
    }
}

/// The same key twice answers one id, and the socket gets the event once.
async fn a_key_publishes_once(grpc_a: &Grpc, grpc_b: &Grpc, socket: &mut Client) {
    let (mut on_a, mut on_b) = (grpc_a.clone(), grpc_b.clone());
    let (first, second) = tokio::join!(
        on_a.publish(keyed("table-1", 1, "key-1")),
        on_b.publish(keyed("table-1", 1, "key-1")),
    );
    let (first, second) = (
        first.expect("publish").into_inner().event_id,
        second.expect("publish").into_inner().event_id,
    );
    assert_eq!(first, second, "both answers name the one event");
    assert_ne!(first, 0);
    let batch = PublishBatchRequest {
        events: vec![keyed("table-1", 2, "key-2"), keyed("table-1", 1, "key-1")],
    };
    let ids = grpc_a
        .clone()
        .publish_batch(batch.clone())
        .await
        .expect("batch")
        .into_inner()
        .event_ids;
    assert_eq!(
        ids[1], first,
        "a known key inside a batch answers its first id"
    );
    let again = grpc_b
        .clone()
        .publish_batch(batch)
        .await
        .expect("batch again")
        .into_inner()
        .event_ids;
    assert_eq!(again, ids, "a retried batch publishes nothing new");
    grpc_a
        .clone()
        .publish(group_request("table-1", event("marker", 0)))
        .await
        .expect("marker");
    let mut seen = Vec::new();
    loop {
        let frame = socket.recv().await;
        if frame["type"] == "marker" {
            break;
        }
        seen.push((frame["n"].as_i64(), frame["_event_id"].as_u64()));
    }
    assert_eq!(
        seen,
        [(Some(1), Some(first)), (Some(2), Some(ids[0]))],
        "each keyed event once"
    );
}

#[tokio::test]
async fn the_same_key_twice_publishes_once_on_one_node() {
    let node = TestNode::start().await;
    let grpc = node.grpc().await;
    let mut socket = node.client(1).await;
    socket.join(json!({"page": "table", "table_id": 1})).await;
    a_key_publishes_once(&grpc, &grpc, &mut socket).await;
}

#[tokio::test]
async fn the_same_key_on_two_nodes_at_once_publishes_once_on_redis() {
    let redis = RedisServer::start();
    two_nodes_publish_a_key_once(&redis, "idempotency-redis").await;
}

#[tokio::test]
async fn the_same_key_on_two_nodes_at_once_publishes_once_on_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    two_nodes_publish_a_key_once(&cluster, "idempotency-cluster").await;
}

async fn two_nodes_publish_a_key_once(redis: &impl Meeting, test: &str) {
    let p = prefix(test);
    let a = node_on(redis, &p, "a").await;
    let b = node_on(redis, &p, "b").await;
    let mut socket = b.client(1).await;
    socket.join(json!({"page": "table", "table_id": 1})).await;
    a_key_publishes_once(&a.grpc().await, &b.grpc().await, &mut socket).await;
}

#[tokio::test]
async fn a_bad_idempotency_key_is_refused_naming_the_field() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    for key in ["x".repeat(129), "tab\there".into()] {
        let status = grpc
            .publish(keyed("table-1", 1, &key))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with("idempotency_key"),
            "{status:?}"
        );
    }
}

/// Redis frozen for three seconds under steady keyed publishes through two nodes: what
/// was answered OK arrives once, what was answered UNAVAILABLE never arrives, and what
/// was answered DEADLINE_EXCEEDED arrives once after a retry with its key.
#[tokio::test]
async fn a_frozen_redis_neither_loses_an_acknowledged_event_nor_doubles_a_retried_one() {
    let redis = RedisServer::start();
    let p = prefix("frozen-keys");
    let a = node_on(&redis, &p, "a").await;
    let b = node_on(&redis, &p, "b").await;
    let mut socket = a.client(1).await;
    socket.join(json!({"page": "table", "table_id": 1})).await;
    let grpcs = [a.grpc().await, b.grpc().await];

    let mut outcome: HashMap<i64, &str> = HashMap::new();
    let started = Instant::now();
    let freezer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        redis.freeze();
        tokio::time::sleep(Duration::from_secs(3)).await;
        redis.thaw();
        redis
    });
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(9) {
        n += 1;
        let request = keyed("table-1", n, &format!("event-{n}"));
        let grpc = &grpcs[n as usize % 2];
        let answer = match grpc.clone().publish(request.clone()).await {
            Ok(_) => "ok",
            Err(status) if status.code() == Code::Unavailable => "unavailable",
            Err(status) if status.code() == Code::DeadlineExceeded => {
                // The event may be out: the backend retries with its key until it knows.
                let retried = Instant::now();
                loop {
                    match grpc.clone().publish(request.clone()).await {
                        Ok(_) => break "retried",
                        Err(_) if retried.elapsed() < PATIENCE => {
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
                        Err(status) => panic!("event {n} never confirmed: {status:?}"),
                    }
                }
            }
            Err(status) => panic!("event {n}: unexpected {status:?}"),
        };
        outcome.insert(n, answer);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _redis = freezer.await.expect("the freezer ran");
    let mut grpc = grpcs[0].clone();
    crate::cluster::publishes_again(&grpc, group_request("table-1", event("marker", 0))).await;
    publish(&mut grpc, group_request("table-1", event("end", 0))).await;
    let mut received: HashMap<i64, usize> = HashMap::new();
    loop {
        let frame = socket.recv().await;
        match frame["type"].as_str() {
            Some("end") => break,
            Some("e") => *received.entry(frame["n"].as_i64().expect("n")).or_default() += 1,
            _ => {}
        }
    }
    let count = |what: &str| outcome.values().filter(|o| **o == what).count();
    eprintln!(
        "{} publishes: {} ok, {} unavailable, {} retried after DEADLINE_EXCEEDED",
        outcome.len(),
        count("ok"),
        count("unavailable"),
        count("retried")
    );
    assert!(
        count("unavailable") + count("retried") > 0,
        "the freeze was felt"
    );
    for (n, answer) in &outcome {
        let got = received.get(n).copied().unwrap_or(0);
        match *answer {
            "unavailable" => assert_eq!(got, 0, "event {n} answered UNAVAILABLE arrived"),
            _ => assert_eq!(got, 1, "event {n} ({answer}) arrived {got} times"),
        }
    }
}

/// A lost mark closes its target's sockets with 1012, and a replay across it refreshes.
async fn a_lost_mark_is_loud(node: &TestNode) {
    let mut grpc = node.grpc().await;
    let mut socket = node.client(1).await;
    socket.join(json!({"page": "table", "table_id": 1})).await;
    let mut elsewhere = node.client(2).await;
    elsewhere
        .join(json!({"page": "table", "table_id": 2}))
        .await;
    let before = publish(&mut grpc, group_request("table-1", event("e", 1))).await;
    expect(&mut socket, "e").await;
    let mark = PublishRequest {
        target: Some(Target::Group("table-1".into())),
        lost: true,
        ..Default::default()
    };
    let mark_id = publish(&mut grpc, mark).await;
    assert!(mark_id > before);
    let close = socket.recv_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1012);
    // The other table's socket stays, and gets what follows.
    publish(&mut grpc, group_request("table-2", event("still", 2))).await;
    expect(&mut elsewhere, "still").await;
    // The browser reconnects and replays from before the gap: it must refresh.
    let mut again = node.client(1).await;
    again.join(json!({"page": "table", "table_id": 1})).await;
    let (events, result) = replay(&mut again, json!(before), true).await;
    assert!(events.is_empty(), "{events:?}");
    assert_refresh(&result);
    // A mark needs a group or users target and no payload.
    let status = grpc
        .publish(PublishRequest {
            payload: event("e", 3),
            ..group_request("table-1", String::new())
        })
        .await;
    assert!(status.is_ok());
    for bad in [
        PublishRequest {
            lost: true,
            ..group_request("table-1", event("e", 4))
        },
        PublishRequest {
            target: Some(Target::Individual(IndividualTarget {
                payloads: [(1, event("e", 5))].into(),
            })),
            lost: true,
            ..Default::default()
        },
    ] {
        let status = grpc.publish(bad).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
}

#[tokio::test]
async fn a_lost_mark_closes_its_sockets_and_a_replay_across_it_refreshes_on_one_node() {
    a_lost_mark_is_loud(&TestNode::start().await).await;
}

#[tokio::test]
async fn a_lost_mark_closes_its_sockets_and_a_replay_across_it_refreshes_on_redis() {
    let redis = RedisServer::start();
    a_lost_mark_is_loud(&node_on(&redis, &prefix("lost-redis"), "a").await).await;
}

#[tokio::test]
async fn a_mixed_batch_on_a_redis_cluster_gets_ids_and_arrives_in_request_order() {
    let cluster = RedisCluster::start().await;
    let p = prefix("batch-order");
    let a = node_on(&cluster, &p, "a").await;
    let b = node_on(&cluster, &p, "b").await;
    let mut socket = b.client(2).await;
    socket.join(json!({"page": "table", "table_id": 1})).await;
    let users = |user_ids: Vec<i64>, all_users: bool, n| PublishRequest {
        target: Some(Target::Users(UserTarget {
            user_ids,
            all_users,
        })),
        payload: event("e", n),
        ..Default::default()
    };
    let events = vec![
        group_request("table-1", event("e", 0)),
        users(vec![2], false, 1),
        users(Vec::new(), true, 2),
        PublishRequest {
            target: Some(Target::Individual(IndividualTarget {
                payloads: [(2, event("e", 3))].into(),
            })),
            ..Default::default()
        },
        group_request("users", event("e", 4)),
        group_request("table-1", event("e", 5)),
    ];
    for round in 0..5 {
        let ids = a
            .grpc()
            .await
            .publish_batch(PublishBatchRequest {
                events: events.clone(),
            })
            .await
            .expect("batch")
            .into_inner()
            .event_ids;
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "round {round}: ids out of request order: {ids:?}"
        );
        for (n, id) in ids.iter().enumerate() {
            let frame = socket.recv().await;
            assert_eq!(
                (frame["n"].as_u64(), frame["_event_id"].as_u64()),
                (Some(n as u64), Some(*id)),
                "round {round}"
            );
        }
    }
}

/// A publish still waiting on a frozen Redis when the node stops answers
/// DEADLINE_EXCEEDED (it may have been published), not a broken call.
#[tokio::test]
async fn a_publish_cut_by_a_stopping_node_answers_deadline_exceeded() {
    let redis = RedisServer::start();
    let url = redis.url();
    let p = prefix("cut-by-shutdown");
    // Shorter than Redis's command timeout, so the stop comes first.
    let node =
        TestNode::start_stopping_within("1", &["--redis-url", &url, "--redis-prefix", &p]).await;
    assert!(node.node.ready(PATIENCE).await);
    let mut grpc = node.grpc().await;
    redis.freeze();
    let call = tokio::spawn(async move {
        let answer = grpc.publish(keyed("table-1", 1, "cut")).await;
        (answer, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = Instant::now();
    node.node.shutdown().await;
    let (answer, answered) = call.await.expect("the call ran");
    redis.thaw();
    let status = answer.expect_err("not confirmed");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // Answered by the stop (within its second), not by Redis's command timeout later,
    // which a process that exits would never send.
    assert!(
        answered.duration_since(stopping) < Duration::from_millis(1500),
        "answered {:?} after the stop began: {status:?}",
        answered.duration_since(stopping)
    );
    assert!(status.message().contains("stopped"), "{status:?}");
}
