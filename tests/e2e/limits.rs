//! Limits a node keeps under pressure, checked on a real node process with a small
//! open-file limit: connections over the cap are refused at once, and running out of file
//! descriptors never makes an accept loop spin.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;

use crate::common::*;
use crate::redis_server::free_port;

/// A node process whose open-file limit is `fds`.
struct Limited {
    child: tokio::process::Child,
    ws_addr: String,
    grpc_addr: String,
}

impl Limited {
    async fn start(fds: u32, extra: &[&str]) -> Limited {
        let ws_addr = format!("127.0.0.1:{}", free_port());
        let grpc_addr = format!("127.0.0.1:{}", free_port());
        let child = tokio::process::Command::new("bash")
            .arg("-c")
            .arg(format!("ulimit -n {fds} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_channelgate"))
            .args(["--ws-addr", &ws_addr, "--grpc-addr", &grpc_addr])
            .args(["--jwt-secret", SECRET, "--api-key", API_KEY])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the channelgate binary runs");
        let node = Limited {
            child,
            ws_addr,
            grpc_addr,
        };
        let started = Instant::now();
        while TcpStream::connect(&node.ws_addr).await.is_err() {
            assert!(started.elapsed() < PATIENCE, "the node never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        node
    }

    /// CPU seconds the process has used (user and system).
    fn cpu_seconds(&self) -> f64 {
        let pid = self.child.id().expect("running");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
        // Fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat format")
            .1
            .split_whitespace()
            .collect();
        let ticks: f64 =
            fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
        ticks / 100.0
    }
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_at_once_with_503() {
    let node = Limited::start(1024, &["--max-connections", "5"]).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(Client::authenticated(&node.ws_addr, 1).await);
    }
    let url = format!("ws://{}/ws/core/?jwt_token={}", node.ws_addr, token(1));
    let started = Instant::now();
    let attempt = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(&url),
    )
    .await
    .expect("an answer, not a wait in the backlog");
    match attempt {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("expected a 503, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    drop(held.pop());
    // A place is free again: the next client gets in.
    let started = Instant::now();
    loop {
        let attempt = tokio_tungstenite::connect_async(&url).await;
        if attempt.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "never let in again: {attempt:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn running_out_of_file_descriptors_never_spins_and_the_node_recovers() {
    let node = Limited::start(128, &[]).await;
    // Idle TCP connections to the gRPC port until the node has no descriptors left.
    let mut idle = Vec::new();
    for _ in 0..200 {
        if let Ok(stream) = TcpStream::connect(&node.grpc_addr).await {
            idle.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = node.cpu_seconds();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = node.cpu_seconds() - before;
    assert!(
        used < 0.5,
        "the node used {used:.2} s of CPU in 2 s while out of descriptors"
    );
    drop(idle);
    let started = Instant::now();
    loop {
        let url = format!("ws://{}/ws/core/?jwt_token={}", node.ws_addr, token(1));
        if tokio_tungstenite::connect_async(&url).await.is_ok() {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "the node never served again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads until the peer closes; `true` if it did within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn silent_and_slow_handshakes_are_closed() {
    use tokio::io::AsyncWriteExt;
    let node = TestNode::start_with(&["--handshake-timeout-ms", "500"]).await;
    let addr = node.node.ws_addr;
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    // Slowloris: a request line, then a header line now and then, never the end.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /ws/core/ HTTP/1.1\r\n")
        .await
        .expect("write");
    let trickle = async {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
                return true;
            }
        }
        closed_within(&mut slow, Duration::from_millis(100)).await
    };
    let (silent_closed, slow_closed) =
        tokio::join!(closed_within(&mut silent, Duration::from_secs(3)), trickle);
    assert!(silent_closed, "a connection that sends nothing is closed");
    assert!(slow_closed, "a handshake that never ends is closed");
    // A prompt client is served as ever.
    let mut client = node.client(1).await;
    client
        .join(serde_json::json!({"page": "table", "table_id": 1}))
        .await;
}

#[tokio::test]
async fn a_client_that_answers_no_ping_is_closed_and_one_that_does_stays() {
    use futures_util::StreamExt;
    let node = TestNode::start_with(&["--ping-interval-ms", "200"]).await;
    let mut alive = node.client(1).await;
    let mut silent = node.client(2).await;
    // `alive` reads, so its WebSocket client answers each ping; `silent` reads nothing.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        if let Ok(message) = tokio::time::timeout(Duration::from_millis(100), alive.ws.next()).await
        {
            let message = message.expect("open").expect("frame");
            assert!(message.is_ping(), "only pings: {message:?}");
        }
    }
    alive
        .join(serde_json::json!({"page": "table", "table_id": 1}))
        .await;
    // Read as bytes: a WebSocket client would answer the pings it reads on a socket the
    // server has closed, and fail on that write before it reached the close frame.
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = silent.ws.get_mut() else {
        panic!("a plain TCP client");
    };
    let mut bytes = Vec::new();
    tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read_to_end(tcp, &mut bytes),
    )
    .await
    .expect("closed within the patience window")
    .expect("read to the end");
    // The server's frames here are pings and the close: unmasked, short.
    let (mut at, mut close_code) = (0, None);
    while at + 2 <= bytes.len() {
        let (opcode, len) = (bytes[at] & 0x0f, usize::from(bytes[at + 1] & 0x7f));
        if opcode == 0x8 && len >= 2 && at + 4 <= bytes.len() {
            close_code = Some(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]));
        }
        at += 2 + len;
    }
    assert_eq!(close_code, Some(1001), "{bytes:?}");
    assert_eq!(node.node.hub.stats().connections, 1);
}

#[tokio::test]
async fn sockets_that_connect_together_do_not_ping_together() {
    use futures_util::StreamExt;
    let every = Duration::from_millis(2000);
    let node = TestNode::start_with(&["--ping-interval-ms", "2000"]).await;
    let mut clients = Vec::new();
    for user in 1..=20 {
        clients.push(node.client(user).await);
    }
    let connected = Instant::now();
    // When each socket's first ping arrives.
    let firsts = futures_util::future::join_all(clients.iter_mut().map(|client| async {
        loop {
            let message = tokio::time::timeout(every * 2, client.ws.next())
                .await
                .expect("a ping within two intervals")
                .expect("open")
                .expect("frame");
            if message.is_ping() {
                return connected.elapsed();
            }
        }
    }))
    .await;
    let earliest = firsts.iter().min().expect("twenty");
    let latest = firsts.iter().max().expect("twenty");
    // All at once, they would arrive within the few milliseconds the connects took.
    assert!(
        *latest - *earliest > every / 2,
        "first pings spread over {:?}: {firsts:?}",
        *latest - *earliest
    );
    assert!(*latest <= every + Duration::from_millis(500), "{firsts:?}");
}

#[tokio::test]
async fn json_logs_are_one_object_a_line_and_never_carry_secrets() {
    use tokio::io::AsyncBufReadExt;
    let ws_addr = format!("127.0.0.1:{}", free_port());
    let grpc_addr = format!("127.0.0.1:{}", free_port());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_channelgate"))
        .args(["--ws-addr", &ws_addr, "--grpc-addr", &grpc_addr])
        .args([
            "--jwt-secret",
            SECRET,
            "--api-key",
            API_KEY,
            "--log-format",
            "json",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the channelgate binary runs");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let mut started = false;
    while !started {
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .expect("a log line in time")
            .expect("readable")
            .expect("the node logs its start");
        let entry: serde_json::Value = serde_json::from_str(&line).expect("a JSON object a line");
        assert!(entry["level"].is_string(), "{entry}");
        assert!(
            !line.contains(SECRET) && !line.contains(API_KEY),
            "a secret in {line}"
        );
        started = entry["fields"]["message"] == "channelgate node started";
    }
}

#[tokio::test]
async fn connections_per_user_and_per_address_are_bounded() {
    let node = TestNode::start_with(&["--max-connections-per-user", "2"]).await;
    let addr = node.node.ws_addr.to_string();
    let _first = Client::authenticated(&addr, 7).await;
    let _second = Client::authenticated(&addr, 7).await;
    let mut third = Client::open(&format!("ws://{addr}/ws/core/?jwt_token={}", token(7))).await;
    let close = third.recv_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    // Another user, and anonymous sockets, are not held to user 7's count.
    let _other = Client::authenticated(&addr, 8).await;
    for _ in 0..3 {
        let mut anonymous = Client::authenticated(&addr, 0).await;
        anonymous
            .join(serde_json::json!({"page": "view", "slug": "v"}))
            .await;
    }

    let node = Limited::start(1024, &["--max-connections-per-ip", "3"]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Client::authenticated(&node.ws_addr, 1).await);
    }
    let url = format!("ws://{}/ws/core/?jwt_token={}", node.ws_addr, token(2));
    match tokio_tungstenite::connect_async(&url).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("expected a 503, got {other:?}"),
    }
}
