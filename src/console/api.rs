//! The console's JSON API: what the page shows, and what it asks the node to do.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};
use warp::reply::Response;

use super::Console;
use super::recent::Via;
use crate::config::{AuthorizerKind, Settings};
use crate::control::{self, Request};
use crate::identity::sign_access_token;
use crate::proto::gateway_server::Gateway;
use crate::proto::{self, publish_request};
use crate::transport::grpc::GatewayApi;

/// Groups and presence spaces listed at most.
const LISTED: usize = 10;
/// How long a test-socket token lasts.
const TEST_TOKEN_SECS: u64 = 15 * 60;

pub(super) fn json_bytes(status: StatusCode, body: Bytes) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn json_value(status: StatusCode, value: &Value) -> Response {
    json_bytes(status, Bytes::from(value.to_string()))
}

pub(super) fn error(status: StatusCode, message: &str) -> Response {
    json_value(status, &json!({ "error": message }))
}

/// What does not change while the node runs. Names the kinds of the bus and the
/// authorizer, never their addresses (a URL may hold a password).
pub(super) fn setup(settings: &Settings, login: bool) -> Bytes {
    let bus = match &settings.redis {
        None => "memory",
        Some(redis) => match redis.target {
            crate::bus::RedisTarget::Url(_) => "redis",
            crate::bus::RedisTarget::Cluster(_) => "redis cluster",
        },
    };
    let authorizer = match settings.authorizer {
        AuthorizerKind::Static => "static",
        AuthorizerKind::Http(_) => "http",
        AuthorizerKind::Grpc(_) => "grpc",
    };
    let setup = json!({
        "node_id": settings.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "dev": settings.dev,
        "bus": bus,
        "authorizer": authorizer,
        "api_key": settings.api_key.is_some(),
        "history": settings.history.is_some(),
        "presence": settings.presence.is_some(),
        "origins_restricted": settings.allowed_origins.is_some(),
        "mints_tokens": settings.dev,
        "login": login,
        "max_payload_bytes": settings.max_payload_bytes,
        "rate_interval_seconds": super::rates::INTERVAL.as_secs_f64(),
        "pages": settings.pages,
    });
    Bytes::from(setup.to_string())
}

/// Every node, this node's rates, groups, presence spaces and recent publishes.
pub(super) async fn state(console: &Console) -> Response {
    let (nodes, missing, bus_error) = match console
        .bus
        .ask_all(Request::Info(proto::InfoRequest {}))
        .await
    {
        Ok(answers) => {
            let nodes = control::merge_info(answers.replies).nodes;
            (nodes, answers.missing, None)
        }
        Err(error) => (Vec::new(), Vec::new(), Some(error.to_string())),
    };
    let nodes: Vec<Value> = nodes
        .into_iter()
        .map(|n| {
            json!({
                "node_id": n.node_id,
                "version": n.version,
                "connections": n.connections,
                "users": n.users,
                "groups": n.groups,
                "subscriptions": n.subscriptions,
                "uptime_seconds": n.uptime_seconds,
                "presence_spaces": n.presence_spaces,
                "presence_members": n.presence_members,
            })
        })
        .collect();
    let groups: Vec<Value> = console
        .hub
        .busiest_groups(LISTED)
        .into_iter()
        .map(|(group, subscribers)| json!({ "group": group, "subscribers": subscribers }))
        .collect();
    let presence = console.presence.as_ref().map(|presence| {
        presence
            .busiest_spaces(LISTED)
            .into_iter()
            .map(|(space, members, here)| {
                json!({ "space": space, "members": members, "here": here })
            })
            .collect::<Vec<_>>()
    });
    let rates = console.rates.series();
    let series: serde_json::Map<String, Value> = rates
        .series
        .into_iter()
        .map(|(name, points)| (name.to_string(), json!(points)))
        .collect();
    let served = console.metrics.console_requests.load(Ordering::Relaxed);
    tracing::debug!(nodes = nodes.len(), "console state");
    json_value(
        StatusCode::OK,
        &json!({
            "nodes": nodes,
            "missing": missing,
            "bus_error": bus_error,
            "rates": { "interval_seconds": rates.interval_seconds, "series": series },
            "groups": groups,
            "presence": presence,
            "recent": console.recent.list(),
            "console_requests": served,
        }),
    )
}

/// The publish form, as the page sends it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishForm {
    /// `group`, `users` or `all_users`.
    target: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    user_ids: Vec<i64>,
    payload: String,
    #[serde(default)]
    skip_history: bool,
    #[serde(default)]
    ignore_web_socket_id: String,
}

/// A publish through the gRPC API's own `Publish`: the same checks, limits and counters.
pub(super) async fn publish(api: &GatewayApi, body: &[u8]) -> Response {
    let form: PublishForm = match serde_json::from_slice(body) {
        Ok(form) => form,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("publish form: {e}")),
    };
    let target = match form.target.as_str() {
        "group" => publish_request::Target::Group(form.group),
        "users" => publish_request::Target::Users(proto::UserTarget {
            user_ids: form.user_ids,
            all_users: false,
        }),
        "all_users" => publish_request::Target::Users(proto::UserTarget {
            user_ids: Vec::new(),
            all_users: true,
        }),
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("target: {other:?}; expected group, users or all_users"),
            );
        }
    };
    let described = match &target {
        publish_request::Target::Group(group) => format!("group {group}"),
        publish_request::Target::Users(users) if users.all_users => "all users".into(),
        publish_request::Target::Users(users) => format!("{} users", users.user_ids.len()),
        publish_request::Target::Individual(_) => "individual".into(),
    };
    let mut request = tonic::Request::new(proto::PublishRequest {
        target: Some(target),
        payload: form.payload,
        skip_history: form.skip_history,
        ignore_web_socket_id: form.ignore_web_socket_id,
        ..Default::default()
    });
    request.extensions_mut().insert(Via::Console);
    match api.publish(request).await {
        Ok(answer) => {
            let event_id = answer.into_inner().event_id;
            tracing::info!(to = %described, event_id, "console publish");
            json_value(StatusCode::OK, &json!({ "event_id": event_id }))
        }
        Err(status) => {
            tracing::info!(to = %described, code = ?status.code(), message = status.message(), "console publish refused");
            let http = match status.code() {
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            json_value(
                http,
                &json!({ "error": status.message(), "code": format!("{:?}", status.code()) }),
            )
        }
    }
}

/// Signs test-socket tokens with the node's JWT secret (`--dev` only).
pub(super) struct Minter {
    secret: String,
    user_id_claim: String,
}

impl Minter {
    pub(super) fn new(settings: &Settings) -> Minter {
        Minter {
            secret: settings.jwt_secret.clone(),
            user_id_claim: settings.jwt_user_id_claim.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MintForm {
    user_id: i64,
}

/// A short-lived token for the test socket: only under `--dev`, whose banner prints the
/// JWT secret anyway. User 0 is anonymous.
pub(super) fn mint(minter: &Option<Minter>, body: &[u8]) -> Response {
    let Some(minter) = minter else {
        return error(
            StatusCode::FORBIDDEN,
            "the console mints tokens under --dev only; paste a token instead",
        );
    };
    let form: MintForm = match serde_json::from_slice(body) {
        Ok(form) => form,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("token form: {e}")),
    };
    let token = match form.user_id {
        0 => "anonymous".to_string(),
        id if id < 0 => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("user_id: {id} is not a user id"),
            );
        }
        id => match sign_access_token(
            minter.secret.as_bytes(),
            &minter.user_id_claim,
            id,
            TEST_TOKEN_SECS,
        ) {
            Ok(token) => token,
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("cannot sign a token: {e}"),
                );
            }
        },
    };
    tracing::info!(user_id = form.user_id, "console minted a test-socket token");
    json_value(
        StatusCode::OK,
        &json!({ "token": token, "expires_in": TEST_TOKEN_SECS }),
    )
}
