//! Who may connect: Baserow's access tokens, checked strictly, and `anonymous`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::common::*;

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn sign(alg: Algorithm, claims: Value, secret: &str) -> String {
    let key = EncodingKey::from_secret(secret.as_bytes()).expect("key");
    jsonwebtoken::encode(&Header::new(alg), &claims, &key).expect("sign")
}

fn access_claims(user_id: i64) -> Value {
    json!({"token_type": "access", "exp": now() + 600, "user_id": user_id})
}

/// Connects with `query` and returns the first frame and the close code.
async fn attempt(node: &TestNode, query: &str) -> (Value, Option<u16>) {
    let mut client = Client::open(&node.ws_url(query)).await;
    let first = client.recv().await;
    let close = if first["success"] == true {
        None
    } else {
        client.recv_close().await.map(|f| u16::from(f.code))
    };
    (first, close)
}

async fn assert_refused(node: &TestNode, query: &str) {
    let (first, close) = attempt(node, query).await;
    assert_eq!(
        first,
        json!({"type": "authentication", "success": false, "web_socket_id": null}),
        "{query}"
    );
    assert_eq!(close, Some(1008), "{query}");
}

#[tokio::test]
async fn a_valid_token_authenticates_its_user() {
    let node = TestNode::start().await;
    let (first, _) = attempt(&node, &format!("jwt_token={}", node.token(42))).await;
    assert_eq!(first["type"], "authentication");
    assert_eq!(first["success"], true);
    assert_eq!(first["replay_enabled"], true);
    let id = first["web_socket_id"].as_str().expect("an id");
    assert!(uuid_like(id), "{id}");
}

fn uuid_like(id: &str) -> bool {
    id.len() == 36 && id.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test]
async fn tokens_that_must_be_refused_are_refused() {
    let node = TestNode::start().await;
    let bad_signature = sign(Algorithm::HS256, access_claims(1), "another-secret");
    let expired = sign(
        Algorithm::HS256,
        json!({"token_type": "access", "exp": now() - 3600, "user_id": 1}),
        SECRET,
    );
    let other_algorithm = sign(Algorithm::HS512, access_claims(1), SECRET);
    let refresh = sign(
        Algorithm::HS256,
        json!({"token_type": "refresh", "exp": now() + 600, "user_id": 1}),
        SECRET,
    );
    let no_exp = sign(
        Algorithm::HS256,
        json!({"token_type": "access", "user_id": 1}),
        SECRET,
    );
    let alg_none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(access_claims(1).to_string())
    );
    let no_user = sign(
        Algorithm::HS256,
        json!({"token_type": "access", "exp": now() + 600}),
        SECRET,
    );
    for token in [
        bad_signature,
        expired,
        other_algorithm,
        refresh,
        no_exp,
        alg_none,
        no_user,
        "garbage".into(),
    ] {
        assert_refused(&node, &format!("jwt_token={token}")).await;
    }
    assert_refused(&node, "").await;
    assert_refused(&node, "jwt_token=").await;
}

#[tokio::test]
async fn anonymous_connects_as_user_zero() {
    let node = TestNode::start().await;
    let mut grpc = node.grpc().await;
    let mut anonymous = node.client(0).await;
    let request = channelgate::proto::PublishRequest {
        target: Some(channelgate::proto::publish_request::Target::Users(
            channelgate::proto::UserTarget {
                user_ids: vec![0],
                all_users: false,
            },
        )),
        payload: event("to_anonymous", 1),
        ..Default::default()
    };
    grpc.publish(request).await.expect("publish");
    assert_eq!(anonymous.recv().await["type"], "to_anonymous");
}

#[tokio::test]
async fn a_valid_client_web_socket_id_is_kept_and_an_invalid_one_replaced() {
    let node = TestNode::start().await;
    let token = node.token(1);
    let (first, _) = attempt(&node, &format!("jwt_token={token}&web_socket_id=tab_1-A")).await;
    assert_eq!(first["web_socket_id"], "tab_1-A");
    for bad in ["has%20space", "a%2Fb", &"x".repeat(65)] {
        let (first, _) = attempt(&node, &format!("jwt_token={token}&web_socket_id={bad}")).await;
        let id = first["web_socket_id"].as_str().expect("an id");
        assert!(uuid_like(id), "{bad} gave {id}");
    }
}
