//! The connect check (`--authorize-connect`): a real HTTP and a real gRPC backend confirm
//! each signed-in token before its socket is served.

use std::time::{Duration, Instant};

use channelgate::config::Settings;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::backend::{Backend, Mode, dead_address};
use crate::common::*;

/// The user's password changed at this time: tokens issued before it are refused.
const PASSWORD_CHANGED_AT: i64 = 1_700_000_000;

/// A token of `user_id` with the given `iat` and `jti`.
pub fn token_with(user_id: i64, issued_at: i64, token_id: &str) -> String {
    let claims = json!({
        "token_type": "access",
        "exp": jsonwebtoken::get_current_timestamp() + 600,
        "user_id": user_id,
        "iat": issued_at,
        "jti": token_id,
    });
    let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("key");
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).expect("sign")
}

async fn node_asking(authorizer: &str, extra: &[&str]) -> TestNode {
    let mut args = vec![
        "--authorizer",
        authorizer,
        "--authorizer-secret",
        "s3cret",
        "--authorize-connect",
    ];
    args.extend_from_slice(extra);
    TestNode::start_with(&args).await
}

/// Opens a socket with `token` and returns its first frame.
async fn connect(node: &TestNode, token: &str, web_socket_id: &str) -> (Client, Value) {
    let mut client =
        Client::open(&node.ws_url(&format!("jwt_token={token}&web_socket_id={web_socket_id}")))
            .await;
    let first = client.recv().await;
    (client, first)
}

async fn close_code(client: &mut Client) -> Option<u16> {
    client.recv_close().await.map(|f| u16::from(f.code))
}

fn connect_questions(backend: &Backend) -> Vec<(Value, Option<String>)> {
    let seen = backend.seen.lock().unwrap().clone();
    seen.into_iter()
        .filter(|(q, _)| q["action"] == "connect")
        .collect()
}

async fn refuses_stale_tokens_and_asks_once_per_token(url: String, backend: &Backend) {
    backend.set_connect_policy(|q| {
        q["token_issued_at"]
            .as_i64()
            .is_some_and(|iat| iat >= PASSWORD_CHANGED_AT)
    });
    let node = node_asking(&url, &[]).await;

    let fresh = token_with(1, PASSWORD_CHANGED_AT + 5, "fresh");
    let (mut a, first) = connect(&node, &fresh, "tab-a").await;
    assert_eq!(first["success"], true, "{first}");
    assert_eq!(
        connect_questions(backend),
        vec![(
            json!({
                "action": "connect",
                "user_id": 1,
                "web_socket_id": "tab-a",
                "token_issued_at": PASSWORD_CHANGED_AT + 5,
                "token_id": "fresh",
            }),
            Some("s3cret".to_string())
        )]
    );
    // The socket is served: its subscribe is asked as a subscribe.
    a.join(json!({"page": "table", "table_id": 1})).await;
    let seen = backend.seen.lock().unwrap().clone();
    assert_eq!(
        seen.last().map(|(q, _)| q["action"].clone()),
        Some(json!("subscribe"))
    );

    // A second tab with the same token: the answer is cached per token.
    let (_b, first) = connect(&node, &fresh, "tab-b").await;
    assert_eq!(first["success"], true, "{first}");
    assert_eq!(connect_questions(backend).len(), 1);

    // A token issued before the password change: refused like a bad token.
    let stale = token_with(1, PASSWORD_CHANGED_AT - 60, "stale");
    let (mut c, first) = connect(&node, &stale, "tab-c").await;
    assert_eq!(
        first,
        json!({"type": "authentication", "success": false, "web_socket_id": null})
    );
    assert_eq!(close_code(&mut c).await, Some(1008));
    assert_eq!(connect_questions(backend).len(), 2);

    // Anonymous sockets have no token to confirm.
    let (_anonymous, first) = connect(&node, "anonymous", "tab-d").await;
    assert_eq!(first["success"], true, "{first}");
    assert_eq!(connect_questions(backend).len(), 2);
}

#[tokio::test]
async fn http_connect_check_refuses_a_token_issued_before_a_password_change() {
    let backend = Backend::new(|_, _| true);
    let url = backend.serve_http().await;
    refuses_stale_tokens_and_asks_once_per_token(url, &backend).await;
}

#[tokio::test]
async fn grpc_connect_check_refuses_a_token_issued_before_a_password_change() {
    let backend = Backend::new(|_, _| true);
    let url = backend.serve_grpc().await;
    refuses_stale_tokens_and_asks_once_per_token(url, &backend).await;
}

#[tokio::test]
async fn without_an_answer_the_socket_is_refused_with_1011() {
    let backend = Backend::new(|_, _| true);
    let http = backend.serve_http().await;
    let grpc = backend.serve_grpc().await;
    let dead = dead_address().await;
    let cases = [
        (format!("http://{dead}/authorize"), Mode::Answer),
        (format!("grpc://{dead}"), Mode::Answer),
        (http.clone(), Mode::Fail),
        (http, Mode::Garbage),
        (grpc, Mode::Fail),
    ];
    for (url, mode) in cases {
        backend.set_mode(mode);
        let node = node_asking(&url, &[]).await;
        let (mut client, first) = connect(&node, &token(1), "w").await;
        assert_eq!(first["success"], false, "{url} {mode:?}: {first}");
        assert_eq!(close_code(&mut client).await, Some(1011), "{url} {mode:?}");
    }
}

#[tokio::test]
async fn a_slow_backend_meets_the_authentication_timeout() {
    let backend = Backend::new(|_, _| true);
    backend.set_delay(Duration::from_secs(5));
    let url = backend.serve_http().await;
    // The authorizer's own timeout is longer: the authentication timeout bounds the wait.
    let node = node_asking(
        &url,
        &[
            "--authorizer-timeout-ms",
            "10000",
            "--authentication-timeout-ms",
            "300",
        ],
    )
    .await;
    let started = Instant::now();
    let (mut client, first) = connect(&node, &token(1), "w").await;
    assert_eq!(first["success"], false, "{first}");
    assert_eq!(close_code(&mut client).await, Some(1011));
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(3), "refused after {waited:?}");
}

#[test]
fn the_connect_check_needs_a_backend_to_ask() {
    let error = Settings::from_args([
        "channelgate",
        "--jwt-secret",
        "s",
        "--api-key",
        "k",
        "--authorize-connect",
    ])
    .expect_err("static authorizer refused");
    assert!(error.contains("--authorize-connect"), "{error}");
}
