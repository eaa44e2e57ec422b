//! Who may subscribe to what: the backend decides, the gateway asks.
//!
//! Every authorizer answers one question, [`AuthorizeRequest`] → allowed or not. Failing to
//! answer is an error, and the caller treats an error as a denial (`authorizer_unavailable`),
//! never as permission.

mod cache;
mod grpc;
mod http;

pub use cache::CachedAuthorizer;
pub use grpc::GrpcAuthorizer;
pub use http::{HttpAuthorizer, SECRET_HEADER};

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;

/// One question to the backend: may this user's socket subscribe to this page?
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuthorizeRequest {
    /// 0 for anonymous.
    pub user_id: i64,
    pub web_socket_id: String,
    pub page: String,
    /// The page's validated parameters (a JSON object).
    pub parameters: Value,
    pub group: String,
}

/// The authorizer could not give an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizerError(pub String);

impl std::fmt::Display for AuthorizerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "authorizer unavailable: {}", self.0)
    }
}

/// A source of subscribe decisions.
pub trait Authorizer: Send + Sync + 'static {
    /// Whether the subscription is allowed.
    fn authorize(
        &self,
        request: AuthorizeRequest,
    ) -> BoxFuture<'static, Result<bool, AuthorizerError>>;

    /// Drops remembered answers for these (user id, group) pairs, so the next question
    /// about them reaches the backend. Only caching authorizers remember anything.
    fn forget(&self, _keys: &[(i64, String)]) {}

    /// A short description for the start-up log.
    fn describe(&self) -> String;
}

/// Allows every page to every connection that reached it: anonymous connections are kept
/// off pages that are not anonymous-ok before any authorizer is asked. For development
/// only; the node warns at start-up when it runs with it.
pub struct StaticAuthorizer;

impl Authorizer for StaticAuthorizer {
    fn authorize(
        &self,
        _request: AuthorizeRequest,
    ) -> BoxFuture<'static, Result<bool, AuthorizerError>> {
        Box::pin(std::future::ready(Ok(true)))
    }

    fn describe(&self) -> String {
        "static (every authenticated user may subscribe to every page)".into()
    }
}
