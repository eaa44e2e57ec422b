//! A stopping node closes its sockets with 1001 and stops accepting.

use crate::common::*;

#[tokio::test]
async fn shutdown_closes_sockets_with_1001_and_refuses_new_ones() {
    let node = TestNode::start().await;
    let mut a = node.client(1).await;
    let mut b = node.client(0).await;
    let url = node.ws_url("jwt_token=anonymous");
    let stopping = tokio::spawn(node.node.shutdown());
    for c in [&mut a, &mut b] {
        let close = c.recv_close().await.expect("a close frame");
        assert_eq!(u16::from(close.code), 1001);
    }
    stopping.await.expect("shutdown finishes");
    assert!(tokio_tungstenite::connect_async(url).await.is_err());
}

#[tokio::test]
async fn a_drain_turns_readyz_503_and_spreads_1012_closes_over_its_period() {
    use std::time::{Duration, Instant};
    let node = TestNode::start_with(&["--drain-seconds", "1"]).await;
    let mut clients = Vec::new();
    for user in 1..=20 {
        clients.push(node.client(user).await);
    }
    let readyz = format!("http://{}/readyz", node.node.ws_addr);
    let started = Instant::now();
    let stopping = tokio::spawn(node.node.shutdown());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        http_status(&readyz).await,
        Some(503),
        "readyz turns 503 first"
    );
    // Each socket's close is timed on its own, as it arrives.
    let closes = clients.iter_mut().map(|client| async move {
        let close = client.recv_close().await.expect("a close frame");
        (u16::from(close.code), started.elapsed())
    });
    let closes = futures_util::future::join_all(closes).await;
    assert!(closes.iter().all(|(code, _)| *code == 1012), "{closes:?}");
    let mut closed_at: Vec<Duration> = closes.into_iter().map(|(_, at)| at).collect();
    closed_at.sort();
    let spread = closed_at[closed_at.len() - 1] - closed_at[0];
    assert!(
        spread >= Duration::from_millis(600),
        "closes spread over the drain, not at once: {closed_at:?}"
    );
    stopping.await.expect("shutdown finishes");
}

/// The status of a plain HTTP GET, `None` if there was no answer.
async fn http_status(url: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (addr, path) = rest.split_once('/')?;
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET /{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    answer.split(' ').nth(1)?.parse().ok()
}
