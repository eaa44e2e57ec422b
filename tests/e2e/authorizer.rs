//! The authorizer callback: a real HTTP and a real gRPC backend decide who may subscribe.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};

use crate::backend::{Backend, Mode, dead_address};
use crate::common::*;

const TABLE_1: &str = "table-1";

async fn node_with(authorizer: &str, extra: &[&str]) -> TestNode {
    let mut args = vec!["--authorizer", authorizer, "--authorizer-secret", "s3cret"];
    args.extend_from_slice(extra);
    TestNode::start_with(&args).await
}

async fn answer(client: &mut Client, frame: Value) -> (String, Option<String>) {
    let answer = client.subscribe(frame).await;
    (
        answer["type"].as_str().unwrap_or_default().to_string(),
        answer["reason"].as_str().map(str::to_string),
    )
}

fn allowed() -> (String, Option<String>) {
    ("page_add".into(), None)
}

fn rejected(reason: &str) -> (String, Option<String>) {
    ("page_rejected".into(), Some(reason.into()))
}

async fn allows_and_denies_per_page(url: String, backend: &Backend) {
    let node = node_with(&url, &[]).await;
    let mut c = node.client(1).await;
    assert_eq!(
        answer(&mut c, json!({"page": "table", "table_id": 1})).await,
        allowed()
    );
    assert_eq!(
        answer(&mut c, json!({"page": "table", "table_id": 2})).await,
        rejected("permission_denied")
    );
    let seen = backend.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let (question, secret) = &seen[0];
    assert_eq!(
        question,
        &json!({
            "action": "subscribe",
            "user_id": 1,
            "web_socket_id": c.web_socket_id,
            "page": "table",
            "parameters": {"table_id": 1},
            "group": "table-1",
        })
    );
    assert_eq!(secret.as_deref(), Some("s3cret"));
    // Anonymous sockets never reach the backend for pages that are not anonymous-ok.
    let mut anonymous = node.client(0).await;
    assert_eq!(
        answer(&mut anonymous, json!({"page": "table", "table_id": 1})).await,
        rejected("permission_denied")
    );
    assert_eq!(backend.calls(), 2);
}

#[tokio::test]
async fn http_authorizer_allows_and_denies_per_page() {
    let backend = Backend::new(|_, group| group == TABLE_1);
    let url = backend.serve_http().await;
    allows_and_denies_per_page(url, &backend).await;
}

#[tokio::test]
async fn grpc_authorizer_allows_and_denies_per_page() {
    let backend = Backend::new(|_, group| group == TABLE_1);
    let url = backend.serve_grpc().await;
    allows_and_denies_per_page(url, &backend).await;
}

#[tokio::test]
async fn an_unavailable_authorizer_denies() {
    let backend = Backend::new(|_, _| true);
    let http = backend.serve_http().await;
    let grpc = backend.serve_grpc().await;
    let dead = dead_address().await;
    let cases = [
        (
            format!("http://{dead}/authorize"),
            Mode::Answer,
            Duration::ZERO,
        ),
        (format!("grpc://{dead}"), Mode::Answer, Duration::ZERO),
        (http.clone(), Mode::Answer, Duration::from_secs(3)),
        (grpc.clone(), Mode::Answer, Duration::from_secs(3)),
        (http.clone(), Mode::Garbage, Duration::ZERO),
        (http, Mode::Fail, Duration::ZERO),
        (grpc, Mode::Fail, Duration::ZERO),
    ];
    for (url, mode, delay) in cases {
        backend.set_mode(mode);
        backend.set_delay(delay);
        let node = node_with(&url, &["--authorizer-timeout-ms", "300"]).await;
        let mut c = node.client(1).await;
        assert_eq!(
            answer(&mut c, json!({"page": "table", "table_id": 1})).await,
            rejected("authorizer_unavailable"),
            "{url} {mode:?} {delay:?}"
        );
        // Failures are not cached: the next question asks again, and is counted again.
        assert_eq!(
            answer(&mut c, json!({"page": "table", "table_id": 1})).await,
            rejected("authorizer_unavailable")
        );
        let metrics = &node.node.metrics;
        let failures = metrics.pages_rejected[4].load(Ordering::Relaxed);
        assert_eq!(failures, 2, "{url}");
    }
}

#[tokio::test]
async fn answers_are_cached_per_user_and_group() {
    let backend = Backend::new(|_, _| true);
    let node = node_with(&backend.serve_http().await, &[]).await;
    let mut a = node.client(1).await;
    let mut b = node.client(1).await;
    let mut other = node.client(2).await;
    a.join(json!({"page": "table", "table_id": 1})).await;
    b.join(json!({"page": "table", "table_id": "1"})).await;
    assert_eq!(backend.calls(), 1);
    other.join(json!({"page": "table", "table_id": 1})).await;
    a.join(json!({"page": "table", "table_id": 2})).await;
    assert_eq!(backend.calls(), 3);
}

#[tokio::test]
async fn a_reconnect_storm_asks_the_backend_a_handful_of_times() {
    let backend = Backend::new(|_, _| true);
    backend.set_delay(Duration::from_millis(300));
    let node = node_with(
        &backend.serve_grpc().await,
        &[
            "--authorizer-cache-ms",
            "0",
            "--max-connections-per-user",
            "200",
        ],
    )
    .await;
    let mut sockets = Vec::new();
    for _ in 0..200 {
        sockets.push(node.client(1).await);
    }
    for s in &mut sockets {
        s.send(json!({"page": "table", "table_id": 1})).await;
    }
    for s in &mut sockets {
        assert_eq!(s.recv().await["type"], "page_add");
    }
    let calls = backend.calls();
    assert!(
        (1..=5).contains(&calls),
        "{calls} backend calls for 200 subscribes"
    );
}

/// Users 1 and 2 on table 1 (and user 2 on a row of it and on a dashboard).
async fn two_users(node: &TestNode) -> (Client, Client) {
    let mut one = node.client(1).await;
    let mut two = node.client(2).await;
    one.join(json!({"page": "table", "table_id": 1})).await;
    two.join(json!({"page": "table", "table_id": 1})).await;
    two.join(json!({"page": "row", "table_id": 1, "row_id": 5}))
        .await;
    two.join(json!({"page": "dashboard", "dashboard_id": 3}))
        .await;
    (one, two)
}

async fn still_receives(grpc: &mut Grpc, client: &mut Client, group: &str, expected: bool) {
    grpc.publish(group_request(group, event("probe", 1)))
        .await
        .unwrap();
    grpc.publish(group_request("users", event("marker", 1)))
        .await
        .unwrap();
    let first = client.recv().await;
    if expected {
        assert_eq!(first["type"], "probe", "{group}");
        assert_eq!(client.recv().await["type"], "marker");
    } else {
        assert_eq!(first["type"], "marker", "{group}");
    }
}

#[tokio::test]
async fn check_permission_re_asks_the_backend_and_discards_what_it_now_denies() {
    let backend = Backend::new(|_, _| true);
    let node = node_with(&backend.serve_http().await, &[]).await;
    let mut grpc = node.grpc().await;
    let (mut one, mut two) = two_users(&node).await;
    let before = backend.calls();
    backend.set_policy(|user, group| !(user == 2 && group.starts_with("table-1")));

    let response = grpc
        .check_permission(channelgate::proto::CheckPermissionRequest {
            permission_group: "permissions-table-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.checked, 3);
    assert_eq!(response.nodes, 1);
    assert_eq!(backend.calls() - before, 3, "the cache is bypassed");
    let mut revoked: Vec<_> = response
        .revoked
        .iter()
        .map(|s| {
            (
                s.user_id,
                s.page.as_str(),
                s.group.as_str(),
                s.web_socket_id.clone(),
            )
        })
        .collect();
    revoked.sort();
    assert_eq!(
        revoked,
        vec![
            (2, "row", "table-1-row-5", two.web_socket_id.clone()),
            (2, "table", "table-1", two.web_socket_id.clone()),
        ]
    );
    let row = response.revoked.iter().find(|s| s.page == "row").unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&row.parameters).unwrap(),
        json!({"table_id": 1, "row_id": 5})
    );

    let mut discarded = [two.recv().await, two.recv().await];
    discarded.sort_by_key(|f| f["page"].as_str().unwrap_or_default().to_string());
    assert_eq!(
        discarded[0],
        json!({"type": "page_discard", "page": "row", "parameters": {"table_id": 1, "row_id": 5}})
    );
    assert_eq!(
        discarded[1],
        json!({"type": "page_discard", "page": "table", "parameters": {"table_id": 1}})
    );
    still_receives(&mut grpc, &mut two, "table-1", false).await;
    still_receives(&mut grpc, &mut two, "dashboard-3", true).await;
    still_receives(&mut grpc, &mut one, "table-1", true).await;
}

#[tokio::test]
async fn check_permission_fails_closed_when_the_backend_is_down() {
    let backend = Backend::new(|_, _| true);
    let node = node_with(
        &backend.serve_http().await,
        &["--authorizer-timeout-ms", "300"],
    )
    .await;
    let mut grpc = node.grpc().await;
    let (_one, mut two) = two_users(&node).await;
    backend.set_mode(Mode::Fail);
    let response = grpc
        .check_permission(channelgate::proto::CheckPermissionRequest {
            user_ids: vec![2],
            group: "dashboard-3".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((response.checked, response.revoked.len()), (1, 1));
    assert_eq!(two.recv().await["type"], "page_discard");
}

#[tokio::test]
async fn revoke_discards_without_asking_and_dry_run_changes_nothing() {
    let backend = Backend::new(|_, _| true);
    let node = node_with(&backend.serve_http().await, &[]).await;
    let mut grpc = node.grpc().await;
    let (mut one, mut two) = two_users(&node).await;
    let before = backend.calls();
    let request = channelgate::proto::CheckPermissionRequest {
        user_ids: vec![2],
        permission_group: "permissions-table-1".into(),
        revoke: true,
        dry_run: true,
        ..Default::default()
    };
    let dry = grpc
        .check_permission(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((dry.checked, dry.revoked.len()), (2, 2));
    still_receives(&mut grpc, &mut two, "table-1", true).await;

    let real = grpc
        .check_permission(channelgate::proto::CheckPermissionRequest {
            dry_run: false,
            ..request
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((real.checked, real.revoked.len()), (2, 2));
    assert_eq!(backend.calls(), before, "revoke does not ask the backend");
    assert_eq!(two.recv().await["type"], "page_discard");
    assert_eq!(two.recv().await["type"], "page_discard");
    still_receives(&mut grpc, &mut two, "table-1", false).await;
    still_receives(&mut grpc, &mut two, "dashboard-3", true).await;
    still_receives(&mut grpc, &mut one, "table-1", true).await;
}

#[tokio::test]
async fn check_permission_scope_filters() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let (mut one, mut two) = two_users(&node).await;
    let revoke = |user_ids: Vec<i64>, permission_group: &str, group: &str| {
        channelgate::proto::CheckPermissionRequest {
            user_ids,
            permission_group: permission_group.into(),
            group: group.into(),
            revoke: true,
            dry_run: true,
        }
    };
    let count = |r: channelgate::proto::CheckPermissionResponse| (r.checked, r.revoked.len());
    let mut ask = async |r| count(grpc.check_permission(r).await.unwrap().into_inner());
    assert_eq!(ask(revoke(vec![], "", "")).await, (4, 4));
    assert_eq!(ask(revoke(vec![1], "", "")).await, (1, 1));
    assert_eq!(ask(revoke(vec![], "permissions-table-1", "")).await, (3, 3));
    assert_eq!(ask(revoke(vec![], "", "table-1")).await, (2, 2));
    assert_eq!(
        ask(revoke(vec![2], "permissions-table-1", "table-1-row-5")).await,
        (1, 1)
    );
    assert_eq!(ask(revoke(vec![3], "", "")).await, (0, 0));

    // Without dry_run, only user 1's table page goes.
    let r = grpc
        .check_permission(channelgate::proto::CheckPermissionRequest {
            dry_run: false,
            ..revoke(vec![1], "", "table-1")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.revoked.len(), 1);
    assert_eq!(one.recv().await["type"], "page_discard");
    still_receives(&mut grpc, &mut two, "table-1", true).await;
}

#[tokio::test]
async fn disconnect_spares_the_ignored_sockets() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let mut tab_a = node.client(1).await;
    let mut tab_b = node.client(1).await;
    let mut asking = node.client(1).await;
    let mut other = node.client(2).await;
    let response = grpc
        .disconnect(channelgate::proto::DisconnectRequest {
            user_ids: vec![1],
            ignore_web_socket_ids: vec![asking.web_socket_id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((response.disconnected, response.nodes), (2, 1));
    for tab in [&mut tab_a, &mut tab_b] {
        assert_eq!(tab.recv().await, json!({"type": "force_disconnect"}));
        let close = tab.recv_close().await.expect("a close frame");
        assert_eq!(u16::from(close.code), 1000);
    }
    for c in [&mut asking, &mut other] {
        c.send(json!({"type": "ping"})).await;
        assert_eq!(c.recv().await["type"], "pong");
    }
    let empty = grpc
        .disconnect(channelgate::proto::DisconnectRequest::default())
        .await;
    assert_eq!(empty.unwrap_err().code(), tonic::Code::InvalidArgument);
}

/// The Python example in `examples/` really works as a backend.
#[tokio::test]
async fn the_python_example_authorizer_decides() {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new("python3")
        .args([
            "examples/authorizer_http.py",
            "--port",
            "0",
            "--secret",
            "s3cret",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs the example");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let url = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the example starts")
        .expect("reads")
        .expect("prints its URL");
    let node = node_with(&url, &[]).await;
    let mut one = node.client(1).await;
    let mut two = node.client(2).await;
    assert_eq!(
        answer(&mut one, json!({"page": "table", "table_id": 2})).await,
        allowed()
    );
    assert_eq!(
        answer(&mut two, json!({"page": "row", "table_id": 2, "row_id": 1})).await,
        rejected("permission_denied")
    );
    assert_eq!(
        answer(&mut two, json!({"page": "view", "slug": "s"})).await,
        allowed()
    );
    let wrong_secret =
        TestNode::start_with(&["--authorizer", &url, "--authorizer-secret", "nope"]).await;
    let mut c = wrong_secret.client(1).await;
    assert_eq!(
        answer(&mut c, json!({"page": "table", "table_id": 1})).await,
        rejected("authorizer_unavailable")
    );
    // With the connect check, a user the example does not know cannot connect.
    let checking = node_with(&url, &["--authorize-connect"]).await;
    checking.client(1).await;
    let mut unknown = Client::open(&checking.ws_url(&format!("jwt_token={}", token(3)))).await;
    assert_eq!(unknown.recv().await["success"], false);
}
