//! Short-lived answers per subscribe question (user, group, parameters) and per token, and
//! single-flight: identical questions asked at the same time become one backend call, so a
//! reconnect storm of many sockets of one user re-subscribing the same table asks the
//! backend once.
//!
//! A permission change drops what it covers ([`Authorizer::forget_pages`],
//! [`Authorizer::forget_connects`]): the answers kept, and the calls in flight, whose
//! answer may predate the change. A call that was in flight when its question was
//! forgotten asks the backend again before it answers anyone, so no answer the backend gave
//! before a revoke reaches a question about what the revoke covers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use super::{AuthorizeRequest, Authorizer, AuthorizerError, ConnectRequest, Decision};
use crate::hub::Scope;

/// What an answer is kept under. Subscribe and connect answers never share a key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// The page's parameters count as well as its group: one the group leaves out (a public
    /// view's password `token`) can change the answer. The permission group is kept so
    /// that a revoke by permission group finds the answer.
    Page {
        user_id: i64,
        group: String,
        permission_group: Option<String>,
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
            permission_group: request.permission_group.clone(),
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

    /// Whether this is a subscribe answer a permission check of `scope` covers.
    fn is_page_in(&self, scope: &Scope) -> bool {
        let Key::Page {
            user_id,
            group,
            permission_group,
            ..
        } = self
        else {
            return false;
        };
        (scope.user_ids.is_empty() || scope.user_ids.contains(user_id))
            && scope.covers_group(group, permission_group.as_deref())
    }

    /// Whether this is a connect answer about one of `user_ids`.
    fn is_connect_of(&self, user_ids: &[i64]) -> bool {
        matches!(self, Key::Connect { user_id, .. } if user_ids.contains(user_id))
    }
}

type Answer = Result<Decision, AuthorizerError>;

/// A way to ask the backend a question, again if the first answer was overtaken.
type Ask = Arc<dyn Fn() -> BoxFuture<'static, Answer> + Send + Sync>;

/// Wraps an authorizer with a cache of definite answers and merging of calls in flight.
/// Errors are never cached: the next question asks again.
pub struct CachedAuthorizer {
    inner: Arc<dyn Authorizer>,
    cache: Arc<Cache>,
}

struct Cache {
    ttl: Duration,
    max_entries: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    answers: HashMap<Key, (Decision, Instant)>,
    /// Calls in flight, with an id so that a call superseded by a forget neither writes
    /// its (possibly stale) answer into the cache nor hands it out.
    in_flight: HashMap<Key, (u64, Shared<BoxFuture<'static, Answer>>)>,
    next_call: u64,
}

impl CachedAuthorizer {
    /// `ttl` zero keeps no answers but still merges identical calls in flight.
    pub fn new(inner: Arc<dyn Authorizer>, ttl: Duration, max_entries: usize) -> Self {
        CachedAuthorizer {
            inner,
            cache: Arc::new(Cache {
                ttl,
                max_entries,
                state: Mutex::default(),
            }),
        }
    }
}

impl Cache {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached answer for `key`, the call in flight for it, or a new call made by `ask`.
    fn answer(self: &Arc<Self>, key: Key, ask: Ask) -> BoxFuture<'static, Answer> {
        let mut state = self.lock();
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
        let cache = self.clone();
        let call_key = key.clone();
        let call = async move {
            let answer = backend.await;
            let current = {
                let mut state = cache.lock();
                let current = state
                    .in_flight
                    .get(&call_key)
                    .is_some_and(|(i, _)| *i == id);
                if current {
                    state.in_flight.remove(&call_key);
                    if let Ok(decision) = &answer
                        && !cache.ttl.is_zero()
                    {
                        state.remember(call_key.clone(), decision.clone(), &cache);
                    }
                }
                current
            };
            if current {
                answer
            } else {
                // Forgotten while the backend answered: that answer may predate the
                // change, so the question is asked again (or joins the newer call).
                cache.answer(call_key, ask).await
            }
        }
        .boxed()
        .shared();
        state.in_flight.insert(key, (id, call.clone()));
        drop(state);
        // Driven to the end even if every asker goes away, so the entry is always cleared.
        tokio::spawn(call.clone());
        Box::pin(call)
    }

    fn forget(&self, forgotten: impl Fn(&Key) -> bool) {
        let mut state = self.lock();
        state.answers.retain(|key, _| !forgotten(key));
        state.in_flight.retain(|key, _| !forgotten(key));
    }
}

impl State {
    fn remember(&mut self, key: Key, decision: Decision, cache: &Cache) {
        if self.answers.len() >= cache.max_entries {
            self.answers.retain(|_, (_, at)| at.elapsed() < cache.ttl);
            if self.answers.len() >= cache.max_entries {
                self.answers.clear();
            }
        }
        self.answers.insert(key, (decision, Instant::now()));
    }
}

impl Authorizer for CachedAuthorizer {
    fn authorize(&self, request: AuthorizeRequest) -> BoxFuture<'static, Answer> {
        let inner = self.inner.clone();
        let key = Key::page(&request);
        self.cache
            .answer(key, Arc::new(move || inner.authorize(request.clone())))
    }

    fn authorize_connect(
        &self,
        request: ConnectRequest,
    ) -> BoxFuture<'static, Result<bool, AuthorizerError>> {
        let inner = self.inner.clone();
        let key = Key::connect(&request);
        let answer = self.cache.answer(
            key,
            Arc::new(move || {
                let allowed = inner.authorize_connect(request.clone());
                Box::pin(async move { Ok(Decision::allowed(allowed.await?)) })
            }),
        );
        Box::pin(async move { Ok(answer.await?.allowed) })
    }

    fn forget_pages(&self, scope: &Scope) {
        self.cache.forget(|key| key.is_page_in(scope));
    }

    fn forget_connects(&self, user_ids: &[i64]) {
        self.cache.forget(|key| key.is_connect_of(user_ids));
    }

    fn forget_all(&self) {
        self.cache.forget(|_| true);
    }

    fn describe(&self) -> String {
        format!(
            "{}, answers cached for {:?}",
            self.inner.describe(),
            self.cache.ttl
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
            permission_group: Some("permissions-table-1".into()),
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

        cache.forget_pages(&Scope {
            user_ids: vec![2],
            group: Some("table-1".into()),
            ..Scope::default()
        });
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
        cache.forget_pages(&Scope {
            group: Some("view-s".into()),
            ..Scope::default()
        });
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

    /// Answers as `allowed` says when the call starts, then takes a while: an answer
    /// the backend gave before a revoke.
    struct Flipping {
        allowed: Arc<std::sync::atomic::AtomicBool>,
        calls: Arc<AtomicUsize>,
    }

    impl Authorizer for Flipping {
        fn authorize(&self, _request: AuthorizeRequest) -> BoxFuture<'static, Answer> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let allowed = self.allowed.load(Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(Decision::allowed(allowed))
            })
        }
        fn authorize_connect(
            &self,
            _request: ConnectRequest,
        ) -> BoxFuture<'static, Result<bool, AuthorizerError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(std::future::ready(Ok(self.allowed.load(Ordering::SeqCst))))
        }
        fn describe(&self) -> String {
            "flipping".into()
        }
    }

    fn flipping() -> (
        CachedAuthorizer,
        Arc<std::sync::atomic::AtomicBool>,
        Arc<AtomicUsize>,
    ) {
        let allowed = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = Flipping {
            allowed: allowed.clone(),
            calls: calls.clone(),
        };
        let cache = CachedAuthorizer::new(Arc::new(inner), Duration::from_secs(5), 100);
        (cache, allowed, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoke_by_permission_group_drops_the_answers_of_its_users_only() {
        let (cache, allowed, calls) = flipping();
        let of = |user_id| AuthorizeRequest {
            user_id,
            ..question(user_id)
        };
        for user in [2, 4] {
            assert_eq!(cache.authorize(of(user)).await, Ok(Decision::allowed(true)));
        }
        allowed.store(false, Ordering::SeqCst);
        let revoke = |permission_group: &str| Scope {
            user_ids: vec![2],
            permission_group: Some(permission_group.into()),
            ..Scope::default()
        };
        cache.forget_pages(&revoke("permissions-table-9"));
        assert_eq!(cache.authorize(of(2)).await, Ok(Decision::allowed(true)));
        cache.forget_pages(&revoke("permissions-table-1"));
        assert_eq!(cache.authorize(of(2)).await, Ok(Decision::allowed(false)));
        assert_eq!(cache.authorize(of(4)).await, Ok(Decision::allowed(true)));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn no_answer_given_before_a_revoke_is_handed_out_after_it() {
        let (cache, allowed, calls) = flipping();
        // Asked before the revoke: the backend's call starts while the user is allowed.
        let before = cache.authorize(question(2));
        tokio::time::advance(Duration::from_millis(5)).await;
        allowed.store(false, Ordering::SeqCst);
        cache.forget_pages(&Scope {
            user_ids: vec![2],
            ..Scope::default()
        });
        let after = cache.authorize(question(2));
        let (before, after) = futures_util::future::join(before, after).await;
        assert_eq!(after, Ok(Decision::allowed(false)));
        assert_eq!(before, Ok(Decision::allowed(false)));
        assert_eq!(
            cache.authorize(question(2)).await,
            Ok(Decision::allowed(false))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_disconnect_drops_its_users_connect_answers() {
        let (cache, allowed, calls) = flipping();
        let token = |user_id| ConnectRequest {
            user_id,
            web_socket_id: "w".into(),
            token_issued_at: Some(1),
            token_id: Some("t".into()),
        };
        assert_eq!(cache.authorize_connect(token(2)).await, Ok(true));
        assert_eq!(cache.authorize_connect(token(3)).await, Ok(true));
        assert_eq!(
            cache.authorize(question(2)).await,
            Ok(Decision::allowed(true))
        );
        allowed.store(false, Ordering::SeqCst);
        cache.forget_connects(&[2]);
        assert_eq!(cache.authorize_connect(token(2)).await, Ok(false));
        assert_eq!(cache.authorize_connect(token(3)).await, Ok(true));
        // Page answers are another matter: a Disconnect is about tokens.
        assert_eq!(
            cache.authorize(question(2)).await,
            Ok(Decision::allowed(true))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        cache.forget_all();
        assert_eq!(cache.authorize_connect(token(3)).await, Ok(false));
    }
}
