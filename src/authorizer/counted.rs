//! Counts the questions that reach the backend authorizer and the ones it failed to
//! answer, for `/metrics` and the console's charts. Sits beneath the cache, so answers
//! given from memory are not counted as calls.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::{AuthorizeRequest, Authorizer, AuthorizerError, ConnectRequest, Decision};
use crate::hub::Scope;
use crate::metrics::Metrics;

/// An authorizer whose calls and failures are counted in the node's [`Metrics`].
pub struct CountedAuthorizer {
    inner: Arc<dyn Authorizer>,
    metrics: Arc<Metrics>,
}

impl CountedAuthorizer {
    pub fn new(inner: Arc<dyn Authorizer>, metrics: Arc<Metrics>) -> Self {
        CountedAuthorizer { inner, metrics }
    }

    fn counted<T: Send + 'static>(
        &self,
        call: BoxFuture<'static, Result<T, AuthorizerError>>,
    ) -> BoxFuture<'static, Result<T, AuthorizerError>> {
        let metrics = self.metrics.clone();
        metrics.authorizer_calls.fetch_add(1, Ordering::Relaxed);
        call.inspect(move |answer| {
            if answer.is_err() {
                metrics.authorizer_failures.fetch_add(1, Ordering::Relaxed);
            }
        })
        .boxed()
    }
}

impl Authorizer for CountedAuthorizer {
    fn authorize(
        &self,
        request: AuthorizeRequest,
    ) -> BoxFuture<'static, Result<Decision, AuthorizerError>> {
        self.counted(self.inner.authorize(request))
    }

    fn authorize_connect(
        &self,
        request: ConnectRequest,
    ) -> BoxFuture<'static, Result<bool, AuthorizerError>> {
        self.counted(self.inner.authorize_connect(request))
    }

    fn forget_pages(&self, scope: &Scope) {
        self.inner.forget_pages(scope);
    }

    fn forget_connects(&self, user_ids: &[i64]) {
        self.inner.forget_connects(user_ids);
    }

    fn forget_all(&self) {
        self.inner.forget_all();
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
