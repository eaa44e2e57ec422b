//! The gRPC authorizer: `channelgate.v1.Authorizer/Authorize`, implemented by the backend.

use std::time::Duration;

use futures_util::future::BoxFuture;
use tonic::transport::{Channel, Endpoint};

use super::{AuthorizeRequest, Authorizer, AuthorizerError, ConnectRequest, Decision};
use crate::proto;
use crate::proto::authorizer_client::AuthorizerClient;

/// Asks the backend over gRPC, with a timeout and at most `concurrency` calls at once.
pub struct GrpcAuthorizer {
    client: AuthorizerClient<Channel>,
    secret: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    target: String,
}

impl GrpcAuthorizer {
    /// `url` is `grpc://HOST:PORT`. The connection is made on first use and re-made as
    /// needed, so the gateway starts even while the backend is down (and denies meanwhile).
    pub fn new(
        url: &str,
        secret: Option<&str>,
        timeout: Duration,
        concurrency: usize,
    ) -> Result<Self, String> {
        let rest = url
            .strip_prefix("grpc://")
            .ok_or_else(|| format!("--authorizer {url:?} must start with grpc://"))?;
        let endpoint = Endpoint::from_shared(format!("http://{rest}"))
            .map_err(|e| format!("--authorizer {url:?}: {e}"))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .tcp_nodelay(true)
            .concurrency_limit(concurrency);
        let secret = secret
            .map(|s| s.parse())
            .transpose()
            .map_err(|_| "--authorizer-secret must be printable ASCII".to_string())?;
        Ok(GrpcAuthorizer {
            client: AuthorizerClient::new(endpoint.connect_lazy()),
            secret,
            target: url.to_string(),
        })
    }
}

impl GrpcAuthorizer {
    /// A call carrying the shared secret.
    fn call<T>(&self, message: T) -> tonic::Request<T> {
        let mut call = tonic::Request::new(message);
        if let Some(secret) = &self.secret {
            call.metadata_mut()
                .insert(super::http::SECRET_HEADER, secret.clone());
        }
        call
    }
}

fn unavailable(status: tonic::Status) -> AuthorizerError {
    AuthorizerError(format!("{:?}: {}", status.code(), status.message()))
}

impl Authorizer for GrpcAuthorizer {
    fn authorize(
        &self,
        request: AuthorizeRequest,
    ) -> BoxFuture<'static, Result<Decision, AuthorizerError>> {
        let mut client = self.client.clone();
        let call = self.call(proto::AuthorizeRequest {
            user_id: request.user_id,
            web_socket_id: request.web_socket_id,
            page: request.page,
            parameters: request.parameters.to_string(),
            group: request.group,
        });
        Box::pin(async move {
            let answer = client
                .authorize(call)
                .await
                .map_err(unavailable)?
                .into_inner();
            Ok(Decision::answered(
                answer.allowed,
                Some(answer.presence_space),
            ))
        })
    }

    fn authorize_connect(
        &self,
        request: ConnectRequest,
    ) -> BoxFuture<'static, Result<bool, AuthorizerError>> {
        let mut client = self.client.clone();
        let call = self.call(proto::ConnectRequest {
            user_id: request.user_id,
            web_socket_id: request.web_socket_id,
            token_issued_at: request.token_issued_at,
            token_id: request.token_id,
        });
        Box::pin(async move {
            let answer = client.authorize_connect(call).await.map_err(unavailable)?;
            Ok(answer.into_inner().allowed)
        })
    }

    fn describe(&self) -> String {
        format!("gRPC {}", self.target)
    }
}
