//! The client wire protocol (Baserow's `/ws/core/`): frames in, frames out, close codes.
//!
//! Pure: this module turns text into typed [`ClientFrame`]s and typed answers into text.
//! The rest of the gateway never looks at raw client JSON.

use serde_json::{Map, Value, json};

/// A frame a client sent, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// `{"page": "<type>", <param>: <value>, ...}`: subscribe to a page.
    Subscribe {
        page: String,
        params: Map<String, Value>,
    },
    /// `{"remove_page": "<type>", <param>: <value>, ...}`: unsubscribe.
    Unsubscribe {
        page: String,
        params: Map<String, Value>,
    },
    /// `{"type": "ping"}`.
    Ping,
    /// `{"type": "replay_events", "last_seen_id": N, "supports_retry": bool}`.
    /// `last_seen_id` is `None` when missing or not a JSON integer; `supports_retry` is
    /// true only when sent as `true`.
    ReplayEvents {
        last_seen_id: Option<i64>,
        supports_retry: bool,
    },
    /// `{"type": "presence.focus", "page": "<type>", <param>: <value>, ..., "focus": F}`:
    /// where in a held page the client is. `focus` is `Null` when absent; it is checked
    /// against the focus types by the presence rules, not here.
    PresenceFocus {
        page: String,
        params: Map<String, Value>,
        focus: Value,
    },
}

/// Why a client frame could not be understood; sent back as an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The text is not JSON.
    InvalidJson(String),
    /// JSON, but not an object.
    NotAnObject,
    /// A binary frame: the protocol is JSON text only.
    Binary,
    /// An object that is none of the known frames.
    UnknownFrame,
    /// `{"type": X}` with an X the gateway does not know.
    UnknownType(String),
    /// A known frame with a field of the wrong type.
    InvalidField(&'static str),
    /// `remove_page` names a page type the gateway does not know.
    UnknownPage(String),
}

impl FrameError {
    /// The machine-readable `code` of the `error` frame.
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::InvalidJson(_) => "invalid_json",
            FrameError::NotAnObject => "not_an_object",
            FrameError::Binary => "binary_frame",
            FrameError::UnknownFrame => "unknown_frame",
            FrameError::UnknownType(_) => "unknown_type",
            FrameError::InvalidField(_) => "invalid_field",
            FrameError::UnknownPage(_) => "unknown_page",
        }
    }

    /// The human-readable `message` of the `error` frame.
    pub fn message(&self) -> String {
        match self {
            FrameError::InvalidJson(e) => format!("frame is not valid JSON: {e}"),
            FrameError::NotAnObject => "frame must be a JSON object".into(),
            FrameError::Binary => "binary frames are not supported; send JSON text".into(),
            FrameError::UnknownFrame => {
                "frame has none of \"page\", \"remove_page\" or \"type\"".into()
            }
            FrameError::UnknownType(t) => format!("unknown frame type {t:?}"),
            FrameError::InvalidField(f) => format!("field {f:?} has the wrong type"),
            FrameError::UnknownPage(p) => format!("unknown page type {p:?}"),
        }
    }
}

/// Parses one text frame from a client.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| FrameError::InvalidJson(e.to_string()))?;
    let Value::Object(mut object) = value else {
        return Err(FrameError::NotAnObject);
    };
    // Checked before `page`: a focus frame names its page too.
    if object.get("type").and_then(Value::as_str) == Some("presence.focus") {
        object.remove("type");
        let focus = object.remove("focus").unwrap_or(Value::Null);
        let Some(Value::String(page)) = object.remove("page") else {
            return Err(FrameError::InvalidField("page"));
        };
        return Ok(ClientFrame::PresenceFocus {
            page,
            params: object,
            focus,
        });
    }
    if let Some(page) = object.remove("page") {
        let Value::String(page) = page else {
            return Err(FrameError::InvalidField("page"));
        };
        return Ok(ClientFrame::Subscribe {
            page,
            params: object,
        });
    }
    if let Some(page) = object.remove("remove_page") {
        let Value::String(page) = page else {
            return Err(FrameError::InvalidField("remove_page"));
        };
        return Ok(ClientFrame::Unsubscribe {
            page,
            params: object,
        });
    }
    match object.get("type") {
        None => Err(FrameError::UnknownFrame),
        Some(Value::String(t)) if t == "ping" => Ok(ClientFrame::Ping),
        Some(Value::String(t)) if t == "replay_events" => Ok(ClientFrame::ReplayEvents {
            last_seen_id: object.get("last_seen_id").and_then(Value::as_i64),
            supports_retry: object.get("supports_retry") == Some(&Value::Bool(true)),
        }),
        Some(Value::String(t)) => Err(FrameError::UnknownType(t.clone())),
        Some(_) => Err(FrameError::InvalidField("type")),
    }
}

/// Why a page subscription was refused (`page_rejected.reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    UnknownPage,
    InvalidParameters,
    PermissionDenied,
    TooManyPages,
    AuthorizerUnavailable,
}

impl RejectReason {
    /// The wire name of the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::UnknownPage => "unknown_page",
            RejectReason::InvalidParameters => "invalid_parameters",
            RejectReason::PermissionDenied => "permission_denied",
            RejectReason::TooManyPages => "too_many_pages",
            RejectReason::AuthorizerUnavailable => "authorizer_unavailable",
        }
    }

    /// Every reason, for metrics.
    pub const ALL: [RejectReason; 5] = [
        RejectReason::UnknownPage,
        RejectReason::InvalidParameters,
        RejectReason::PermissionDenied,
        RejectReason::TooManyPages,
        RejectReason::AuthorizerUnavailable,
    ];
}

/// Frames the server sends, encoded to JSON text.
pub mod server {
    use super::*;

    /// The first frame of an accepted connection.
    pub fn authenticated(web_socket_id: &str, replay_enabled: bool) -> String {
        json!({
            "type": "authentication",
            "success": true,
            "web_socket_id": web_socket_id,
            "replay_enabled": replay_enabled,
        })
        .to_string()
    }

    /// The only frame of a connection whose token was refused; a close follows.
    pub fn authentication_failed() -> String {
        json!({"type": "authentication", "success": false, "web_socket_id": null}).to_string()
    }

    pub fn page_add(page: &str, parameters: &Value) -> String {
        json!({"type": "page_add", "page": page, "parameters": parameters}).to_string()
    }

    pub fn page_discard(page: &str, parameters: &Value) -> String {
        json!({"type": "page_discard", "page": page, "parameters": parameters}).to_string()
    }

    /// `parameters` are echoed as the client sent them, since a rejected page may have
    /// none that validate.
    pub fn page_rejected(page: &str, parameters: &Value, reason: RejectReason) -> String {
        json!({
            "type": "page_rejected",
            "page": page,
            "parameters": parameters,
            "reason": reason.as_str(),
        })
        .to_string()
    }

    pub fn pong() -> String {
        r#"{"type":"pong"}"#.to_string()
    }

    pub fn error(code: &str, message: &str) -> String {
        json!({"type": "error", "code": code, "message": message}).to_string()
    }

    pub fn force_disconnect() -> String {
        r#"{"type":"force_disconnect"}"#.to_string()
    }

    /// The end of a replay (Baserow's `replay_events_result`).
    pub fn replay_result(force_refresh: bool, latest_event_id: i64) -> String {
        json!({
            "type": "replay_events_result",
            "force_refresh": force_refresh,
            "latest_event_id": latest_event_id,
        })
        .to_string()
    }

    /// A replay the node cannot serve now; the client asks again after `retry_after_ms`.
    pub fn replay_retry(retry_after_ms: u64) -> String {
        json!({"type": "replay_events_retry", "retry_after_ms": retry_after_ms}).to_string()
    }

    /// Who else is in a space, for a member that just joined it.
    pub fn presence_members(space: &str, entries: Vec<Value>) -> String {
        json!({"type": "presence.members", "space": space, "entries": entries}).to_string()
    }

    /// One entry of `presence.members`.
    pub fn presence_entry(user_id: i64, presence_id: &str, focus: &Value) -> Value {
        json!({"user_id": user_id, "presence_id": presence_id, "focus": focus})
    }

    pub fn presence_join(space: &str, user_id: i64, presence_id: &str) -> String {
        json!({
            "type": "presence.join",
            "space": space,
            "user_id": user_id,
            "presence_id": presence_id,
        })
        .to_string()
    }

    pub fn presence_leave(space: &str, user_id: i64, presence_id: &str) -> String {
        json!({
            "type": "presence.leave",
            "space": space,
            "user_id": user_id,
            "presence_id": presence_id,
        })
        .to_string()
    }

    pub fn presence_focus(space: &str, user_id: i64, presence_id: &str, focus: &Value) -> String {
        json!({
            "type": "presence.focus",
            "space": space,
            "user_id": user_id,
            "presence_id": presence_id,
            "focus": focus,
        })
        .to_string()
    }

    /// To a member that left a space while still connected.
    pub fn presence_space_discard(space: &str) -> String {
        json!({"type": "presence.space_discard", "space": space}).to_string()
    }

    /// To anonymous members: whether any signed-in user is in the space.
    pub fn presence_editors_active(space: &str, active: bool) -> String {
        json!({"type": "presence.editors_active", "space": space, "active": active}).to_string()
    }
}

/// Every reason the gateway closes a WebSocket, mapped once to its close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// 1000: the client ended the session.
    Normal,
    /// 1000: the backend disconnected the user (after `force_disconnect`).
    Disconnected,
    /// 1001: the node is shutting down.
    GoingAway,
    /// 1001: the client answered no ping for two ping intervals (a dead or half-open peer).
    Unresponsive,
    /// 1002: the client broke the WebSocket protocol (unmasked frame, bad opcode, ...).
    ProtocolError,
    /// 1007: a text frame that is not valid UTF-8.
    InvalidUtf8,
    /// 1007: a compressed message that does not inflate.
    InvalidPayload,
    /// 1008: authentication failed.
    AuthenticationFailed,
    /// 1008: more frames than the inbound rate limit allows.
    RateLimited,
    /// 1008: the user has `--max-connections-per-user` open already.
    TooManyConnections,
    /// 1008: too many malformed frames in a row.
    RepeatedGarbage,
    /// 1009: a message over the gateway's inbound size limit.
    MessageTooBig,
    /// 1011: an internal error.
    Internal,
    /// 1011: the connect check (`--authorize-connect`) got no answer from the backend.
    ConnectUnconfirmed,
    /// 1012: the node restarts; reconnect.
    Restart,
    /// 4008: the outbound queue overflowed because the client reads too slowly.
    SlowConsumer,
}

impl CloseReason {
    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Normal | CloseReason::Disconnected => 1000,
            CloseReason::GoingAway | CloseReason::Unresponsive => 1001,
            CloseReason::ProtocolError => 1002,
            CloseReason::InvalidUtf8 | CloseReason::InvalidPayload => 1007,
            CloseReason::AuthenticationFailed
            | CloseReason::RateLimited
            | CloseReason::TooManyConnections
            | CloseReason::RepeatedGarbage => 1008,
            CloseReason::MessageTooBig => 1009,
            CloseReason::Internal | CloseReason::ConnectUnconfirmed => 1011,
            CloseReason::Restart => 1012,
            CloseReason::SlowConsumer => 4008,
        }
    }

    /// The close frame's reason text.
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal closure",
            CloseReason::Disconnected => "disconnected by the backend",
            CloseReason::GoingAway => "node shutting down",
            CloseReason::Unresponsive => "no answer to pings",
            CloseReason::ProtocolError => "WebSocket protocol error",
            CloseReason::InvalidUtf8 => "invalid UTF-8 in a text frame",
            CloseReason::InvalidPayload => "a compressed message that does not inflate",
            CloseReason::AuthenticationFailed => "authentication failed",
            CloseReason::RateLimited => "inbound rate limit exceeded",
            CloseReason::TooManyConnections => "too many connections for this user",
            CloseReason::RepeatedGarbage => "too many malformed frames",
            CloseReason::MessageTooBig => "message too big",
            CloseReason::Internal => "internal error",
            CloseReason::ConnectUnconfirmed => "the backend did not confirm the connection",
            CloseReason::Restart => "node restarting",
            CloseReason::SlowConsumer => "slow consumer: outbound queue overflowed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_focus_names_its_page_and_focus() {
        let frame = parse_client_frame(
            r#"{"type":"presence.focus","page":"table","table_id":5,"focus":{"type":"row","row_id":1}}"#,
        )
        .unwrap();
        let ClientFrame::PresenceFocus {
            page,
            params,
            focus,
        } = frame
        else {
            panic!("not a focus frame: {frame:?}");
        };
        assert_eq!(page, "table");
        assert_eq!(Value::Object(params), json!({"table_id": 5}));
        assert_eq!(focus, json!({"type": "row", "row_id": 1}));
        let no_page = parse_client_frame(r#"{"type":"presence.focus","focus":null}"#);
        assert_eq!(no_page, Err(FrameError::InvalidField("page")));
    }

    #[test]
    fn subscribe_keeps_flat_parameters() {
        let frame = parse_client_frame(r#"{"page":"table","table_id":5}"#).unwrap();
        let ClientFrame::Subscribe { page, params } = frame else {
            panic!("not a subscribe: {frame:?}");
        };
        assert_eq!(page, "table");
        assert_eq!(params.get("table_id"), Some(&json!(5)));
        assert_eq!(params.len(), 1);
    }

    #[test]
    fn remove_page_and_ping() {
        assert!(matches!(
            parse_client_frame(r#"{"remove_page":"row","table_id":1,"row_id":2}"#),
            Ok(ClientFrame::Unsubscribe { .. })
        ));
        assert_eq!(
            parse_client_frame(r#"{"type":"ping"}"#),
            Ok(ClientFrame::Ping)
        );
    }

    #[test]
    fn replay_requests_take_any_cursor() {
        let replay = |text: &str| match parse_client_frame(text) {
            Ok(ClientFrame::ReplayEvents {
                last_seen_id,
                supports_retry,
            }) => (last_seen_id, supports_retry),
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(
            replay(r#"{"type":"replay_events","last_seen_id":7,"supports_retry":true}"#),
            (Some(7), true)
        );
        assert_eq!(replay(r#"{"type":"replay_events"}"#), (None, false));
        assert_eq!(
            replay(r#"{"type":"replay_events","last_seen_id":"7","supports_retry":1}"#),
            (None, false)
        );
        assert_eq!(
            replay(r#"{"type":"replay_events","last_seen_id":1.5}"#),
            (None, false)
        );
    }

    #[test]
    fn garbage_is_classified() {
        assert_eq!(parse_client_frame("[1]"), Err(FrameError::NotAnObject));
        assert_eq!(parse_client_frame("{}"), Err(FrameError::UnknownFrame));
        assert_eq!(
            parse_client_frame(r#"{"page":5}"#),
            Err(FrameError::InvalidField("page"))
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"dance"}"#),
            Err(FrameError::UnknownType("dance".into()))
        );
        assert!(matches!(
            parse_client_frame("{not json"),
            Err(FrameError::InvalidJson(_))
        ));
    }

    #[test]
    fn close_codes_are_the_documented_ones() {
        assert_eq!(CloseReason::SlowConsumer.code(), 4008);
        assert_eq!(CloseReason::GoingAway.code(), 1001);
        assert_eq!(CloseReason::RateLimited.code(), 1008);
    }
}
