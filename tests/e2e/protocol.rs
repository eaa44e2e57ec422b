//! The socket protocol's edges: ping, garbage, limits and close codes.

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::common::*;

async fn close_code(client: &mut Client) -> Option<u16> {
    client.recv_close().await.map(|f| u16::from(f.code))
}

#[tokio::test]
async fn ping_is_answered_with_pong() {
    let node = TestNode::start().await;
    let mut c = node.client(1).await;
    c.send(json!({"type": "ping"})).await;
    assert_eq!(c.recv().await, json!({"type": "pong"}));
}

#[tokio::test]
async fn malformed_frames_get_an_error_frame_and_the_connection_keeps_working() {
    let node = TestNode::start().await;
    let mut c = node.client(1).await;
    let cases = [
        ("{not json", "invalid_json"),
        ("[1,2]", "not_an_object"),
        ("42", "not_an_object"),
        ("{}", "unknown_frame"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (r#"{"page":7}"#, "invalid_field"),
        (r#"{"remove_page":"nope"}"#, "unknown_page"),
    ];
    for (text, code) in cases {
        c.send_text(text).await;
        let answer = c.recv().await;
        assert_eq!(answer["type"], "error", "{text}");
        assert_eq!(answer["code"], code, "{text}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    c.ws.send(Message::binary(vec![1, 2, 3]))
        .await
        .expect("send");
    assert_eq!(c.recv().await["code"], "binary_frame");
    c.join(json!({"page": "table", "table_id": 1})).await;
    c.send(json!({"type": "ping"})).await;
    assert_eq!(c.recv().await["type"], "pong");
}

#[tokio::test]
async fn repeated_garbage_closes_with_1008() {
    let node = TestNode::start().await;
    let mut c = node.client(1).await;
    for _ in 0..25 {
        c.send_text("nonsense").await;
    }
    assert_eq!(close_code(&mut c).await, Some(1008));
}

#[tokio::test]
async fn a_flood_closes_with_1008_but_a_burst_of_100_is_fine() {
    let node = TestNode::start().await;
    let mut c = node.client(1).await;
    for _ in 0..100 {
        c.ws.feed(Message::text(r#"{"type":"ping"}"#))
            .await
            .expect("feed");
    }
    c.ws.flush().await.expect("flush");
    for _ in 0..100 {
        assert_eq!(c.recv().await["type"], "pong");
    }
    let mut flood = node.client(2).await;
    for _ in 0..1000 {
        flood
            .ws
            .feed(Message::text(r#"{"type":"ping"}"#))
            .await
            .expect("feed");
    }
    let _ = flood.ws.flush().await;
    assert_eq!(close_code(&mut flood).await, Some(1008));
}

#[tokio::test]
async fn a_flood_of_websocket_pings_counts_against_the_rate_limit() {
    let node = TestNode::start().await;
    let mut flood = node.client(1).await;
    for _ in 0..5000 {
        flood
            .ws
            .feed(Message::Ping(vec![1].into()))
            .await
            .expect("feed");
    }
    let _ = flood.ws.flush().await;
    assert_eq!(close_code(&mut flood).await, Some(1008));
}

#[tokio::test]
async fn an_oversize_message_closes_with_1009() {
    let node = TestNode::start_with(&["--max-message-bytes", "4096"]).await;
    let mut c = node.client(1).await;
    let big = json!({"type": "ping", "pad": "x".repeat(10_000)});
    c.send(big).await;
    assert_eq!(close_code(&mut c).await, Some(1009));
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let node = TestNode::start().await;
    let mut c = node.client(1).await;
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    c.ws.send(Message::Frame(frame))
        .await
        .expect("send raw frame");
    assert_eq!(close_code(&mut c).await, Some(1007));
}

#[tokio::test]
async fn origins_outside_the_allow_list_get_403() {
    let node =
        TestNode::start_with(&["--allowed-origins", "https://app.example,https://b.example"]).await;
    let url = node.ws_url(&format!("jwt_token={}", node.token(1)));
    let request = |origin: Option<&str>| {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.clone().into_client_request().expect("request");
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", origin.parse().expect("header"));
        }
        request
    };
    let refused = tokio_tungstenite::connect_async(request(Some("https://evil.example"))).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("expected HTTP 403, got {other:?}"),
    }
    for origin in [Some("https://b.example"), None] {
        tokio_tungstenite::connect_async(request(origin))
            .await
            .expect("allowed origin connects");
    }
}

#[tokio::test]
async fn http_endpoints_answer() {
    let node = TestNode::start().await;
    let _c = node.client(1).await;
    let get = |path: &str| {
        let addr = node.node.ws_addr;
        let path = path.to_string();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            s.write_all(request.as_bytes()).await.expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).await.expect("read");
            out
        }
    };
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    let metrics = get("/metrics").await;
    assert!(metrics.contains("channelgate_connections 1"), "{metrics}");
    assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    assert!(get("/ws/core/").await.starts_with("HTTP/1.1 426"));
}

#[tokio::test]
async fn a_websocket_ping_is_answered_with_its_pong_between_frames() {
    let node = TestNode::start().await;
    let mut c = node.client(1).await;
    c.ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .expect("ping");
    c.send(json!({"type": "ping"})).await;
    assert_eq!(
        c.next_message().await,
        Message::Pong(b"are you there".to_vec().into())
    );
    assert_eq!(c.recv().await, json!({"type": "pong"}));
}
