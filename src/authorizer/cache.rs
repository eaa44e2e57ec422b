//! Short-lived answers per subscribe question (user, group, parameters) and per token, and
//! single-flight: identical questions asked at the same time become one backend call, so a
//! reconnect storm of many sockets of one user re-subscribing the same table asks the
//! backend once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use super::{AuthorizeRequest, Authorizer, AuthorizerError, ConnectRequest, Decision};

/// What an answer is kept under. Subscribe and connect answers never share a key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// The page's parameters count as well as its group: one the group leaves out (a public
    /// view's password `token`) can change the answer.
    Page {
        user_id: i64,
        group: String,
        parameters: String,
    },
    /// One answer per token: its `jti`, and its `iat` for a token without one.
    Connect {
        user_id: i64,
        token_id: Option<String>,
        issued_at: Option<i64>,
    },
}

impl Key {
    fn page(request: &AuthorizeRequest) -> Key {
        Key::Page {
            user_id: request.user_id,
            group: request.group.clone(),
            parameters: request.parameters.to_string(),
        }
    }

    fn connect(request: &ConnectRequest) -> Key {
        Key::Connect {
            user_id: request.user_id,
            token_id: request.token_id.clone(),
            issued_at: request.token_issued_at,
        }
    }

    /// Whether this is an answer about `user_id`'s `group`, whatever its parameters.
    fn is_about(&self, user_id: i64, group: &str) -> bool {
        matches!(self, Key::Page { user_id: u, group: g, .. } if *u == user_id && g == group)
    }
}

type Answer = Result<Decision, AuthorizerError>;

/// Wraps an authorizer with a cache of definite answers and merging of calls in flight.
/// Errors are never cached: the next question asks again.
pub struct CachedAuthorizer {
    inner: Arc<dyn Authorizer>,
    ttl: Duration,
    max_entries: usize,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    answers: HashMap<Key, (Decision, Instant)>,
    /// Calls in flight, with an id so that a call superseded by `forget` does not write
    /// its (possibly stale) answer into the cache.
    in_flight: HashMap<Key, (u64, Shared<BoxFuture<'static, Answer>>)>,
    next_call: u64,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl CachedAuthorizer {
    /// `ttl` zero keeps no answers but still merges identical calls in flight.
    pub fn new(inner: Arc<dyn Authorizer>, ttl: Duration, max_entries: usize) -> Self {
        CachedAuthorizer {
            inner,
            ttl,
            max_entries,
            state: Arc::default(),
        }
    }
}

impl State {
    fn remember(&mut self, key: Key, decision: Decision, max_entries: usize, ttl: Duration) {
        if self.answers.len() >= max_entries {
            self.answers.retain(|_, (_, at)| at.elapsed() < ttl);
            if self.answers.len() >= max_entries {
                self.answers.clear();
            }
        }
        self.answers.insert(key, (decision, Instant::now()));
    }
}

impl CachedAuthorizer {
    /// The cached answer for `key`, the call in flight for it, or a new call made by `ask`.
    fn answer(
        &self,
        key: Key,
        ask: impl FnOnce() -> BoxFuture<'static, Answer>,
    ) -> BoxFuture<'static, Answer> {
        let mut state = lock(&self.state);
        if let Some((decision, at)) = state.answers.get(&key) {
            if at.elapsed() < self.ttl {
                return Box::pin(std::future::ready(Ok(decision.clone())));
            }
            state.answers.remove(&key);
        }
        if let Some((_, call)) = state.in_flight.get(&key) {
            return Box::pin(call.clone());
        }
        let id = state.next_call;
        state.next_call += 1;
        let backend = ask();
        let shared_state = self.state.clone();
        let (ttl, max_entries) = (self.ttl, self.max_entries);
        let call_key = key.clone();
        let call = async move {
            let answer = backend.await;
            let mut state = lock(&shared_state);
            if state
                .in_flight
                .get(&call_key)
                .is_some_and(|(i, _)| *i == id)
            {
                state.in_flight.remove(&call_key);
                if let Ok(decision) = &answer
                    && !ttl.is_zero()
                {
                    state.remember(call_key, decision.clone(), max_entries, ttl);
                }
            }
            answer
        }
        .boxed()
        .shared();
        state.in_flight.insert(key, (id, call.clone()));
        drop(state);
        // Driven to the end even if every asker goes away, so the entry is always cleared.
        tokio::spawn(call.clone());
        Box::pin(call)
    }
}

impl Authorizer for CachedAuthorizer {
    fn authorize(&self, request: AuthorizeRequest) -> BoxFuture<'static, Answer> {
        self.answer(Key::page(&request), || self.inner.authorize(request))
    }

    fn authorize_connect(
        &self,
        request: ConnectRequest,
    ) -> BoxFuture<'static, Result<bool, AuthorizerError>> {
        let answer = self.answer(Key::connect(&request), || {
            let allowed = self.inner.authorize_connect(request);
            Box::pin(async move { Ok(Decision::allowed(allowed.await?)) })
        });
        Box::pin(async move { Ok(answer.await?.allowed) })
    }

    fn forget(&self, keys: &[(i64, String)]) {
        let forgotten = |key: &Key| keys.iter().any(|(user, group)| key.is_about(*user, group));
        let mut state = lock(&self.state);
        state.answers.retain(|key, _| !forgotten(key));
        state.in_flight.retain(|key, _| !forgotten(key));
    }

    fn describe(&self) -> String {
        format!(
            "{}, answers cached for {:?}",
            self.inner.describe(),
            self.ttl
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts calls; allows users with even ids after a short wait.
    struct Counting(Arc<AtomicUsize>);

    impl Authorizer for Counting {
        fn authorize(&self, request: AuthorizeRequest) -> BoxFuture<'static, Answer> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(Decision::allowed(request.user_id % 2 == 0))
            })
        }
        fn authorize_connect(
            &self,
            request: ConnectRequest,
        ) -> BoxFuture<'static, Result<bool, AuthorizerError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(std::future::ready(Ok(request.token_id.is_some())))
        }
        fn describe(&self) -> String {
            "counting".into()
        }
    }

    fn question(user_id: i64) -> AuthorizeRequest {
        AuthorizeRequest {
            user_id,
            web_socket_id: "w".into(),
            page: "table".into(),
            parameters: serde_json::json!({"table_id": 1}),
            group: "table-1".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn identical_questions_share_one_call_and_then_the_cache() {
        let calls = Arc::new(AtomicUsize::new(0));
        let cache = CachedAuthorizer::new(
            Arc::new(Counting(calls.clone())),
            Duration::from_secs(5),
            100,
        );
        let answers =
            futures_util::future::join_all((0..50).map(|_| cache.authorize(question(2)))).await;
        assert!(answers.iter().all(|a| *a == Ok(Decision::allowed(true))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            cache.authorize(question(2)).await,
            Ok(Decision::allowed(true))
        );
        assert_eq!(
            cache.authorize(question(3)).await,
            Ok(Decision::allowed(false))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(
            cache.authorize(question(2)).await,
            Ok(Decision::allowed(true))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        cache.forget(&[(2, "table-1".into())]);
        assert_eq!(
            cache.authorize(question(2)).await,
            Ok(Decision::allowed(true))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn parameters_the_group_leaves_out_are_another_question() {
        let calls = Arc::new(AtomicUsize::new(0));
        let cache = CachedAuthorizer::new(
            Arc::new(Counting(calls.clone())),
            Duration::from_secs(5),
            100,
        );
        let view = |token: &str| AuthorizeRequest {
            parameters: serde_json::json!({"slug": "s", "token": token}),
            page: "view".into(),
            group: "view-s".into(),
            ..question(0)
        };
        cache.authorize(view("right")).await.expect("an answer");
        cache.authorize(view("wrong")).await.expect("an answer");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        cache.forget(&[(0, "view-s".into())]);
        cache.authorize(view("right")).await.expect("an answer");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn connect_answers_are_cached_per_token() {
        let calls = Arc::new(AtomicUsize::new(0));
        let cache = CachedAuthorizer::new(
            Arc::new(Counting(calls.clone())),
            Duration::from_secs(5),
            100,
        );
        let token = |id: Option<&str>, iat: Option<i64>| ConnectRequest {
            user_id: 2,
            web_socket_id: "w".into(),
            token_issued_at: iat,
            token_id: id.map(str::to_string),
        };
        assert_eq!(
            cache.authorize_connect(token(Some("a"), Some(1))).await,
            Ok(true)
        );
        assert_eq!(
            cache.authorize_connect(token(Some("a"), Some(1))).await,
            Ok(true)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Another token of the same user is another question, with or without a jti.
        assert_eq!(
            cache.authorize_connect(token(Some("b"), Some(1))).await,
            Ok(true)
        );
        assert_eq!(
            cache.authorize_connect(token(None, Some(1))).await,
            Ok(false)
        );
        assert_eq!(
            cache.authorize_connect(token(None, Some(2))).await,
            Ok(false)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // And never the answer about a page.
        assert_eq!(
            cache.authorize(question(2)).await,
            Ok(Decision::allowed(true))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }
}
