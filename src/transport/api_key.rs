//! The gRPC API's key check: `authorization: Bearer <api key>`, compared in constant time
//! before a call reaches the service, when an API key is configured.
//!
//! A tower service rather than a tonic interceptor: an interceptor turns every request
//! into a tonic `Request` and back (its URI copied, its headers moved in and out of a
//! metadata map) to show it one header; this reads the header where it is, and a node
//! without a key passes the request straight on.

use std::sync::Arc;
use std::task::{Context, Poll};

use crate::identity::same_secret;
use futures_util::future::{Either, Ready, ready};
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

/// `inner` behind the API key check.
#[derive(Clone)]
pub struct ApiKeyCheck<S> {
    inner: S,
    /// `Bearer <api key>`, the whole header value expected; `None`: no key, no check.
    expected: Option<Arc<[u8]>>,
}

impl<S> ApiKeyCheck<S> {
    pub fn new(inner: S, api_key: Option<&str>) -> Self {
        ApiKeyCheck {
            inner,
            expected: api_key.map(|key| format!("Bearer {key}").into_bytes().into()),
        }
    }
}

/// The answer to a call without the right key, as tonic gives a status.
fn unauthenticated() -> http::Response<Body> {
    let status =
        Status::unauthenticated("missing or wrong API key: send `authorization: Bearer <api key>`");
    let (parts, ()) = status.into_http::<()>().into_parts();
    http::Response::from_parts(parts, Body::empty())
}

impl<S, B> tower::Service<http::Request<B>> for ApiKeyCheck<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<http::Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(expected) = &self.expected {
            let given = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map_or(&[][..], |v| v.as_bytes());
            if !same_secret(given, expected) {
                return Either::Right(ready(Ok(unauthenticated())));
            }
        }
        Either::Left(self.inner.call(request))
    }
}

impl<S: NamedService> NamedService for ApiKeyCheck<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(same_secret(b"Bearer k", b"Bearer k"));
        assert!(!same_secret(b"Bearer k", b"Bearer j"));
        assert!(!same_secret(b"Bearer k", b"Bearer kk"));
        assert!(!same_secret(b"", b"Bearer k"));
    }

    #[test]
    fn a_refusal_is_unauthenticated() {
        let response = unauthenticated();
        assert_eq!(response.headers()["grpc-status"], "16");
        assert_eq!(response.headers()["content-type"], "application/grpc");
    }
}
