//! Sockudo, a Pusher-protocol server, as a peer: its subscribers speak Pusher protocol 7 over
//! the lean [`Client`], and events go in through Pusher's HTTP API (`POST /apps/{id}/events`,
//! signed with the app's secret), the way an application server publishes to it.
//!
//! The app is the one `bench/peers/sockudo/config.json` declares; the constants below must
//! match it.
//!
//! A Pusher event carries its `data` as a JSON string inside the envelope
//! (`{"event":"bench","channel":"table-3","data":"{\"type\":\"bench\",\"ts\":…}"}`), so the
//! payload's send time is found as the escaped key `\"ts\":`, without a JSON parser, as for
//! the other systems.

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;
use tokio::net::TcpStream;

use crate::client::Client;
use crate::load::number_after;

/// The app of `bench/peers/sockudo/config.json`.
pub const APP_ID: &str = "channelgate-bench";
pub const APP_KEY: &str = "channelgate-bench-key";
pub const APP_SECRET: &str = "channelgate-bench-secret";

/// The start of the server's application-level ping, and the client's answer.
const PING: &[u8] = br#"{"event":"pusher:ping""#;
const PONG: &str = r#"{"event":"pusher:pong","data":{}}"#;

/// The event name every published event carries.
const EVENT: &str = "bench";

/// The WebSocket path of the app: Pusher protocol 7, as pusher-js 8 asks for it.
fn socket_path() -> String {
    format!("/app/{APP_KEY}?protocol=7&client=channelgate-loadgen&version=1.0")
}

/// Upgrades `stream` to a Pusher socket and waits for `pusher:connection_established`.
/// The socket answers the server's `pusher:ping` (sent after `activity_timeout`, 120 s, of
/// silence from the client) with `pusher:pong`, as a Pusher client does; without it the
/// server closes the socket.
pub async fn connect(stream: TcpStream, host: &str) -> Result<Client, String> {
    let mut ws = Client::connect(stream, host, &socket_path())
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    ws.answer_text(PING, PONG);
    ws.await_answer(b"pusher:connection_established", &[b"pusher:error"])
        .await?;
    Ok(ws)
}

/// Subscribes to the public channel `channel` and waits for
/// `pusher_internal:subscription_succeeded`.
pub async fn subscribe(ws: &mut Client, channel: &str) -> Result<(), String> {
    let frame = serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel}});
    ws.send_text(&frame.to_string())
        .await
        .map_err(|e| e.to_string())?;
    ws.await_answer(
        b"pusher_internal:subscription_succeeded",
        &[b"pusher:subscription_error", b"pusher:error"],
    )
    .await
}

/// Whether a frame is a Pusher message (sockudo writes the `event` key first).
pub fn is_event(text: &[u8]) -> bool {
    text.starts_with(br#"{"event":"#)
}

/// The send time stamped in a payload that arrived as a Pusher event's `data` string.
pub fn stamp(text: &[u8]) -> Option<u64> {
    number_after(text, br#"\"ts\":"#)
}

/// Publishes through the HTTP API over a pool of keep-alive connections (one per request
/// in flight), so the server parses requests, not TCP handshakes.
#[derive(Clone)]
pub struct Publisher {
    http: HttpClient<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Publisher {
    pub fn new(addr: SocketAddr) -> Publisher {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = HttpClient::builder(TokioExecutor::new()).build(connector);
        Publisher {
            http,
            base: format!("http://{addr}"),
        }
    }

    /// One signed `POST /apps/{id}/events` of `data` to `channel`; resolves once the server
    /// answered 200.
    pub fn publish(
        &self,
        channel: &str,
        data: &str,
    ) -> impl Future<Output = Result<(), String>> + Send + 'static {
        let body = serde_json::json!({"name": EVENT, "channel": channel, "data": data}).to_string();
        let path = format!("/apps/{APP_ID}/events");
        let timestamp = crate::load::now_micros() / 1_000_000;
        let query = signed_query(&path, &body, timestamp);
        let request = http::Request::post(format!("{}{path}?{query}", self.base))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)));
        let http = self.http.clone();
        async move {
            let request = request.map_err(|e| e.to_string())?;
            let response = http.request(request).await.map_err(|e| e.to_string())?;
            let status = response.status();
            let answer = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if status.is_success() {
                Ok(())
            } else {
                let answer = String::from_utf8_lossy(&answer);
                Err(format!("HTTP {status}: {answer}"))
            }
        }
    }
}

/// The query string of a signed POST of `body` to `path` (Pusher's HTTP API signature: an
/// HMAC-SHA256 of the method, the path and the sorted parameters, keyed by the secret).
fn signed_query(path: &str, body: &str, timestamp: u64) -> String {
    let body_md5 = format!("{:x}", md5::compute(body));
    // Already in sorted order, as the signature wants them.
    let params = format!(
        "auth_key={APP_KEY}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={body_md5}"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(APP_SECRET.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(format!("POST\n{path}\n{params}").as_bytes());
    let signature: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{params}&auth_signature={signature}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_pusher_and_finds_escaped_stamps() {
        // Expected values from Python's hashlib and hmac over the same input.
        let query = signed_query(
            "/apps/channelgate-bench/events",
            r#"{"a":1}"#,
            1_700_000_000,
        );
        assert_eq!(
            query,
            "auth_key=channelgate-bench-key&auth_timestamp=1700000000&auth_version=1.0\
             &body_md5=bb6cb5c68df4652941caf652a366f2d8&auth_signature=dc176dc712280ff604d29008ea48965680f6af50be0c7218afbabfe626581fd1"
        );
        // As sockudo writes an event: `event`, `channel`, then `data` as a string.
        let event =
            br#"{"event":"bench","channel":"table-3","data":"{\"type\":\"bench\",\"n\":7,\"ts\":1234}"}"#;
        assert!(is_event(event));
        assert_eq!(stamp(event), Some(1234));
        assert_eq!(stamp(br#"{"event":"pusher:pong","data":"{}"}"#), None);
    }
}
