//! Who may subscribe to what: the backend decides, the gateway asks.
//!
//! Every authorizer answers two questions: may this socket subscribe to this page
//! ([`AuthorizeRequest`]), and, with `--authorize-connect`, may this token connect at all
//! ([`ConnectRequest`]). Failing to answer is an error, and the caller treats an error as a
//! denial (`authorizer_unavailable`, or a refused connection), never as permission.

mod cache;
mod counted;
mod grpc;
mod http;

pub use cache::CachedAuthorizer;
pub use counted::CountedAuthorizer;
pub use grpc::GrpcAuthorizer;
pub use http::{HttpAuthorizer, SECRET_HEADER};

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;

use crate::hub::Scope;

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
    /// The page's permission group, so that a cache can drop answers by it; the backend
    /// is not told (it knows its own permission groups).
    #[serde(skip)]
    pub permission_group: Option<String>,
}

/// The connect check: may this verified token open a socket? A signed, unexpired token is
/// not enough for a backend that refuses tokens issued before the user's last password
/// change, or users who are inactive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectRequest {
    pub user_id: i64,
    pub web_socket_id: String,
    /// The token's `iat`.
    pub token_issued_at: Option<i64>,
    /// The token's `jti`.
    pub token_id: Option<String>,
}

/// The backend's answer to a subscribe question.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The presence space the page joins, when the backend names one (how a public view
    /// joins its table's space); otherwise the page table's, if any.
    pub presence_space: Option<String>,
}

impl Decision {
    pub fn allowed(allowed: bool) -> Decision {
        Decision {
            allowed,
            presence_space: None,
        }
    }

    /// A backend's answer, as HTTP and gRPC give it: an empty space names none.
    pub fn answered(allowed: bool, presence_space: Option<String>) -> Decision {
        Decision {
            allowed,
            presence_space: presence_space.filter(|space| !space.is_empty()),
        }
    }
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
    ) -> BoxFuture<'static, Result<Decision, AuthorizerError>>;

    /// Whether this token may connect (`--authorize-connect`).
    fn authorize_connect(
        &self,
        request: ConnectRequest,
    ) -> BoxFuture<'static, Result<bool, AuthorizerError>>;

    /// Drops remembered subscribe answers, and calls in flight, that a permission check of
    /// `scope` covers (`CheckPermission`, re-check or revoke): the next question about them
    /// reaches the backend. Only caching authorizers remember anything.
    fn forget_pages(&self, _scope: &Scope) {}

    /// Drops remembered connect answers of these users (`Disconnect`): a token the backend
    /// now refuses is not let in from memory.
    fn forget_connects(&self, _user_ids: &[i64]) {}

    /// Drops every remembered answer: the node may have missed permission changes.
    fn forget_all(&self) {}

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
    ) -> BoxFuture<'static, Result<Decision, AuthorizerError>> {
        Box::pin(std::future::ready(Ok(Decision::allowed(true))))
    }

    fn authorize_connect(
        &self,
        _request: ConnectRequest,
    ) -> BoxFuture<'static, Result<bool, AuthorizerError>> {
        Box::pin(std::future::ready(Ok(true)))
    }

    fn describe(&self) -> String {
        "static (every authenticated user may subscribe to every page)".into()
    }
}
