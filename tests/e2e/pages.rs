//! Page types: group names, typed parameters, and who may hold which page.

use serde_json::{Value, json};

use crate::common::*;

async fn rejected_reason(client: &mut Client, frame: Value) -> String {
    let answer = client.subscribe(frame.clone()).await;
    assert_eq!(answer["type"], "page_rejected", "{frame} got {answer}");
    answer["reason"].as_str().expect("reason").to_string()
}

#[tokio::test]
async fn each_page_type_joins_its_group() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let mut c = node.client(1).await;
    let cases = [
        (
            json!({"page": "table", "table_id": "12"}),
            "table-12",
            json!({"table_id": 12}),
        ),
        (
            json!({"page": "row", "table_id": 12, "row_id": "34"}),
            "table-12-row-34",
            json!({"table_id": 12, "row_id": 34}),
        ),
        (
            json!({"page": "view", "slug": "Ab_c-9", "token": "t.k:1"}),
            "view-Ab_c-9",
            json!({"slug": "Ab_c-9", "token": "t.k:1"}),
        ),
        (
            json!({"page": "dashboard", "dashboard_id": 5}),
            "dashboard-5",
            json!({"dashboard_id": 5}),
        ),
        (
            json!({"page": "restricted_view", "restricted_view_id": "8"}),
            "restricted-view-8",
            json!({"restricted_view_id": 8, "table_id": null}),
        ),
    ];
    for (frame, group, parameters) in cases {
        let answer = c.subscribe(frame.clone()).await;
        assert_eq!(
            answer,
            json!({"type": "page_add", "page": frame["page"], "parameters": parameters})
        );
        grpc.publish(group_request(group, event(group, 1)))
            .await
            .expect("publish");
        assert_eq!(c.recv().await["type"], group);
    }
}

#[tokio::test]
async fn invalid_and_forged_parameters_are_rejected_and_never_joined() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let mut c = node.client(1).await;
    let bad = [
        json!({"page": "table", "table_id": "5-row-3"}),
        json!({"page": "table", "table_id": -1}),
        json!({"page": "table", "table_id": 1.5}),
        json!({"page": "table", "table_id": [5]}),
        json!({"page": "table", "table_id": {"id": 5}}),
        json!({"page": "table", "table_id": true}),
        json!({"page": "table"}),
        json!({"page": "row", "table_id": 5, "row_id": "3 "}),
        json!({"page": "view", "slug": "x-row-3/../y"}),
        json!({"page": "view", "slug": ""}),
        json!({"page": "view", "slug": "ok", "token": "has space"}),
        json!({"page": "dashboard", "dashboard_id": "99999999999999999999"}),
    ];
    for frame in bad {
        assert_eq!(rejected_reason(&mut c, frame).await, "invalid_parameters");
    }
    // The forged group exists only if something joined it.
    grpc.publish(group_request("table-5-row-3", event("forged", 1)))
        .await
        .expect("publish");
    grpc.publish(group_request("users", event("marker", 1)))
        .await
        .expect("publish");
    assert_eq!(c.recv().await["type"], "marker");
}

#[tokio::test]
async fn unknown_pages_and_anonymous_limits() {
    let node = TestNode::start().await;
    let mut user = node.client(1).await;
    assert_eq!(
        rejected_reason(&mut user, json!({"page": "spreadsheet", "id": 1})).await,
        "unknown_page"
    );
    let mut anonymous = node.client(0).await;
    for frame in [
        json!({"page": "table", "table_id": 1}),
        json!({"page": "row", "table_id": 1, "row_id": 1}),
        json!({"page": "dashboard", "dashboard_id": 1}),
        json!({"page": "restricted_view", "restricted_view_id": 1}),
    ] {
        assert_eq!(
            rejected_reason(&mut anonymous, frame).await,
            "permission_denied"
        );
    }
    anonymous
        .join(json!({"page": "view", "slug": "public"}))
        .await;
}

#[tokio::test]
async fn a_connection_holds_at_most_max_pages() {
    let node = TestNode::start_with(&["--max-pages", "2"]).await;
    let mut c = node.client(1).await;
    c.join(json!({"page": "table", "table_id": 1})).await;
    c.join(json!({"page": "table", "table_id": 2})).await;
    assert_eq!(
        rejected_reason(&mut c, json!({"page": "table", "table_id": 3})).await,
        "too_many_pages"
    );
    // Holding a page again is not a new page.
    c.join(json!({"page": "table", "table_id": 2})).await;
}

#[tokio::test]
async fn the_page_table_can_be_replaced_from_the_config_file() {
    let dir = std::env::temp_dir().join(format!("cg-pages-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("pages.toml");
    std::fs::write(
        &path,
        r#"
[[pages]]
name = "document"
group = "doc-{doc_id}"
permission_group = "permissions-doc-{doc_id}"
parameters = [{ name = "doc_id", kind = "id" }]
"#,
    )
    .expect("write config");
    let node = TestNode::start_with(&["--config", path.to_str().expect("path")]).await;
    let mut grpc = node.grpc().await;
    let mut c = node.client(1).await;
    c.join(json!({"page": "document", "doc_id": "4"})).await;
    assert_eq!(
        rejected_reason(&mut c, json!({"page": "table", "table_id": 1})).await,
        "unknown_page"
    );
    grpc.publish(group_request("doc-4", event("doc_changed", 1)))
        .await
        .expect("publish");
    assert_eq!(c.recv().await["type"], "doc_changed");
}
