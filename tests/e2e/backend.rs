//! A stand-in backend for the authorizer callback: a real HTTP server and a real tonic
//! Authorizer server on free ports, both deciding by one policy (and one for the connect
//! check) and counting questions.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use channelgate::proto::authorizer_server::{Authorizer, AuthorizerServer};
use channelgate::proto::{AuthorizeRequest, AuthorizeResponse, ConnectRequest};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;

/// How the backend answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `{"allowed": policy(user, group)}`, or the gRPC equivalent.
    Answer,
    /// HTTP 200 with a body that is not the answer.
    Garbage,
    /// HTTP 500, or gRPC INTERNAL.
    Fail,
}

type Policy = Arc<dyn Fn(i64, &str) -> bool + Send + Sync>;
/// Decides a connect question (its JSON form).
type ConnectPolicy = Arc<dyn Fn(&Value) -> bool + Send + Sync>;
/// Names the presence space of a subscribe question (its JSON form), if any.
type SpacePolicy = Arc<dyn Fn(&Value) -> Option<String> + Send + Sync>;

pub struct Backend {
    pub calls: AtomicUsize,
    /// Each question as JSON, with the secret it came with.
    pub seen: Mutex<Vec<(Value, Option<String>)>>,
    policy: Mutex<Policy>,
    connect_policy: Mutex<ConnectPolicy>,
    space_policy: Mutex<SpacePolicy>,
    mode: Mutex<Mode>,
    delay: Mutex<Duration>,
}

impl Backend {
    pub fn new(policy: impl Fn(i64, &str) -> bool + Send + Sync + 'static) -> Arc<Backend> {
        Arc::new(Backend {
            calls: AtomicUsize::new(0),
            seen: Mutex::default(),
            policy: Mutex::new(Arc::new(policy)),
            connect_policy: Mutex::new(Arc::new(|_: &Value| true)),
            space_policy: Mutex::new(Arc::new(|_: &Value| None)),
            mode: Mutex::new(Mode::Answer),
            delay: Mutex::new(Duration::ZERO),
        })
    }

    pub fn set_policy(&self, policy: impl Fn(i64, &str) -> bool + Send + Sync + 'static) {
        *self.policy.lock().unwrap() = Arc::new(policy);
    }

    pub fn set_connect_policy(&self, policy: impl Fn(&Value) -> bool + Send + Sync + 'static) {
        *self.connect_policy.lock().unwrap() = Arc::new(policy);
    }

    pub fn set_space_policy(
        &self,
        policy: impl Fn(&Value) -> Option<String> + Send + Sync + 'static,
    ) {
        *self.space_policy.lock().unwrap() = Arc::new(policy);
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Records a question and decides it, after the configured delay.
    async fn decide(
        &self,
        question: Value,
        secret: Option<String>,
    ) -> (Mode, bool, Option<String>) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let delay = *self.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let allowed = if question["action"] == "connect" {
            let policy = self.connect_policy.lock().unwrap().clone();
            policy(&question)
        } else {
            let user = question["user_id"].as_i64().unwrap_or(-1);
            let policy = self.policy.lock().unwrap().clone();
            policy(user, question["group"].as_str().unwrap_or_default())
        };
        let space_policy = self.space_policy.lock().unwrap().clone();
        let space = space_policy(&question);
        self.seen.lock().unwrap().push((question, secret));
        (*self.mode.lock().unwrap(), allowed, space)
    }

    /// Serves the HTTP kind; returns `http://ADDR/authorize`.
    pub async fn serve_http(self: &Arc<Self>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let backend = backend.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: http::Request<Incoming>| {
                            let backend = backend.clone();
                            async move {
                                let secret = request
                                    .headers()
                                    .get("x-channelgate-secret")
                                    .map(|v| v.to_str().unwrap().to_string());
                                let body = request.into_body().collect().await.unwrap().to_bytes();
                                let question: Value = serde_json::from_slice(&body).unwrap();
                                let (mode, allowed, space) = backend.decide(question, secret).await;
                                let answer = serde_json::json!({"allowed": allowed, "presence_space": space});
                                let (status, text) = match mode {
                                    Mode::Answer => (200, answer.to_string()),
                                    Mode::Garbage => (200, "<html>login</html>".to_string()),
                                    Mode::Fail => (500, "oops".to_string()),
                                };
                                let response = http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(text)))
                                    .unwrap();
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        format!("http://{addr}/authorize")
    }

    /// Serves the gRPC kind; returns `grpc://ADDR`.
    pub async fn serve_grpc(self: &Arc<Self>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let service = AuthorizerServer::new(GrpcBackend(self.clone()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("grpc://{addr}")
    }
}

struct GrpcBackend(Arc<Backend>);

fn secret_of<T>(request: &tonic::Request<T>) -> Option<String> {
    request
        .metadata()
        .get("x-channelgate-secret")
        .map(|v| v.to_str().unwrap().to_string())
}

impl GrpcBackend {
    /// Decides a question put in the HTTP kind's JSON form, so tests compare one shape.
    async fn answer(
        &self,
        question: Value,
        secret: Option<String>,
    ) -> Result<tonic::Response<AuthorizeResponse>, tonic::Status> {
        match self.0.decide(question, secret).await {
            (Mode::Answer, allowed, space) => Ok(tonic::Response::new(AuthorizeResponse {
                allowed,
                presence_space: space.unwrap_or_default(),
            })),
            _ => Err(tonic::Status::internal("backend failed")),
        }
    }
}

#[tonic::async_trait]
impl Authorizer for GrpcBackend {
    async fn authorize(
        &self,
        request: tonic::Request<AuthorizeRequest>,
    ) -> Result<tonic::Response<AuthorizeResponse>, tonic::Status> {
        let secret = secret_of(&request);
        let r = request.into_inner();
        let question = serde_json::json!({
            "action": "subscribe",
            "user_id": r.user_id,
            "web_socket_id": r.web_socket_id,
            "page": r.page,
            "parameters": serde_json::from_str::<Value>(&r.parameters).unwrap(),
            "group": r.group,
        });
        self.answer(question, secret).await
    }

    async fn authorize_connect(
        &self,
        request: tonic::Request<ConnectRequest>,
    ) -> Result<tonic::Response<AuthorizeResponse>, tonic::Status> {
        let secret = secret_of(&request);
        let r = request.into_inner();
        let question = serde_json::json!({
            "action": "connect",
            "user_id": r.user_id,
            "web_socket_id": r.web_socket_id,
            "token_issued_at": r.token_issued_at,
            "token_id": r.token_id,
        });
        self.answer(question, secret).await
    }
}

/// An address where nothing listens.
pub async fn dead_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}
