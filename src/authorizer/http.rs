//! The HTTP authorizer: `POST <url>` with the question as JSON, answered `{"allowed": bool}`.
//! The question's `action` is `subscribe` or `connect`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{AuthorizeRequest, Authorizer, AuthorizerError, ConnectRequest, Decision};

/// Answers larger than this are garbage.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The header that carries `--authorizer-secret`.
pub const SECRET_HEADER: &str = "x-channelgate-secret";

#[derive(Deserialize)]
struct Answer {
    allowed: bool,
    #[serde(default)]
    presence_space: Option<String>,
}

/// A question as posted: its fields, flat beside the `action` that tells the two apart.
#[derive(Serialize)]
struct Question<'a, T: Serialize> {
    action: &'static str,
    #[serde(flatten)]
    fields: &'a T,
}

/// Asks the backend over HTTP/1.1, with a timeout and at most `concurrency` calls at once.
pub struct HttpAuthorizer {
    url: http::Uri,
    secret: Option<http::HeaderValue>,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    permits: Arc<Semaphore>,
}

impl HttpAuthorizer {
    pub fn new(
        url: &str,
        secret: Option<&str>,
        timeout: Duration,
        concurrency: usize,
    ) -> Result<Self, String> {
        let url: http::Uri = url
            .parse()
            .map_err(|e| format!("--authorizer {url:?} is not a URL: {e}"))?;
        if url.scheme_str() != Some("http") || url.host().is_none() {
            return Err(format!(
                "--authorizer {url} must be http://HOST[:PORT]/PATH (TLS: put a local proxy in front)"
            ));
        }
        let secret = secret
            .map(http::HeaderValue::from_str)
            .transpose()
            .map_err(|_| "--authorizer-secret must be printable ASCII".to_string())?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        Ok(HttpAuthorizer {
            url,
            secret,
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
            permits: Arc::new(Semaphore::new(concurrency)),
        })
    }
}

impl HttpAuthorizer {
    /// Posts one question and reads `{"allowed": bool}`, within the timeout.
    fn ask<T: Serialize>(
        &self,
        action: &'static str,
        fields: &T,
    ) -> BoxFuture<'static, Result<Answer, AuthorizerError>> {
        let body = serde_json::to_vec(&Question { action, fields })
            .map_err(|e| AuthorizerError(format!("cannot encode the question: {e}")));
        let client = self.client.clone();
        let url = self.url.clone();
        let secret = self.secret.clone();
        let timeout = self.timeout;
        let permits = self.permits.clone();
        Box::pin(async move {
            let mut builder =
                http::Request::post(url).header(http::header::CONTENT_TYPE, "application/json");
            if let Some(secret) = secret {
                builder = builder.header(SECRET_HEADER, secret);
            }
            let http_request = builder
                .body(Full::new(Bytes::from(body?)))
                .map_err(|e| AuthorizerError(format!("cannot build the request: {e}")))?;
            let call = async {
                let _permit = permits
                    .acquire_owned()
                    .await
                    .map_err(|_| AuthorizerError("closed".into()))?;
                let response = client
                    .request(http_request)
                    .await
                    .map_err(|e| AuthorizerError(format!("request failed: {e}")))?;
                let status = response.status();
                if status != http::StatusCode::OK {
                    return Err(AuthorizerError(format!("answered HTTP {status}")));
                }
                let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                    .collect()
                    .await
                    .map_err(|e| AuthorizerError(format!("cannot read the answer: {e}")))?
                    .to_bytes();
                let answer: Answer = serde_json::from_slice(&body).map_err(|e| {
                    AuthorizerError(format!("answer is not {{\"allowed\": bool}}: {e}"))
                })?;
                Ok(answer)
            };
            tokio::time::timeout(timeout, call)
                .await
                .map_err(|_| AuthorizerError(format!("no answer within {timeout:?}")))?
        })
    }
}

impl Authorizer for HttpAuthorizer {
    fn authorize(
        &self,
        request: AuthorizeRequest,
    ) -> BoxFuture<'static, Result<Decision, AuthorizerError>> {
        let answer = self.ask("subscribe", &request);
        Box::pin(async move {
            let answer = answer.await?;
            Ok(Decision::answered(answer.allowed, answer.presence_space))
        })
    }

    fn authorize_connect(
        &self,
        request: ConnectRequest,
    ) -> BoxFuture<'static, Result<bool, AuthorizerError>> {
        let answer = self.ask("connect", &request);
        Box::pin(async move { Ok(answer.await?.allowed) })
    }

    fn describe(&self) -> String {
        format!("http {}", self.url)
    }
}
