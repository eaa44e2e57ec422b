//! Keeping live subscriptions honest when permissions change (`CheckPermission`), and
//! throwing users out (`Disconnect`), on one node.

use std::sync::Arc;

use serde_json::Value;

use crate::authorizer::{AuthorizeRequest, Authorizer};
use crate::hub::{Connection, Hub, Scope};
use crate::pages::Page;

/// One subscription that lost its permission.
#[derive(Debug, Clone, PartialEq)]
pub struct Revoked {
    pub web_socket_id: String,
    pub user_id: i64,
    pub page: String,
    pub parameters: Value,
    pub group: String,
}

/// What a check found on this node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckOutcome {
    pub checked: u32,
    pub revoked: Vec<Revoked>,
}

/// Re-checks subscriptions in scope: discards each the authorizer no longer allows (or
/// every one, with `revoke`). A failing authorizer means "not allowed": fail closed.
/// With `dry_run`, reports what would go and changes nothing.
pub async fn check(
    hub: &Hub,
    authorizer: &dyn Authorizer,
    scope: &Scope,
    revoke: bool,
    dry_run: bool,
) -> CheckOutcome {
    // Every remembered answer in scope goes, not only those of the pages held here: a
    // socket of this node may ask again at once, or a user's socket on another node held
    // the page. A dry run of a revoke changes nothing; a re-check needs fresh answers.
    if !(revoke && dry_run) {
        authorizer.forget_pages(scope);
    }
    let subscriptions = hub.subscriptions(scope);
    let allowed: Vec<bool> = if revoke {
        vec![false; subscriptions.len()]
    } else {
        let questions = subscriptions.iter().map(|(conn, page)| {
            let answer = authorizer.authorize(question(conn, page));
            async move { answer.await.is_ok_and(|d| d.allowed) }
        });
        futures_util::future::join_all(questions).await
    };
    let mut outcome = CheckOutcome {
        checked: u32::try_from(subscriptions.len()).unwrap_or(u32::MAX),
        revoked: Vec::new(),
    };
    for ((conn, page), allowed) in subscriptions.into_iter().zip(allowed) {
        if allowed || (!dry_run && !hub.unsubscribe(&conn, &page)) {
            continue;
        }
        outcome.revoked.push(Revoked {
            web_socket_id: conn.web_socket_id.to_string(),
            user_id: conn.user_id,
            page: page.page.to_string(),
            parameters: page.parameters,
            group: page.group.to_string(),
        });
    }
    outcome
}

fn question(conn: &Arc<Connection>, page: &Page) -> AuthorizeRequest {
    AuthorizeRequest {
        user_id: conn.user_id,
        web_socket_id: conn.web_socket_id.to_string(),
        page: page.page.to_string(),
        parameters: page.parameters.clone(),
        group: page.group.to_string(),
        permission_group: page.permission_group.as_deref().map(str::to_string),
    }
}
