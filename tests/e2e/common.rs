//! A node started in-process on free ports, with real WebSocket and gRPC clients.

use std::time::Duration;

use channelgate::Node;
use channelgate::config::Settings;
use channelgate::identity::sign_access_token;
use channelgate::proto::gateway_client::GatewayClient;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const SECRET: &str = "e2e-test-secret";
pub const API_KEY: &str = "e2e-api-key";
/// How long a test waits for a frame that must come.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub struct TestNode {
    pub node: Node,
}

pub type Grpc = GatewayClient<InterceptedService<Channel, ApiKey>>;

#[derive(Clone)]
pub struct ApiKey(pub Option<&'static str>);

impl tonic::service::Interceptor for ApiKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(key) = self.0 {
            let value = format!("Bearer {key}").parse().expect("ascii header");
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

impl TestNode {
    pub async fn start() -> TestNode {
        TestNode::start_with(&[]).await
    }

    /// A production-like node (secret, API key, static authorizer) plus extra flags.
    pub async fn start_with(extra: &[&str]) -> TestNode {
        TestNode::start_stopping_within("5", extra).await
    }

    /// The same, with `--shutdown-timeout` in seconds.
    pub async fn start_stopping_within(shutdown_timeout: &str, extra: &[&str]) -> TestNode {
        let mut args = vec![
            "channelgate",
            "--ws-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--jwt-secret",
            SECRET,
            "--api-key",
            API_KEY,
            "--shutdown-timeout",
            shutdown_timeout,
        ];
        args.extend_from_slice(extra);
        let settings = Settings::from_args(args).expect("test settings");
        TestNode {
            node: Node::start(settings).await.expect("node starts"),
        }
    }

    pub fn token(&self, user_id: i64) -> String {
        token(user_id)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws/core/?{query}", self.node.ws_addr)
    }

    /// A client of `user_id` (0: anonymous), past its authentication frame.
    pub async fn client(&self, user_id: i64) -> Client {
        Client::authenticated(&self.node.ws_addr.to_string(), user_id).await
    }

    pub async fn grpc(&self) -> Grpc {
        self.grpc_with_key(Some(API_KEY)).await
    }

    /// A plaintext Info call, which may fail.
    pub async fn grpc_try(&self) -> Result<(), String> {
        let channel = Channel::from_shared(format!("http://{}", self.node.grpc_addr))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        GatewayClient::with_interceptor(channel, ApiKey(Some(API_KEY)))
            .info(channelgate::proto::InfoRequest {})
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    pub async fn grpc_with_key(&self, key: Option<&'static str>) -> Grpc {
        let channel = Channel::from_shared(format!("http://{}", self.node.grpc_addr))
            .expect("uri")
            .connect()
            .await
            .expect("gRPC connects");
        GatewayClient::with_interceptor(channel, ApiKey(key))
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub web_socket_id: String,
}

/// A token of `user_id` signed with the test secret.
pub fn token(user_id: i64) -> String {
    sign_access_token(SECRET.as_bytes(), "user_id", user_id, 600).expect("sign")
}

impl Client {
    /// A client of `user_id` (0: anonymous) on the node at `ws_addr`, past its
    /// authentication frame.
    pub async fn authenticated(ws_addr: &str, user_id: i64) -> Client {
        let token = if user_id == 0 {
            "anonymous".to_string()
        } else {
            token(user_id)
        };
        let mut client = Client::open(&format!("ws://{ws_addr}/ws/core/?jwt_token={token}")).await;
        let auth = client.recv().await;
        assert_eq!(auth["type"], "authentication", "{auth}");
        assert_eq!(auth["success"], true, "{auth}");
        client.web_socket_id = auth["web_socket_id"].as_str().expect("id").to_string();
        client
    }

    /// Opens a socket without reading anything.
    pub async fn open(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket connects");
        Client {
            ws,
            web_socket_id: String::new(),
        }
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next message of any kind, which must come within [`PATIENCE`].
    pub async fn next_message(&mut self) -> Message {
        tokio::time::timeout(PATIENCE, self.ws.next())
            .await
            .expect("a frame within the patience window")
            .expect("socket still open")
            .expect("well-formed frames")
    }

    /// The next frame, which must be JSON text and must come within [`PATIENCE`].
    pub async fn recv(&mut self) -> Value {
        loop {
            match self.next_message().await {
                Message::Text(text) => return serde_json::from_str(&text).expect("JSON frame"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Subscribes and returns the answer (`page_add` or `page_rejected`).
    pub async fn subscribe(&mut self, frame: Value) -> Value {
        self.send(frame).await;
        self.recv().await
    }

    /// Subscribes and insists it worked.
    pub async fn join(&mut self, frame: Value) {
        let answer = self.subscribe(frame.clone()).await;
        assert_eq!(
            answer["type"], "page_add",
            "subscribing {frame} got {answer}"
        );
    }

    /// Reads until the server's close frame and returns it (`None`: closed without one).
    pub async fn recv_close(&mut self) -> Option<CloseFrame> {
        loop {
            let message = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("the close within the patience window");
            match message {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }
}

/// Publishes and returns the event's history id.
pub async fn publish(grpc: &mut Grpc, request: channelgate::proto::PublishRequest) -> u64 {
    grpc.publish(request)
        .await
        .expect("publish accepted")
        .into_inner()
        .event_id
}

/// A group event's payload.
pub fn event(kind: &str, n: i64) -> String {
    json!({"type": kind, "n": n}).to_string()
}

pub fn group_request(group: &str, payload: String) -> channelgate::proto::PublishRequest {
    channelgate::proto::PublishRequest {
        target: Some(channelgate::proto::publish_request::Target::Group(
            group.into(),
        )),
        payload,
        ..Default::default()
    }
}
