//! Nodes on a real Redis Cluster (three primaries, a replica each): every delivery rule,
//! groups spread over the shards, order, replay across shards and nodes, presence, and a
//! primary killed or a slot moved while events flow.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde_json::{Value, json};

use crate::cluster::{
    Meeting, control_on_every_node, delivery_rules, eventually, node_on, node_on_with, prefix,
    publishes_again, thousand_in_order, three_nodes_on,
};
use crate::common::*;
use crate::presence::documented_frames;
use crate::redis_cluster::{RedisCluster, slot_of};
use crate::replay::{
    LIMITS, cursors_and_limits, expiry, live_during_replay, reconnect, replay, replay_on_any_node,
};

impl Meeting for RedisCluster {
    fn flags(&self) -> [String; 2] {
        ["--redis-cluster-nodes".into(), self.nodes_arg()]
    }
}

/// Tables whose groups the tests below spread over the shards.
const TABLES: std::ops::RangeInclusive<i64> = 1..=12;

/// The group channels each primary serves (`PUBSUB SHARDCHANNELS`), by primary.
async fn group_channels(cluster: &RedisCluster, prefix: &str) -> BTreeMap<u16, Vec<String>> {
    let mut by_primary = BTreeMap::new();
    for port in cluster.primaries().await {
        let mut connection = cluster.client(port).await;
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("SHARDCHANNELS")
            .arg(format!("{prefix}:g:*"))
            .query_async(&mut connection)
            .await
            .expect("PUBSUB SHARDCHANNELS");
        by_primary.insert(port, channels);
    }
    by_primary
}

/// The channel of a group, as a primary lists it.
fn channel_of(channels: &BTreeMap<u16, Vec<String>>, group: &str) -> String {
    channels
        .values()
        .flatten()
        .find(|channel| channel.ends_with(&format!("}}:{group}")))
        .unwrap_or_else(|| panic!("a channel for {group} in {channels:?}"))
        .clone()
}

#[tokio::test]
async fn every_delivery_rule_and_control_request_holds_across_nodes_on_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    let ([_a, b, c], mut grpc) = three_nodes_on(&cluster, "sharded-rules").await;
    delivery_rules(&b, &c, &mut grpc).await;
    control_on_every_node(&b, &c, &mut grpc).await;
}

#[tokio::test]
async fn with_history_off_events_flow_and_a_failover_closes_sockets_to_refresh() {
    let mut cluster = RedisCluster::start().await;
    let p = prefix("sharded-no-history");
    let off = ["--history", "off"];
    let a = node_on_with(&cluster, &p, "a", &off).await;
    let b = node_on_with(&cluster, &p, "b", &off).await;
    let c = node_on_with(&cluster, &p, "c", &off).await;
    let mut grpc = a.grpc().await;
    delivery_rules(&b, &c, &mut grpc).await;

    let mut watcher = b.client(1).await;
    watcher.join(json!({"page": "table", "table_id": 1})).await;
    let channels = group_channels(&cluster, &p).await;
    cluster
        .kill_primary_of_slot(slot_of(&channel_of(&channels, "table-1")))
        .await;
    // Nothing can show what the socket missed: it is told to reconnect (1012).
    let close = watcher.recv_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1012);
    assert!(b.node.ready(Duration::from_secs(20)).await);
    let mut watcher = b.client(1).await;
    watcher.join(json!({"page": "table", "table_id": 1})).await;
    publishes_again(&grpc, group_request("table-1", event("e", 1))).await;
    assert_eq!(watcher.recv().await["n"], 1);
}

#[tokio::test]
async fn groups_spread_over_every_shard_with_one_subscription_per_node() {
    let cluster = RedisCluster::start().await;
    let p = prefix("sharded-spread");
    let a = node_on(&cluster, &p, "a").await;
    let b = node_on(&cluster, &p, "b").await;
    let mut on_a = a.client(1).await;
    let mut on_b = b.client(1).await;
    let mut also_on_b = b.client(2).await;
    for table in TABLES {
        for client in [&mut on_a, &mut on_b, &mut also_on_b] {
            client
                .join(json!({"page": "table", "table_id": table}))
                .await;
        }
    }
    let by_primary = group_channels(&cluster, &p).await;
    assert_eq!(by_primary.len(), 3);
    for (port, channels) in &by_primary {
        assert!(
            !channels.is_empty(),
            "primary {port} carries groups: {by_primary:?}"
        );
        for (channel, subscribers) in cluster.shard_numsub(*port, channels).await {
            assert_eq!(
                subscribers, 2,
                "{channel}: one subscription per node, not per socket"
            );
        }
    }
    let all: HashSet<&String> = by_primary.values().flatten().collect();
    assert_eq!(all.len(), TABLES.count(), "a channel per group: {all:?}");

    // Node b's last socket leaves table-1: b unsubscribes, a stays.
    let table_1 = channel_of(&by_primary, "table-1");
    let owner = cluster.primary_of_slot(slot_of(&table_1)).await;
    for client in [&mut on_b, &mut also_on_b] {
        client
            .send(json!({"remove_page": "table", "table_id": 1}))
            .await;
        assert_eq!(client.recv().await["type"], "page_discard");
    }
    eventually("node b unsubscribes table-1", async || {
        cluster
            .shard_numsub(owner, std::slice::from_ref(&table_1))
            .await[0]
            .1
            == 1
    })
    .await;
}

#[tokio::test]
async fn a_thousand_publishes_arrive_in_order_on_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    let p = prefix("sharded-order");
    let a = node_on(&cluster, &p, "a").await;
    let b = node_on(&cluster, &p, "b").await;
    thousand_in_order(&a, &b).await;
}

#[tokio::test]
async fn a_socket_gets_ids_in_order_from_every_shard_while_two_nodes_publish() {
    let cluster = RedisCluster::start().await;
    let p = prefix("sharded-id-order");
    let a = node_on(&cluster, &p, "a").await;
    let b = node_on(&cluster, &p, "b").await;
    let mut watchers = [a.client(1).await, b.client(1).await];
    for table in TABLES {
        for watcher in &mut watchers {
            watcher
                .join(json!({"page": "table", "table_id": table}))
                .await;
        }
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut publishers = Vec::new();
    for k in 0..4 {
        let node = if k % 2 == 0 { &a } else { &b };
        let first = k * PUBLISHER_SPAN;
        publishers.push(tokio::spawn(publish_round(
            node.grpc().await,
            first,
            stopped.clone(),
        )));
    }
    let mut seen = [Seen::new(), Seen::new()];
    while seen[0].len() < 600 {
        for (watcher, seen) in watchers.iter_mut().zip(&mut seen) {
            take(seen, &watcher.recv().await);
        }
    }
    stop.send_replace(true);
    let mut acknowledged = Vec::new();
    for publisher in publishers {
        acknowledged.extend(publisher.await.expect("a publisher").0);
    }
    for (watcher, seen) in watchers.iter_mut().zip(&mut seen) {
        receives_every_acknowledged_event(watcher, seen, &acknowledged).await;
    }
}

#[tokio::test]
async fn a_socket_replays_across_shards_on_the_other_node() {
    let cluster = RedisCluster::start().await;
    replay_on_any_node(&cluster).await;
}

#[tokio::test]
async fn cursors_trimming_expiry_and_live_events_during_a_replay_on_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    let limits = node_on_with(&cluster, &prefix("sharded-limits"), "a", &LIMITS).await;
    cursors_and_limits(&limits, false).await;
    let ttl = &["--history-ttl", "1"];
    let expiring = node_on_with(&cluster, &prefix("sharded-ttl"), "b", ttl).await;
    expiry(&expiring).await;
    let live = node_on(&cluster, &prefix("sharded-live"), "c").await;
    live_during_replay(&live).await;
}

#[tokio::test]
async fn presence_on_a_redis_cluster_shows_exactly_the_documented_frames() {
    let cluster = RedisCluster::start().await;
    documented_frames(&cluster).await;
}

/// What a watching socket got: per id, its table and number.
type Seen = BTreeMap<u64, (i64, i64)>;

/// Numbers of publisher k start at k times this (a multiple of the table count).
const PUBLISHER_SPAN: i64 = 1_200_000;

/// Publishes through `grpc`, round the tables, until `stop`, numbering from `first`;
/// returns the acknowledged events (id, table, n) and how many publishes failed.
async fn publish_round(
    mut grpc: Grpc,
    first: i64,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<(u64, i64, i64)>, usize) {
    let mut acknowledged = Vec::new();
    let mut failed = 0;
    let mut n = first;
    while !*stop.borrow() {
        let table = TABLES.start() + n % TABLES.count() as i64;
        let request = group_request(&format!("table-{table}"), event("e", n));
        match grpc.publish(request).await {
            Ok(reply) => acknowledged.push((reply.into_inner().event_id, table, n)),
            Err(_) => {
                failed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (acknowledged, failed)
}

/// Reads `client` until every acknowledged id arrived; checks each came once and each
/// table's events in the order they were published.
async fn receives_every_acknowledged_event(
    client: &mut Client,
    seen: &mut Seen,
    acknowledged: &[(u64, i64, i64)],
) {
    let wanted: HashSet<u64> = acknowledged.iter().map(|(id, _, _)| *id).collect();
    while !wanted.iter().all(|id| seen.contains_key(id)) {
        let frame = tokio::time::timeout(Duration::from_secs(20), client.recv())
            .await
            .unwrap_or_else(|_| {
                let missing: Vec<_> = wanted.iter().filter(|id| !seen.contains_key(id)).collect();
                panic!("acknowledged events never arrived: {missing:?}")
            });
        take(seen, &frame);
    }
    let mut last_n: HashMap<(i64, i64), i64> = HashMap::new();
    for (table, n) in seen.values() {
        let last = last_n.insert((*table, n / PUBLISHER_SPAN), *n);
        assert!(last < Some(*n), "table-{table}: {n} after {last:?}");
    }
}

/// Takes a frame of the watcher: ids come in increasing order, whatever shard made them.
fn take(seen: &mut Seen, frame: &Value) {
    assert_eq!(frame["type"], "e", "{frame}");
    let id = frame["_event_id"].as_u64().expect("an id");
    if let Some((&last, _)) = seen.last_key_value() {
        assert!(id > last, "{id} arrived after {last}");
    }
    let n = frame["n"].as_i64().expect("n");
    let table = TABLES.start() + n % TABLES.count() as i64;
    assert!(seen.insert(id, (table, n)).is_none(), "{id} arrived twice");
}

/// The longest wait between two frames of a socket.
#[derive(Default)]
struct Gaps {
    last: Option<std::time::Instant>,
    longest: Duration,
}

impl Gaps {
    async fn recv(&mut self, client: &mut Client) -> Value {
        let frame = client.recv().await;
        let now = std::time::Instant::now();
        if let Some(last) = self.last {
            self.longest = self.longest.max(now - last);
        }
        self.last = Some(now);
        frame
    }
}

/// Nodes a and b on `cluster`, a watcher on b on every table, a publisher through a;
/// `fault` runs while events flow. Then every acknowledged event reaches the watcher
/// (still connected) once and in order, and a tab that left before the fault replays on
/// node a, from its cursor, every acknowledged event after it, in id order, each once.
async fn events_flow_through(
    cluster: &mut RedisCluster,
    test: &str,
    fault: impl AsyncFnOnce(&mut RedisCluster, &BTreeMap<u16, Vec<String>>),
) {
    let p = prefix(test);
    let a = node_on_with(cluster, &p, "a", &["--replay-limit", "100000"]).await;
    let b = node_on(cluster, &p, "b").await;
    let mut watcher = b.client(1).await;
    let mut tab = reconnect(&a.node.ws_addr.to_string(), 2, "tab").await;
    for table in TABLES {
        let page = json!({"page": "table", "table_id": table});
        watcher.join(page.clone()).await;
        tab.join(page).await;
    }
    let channels = group_channels(cluster, &p).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(publish_round(a.grpc().await, 0, stopped));
    let mut seen = Seen::new();
    let mut gaps = Gaps::default();
    let mut cursor = 0;
    for _ in 0..50 {
        cursor = tab.recv().await["_event_id"].as_u64().expect("an id");
        take(&mut seen, &gaps.recv(&mut watcher).await);
    }
    drop(tab);
    let started = std::time::Instant::now();
    fault(cluster, &channels).await;
    let faulted = started.elapsed();
    assert!(
        a.node.ready(Duration::from_secs(20)).await && b.node.ready(Duration::from_secs(20)).await,
        "the nodes are in step with the cluster again"
    );
    let ready = started.elapsed();
    let before = seen.len();
    while seen.len() < before + 100 {
        take(&mut seen, &gaps.recv(&mut watcher).await);
    }
    stop.send_replace(true);
    let (acknowledged, failed) = publisher.await.expect("the publisher");
    receives_every_acknowledged_event(&mut watcher, &mut seen, &acknowledged).await;
    eprintln!(
        "{test}: {} acknowledged, {failed} refused, {} delivered; fault over after {faulted:?}, nodes ready after {ready:?}, longest pause between deliveries {:?}",
        acknowledged.len(),
        seen.len(),
        gaps.longest
    );
    assert!(
        acknowledged.len() > 100,
        "events flowed: {}",
        acknowledged.len()
    );

    let mut tab = reconnect(&a.node.ws_addr.to_string(), 2, "tab").await;
    for table in TABLES {
        tab.join(json!({"page": "table", "table_id": table})).await;
    }
    let (events, result) = replay(&mut tab, json!(cursor), true).await;
    assert_eq!(result["force_refresh"], false, "{result}");
    let replayed: Vec<u64> = events
        .iter()
        .map(|e| e["_event_id"].as_u64().expect("id"))
        .collect();
    assert!(
        replayed.windows(2).all(|w| w[0] < w[1]),
        "replayed in id order, each once"
    );
    let replayed_set: HashSet<u64> = replayed.iter().copied().collect();
    for (id, _, n) in &acknowledged {
        assert!(
            *id <= cursor || replayed_set.contains(id),
            "acknowledged event {n} ({id}) after the cursor {cursor} is not replayed"
        );
    }
    for id in &replayed {
        assert!(
            seen.contains_key(id),
            "replayed {id}, which the watcher never got"
        );
    }
}

#[tokio::test]
async fn a_publish_no_replica_confirms_fails_instead_of_being_acknowledged() {
    let cluster = RedisCluster::start().await;
    let p = prefix("sharded-unconfirmed");
    let a = node_on(&cluster, &p, "a").await;
    let mut watcher = a.client(1).await;
    for table in TABLES {
        watcher
            .join(json!({"page": "table", "table_id": table}))
            .await;
    }
    let channels = group_channels(&cluster, &p).await;
    let primary = cluster
        .primary_of_slot(slot_of(&channel_of(&channels, "table-1")))
        .await;
    // Under load a replica can be flagged as failing for a moment: wait until it is not.
    let mut replicas = cluster.replicas_of(primary).await;
    let started = std::time::Instant::now();
    while replicas.len() != 1 && started.elapsed() < PATIENCE {
        tokio::time::sleep(Duration::from_millis(100)).await;
        replicas = cluster.replicas_of(primary).await;
    }
    assert_eq!(replicas.len(), 1, "one replica of {primary}");
    let mut grpc = a.grpc().await;
    publish(&mut grpc, group_request("table-1", event("e", 0))).await;

    // The replicas are frozen: the primary keeps the event, but a failover now could lose
    // it, so the publish is not acknowledged (DEADLINE_EXCEEDED: it may be delivered).
    // Every replica, not only the one listed: under the load of the whole suite a failover
    // can move a replica to another primary between that listing and the publish.
    let frozen = cluster.replicas().await;
    assert!(
        frozen.contains(&replicas[0]),
        "the replicas {frozen:?} include {replicas:?}"
    );
    for &replica in &frozen {
        cluster.freeze(replica);
    }
    let refused = grpc.publish(group_request("table-1", event("e", 12))).await;
    for &replica in &frozen {
        cluster.thaw(replica);
    }
    let refused = match refused {
        Err(status) => status,
        Ok(_) => {
            let primaries = cluster.primaries().await;
            panic!(
                "acknowledged, yet every replica was frozen: {frozen:?}; primaries {primaries:?}"
            )
        }
    };
    // Published, but not confirmed: the outcome is unknown to the caller, who retries
    // with the event's idempotency key.
    assert_eq!(refused.code(), tonic::Code::DeadlineExceeded, "{refused:?}");
    assert!(refused.message().contains("replica"), "{refused:?}");
    // Groups on other shards were not held up, and the shard works again once thawed.
    publish(&mut grpc, group_request("table-1", event("e", 24))).await;
    for n in [0, 12, 24] {
        assert_eq!(
            watcher.recv().await["n"],
            n,
            "the unconfirmed event may still arrive"
        );
    }
}

#[tokio::test]
async fn a_killed_primary_is_replaced_by_its_replica_and_nothing_acknowledged_is_lost() {
    let mut cluster = RedisCluster::start().await;
    events_flow_through(
        &mut cluster,
        "sharded-failover",
        async |cluster: &mut RedisCluster, channels: &BTreeMap<u16, Vec<String>>| {
            let table_1 = channel_of(channels, "table-1");
            let killed = cluster.kill_primary_of_slot(slot_of(&table_1)).await;
            eprintln!("killed the primary on {killed}");
        },
    )
    .await;
}

#[tokio::test]
async fn a_slot_moved_while_events_flow_loses_nothing() {
    let mut cluster = RedisCluster::start().await;
    events_flow_through(
        &mut cluster,
        "sharded-migration",
        async |cluster: &mut RedisCluster, channels: &BTreeMap<u16, Vec<String>>| {
            let table_1 = channel_of(channels, "table-1");
            let slot = slot_of(&table_1);
            let to = cluster.another_primary_than_of(slot).await;
            cluster.migrate_slot(slot, to).await;
            eventually("the slot is served by its new primary", async || {
                cluster.primary_of_slot(slot).await == to
            })
            .await;
        },
    )
    .await;
}
