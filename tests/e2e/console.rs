//! The console over plain HTTP: who may open it, that it shows no secret, and that its
//! publish goes through the gRPC API's checks (`console_browser` uses it in Chromium).

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

const CONSOLE_TOKEN: &str = "e2e-console-token-0123456789";

/// An HTTP answer: status, headers (lower-cased names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 request on its own connection.
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the node listens");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.expect("sends");
    let mut raw = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut raw))
        .await
        .expect("an answer in time")
        .expect("reads");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

async fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    http(addr, "GET", path, headers, "").await
}

async fn post_json(addr: &str, path: &str, headers: &[(&str, &str)], body: &Value) -> Answer {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    http(addr, "POST", path, &all, &body.to_string()).await
}

const BEARER: &str = "Bearer e2e-console-token-0123456789";
/// Every page, asset and API answer the token guards.
const GUARDED: [&str; 5] = [
    "/console/",
    "/console/console.js",
    "/console/console.css",
    "/console/api/setup",
    "/console/api/state",
];

#[tokio::test]
async fn without_dev_or_a_token_there_is_no_console() {
    let node = TestNode::start().await;
    let addr = node.node.ws_addr.to_string();
    for path in ["/console/", "/console", "/console/api/state", "/"] {
        assert_eq!(get(&addr, path, &[]).await.status, 404, "{path}");
    }
    let publish = json!({"target": "group", "group": "g", "payload": "{\"type\":\"x\"}"});
    assert_eq!(
        post_json(&addr, "/console/api/publish", &[], &publish)
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn with_a_token_every_console_request_needs_it() {
    let node = TestNode::start_with(&["--console-token", CONSOLE_TOKEN]).await;
    let addr = node.node.ws_addr.to_string();
    let publish = json!({"target": "group", "group": "table-1", "payload": "{\"type\":\"x\"}"});
    for path in GUARDED {
        let answer = get(&addr, path, &[]).await;
        assert_eq!(answer.status, 401, "{path}");
        assert!(
            !answer.body.contains("console.js"),
            "{path}: {}",
            answer.body
        );
    }
    // Not --dev: `/` is not the console's.
    assert_eq!(get(&addr, "/", &[]).await.status, 404);
    let refused = post_json(&addr, "/console/api/publish", &[], &publish).await;
    assert_eq!(refused.status, 401);
    let wrong = [("Authorization", "Bearer not-the-console-token")];
    assert_eq!(get(&addr, "/console/api/state", &wrong).await.status, 401);

    let bearer = [("Authorization", BEARER)];
    let page = get(&addr, "/console/", &bearer).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("console.js"));
    assert_eq!(get(&addr, "/console/console.js", &bearer).await.status, 200);
    let state = get(&addr, "/console/api/state", &bearer).await;
    assert_eq!(state.status, 200, "{}", state.body);
    assert_eq!(state.json()["nodes"].as_array().map(Vec::len), Some(1));

    // The login form: a wrong token is refused, the right one opens a session cookie.
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let failed = http(&addr, "POST", "/console/login", &form, "token=nope").await;
    assert_eq!(failed.status, 401);
    assert!(failed.header("set-cookie").is_none());
    let login = http(
        &addr,
        "POST",
        "/console/login",
        &form,
        &format!("token={CONSOLE_TOKEN}"),
    )
    .await;
    assert_eq!(login.status, 303);
    let cookie = login.header("set-cookie").expect("a session cookie");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains(CONSOLE_TOKEN), "{cookie}");
    let session = cookie.split(';').next().expect("name=value");
    let with_cookie = [("Cookie", session)];
    assert_eq!(
        get(&addr, "/console/api/state", &with_cookie).await.status,
        200
    );

    // A publish through the console: the gRPC API's checks, an event id, a delivery.
    let mut client = node.client(4).await;
    client.join(json!({"page": "table", "table_id": 1})).await;
    let published = post_json(&addr, "/console/api/publish", &bearer, &publish).await;
    assert_eq!(published.status, 200, "{}", published.body);
    let event_id = published.json()["event_id"].as_u64().expect("an id");
    assert!(event_id > 0);
    let frame = client.recv().await;
    assert_eq!(frame["type"], "x");
    assert_eq!(frame["_event_id"], event_id);
    let not_an_object = json!({"target": "group", "group": "table-1", "payload": "[1]"});
    let invalid = post_json(&addr, "/console/api/publish", &bearer, &not_an_object).await;
    assert_eq!(invalid.status, 400);
    assert!(invalid.body.contains("payload"), "{}", invalid.body);
    let nobody = json!({"target": "users", "user_ids": [], "payload": "{\"type\":\"x\"}"});
    let invalid = post_json(&addr, "/console/api/publish", &bearer, &nobody).await;
    assert_eq!(invalid.status, 400);
    assert!(invalid.body.contains("user_ids"), "{}", invalid.body);

    // Tokens are minted under --dev only; POSTs from elsewhere and non-JSON are refused.
    let mint = post_json(&addr, "/console/api/token", &bearer, &json!({"user_id": 1})).await;
    assert_eq!(mint.status, 403);
    let elsewhere = [("Authorization", BEARER), ("Origin", "http://evil.example")];
    let forged = post_json(&addr, "/console/api/publish", &elsewhere, &publish).await;
    assert_eq!(forged.status, 403);
    let as_form = [
        ("Authorization", BEARER),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ];
    let form_post = http(&addr, "POST", "/console/api/publish", &as_form, "a=b").await;
    assert_eq!(form_post.status, 415);
    // No CORS: nothing tells a browser another origin may read an answer.
    for answer in [&page, &state, &published] {
        assert!(
            answer.header("access-control-allow-origin").is_none(),
            "{:?}",
            answer.headers
        );
    }

    // Counted like gRPC calls: in /metrics.
    let metrics = node.node.metrics_text();
    let count = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in /metrics"))
    };
    assert!(count("channelgate_console_requests_total") >= 6);
    assert!(count("channelgate_console_refused_total") >= 9);
    assert!(count("channelgate_events_published_total") >= 1);
}

#[tokio::test]
async fn the_console_shows_no_secret() {
    let node = TestNode::start_with(&[
        "--console-token",
        CONSOLE_TOKEN,
        "--presence",
        "on",
        "--authorizer-secret",
        "e2e-authorizer-secret",
    ])
    .await;
    let addr = node.node.ws_addr.to_string();
    let mut client = node.client(5).await;
    client.join(json!({"page": "table", "table_id": 3})).await;
    let mut grpc = node.grpc().await;
    publish(&mut grpc, group_request("table-3", event("from_grpc", 1))).await;
    let bearer = [("Authorization", BEARER)];
    let publish = json!({"target": "all_users", "payload": "{\"type\":\"from_console\"}"});
    let published = post_json(&addr, "/console/api/publish", &bearer, &publish).await;
    assert_eq!(published.status, 200, "{}", published.body);

    let mut answers = Vec::new();
    for path in GUARDED {
        let answer = get(&addr, path, &bearer).await;
        assert_eq!(answer.status, 200, "{path}");
        answers.push((path, answer));
    }
    answers.push(("login form", get(&addr, "/console/", &[]).await));
    answers.push(("publish answer", published));
    let state = answers[4].1.json();
    assert_eq!(state["groups"][0]["group"], "table-3", "{state}");
    assert_eq!(state["presence"][0]["space"], "table-3", "{state}");
    let recent: Vec<&str> = state["recent"]
        .as_array()
        .expect("recent publishes")
        .iter()
        .filter_map(|p| p["type"].as_str())
        .collect();
    assert_eq!(recent, ["from_console", "from_grpc"]);

    let secrets = [
        SECRET,
        API_KEY,
        CONSOLE_TOKEN,
        "e2e-authorizer-secret",
        &token(5),
    ];
    for (what, answer) in &answers {
        for secret in secrets {
            assert!(
                !answer.body.contains(secret),
                "{what} shows a secret: {secret}"
            );
            for (name, value) in &answer.headers {
                assert!(
                    !value.contains(secret),
                    "{what}'s {name} header shows a secret"
                );
            }
        }
    }
}

#[tokio::test]
async fn dev_mode_opens_the_console_and_sends_the_root_to_it() {
    let node = TestNode::start_with(&["--dev"]).await;
    let addr = node.node.ws_addr.to_string();
    let root = get(&addr, "/", &[]).await;
    assert_eq!(root.status, 303);
    assert_eq!(root.header("location"), Some("/console/"));
    assert_eq!(
        get(&addr, "/console", &[]).await.header("location"),
        Some("/console/")
    );
    assert_eq!(get(&addr, "/console/", &[]).await.status, 200);
    let minted = post_json(&addr, "/console/api/token", &[], &json!({"user_id": 9})).await;
    assert_eq!(minted.status, 200, "{}", minted.body);
    let token = minted.json()["token"]
        .as_str()
        .expect("a token")
        .to_string();
    let mut client = Client::open(&node.ws_url(&format!("jwt_token={token}"))).await;
    let auth = client.recv().await;
    assert_eq!(auth["success"], true, "{auth}");
    let refused = post_json(&addr, "/console/api/token", &[], &json!({"user_id": -1})).await;
    assert_eq!(refused.status, 400);
}
