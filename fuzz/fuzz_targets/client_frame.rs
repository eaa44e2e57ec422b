//! The client frame parser on any text a socket may carry: it answers without panicking,
//! classifies the frame as the protocol says, and a page frame resolves (or is refused)
//! through the default page table as the page specs say. Each input is tried twice: as
//! frame text, and as the bytes of a JSON object built from the protocol's keys (which
//! reaches the frames' fields far sooner than mutated text does).

#![no_main]

use std::sync::LazyLock;

use arbitrary::{Arbitrary, Unstructured};
use channelgate::pages::{PageRegistry, PageSpec};
use channelgate::protocol::{ClientFrame, FrameError, RejectReason, parse_client_frame, server};
use channelgate_fuzz::{Json, check_resolve, default_pages};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

static PAGES: LazyLock<(PageRegistry, Vec<PageSpec>)> = LazyLock::new(default_pages);

/// The keys frames and pages read.
const KEYS: [&str; 12] = [
    "page",
    "focus",
    "remove_page",
    "type",
    "last_seen_id",
    "supports_retry",
    "table_id",
    "row_id",
    "slug",
    "token",
    "dashboard_id",
    "restricted_view_id",
];

#[derive(Debug, Arbitrary)]
enum Key {
    Known(u8),
    Other(String),
}

/// A frame object built from fuzzer bytes.
#[derive(Debug, Arbitrary)]
struct Fields(Vec<(Key, Json)>);

impl Fields {
    fn text(&self) -> String {
        let object: Map<String, Value> = self
            .0
            .iter()
            .map(|(key, Json(value))| {
                let key = match key {
                    Key::Known(i) => KEYS[usize::from(*i) % KEYS.len()].to_string(),
                    Key::Other(key) => key.clone(),
                };
                (key, value.clone())
            })
            .collect();
        Value::Object(object).to_string()
    }
}

/// The frame the protocol makes of a JSON value, from its description in `protocol.rs`.
fn expected_frame(value: Value) -> Result<ClientFrame, FrameError> {
    let Value::Object(mut object) = value else {
        return Err(FrameError::NotAnObject);
    };
    // A focus frame names its page too, so it is told apart first.
    if matches!(object.get("type"), Some(Value::String(t)) if t == "presence.focus") {
        object.remove("type");
        let focus = object.remove("focus").unwrap_or(Value::Null);
        return match object.remove("page") {
            Some(Value::String(page)) => Ok(ClientFrame::PresenceFocus {
                page,
                params: object,
                focus,
            }),
            _ => Err(FrameError::InvalidField("page")),
        };
    }
    for (key, field) in [("page", "page"), ("remove_page", "remove_page")] {
        match object.remove(key) {
            None => continue,
            Some(Value::String(page)) => {
                return Ok(if key == "page" {
                    ClientFrame::Subscribe {
                        page,
                        params: object,
                    }
                } else {
                    ClientFrame::Unsubscribe {
                        page,
                        params: object,
                    }
                });
            }
            Some(_) => return Err(FrameError::InvalidField(field)),
        }
    }
    match object.get("type") {
        None => Err(FrameError::UnknownFrame),
        Some(Value::String(t)) if t == "ping" => Ok(ClientFrame::Ping),
        Some(Value::String(t)) if t == "replay_events" => Ok(ClientFrame::ReplayEvents {
            last_seen_id: match object.get("last_seen_id") {
                Some(Value::Number(n)) => n.as_i64(),
                _ => None,
            },
            supports_retry: matches!(object.get("supports_retry"), Some(Value::Bool(true))),
        }),
        Some(Value::String(t)) => Err(FrameError::UnknownType(t.clone())),
        Some(_) => Err(FrameError::InvalidField("type")),
    }
}

/// A server frame must be one JSON object.
fn object_of(frame: &str) -> Map<String, Value> {
    match serde_json::from_str(frame) {
        Ok(Value::Object(object)) => object,
        other => panic!("server frame {frame:?} is not a JSON object: {other:?}"),
    }
}

/// Parses one frame text and checks the answer.
fn check(text: &str) {
    let parsed = parse_client_frame(text);
    match serde_json::from_str::<Value>(text) {
        Err(_) => assert!(
            matches!(parsed, Err(FrameError::InvalidJson(_))),
            "{text:?} is not JSON, yet parsed as {parsed:?}"
        ),
        Ok(value) => assert_eq!(parsed, expected_frame(value), "{text:?}"),
    }
    match &parsed {
        Err(error) => {
            // The error frame the session sends back stays one JSON object.
            assert!(!error.code().is_empty() && !error.message().is_empty());
            let frame = object_of(&server::error(error.code(), &error.message()));
            assert_eq!(frame["code"], error.code());
            assert_eq!(frame["message"], error.message().as_str());
        }
        Ok(
            ClientFrame::Subscribe { page, params }
            | ClientFrame::Unsubscribe { page, params }
            | ClientFrame::PresenceFocus { page, params, .. },
        ) => {
            assert!(!params.contains_key("page"));
            let (registry, specs) = &*PAGES;
            check_resolve(registry, specs, page, params);
            let echoed = Value::Object(params.clone());
            let frame = object_of(&server::page_rejected(
                page,
                &echoed,
                RejectReason::InvalidParameters,
            ));
            assert_eq!(frame["page"], page.as_str());
        }
        Ok(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // A WebSocket text frame is UTF-8; the transport refuses anything else before parsing.
    if let Ok(text) = std::str::from_utf8(data) {
        check(text);
    }
    if let Ok(fields) = Fields::arbitrary_take_rest(Unstructured::new(data)) {
        check(&fields.text());
    }
});
