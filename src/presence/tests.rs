use std::sync::Arc;

use futures_util::FutureExt;
use serde_json::{Value, json};

use super::*;
use crate::hub::{Hub, NoInterest};

fn presence(max_members: usize) -> Presence {
    Presence::new(
        "here",
        PresenceLimits {
            max_members,
            focus_rate: 3,
        },
        FocusTypes::new(&FocusTypes::baserow_specs()).unwrap(),
    )
}

fn hub() -> Hub {
    Hub::new(1 << 20, 10, Arc::new(NoInterest))
}

/// The JSON frames queued for a connection since the last call.
fn frames(conn: &Connection) -> Vec<Value> {
    let mut batch = Vec::new();
    let _ = conn.outbox.next_batch(&mut batch).now_or_never();
    batch
        .iter()
        .map(|frame| {
            let wire = frame.wire();
            let start = match wire[1] & 0x7f {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            serde_json::from_slice(&wire[start..]).unwrap()
        })
        .collect()
}

fn space() -> Arc<str> {
    "table-1".into()
}

fn join(presence: &Presence, conn: &Arc<Connection>) {
    presence.join(conn, &space(), || true);
}

fn presence_id(frame: &Value) -> String {
    frame["presence_id"].as_str().unwrap().to_string()
}

#[test]
fn joiner_lists_the_others_and_the_others_hear_of_it() {
    let (hub, presence) = (hub(), presence(10));
    let a = hub.connect("a".into(), 1);
    let b = hub.connect("b".into(), 2);
    join(&presence, &a);
    assert_eq!(
        frames(&a),
        vec![json!({"type": "presence.members", "space": "table-1", "entries": []})]
    );
    join(&presence, &b);
    let listing = frames(&b);
    assert_eq!(listing.len(), 1);
    let entries = listing[0]["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["user_id"], 1);
    assert_eq!(entries[0]["focus"], Value::Null);
    let joined = frames(&a);
    assert_eq!(joined.len(), 1);
    assert_eq!(joined[0]["type"], "presence.join");
    assert_eq!(joined[0]["user_id"], 2);
    let b_id = presence_id(&joined[0]);
    assert_ne!(b_id, presence_id(&entries[0]));

    // Joining again (a second page of the space) changes nothing.
    join(&presence, &b);
    assert!(frames(&a).is_empty() && frames(&b).is_empty());

    // A page of the space that came back while the last one went keeps the member.
    presence.left(&b, &space(), &|| true);
    assert!(frames(&a).is_empty() && frames(&b).is_empty());
    assert_eq!(presence.stats().members, 2);

    presence.left(&b, &space(), &|| false);
    assert_eq!(
        frames(&b),
        vec![json!({"type": "presence.space_discard", "space": "table-1"})]
    );
    assert_eq!(
        frames(&a),
        vec![
            json!({"type": "presence.leave", "space": "table-1", "user_id": 2, "presence_id": b_id})
        ]
    );
    assert_eq!(presence.stats().members, 1);
}

#[test]
fn anonymous_members_only_learn_whether_editors_are_here() {
    let (hub, presence) = (hub(), presence(10));
    let viewer = hub.connect("v".into(), 0);
    join(&presence, &viewer);
    assert_eq!(
        frames(&viewer),
        vec![json!({"type": "presence.editors_active", "space": "table-1", "active": false})]
    );
    let editor = hub.connect("e".into(), 7);
    join(&presence, &editor);
    // The editor sees the anonymous member as user -1.
    assert_eq!(frames(&editor)[0]["entries"][0]["user_id"], -1);
    assert_eq!(
        frames(&viewer),
        vec![json!({"type": "presence.editors_active", "space": "table-1", "active": true})]
    );
    // A second editor flips nothing; focus and leave frames never reach the viewer.
    let other = hub.connect("o".into(), 8);
    join(&presence, &other);
    presence
        .focus(&other, &space(), json!({"type": "row", "row_id": 3}))
        .unwrap();
    presence.disconnected(&other);
    assert!(frames(&viewer).is_empty());
    presence.disconnected(&editor);
    assert_eq!(
        frames(&viewer),
        vec![json!({"type": "presence.editors_active", "space": "table-1", "active": false})]
    );
}

#[test]
fn focus_reaches_the_others_and_the_next_joiner_but_not_the_sender() {
    let (hub, presence) = (hub(), presence(10));
    let a = hub.connect("a".into(), 1);
    let b = hub.connect("b".into(), 2);
    join(&presence, &a);
    join(&presence, &b);
    frames(&a);
    frames(&b);
    let cell = json!({"type": "cell", "row_id": 4, "field_id": 9});
    presence.focus(&a, &space(), cell.clone()).unwrap();
    assert!(frames(&a).is_empty());
    let seen = frames(&b);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["type"], "presence.focus");
    assert_eq!(seen[0]["focus"], cell);
    let c = hub.connect("c".into(), 3);
    join(&presence, &c);
    let entries = frames(&c)[0]["entries"].clone();
    let of_a = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["user_id"] == 1)
        .unwrap()
        .clone();
    assert_eq!(of_a["focus"], cell);

    // Invalid, not in the space, or over the rate: dropped and counted.
    assert!(matches!(
        presence.focus(&a, &space(), json!({"type": "cell"})),
        Err(FocusDropped::Invalid(_))
    ));
    assert_eq!(
        presence.focus(&a, &"table-2".into(), Value::Null),
        Err(FocusDropped::NotInSpace)
    );
    // The burst is 3 and one went already.
    let results: Vec<_> = (0..5)
        .map(|i| presence.focus(&a, &space(), json!({"type": "row", "row_id": i})))
        .collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2);
    assert_eq!(presence.stats().focus_dropped, 5);
}

#[test]
fn a_full_space_takes_no_more_members() {
    let (hub, presence) = (hub(), presence(2));
    let conns: Vec<_> = (1..=3)
        .map(|i| hub.connect(format!("{i}").into(), i))
        .collect();
    for conn in &conns {
        join(&presence, conn);
    }
    assert!(frames(&conns[2]).is_empty());
    assert_eq!(presence.stats().members, 2);
    assert_eq!(presence.stats().full, 1);
}

#[test]
fn a_join_for_a_page_no_longer_held_is_skipped() {
    let (hub, presence) = (hub(), presence(10));
    let a = hub.connect("a".into(), 1);
    presence.join(&a, &space(), || false);
    assert!(frames(&a).is_empty());
    assert_eq!(presence.stats().members, 0);
}

fn remote(node: &str, id: &str, user_id: i64) -> Member {
    Member {
        presence_id: id.into(),
        user_id,
        focus: Value::Null,
        node: node.into(),
    }
}

#[test]
fn other_nodes_changes_and_a_dead_nodes_sweep() {
    let (hub, presence) = (hub(), presence(10));
    let a = hub.connect("a".into(), 1);
    join(&presence, &a);
    frames(&a);
    presence.apply(Change::Join {
        space: space(),
        member: remote("there", "r1", 5),
    });
    presence.apply(Change::Focus {
        space: space(),
        presence_id: "r1".into(),
        user_id: 5,
        focus: json!({"type": "row", "row_id": 1}),
        node: "there".into(),
    });
    // This node's own changes come back from the bus and are skipped.
    presence.apply(Change::Join {
        space: space(),
        member: remote("here", "mine", 9),
    });
    let seen = frames(&a);
    assert_eq!(
        seen.iter().map(|f| f["type"].clone()).collect::<Vec<_>>(),
        vec![json!("presence.join"), json!("presence.focus")]
    );
    let live: HashSet<String> = ["here".to_string()].into();
    let dead = presence.sweep(&live);
    assert_eq!(dead.len(), 1);
    assert_eq!(frames(&a)[0]["type"], "presence.leave");
    assert_eq!(presence.local_members().len(), 1);
}

#[test]
fn reconcile_replaces_the_view_then_applies_what_waited() {
    let (hub, presence) = (hub(), presence(10));
    let a = hub.connect("a".into(), 1);
    join(&presence, &a);
    presence.apply(Change::Join {
        space: space(),
        member: remote("there", "gone", 5),
    });
    frames(&a);
    presence.begin_loading();
    // Arrives during the load: waits, then applies after the snapshot.
    presence.apply(Change::Leave {
        space: space(),
        presence_id: "new".into(),
        node: "there".into(),
    });
    presence.reconcile(vec![(space(), remote("there", "new", 6))]);
    let seen: Vec<_> = frames(&a)
        .iter()
        .map(|f| (f["type"].clone(), f["presence_id"].clone()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (json!("presence.leave"), json!("gone")),
            (json!("presence.join"), json!("new")),
            (json!("presence.leave"), json!("new")),
        ]
    );
}
