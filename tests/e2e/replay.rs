//! Event history and replay (DESIGN §6): a browser that reconnects with its
//! `web_socket_id` and its last seen id gets exactly what it missed, on one node and across
//! nodes, or is told to refresh; never a hole, never a duplicate.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use channelgate::proto::publish_request::Target;
use channelgate::proto::{IndividualTarget, PublishRequest, UserTarget};
use serde_json::{Value, json};

use crate::cluster::{Meeting, node_on, node_on_with, prefix, publishes_again};
use crate::common::*;
use crate::redis_server::RedisServer;

const TABLE_1: &str = r#"{"page":"table","table_id":1}"#;

/// A client of `user_id` with the socket id `web_socket_id`, past authentication, which
/// must say that replay is enabled.
pub async fn reconnect(ws_addr: &str, user_id: i64, web_socket_id: &str) -> Client {
    let url = format!(
        "ws://{ws_addr}/ws/core/?jwt_token={}&web_socket_id={web_socket_id}",
        token(user_id)
    );
    let mut client = Client::open(&url).await;
    let auth = client.recv().await;
    assert_eq!(auth["web_socket_id"], web_socket_id, "{auth}");
    assert_eq!(auth["replay_enabled"], true, "{auth}");
    client.web_socket_id = web_socket_id.to_string();
    client
}

pub async fn join_all(client: &mut Client, pages: &[&str]) {
    for page in pages {
        client
            .join(serde_json::from_str(page).expect("page JSON"))
            .await;
    }
}

/// Sends `replay_events` and reads up to its answer: the events replayed before it, and
/// the answer (`replay_events_result` or `replay_events_retry`).
pub async fn replay(
    client: &mut Client,
    last_seen_id: Value,
    supports_retry: bool,
) -> (Vec<Value>, Value) {
    client
        .send(json!({"type": "replay_events", "last_seen_id": last_seen_id, "supports_retry": supports_retry}))
        .await;
    let mut events = Vec::new();
    loop {
        let frame = client.recv().await;
        match frame["type"].as_str() {
            Some("replay_events_result" | "replay_events_retry") => return (events, frame),
            _ => events.push(frame),
        }
    }
}

/// The current highest id, as a first connect learns it.
pub async fn baseline(client: &mut Client) -> u64 {
    let (events, result) = replay(client, json!(-1), true).await;
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(result["force_refresh"], false, "{result}");
    result["latest_event_id"].as_u64().expect("an id")
}

fn users(user_ids: Vec<i64>, all_users: bool, payload: String) -> PublishRequest {
    PublishRequest {
        target: Some(Target::Users(UserTarget {
            user_ids,
            all_users,
        })),
        payload,
        ..Default::default()
    }
}

fn ids_of(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["_event_id"].as_u64().expect("_event_id"))
        .collect()
}

/// A `replay_events_retry` about a second out (spread so a crowd does not return at once).
fn assert_retry(answer: &Value) {
    assert_eq!(answer["type"], "replay_events_retry", "{answer}");
    let after = answer["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!((500..=1500).contains(&after), "{answer}");
}

pub fn assert_refresh(result: &Value) {
    assert_eq!(result["type"], "replay_events_result", "{result}");
    assert_eq!(result["force_refresh"], true, "{result}");
    assert_eq!(result["latest_event_id"], -2, "{result}");
}

/// While the socket of user 1, `tab-1`, on `table-1`, `table-2` and row 5 of table 1, is
/// away: events for it and events it must not get. Returns the ids of those it must get,
/// with the `n` of each.
pub async fn publish_while_away(grpc: &mut Grpc) -> Vec<(u64, i64)> {
    let mut wanted = Vec::new();
    let mut to = async |grpc: &mut Grpc, request: PublishRequest, n: i64, wanted_too: bool| {
        let id = publish(grpc, request).await;
        if wanted_too {
            wanted.push((id, n));
        }
        id
    };
    to(grpc, group_request("table-1", event("e", 1)), 1, true).await;
    let own = PublishRequest {
        ignore_web_socket_id: "tab-1".into(),
        ..group_request("table-2", event("e", 2))
    };
    to(grpc, own, 2, false).await;
    to(grpc, group_request("table-1-row-5", event("e", 3)), 3, true).await;
    to(grpc, group_request("table-3", event("e", 4)), 4, false).await;
    to(grpc, users(vec![1], false, event("e", 5)), 5, true).await;
    to(grpc, users(vec![2], false, event("e", 6)), 6, false).await;
    to(grpc, group_request("users", event("e", 7)), 7, true).await;
    let everyone_but_own = PublishRequest {
        ignore_web_socket_id: "tab-1".into(),
        ..users(vec![], true, event("e", 8))
    };
    to(grpc, everyone_but_own, 8, false).await;
    let excluded = PublishRequest {
        exclude_user_ids: vec![1],
        ..group_request("table-1", event("e", 9))
    };
    to(grpc, excluded, 9, false).await;
    let individual = PublishRequest {
        target: Some(Target::Individual(IndividualTarget {
            payloads: [(1, event("e", 10)), (2, event("e", 100))].into(),
        })),
        ..Default::default()
    };
    to(grpc, individual, 10, true).await;
    let unrecorded = PublishRequest {
        skip_history: true,
        ..group_request("table-2", event("e", 11))
    };
    let id = to(grpc, unrecorded, 11, false).await;
    assert_eq!(id, 0, "a skip_history event has no id");
    to(grpc, group_request("table-2", event("e", 12)), 12, true).await;
    wanted
}

pub const TAB_PAGES: [&str; 3] = [
    TABLE_1,
    r#"{"page":"table","table_id":2}"#,
    r#"{"page":"row","table_id":1,"row_id":5}"#,
];

/// Reconnects `tab-1` to `ws_addr`, replays from `cursor` and checks it gets exactly
/// `wanted`, in id order, then the result, then a live event, which it returns.
pub async fn replays_what_was_missed(
    ws_addr: &str,
    grpc: &mut Grpc,
    cursor: u64,
    wanted: &[(u64, i64)],
) -> (u64, i64) {
    // Else an event the node had still to deliver could reach the tab live, before the
    // replayed ones: allowed, but then this could not check the replay's order.
    delivered_so_far(ws_addr, grpc).await;
    let mut tab = reconnect(ws_addr, 1, "tab-1").await;
    join_all(&mut tab, &TAB_PAGES).await;
    let (events, result) = replay(&mut tab, json!(cursor), true).await;
    let got: Vec<(u64, i64)> = events
        .iter()
        .map(|e| {
            (
                e["_event_id"].as_u64().expect("id"),
                e["n"].as_i64().expect("n"),
            )
        })
        .collect();
    assert_eq!(got, wanted);
    assert_eq!(
        result,
        json!({"type": "replay_events_result", "force_refresh": false, "latest_event_id": wanted.last().map(|w| w.0)})
    );
    let live = publish(grpc, group_request("table-1", event("live", 13))).await;
    let frame = tab.recv().await;
    assert_eq!(
        (frame["n"].as_i64(), frame["_event_id"].as_u64()),
        (Some(13), Some(live))
    );
    (live, 13)
}

#[tokio::test]
async fn a_reconnecting_socket_gets_exactly_what_it_missed_then_live_events() {
    let node = TestNode::start().await;
    let addr = node.node.ws_addr.to_string();
    let mut grpc = node.grpc().await;
    let mut tab = reconnect(&addr, 1, "tab-1").await;
    join_all(&mut tab, &TAB_PAGES).await;
    let cursor = baseline(&mut tab).await;
    drop(tab);
    let wanted = publish_while_away(&mut grpc).await;
    assert!(
        wanted.windows(2).all(|w| w[0].0 < w[1].0),
        "ids increase: {wanted:?}"
    );
    replays_what_was_missed(&addr, &mut grpc, cursor, &wanted).await;
    let metrics = &node.node.metrics;
    assert_eq!(metrics.replays_served.load(Ordering::Relaxed), 1);
    assert_eq!(
        metrics.events_replayed.load(Ordering::Relaxed),
        wanted.len() as u64
    );
    assert_eq!(metrics.events_recorded.load(Ordering::Relaxed), 12);
    let text = node.node.metrics_text();
    assert!(
        text.contains("\nchannelgate_history_bytes ")
            && !text.contains("\nchannelgate_history_bytes 0\n"),
        "{text}"
    );
}

#[tokio::test]
async fn a_socket_replays_on_any_node_from_redis() {
    replay_on_any_node(&RedisServer::start()).await;
}

/// A socket that left node a replays on node b, and on a again, from the same cursor.
pub async fn replay_on_any_node(redis: &impl Meeting) {
    let p = prefix("replay-nodes");
    let a = node_on(redis, &p, "a").await;
    let b = node_on(redis, &p, "b").await;
    let (on_a, on_b) = (a.node.ws_addr.to_string(), b.node.ws_addr.to_string());
    let mut tab = reconnect(&on_a, 1, "tab-1").await;
    join_all(&mut tab, &TAB_PAGES).await;
    let cursor = baseline(&mut tab).await;
    drop(tab);
    let mut grpc_b = b.grpc().await;
    let mut wanted = publish_while_away(&mut grpc_b).await;
    let live = replays_what_was_missed(&on_b, &mut grpc_b, cursor, &wanted).await;
    // Back on node a, the same cursor gets the same, and the live event of the visit to b.
    wanted.push(live);
    let mut grpc_a = a.grpc().await;
    replays_what_was_missed(&on_a, &mut grpc_a, cursor, &wanted).await;
}

/// A marker to everyone that the history does not keep: it reaches a node's sockets after
/// every event published before it.
fn unrecorded_marker() -> PublishRequest {
    PublishRequest {
        skip_history: true,
        ..group_request("users", event("marker", 0))
    }
}

/// Returns once the node at `ws_addr` has delivered every event published before: an
/// unrecorded marker to everyone reaches a socket there after them, as a node delivers in
/// id order (an unrecorded event takes its place in that order too).
pub async fn delivered_so_far(ws_addr: &str, grpc: &mut Grpc) {
    let mut probe = Client::authenticated(ws_addr, 2).await;
    publish(grpc, unrecorded_marker()).await;
    while probe.recv().await["type"] != "marker" {}
}

/// A fresh socket on `table-1` replaying from `cursor`.
pub async fn replay_fresh(
    ws_addr: &str,
    cursor: Value,
    supports_retry: bool,
) -> (Vec<Value>, Value) {
    let mut client = Client::authenticated(ws_addr, 1).await;
    join_all(&mut client, &[TABLE_1]).await;
    replay(&mut client, cursor, supports_retry).await
}

/// Like [`replay_fresh`], but also takes the events that reach the socket live right
/// after the result (on Redis, an event published before the socket joined may still be
/// on its way to the node): the ids of every event it got, each once (asserted here), in
/// id order, and the result. The order they came in is not compared: one that reached
/// the socket live between its join and its replay request came first, as DESIGN §6
/// allows.
pub async fn replay_fresh_all(ws_addr: &str, grpc: &mut Grpc, cursor: Value) -> (Vec<u64>, Value) {
    let mut client = Client::authenticated(ws_addr, 1).await;
    join_all(&mut client, &[TABLE_1]).await;
    let (events, result) = replay(&mut client, cursor, true).await;
    publish(grpc, unrecorded_marker()).await;
    let mut ids = ids_of(&events);
    loop {
        let frame = client.recv().await;
        if frame["type"] == "marker" {
            ids.sort_unstable();
            let twice = ids.windows(2).any(|pair| pair[0] == pair[1]);
            assert!(!twice, "an id reached the socket twice: {ids:?}");
            return (ids, result);
        }
        ids.push(frame["_event_id"].as_u64().expect("an event"));
    }
}

/// -1, -2, garbage, a future cursor, trimmed history and the replay limit. `consecutive`:
/// the store's ids follow one another (one sequence; a Redis Cluster's lanes make ids
/// that increase but leave gaps).
pub async fn cursors_and_limits(node: &TestNode, consecutive: bool) {
    let addr = node.node.ws_addr.to_string();
    let mut grpc = node.grpc().await;
    // Before any event, the baseline is where the sequence starts: the next id follows it.
    let (events, first) = replay_fresh(&addr, json!(-1), true).await;
    assert!(events.is_empty());
    assert_eq!(first["force_refresh"], false, "{first}");
    let start = first["latest_event_id"].as_u64().expect("an id");
    let before = publish(&mut grpc, group_request("table-9", event("e", 0))).await;
    if consecutive {
        assert_eq!(before, start + 1);
    } else {
        assert!(before > start, "{before} follows {start}");
    }
    for cursor in [json!(-1), json!("x"), json!(-7), Value::Null] {
        let (_, result) = replay_fresh(&addr, cursor.clone(), true).await;
        assert_eq!(result["force_refresh"], false, "{cursor}: {result}");
        assert_eq!(result["latest_event_id"], before, "{cursor}: {result}");
    }
    let (events, lost) = replay_fresh(&addr, json!(-2), true).await;
    assert!(events.is_empty());
    assert_eq!(
        lost,
        json!({"type": "replay_events_result", "force_refresh": true, "latest_event_id": before})
    );
    assert_refresh(&replay_fresh(&addr, json!(before + 1), true).await.1);

    // The limit is 2 and a stream keeps 3: two events replay, three are over the limit,
    // four are trimmed.
    let mut ids = Vec::new();
    for n in 1..=4 {
        ids.push(publish(&mut grpc, group_request("table-1", event("e", n))).await);
    }
    let (got, result) = replay_fresh_all(&addr, &mut grpc, json!(ids[1])).await;
    assert_eq!(got, ids[2..]);
    assert_eq!(result["latest_event_id"], ids[3]);
    let (events, over) = replay_fresh(&addr, json!(ids[0]), true).await;
    assert!(events.is_empty(), "{events:?}");
    assert_refresh(&over);
    assert_refresh(&replay_fresh(&addr, json!(before), true).await.1);
    // Events the socket would not get do not count against the limit: three of them,
    // over the limit of two.
    let mut grpc2 = node.grpc().await;
    let mut others = Vec::new();
    for n in 5..=7 {
        let request = PublishRequest {
            exclude_user_ids: vec![1],
            ..group_request("table-1", event("e", n))
        };
        others.push(publish(&mut grpc2, request).await);
    }
    let (events, result) = replay_fresh(&addr, json!(ids[3]), true).await;
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(
        result["latest_event_id"], ids[3],
        "skipped events are not counted: {result}"
    );
    let text = node.node.metrics_text();
    for reason in ["lost_cursor", "future_cursor", "over_limit", "trimmed"] {
        let line = format!("channelgate_replay_refreshes_total{{reason=\"{reason}\"}} 1");
        assert!(text.contains(&line), "{line} in\n{text}");
    }
}

pub const LIMITS: [&str; 4] = ["--history-size", "3", "--replay-limit", "2"];

#[tokio::test]
async fn cursors_trimming_and_the_limit_on_one_node() {
    cursors_and_limits(&TestNode::start_with(&LIMITS).await, true).await;
}

#[tokio::test]
async fn cursors_trimming_and_the_limit_on_redis() {
    let redis = RedisServer::start();
    let node = node_on_with(&redis, &prefix("replay-limits"), "a", &LIMITS).await;
    cursors_and_limits(&node, true).await;
}

/// With a two-second history: a recent cursor replays, an old one refreshes.
pub async fn expiry(node: &TestNode) {
    let addr = node.node.ws_addr.to_string();
    let mut grpc = node.grpc().await;
    let start = publish(&mut grpc, group_request("table-1", event("e", 0))).await;
    let id = publish(&mut grpc, group_request("table-1", event("e", 1))).await;
    let (got, _) = replay_fresh_all(&addr, &mut grpc, json!(start)).await;
    assert_eq!(got, [id]);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    publish(&mut grpc, group_request("table-2", event("e", 2))).await;
    let (events, result) = replay_fresh(&addr, json!(start), true).await;
    assert!(events.is_empty(), "{events:?}");
    assert_refresh(&result);
}

#[tokio::test]
async fn expired_history_forces_a_refresh_on_one_node() {
    expiry(&TestNode::start_with(&["--history-ttl", "2"]).await).await;
}

#[tokio::test]
async fn expired_history_forces_a_refresh_on_redis() {
    let redis = RedisServer::start();
    let node = node_on_with(&redis, &prefix("replay-ttl"), "a", &["--history-ttl", "1"]).await;
    expiry(&node).await;
}

#[tokio::test]
async fn a_stalled_store_and_too_many_replays_ask_to_retry_or_refresh() {
    let redis = RedisServer::start();
    let p = prefix("replay-overload");
    let node = TestNode::start_with(&[
        "--redis-url",
        &redis.url(),
        "--redis-prefix",
        &p,
        "--replay-concurrency",
        "1",
        "--history-timeout-ms",
        "1500",
    ])
    .await;
    assert!(node.node.ready(PATIENCE).await);
    let addr = node.node.ws_addr.to_string();
    let mut grpc = node.grpc().await;
    // The node holds table 1 when it is published to, so it has delivered `e`: the
    // catch-up after the stall (four seconds is past the node's heartbeat, so it counts
    // itself gone and catches up) has nothing of table 1 to bring.
    let mut watcher = Client::authenticated(&addr, 2).await;
    join_all(&mut watcher, &[TABLE_1]).await;
    let cursor = publish(&mut grpc, group_request("table-1", event("e", 0))).await;
    assert_eq!(watcher.recv().await["_event_id"], cursor);
    let mut stalled = Client::authenticated(&addr, 1).await;
    join_all(&mut stalled, &[TABLE_1]).await;
    // Redis holds back every script (and write) for four seconds: the replay stalls.
    let mut admin = redis.client().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(4000)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .expect("CLIENT PAUSE");
    stalled
        .send(json!({"type": "replay_events", "last_seen_id": cursor, "supports_retry": true}))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The one replay slot is taken: the next client is told to retry, or to refresh.
    let (_, busy) = replay_fresh(&addr, json!(cursor), true).await;
    assert_retry(&busy);
    assert_refresh(&replay_fresh(&addr, json!(cursor), false).await.1);
    // The stalled one times out and is told to retry.
    assert_retry(&stalled.recv().await);
    // Once Redis answers again, the retry is served.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (events, result) = replay(&mut stalled, json!(cursor), true).await;
    assert!(events.is_empty());
    assert_eq!(result["latest_event_id"], cursor);
}

/// A publisher at a steady rate while a socket subscribes, gets some events live and
/// replays: every id after the cursor reaches it once, live or replayed.
pub async fn live_during_replay(node: &TestNode) {
    let addr = node.node.ws_addr.to_string();
    let mut grpc = node.grpc().await;
    let cursor = publish(&mut grpc, group_request("table-1", event("e", 0))).await;
    let publisher = tokio::spawn(async move {
        let mut ids = Vec::new();
        for n in 1..=300 {
            ids.push(publish(&mut grpc, group_request("table-1", event("e", n))).await);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ids
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut client = Client::authenticated(&addr, 1).await;
    client
        .send(serde_json::from_str(TABLE_1).expect("page"))
        .await;
    // Events may come before `page_add`: the membership is in place before the bus
    // confirms it.
    let mut early = Vec::new();
    loop {
        let frame = client.recv().await;
        if frame["type"] == "page_add" {
            break;
        }
        early.push(frame);
    }
    // A few live events before the replay is asked for: it must leave them out.
    for _ in 0..3 {
        early.push(client.recv().await);
    }
    let (replayed, result) = replay(&mut client, json!(cursor), true).await;
    assert_eq!(result["force_refresh"], false, "{result}");
    let published = publisher.await.expect("publisher");
    let last = *published.last().expect("ids");
    let mut seen = ids_of(&early);
    seen.extend(ids_of(&replayed));
    while seen.last() != Some(&last) {
        seen.push(client.recv().await["_event_id"].as_u64().expect("id"));
    }
    let unique: HashSet<u64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "no id twice");
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, published, "every id once");
}

#[tokio::test]
async fn live_events_during_a_replay_arrive_once_on_one_node() {
    live_during_replay(&TestNode::start().await).await;
}

#[tokio::test]
async fn live_events_during_a_replay_arrive_once_on_redis() {
    let redis = RedisServer::start();
    let p = prefix("replay-live");
    let node = node_on(&redis, &p, "a").await;
    live_during_replay(&node).await;
}

#[tokio::test]
async fn a_redis_restart_while_away_never_passes_for_a_complete_replay() {
    let mut redis = RedisServer::start();
    let p = prefix("replay-restart");
    let node = node_on(&redis, &p, "a").await;
    let addr = node.node.ws_addr.to_string();
    let mut grpc = node.grpc().await;
    let cursor = publish(&mut grpc, group_request("table-1", event("e", 0))).await;
    publish(&mut grpc, group_request("table-1", event("lost", 1))).await;
    redis.kill();
    redis.restart();
    assert!(node.node.ready(PATIENCE).await, "the node reconnects");
    // Nothing published since: the cursor is in the future of the new store. A replay
    // while the node reconnects may be told to retry, but never that it is complete.
    assert_refresh(&replay_until_answered(&addr, cursor).await);
    // After new events too: the old cursor is below the new store's start.
    publishes_again(&grpc, group_request("table-1", event("new", 2))).await;
    for _ in 0..3 {
        publish(&mut grpc, group_request("table-1", event("new", 3))).await;
    }
    assert_refresh(&replay_until_answered(&addr, cursor).await);
}

/// Replays from `cursor` on a fresh socket, again after each `replay_events_retry`.
async fn replay_until_answered(addr: &str, cursor: u64) -> Value {
    for _ in 0..20 {
        let (events, answer) = replay_fresh(addr, json!(cursor), true).await;
        assert!(events.is_empty(), "{events:?}");
        if answer["type"] == "replay_events_result" {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("replay never answered");
}

#[tokio::test]
async fn with_history_off_replay_is_disabled() {
    let node = TestNode::start_with(&["--history", "off"]).await;
    let url = node.ws_url(&format!("jwt_token={}", node.token(1)));
    let mut client = Client::open(&url).await;
    let auth = client.recv().await;
    assert_eq!(auth["replay_enabled"], false, "{auth}");
    client
        .send(json!({"type": "replay_events", "last_seen_id": 3}))
        .await;
    let answer = client.recv().await;
    assert_eq!(
        (answer["type"].as_str(), answer["code"].as_str()),
        (Some("error"), Some("replay_disabled"))
    );
}
