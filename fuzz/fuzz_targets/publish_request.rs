//! The publish checks on any `PublishRequest`: a group, users or individual target with
//! payloads of any shape (mostly JSON objects, with or without a string `type`). The
//! checks must accept exactly the requests the API documents, name the culprit field
//! when they refuse, keep payloads verbatim, and what they accept must survive the trip
//! to other nodes and frame into JSON carrying its `_event_id`.

#![no_main]

use std::collections::BTreeSet;
use std::fmt;

use arbitrary::Arbitrary;
use channelgate::event::{self, EVERYONE_GROUP, Event, Target};
use channelgate::outbox::Frame;
use channelgate::proto::{
    IndividualTarget, PublishRequest, UserTarget, publish_request::Target as RequestTarget,
};
use channelgate_fuzz::Json;
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

#[derive(Debug, Arbitrary)]
struct Input {
    target: Option<TargetIn>,
    payload: PayloadIn,
    ignore_web_socket_id: String,
    exclude_user_ids: Vec<i64>,
    skip_history: bool,
    max_payload_bytes: MaxBytes,
    event_id: u64,
    probes: Vec<(Socket, i64)>,
}

#[derive(Debug, Arbitrary)]
enum TargetIn {
    Group(GroupIn),
    Users { user_ids: Vec<i64>, all_users: bool },
    Individual(Vec<(i64, PayloadIn)>),
}

#[derive(Debug, Arbitrary)]
enum GroupIn {
    Known(u8),
    Other(String),
}

#[derive(Debug, Arbitrary)]
enum PayloadIn {
    Object {
        kind: Kind,
        /// A second `type` key, written before the first.
        again: Option<Kind>,
        fields: Vec<(String, Json)>,
        before: Vec<Space>,
        after: Vec<Space>,
    },
    Raw(String),
}

#[derive(Debug, Arbitrary)]
enum Kind {
    Text(String),
    NotAString(Json),
    Missing,
}

/// JSON's whitespace, and two characters that Rust's `trim` takes for whitespace but
/// JSON does not.
#[derive(Debug, Arbitrary)]
enum Space {
    Space,
    Tab,
    Newline,
    Return,
    NoBreak,
    LineSeparator,
}

#[derive(Debug, Arbitrary)]
enum MaxBytes {
    Default,
    Small(u16),
}

#[derive(Debug, Arbitrary)]
enum Socket {
    /// The request's `ignore_web_socket_id`.
    Ignored,
    Other(String),
}

impl GroupIn {
    fn name(&self) -> String {
        let known = [
            "table-1".to_string(),
            EVERYONE_GROUP.to_string(),
            "view-abc_D-1".to_string(),
            String::new(),
            "a b".to_string(),
            "x".repeat(255),
            "x".repeat(256),
            "é".to_string(),
            "tab\t".to_string(),
        ];
        match self {
            GroupIn::Known(i) => known[usize::from(*i) % known.len()].clone(),
            GroupIn::Other(name) => name.clone(),
        }
    }
}

impl Kind {
    fn json(&self) -> Option<Value> {
        match self {
            Kind::Text(text) => Some(Value::from(text.as_str())),
            Kind::NotAString(Json(value)) => Some(value.clone()),
            Kind::Missing => None,
        }
    }
}

impl Space {
    fn char(&self) -> char {
        match self {
            Space::Space => ' ',
            Space::Tab => '\t',
            Space::Newline => '\n',
            Space::Return => '\r',
            Space::NoBreak => '\u{a0}',
            Space::LineSeparator => '\u{2028}',
        }
    }
}

impl PayloadIn {
    fn text(&self) -> String {
        match self {
            PayloadIn::Raw(text) => text.clone(),
            PayloadIn::Object {
                kind,
                again,
                fields,
                before,
                after,
            } => {
                let mut object: Map<String, Value> = fields
                    .iter()
                    .map(|(name, Json(value))| (name.clone(), value.clone()))
                    .collect();
                match kind.json() {
                    Some(kind) => object.insert("type".into(), kind),
                    None => object.remove("type"),
                };
                let mut text = Value::Object(object).to_string();
                if let Some(again) = again.as_ref().and_then(Kind::json) {
                    let rest = &text[1..];
                    let comma = if rest == "}" { "" } else { "," };
                    text = format!(r#"{{"type":{again}{comma}{rest}"#);
                }
                let spaces = |spaces: &[Space]| spaces.iter().map(Space::char).collect::<String>();
                format!("{}{text}{}", spaces(before), spaces(after))
            }
        }
    }
}

impl Input {
    fn request(&self) -> PublishRequest {
        let target = self.target.as_ref().map(|target| match target {
            TargetIn::Group(group) => RequestTarget::Group(group.name()),
            TargetIn::Users {
                user_ids,
                all_users,
            } => RequestTarget::Users(UserTarget {
                user_ids: user_ids.clone(),
                all_users: *all_users,
            }),
            TargetIn::Individual(payloads) => RequestTarget::Individual(IndividualTarget {
                payloads: payloads
                    .iter()
                    .map(|(user_id, payload)| (*user_id, payload.text()))
                    .collect(),
            }),
        });
        PublishRequest {
            target,
            payload: self.payload.text(),
            ignore_web_socket_id: self.ignore_web_socket_id.clone(),
            exclude_user_ids: self.exclude_user_ids.clone(),
            skip_history: self.skip_history,
        }
    }

    fn max_payload_bytes(&self) -> usize {
        match self.max_payload_bytes {
            MaxBytes::Default => 1 << 20,
            MaxBytes::Small(max) => usize::from(max),
        }
    }
}

/// The top-level `type` keys of a JSON object: how many, and whether the last is a string.
struct TypeKeys {
    count: usize,
    string: bool,
}

impl<'de> Deserialize<'de> for TypeKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = TypeKeys;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TypeKeys, A::Error> {
                let mut keys = TypeKeys {
                    count: 0,
                    string: false,
                };
                while let Some(key) = map.next_key::<String>()? {
                    if key == "type" {
                        keys.count += 1;
                        keys.string = map.next_value::<Value>()?.is_string();
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(keys)
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

/// Whether a payload must be accepted (`Some(true)`), refused (`Some(false)`), or may be
/// either: JSON that serde_json checks for syntax but cannot hold as a `Value` (a lone
/// surrogate, a number out of range), which the API neither promises nor rules out.
fn payload_verdict(payload: &str, max_bytes: usize) -> Option<bool> {
    if payload.len() > max_bytes || serde_json::from_str::<IgnoredAny>(payload).is_err() {
        return Some(false);
    }
    match serde_json::from_str::<Value>(payload) {
        Ok(Value::Object(_)) => {}
        Ok(_) => return Some(false),
        Err(_) => return None,
    }
    let keys = serde_json::from_str::<TypeKeys>(payload).ok()?;
    Some(keys.count == 1 && keys.string)
}

fn group_is_valid(group: &str) -> bool {
    (1..=255).contains(&group.len()) && group.bytes().all(|b| b.is_ascii_graphic())
}

/// What `from_request` must answer: `Ok`, or an error naming one of these fields; `None`
/// where a payload's verdict is open.
fn expected(request: &PublishRequest, max_bytes: usize) -> Option<Result<(), BTreeSet<String>>> {
    let refuse = |field: &str| Some(Err(BTreeSet::from([field.to_string()])));
    let payload = || match payload_verdict(&request.payload, max_bytes)? {
        true => Some(Ok(())),
        false => refuse("payload"),
    };
    let exclusions = !request.exclude_user_ids.is_empty();
    match request.target.as_ref() {
        None => refuse("target"),
        Some(RequestTarget::Group(group)) if !group_is_valid(group) => refuse("group"),
        Some(RequestTarget::Group(_)) => payload(),
        Some(RequestTarget::Users(_)) if exclusions => refuse("exclude_user_ids"),
        Some(RequestTarget::Users(users)) => match payload()? {
            Err(fields) => Some(Err(fields)),
            Ok(()) if users.all_users => Some(Ok(())),
            Ok(()) if users.user_ids.is_empty() || users.user_ids.iter().any(|id| *id < 0) => {
                refuse("users.user_ids")
            }
            Ok(()) => Some(Ok(())),
        },
        Some(RequestTarget::Individual(_)) if exclusions => refuse("exclude_user_ids"),
        Some(RequestTarget::Individual(individual)) if individual.payloads.is_empty() => {
            refuse("individual.payloads")
        }
        Some(RequestTarget::Individual(individual)) => {
            let mut bad = BTreeSet::new();
            for (user_id, payload) in &individual.payloads {
                let valid = *user_id >= 0 && payload_verdict(payload, max_bytes)?;
                if !valid {
                    bad.insert(format!("individual.payloads[{user_id}]"));
                }
            }
            Some(if bad.is_empty() { Ok(()) } else { Err(bad) })
        }
    }
}

/// The payloads an accepted event carries.
fn payloads(event: &Event) -> Vec<&str> {
    match &event.target {
        Target::Group { payload, .. }
        | Target::Everyone { payload, .. }
        | Target::Users { payload, .. } => vec![payload.as_str()],
        Target::Individual { payloads } => payloads.iter().map(|(_, p)| p.as_str()).collect(),
    }
}

/// An accepted payload framed with `id`: the frame's text, which must still be JSON and,
/// with an id, end in that `_event_id`.
fn check_framing(payload: &str, id: u64) {
    let frame = Frame::event(payload, id);
    let wire = frame.wire();
    let header = match wire[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let body = std::str::from_utf8(&wire[header..]).expect("a text frame is UTF-8");
    if id == 0 {
        assert_eq!(body, payload);
        return;
    }
    let opening = payload.trim_end().strip_suffix('}').expect("an object");
    assert_eq!(body, format!("{opening},\"_event_id\":{id}}}"));
    assert!(
        serde_json::from_str::<IgnoredAny>(body).is_ok(),
        "{body:?} framed from {payload:?} is not JSON"
    );
    if serde_json::from_str::<Value>(payload).is_ok() {
        let framed: Value = serde_json::from_str(body).expect("checked above");
        assert_eq!(framed["_event_id"], Value::from(id), "{body:?}");
    }
}

/// What an accepted event must be, given the request it came from.
fn check_accepted(input: &Input, request: &PublishRequest, event: &Event, max_bytes: usize) {
    assert_eq!(event.id, 0);
    assert_eq!(event.record, !request.skip_history);
    assert_eq!(
        event.ignore_web_socket_id.as_deref(),
        Some(request.ignore_web_socket_id.as_str()).filter(|id| !id.is_empty())
    );
    for payload in payloads(event) {
        assert!(payload.len() <= max_bytes);
        assert!(
            payload
                .trim_start_matches([' ', '\t', '\n', '\r'])
                .starts_with('{')
        );
        assert_ne!(
            payload_verdict(payload, max_bytes),
            Some(false),
            "{payload:?}"
        );
        check_framing(payload, input.event_id);
    }
    match (request.target.as_ref().expect("a target"), &event.target) {
        (
            RequestTarget::Group(name),
            Target::Group {
                group,
                exclude_user_ids,
                payload,
            },
        ) => {
            assert_ne!(name, EVERYONE_GROUP);
            assert_eq!(group, name);
            assert_eq!(exclude_user_ids, &request.exclude_user_ids);
            assert_eq!(payload.as_str(), request.payload);
        }
        (
            RequestTarget::Group(name),
            Target::Everyone {
                exclude_user_ids,
                payload,
            },
        ) => {
            assert_eq!(name, EVERYONE_GROUP);
            assert_eq!(exclude_user_ids, &request.exclude_user_ids);
            assert_eq!(payload.as_str(), request.payload);
        }
        (
            RequestTarget::Users(users),
            Target::Everyone {
                exclude_user_ids,
                payload,
            },
        ) => {
            assert!(users.all_users && exclude_user_ids.is_empty());
            assert_eq!(payload.as_str(), request.payload);
        }
        (RequestTarget::Users(users), Target::Users { user_ids, payload }) => {
            assert!(!users.all_users);
            let wanted: Vec<i64> = BTreeSet::from_iter(users.user_ids.iter().copied())
                .into_iter()
                .collect();
            assert_eq!(user_ids, &wanted, "sorted, without duplicates");
            assert!(user_ids.iter().all(|id| *id >= 0));
            assert_eq!(payload.as_str(), request.payload);
        }
        (RequestTarget::Individual(individual), Target::Individual { payloads }) => {
            let mut wanted: Vec<(i64, &str)> = individual
                .payloads
                .iter()
                .map(|(user_id, payload)| (*user_id, payload.as_str()))
                .collect();
            wanted.sort_unstable();
            let got: Vec<(i64, &str)> = payloads.iter().map(|(u, p)| (*u, p.as_str())).collect();
            assert_eq!(got, wanted);
        }
        (request, event) => panic!("{request:?} became {event:?}"),
    }

    // Across nodes: to the request and back, and through the bus bytes with an id.
    assert_eq!(
        Event::from_trusted(event.to_request()).as_ref(),
        Some(event)
    );
    let mut numbered = event.clone();
    numbered.id = input.event_id;
    let bytes = prost::Message::encode_to_vec(&numbered.to_bus());
    assert_eq!(Event::from_bus(&bytes), Some(numbered));

    // Who gets what, by Baserow's rules.
    for (socket, user_id) in &input.probes {
        let socket = match socket {
            Socket::Ignored => request.ignore_web_socket_id.as_str(),
            Socket::Other(id) => id.as_str(),
        };
        let ignored = event.ignore_web_socket_id.as_deref() == Some(socket);
        let wanted: Option<&str> = match &event.target {
            _ if ignored => None,
            Target::Group {
                exclude_user_ids,
                payload,
                ..
            }
            | Target::Everyone {
                exclude_user_ids,
                payload,
            } => (!exclude_user_ids.contains(user_id)).then_some(payload.as_str()),
            Target::Users { user_ids, payload } => {
                user_ids.contains(user_id).then_some(payload.as_str())
            }
            Target::Individual { .. } => match request.target.as_ref() {
                Some(RequestTarget::Individual(individual)) => {
                    individual.payloads.get(user_id).map(String::as_str)
                }
                _ => unreachable!("checked above"),
            },
        };
        assert_eq!(
            event.payload_for(socket, *user_id).map(|p| p.as_str()),
            wanted,
            "socket {socket:?}, user {user_id}"
        );
    }
}

fuzz_target!(|input: Input| {
    let request = input.request();
    let max_bytes = input.max_payload_bytes();
    let verdict = expected(&request, max_bytes);
    match event::from_request(request.clone(), max_bytes) {
        Ok(event) => {
            if let Some(verdict) = &verdict {
                assert_eq!(verdict, &Ok(()), "{request:?} was accepted");
            }
            check_accepted(&input, &request, &event, max_bytes);
        }
        Err(error) => {
            assert!(!error.message.is_empty());
            assert_eq!(
                error.to_string(),
                format!("{}: {}", error.field, error.message)
            );
            match &verdict {
                Some(Ok(())) => panic!("{request:?} was refused: {error}"),
                Some(Err(fields)) => assert!(
                    fields.contains(&error.field),
                    "{request:?} refused for {error}, not for one of {fields:?}"
                ),
                // An open payload verdict: the field is still one the request has.
                None => assert!(
                    ["payload", "users.user_ids"].contains(&error.field.as_str())
                        || error.field.starts_with("individual.payloads["),
                    "{error}"
                ),
            }
            let within = error.clone().within("events[0]");
            assert_eq!(within.field, format!("events[0].{}", error.field));
        }
    }
});
