//! Published events: a publish request checked and turned into payloads ready to send.
//!
//! Pure. Each payload is validated once here and becomes one shared [`Payload`]; the hub
//! and the bus never look inside it again.

use std::borrow::Cow;

use serde::Deserialize;

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::proto::{self, publish_request};

/// A checked payload, shared by every recipient (reference counted, never copied).
pub type Payload = Utf8Bytes;

/// The group that means every connection, as in Baserow.
pub const EVERYONE_GROUP: &str = "users";

/// Longest accepted group name, in bytes.
const MAX_GROUP_LEN: usize = 255;

/// Longest accepted idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

/// An event ready for delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub target: Target,
    /// The socket that caused the event; it does not receive it.
    pub ignore_web_socket_id: Option<String>,
    /// Whether the event history keeps it (false: Baserow's `record=False`).
    pub record: bool,
    /// Its id in the event history, given when it is recorded; 0 until then, and for ever
    /// when it is not recorded. Delivered payloads carry it as `_event_id`.
    pub id: u64,
    /// The caller's key for this event: seen again within the idempotency window, the
    /// publish answers the first id and publishes nothing. Not carried to other nodes.
    pub idempotency_key: Option<String>,
    /// Not an event but a mark that events for this target were lost before they reached
    /// the gateway: its sockets are closed to reconnect and refresh, and the history keeps
    /// a gap (a replay across it answers `force_refresh`). Its payload is empty.
    pub lost: bool,
}

/// Who receives an event, with its payload(s).
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Members of one channel group, but not these users.
    Group {
        group: String,
        exclude_user_ids: Vec<i64>,
        payload: Payload,
    },
    /// Every connection (the `users` group, or `all_users`), but not these users.
    Everyone {
        exclude_user_ids: Vec<i64>,
        payload: Payload,
    },
    /// Every connection of these users (sorted, without duplicates).
    Users {
        user_ids: Vec<i64>,
        payload: Payload,
    },
    /// A payload of its own for each user.
    Individual { payloads: Vec<(i64, Payload)> },
}

/// A publish request that cannot be delivered; `field` names the culprit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidEvent {
    pub field: String,
    pub message: String,
}

impl InvalidEvent {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        InvalidEvent {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Prefixes the field, for events inside a batch: `events[3].payload`.
    pub fn within(self, prefix: &str) -> Self {
        InvalidEvent {
            field: format!("{prefix}.{}", self.field),
            message: self.message,
        }
    }
}

impl std::fmt::Display for InvalidEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Checks a publish request and its payload(s).
pub fn from_request(
    request: proto::PublishRequest,
    max_payload_bytes: usize,
) -> Result<Event, InvalidEvent> {
    let proto::PublishRequest {
        target,
        payload,
        ignore_web_socket_id,
        exclude_user_ids,
        skip_history,
        idempotency_key,
        lost,
    } = request;
    let idempotency_key = check_idempotency_key(idempotency_key)?;
    let checked = |field: &str, payload: String| {
        if lost {
            // A mark carries no event.
            return if payload.is_empty() {
                Ok(Payload::from(""))
            } else {
                Err(InvalidEvent::new(field, "must be empty with lost"))
            };
        }
        check_payload(field, payload, max_payload_bytes)
    };
    let exclusions_unused = |target: &str| {
        if exclude_user_ids.is_empty() {
            Ok(())
        } else {
            Err(InvalidEvent::new(
                "exclude_user_ids",
                format!("applies to a group target only, not to {target}"),
            ))
        }
    };
    let target = match target {
        None => {
            return Err(InvalidEvent::new(
                "target",
                "one of group, users or individual is required",
            ));
        }
        Some(publish_request::Target::Group(group)) => {
            check_group(&group)?;
            let payload = checked("payload", payload)?;
            if group == EVERYONE_GROUP {
                Target::Everyone {
                    exclude_user_ids,
                    payload,
                }
            } else {
                Target::Group {
                    group,
                    exclude_user_ids,
                    payload,
                }
            }
        }
        Some(publish_request::Target::Users(users)) => {
            exclusions_unused("users")?;
            let payload = checked("payload", payload)?;
            if users.all_users {
                Target::Everyone {
                    exclude_user_ids: Vec::new(),
                    payload,
                }
            } else {
                let mut user_ids = users.user_ids;
                if user_ids.is_empty() {
                    return Err(InvalidEvent::new(
                        "users.user_ids",
                        "is empty and all_users is false",
                    ));
                }
                if let Some(bad) = user_ids.iter().find(|id| **id < 0) {
                    return Err(InvalidEvent::new(
                        "users.user_ids",
                        format!("{bad} is not a user id"),
                    ));
                }
                user_ids.sort_unstable();
                user_ids.dedup();
                Target::Users { user_ids, payload }
            }
        }
        Some(publish_request::Target::Individual(_)) if lost => {
            return Err(InvalidEvent::new(
                "individual",
                "a lost mark takes a group or users target",
            ));
        }
        Some(publish_request::Target::Individual(individual)) => {
            exclusions_unused("individual")?;
            if individual.payloads.is_empty() {
                return Err(InvalidEvent::new(
                    "individual.payloads",
                    "must not be empty",
                ));
            }
            let mut payloads = Vec::with_capacity(individual.payloads.len());
            for (user_id, payload) in individual.payloads {
                let field = format!("individual.payloads[{user_id}]");
                if user_id < 0 {
                    return Err(InvalidEvent::new(field, "is not a user id"));
                }
                payloads.push((user_id, checked(&field, payload)?));
            }
            payloads.sort_unstable_by_key(|(user_id, _)| *user_id);
            Target::Individual { payloads }
        }
    };
    Ok(Event {
        target,
        ignore_web_socket_id: Some(ignore_web_socket_id).filter(|id| !id.is_empty()),
        record: !skip_history,
        id: 0,
        idempotency_key,
        lost,
    })
}

/// An idempotency key is 1-128 printable ASCII characters; empty means none.
fn check_idempotency_key(key: String) -> Result<Option<String>, InvalidEvent> {
    if key.is_empty() {
        return Ok(None);
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(InvalidEvent::new(
            "idempotency_key",
            format!(
                "is {} bytes; the limit is {MAX_IDEMPOTENCY_KEY_LEN}",
                key.len()
            ),
        ));
    }
    if !key.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(InvalidEvent::new(
            "idempotency_key",
            "must be printable ASCII",
        ));
    }
    Ok(Some(key))
}

impl Event {
    /// The event as a publish request, to carry it to other nodes.
    pub fn to_request(&self) -> proto::PublishRequest {
        let mut request = proto::PublishRequest {
            ignore_web_socket_id: self.ignore_web_socket_id.clone().unwrap_or_default(),
            skip_history: !self.record,
            lost: self.lost,
            ..Default::default()
        };
        match &self.target {
            Target::Group {
                group,
                exclude_user_ids,
                payload,
            } => {
                request.target = Some(publish_request::Target::Group(group.clone()));
                request.exclude_user_ids = exclude_user_ids.clone();
                request.payload = payload.as_str().to_string();
            }
            Target::Everyone {
                exclude_user_ids,
                payload,
            } => {
                request.target = Some(publish_request::Target::Group(EVERYONE_GROUP.into()));
                request.exclude_user_ids = exclude_user_ids.clone();
                request.payload = payload.as_str().to_string();
            }
            Target::Users { user_ids, payload } => {
                request.target = Some(publish_request::Target::Users(proto::UserTarget {
                    user_ids: user_ids.clone(),
                    all_users: false,
                }));
                request.payload = payload.as_str().to_string();
            }
            Target::Individual { payloads } => {
                let payloads = payloads
                    .iter()
                    .map(|(user_id, payload)| (*user_id, payload.as_str().to_string()))
                    .collect();
                request.target = Some(publish_request::Target::Individual(
                    proto::IndividualTarget { payloads },
                ));
            }
        }
        request
    }

    /// The event as the bus carries and the history keeps it.
    pub fn to_bus(&self) -> proto::BusEvent {
        proto::BusEvent {
            event: Some(self.to_request()),
            event_id: self.id,
            position: 0,
        }
    }

    /// Rebuilds an event from [`Event::to_bus`] bytes (with the id Redis appended).
    pub fn from_bus(bytes: &[u8]) -> Option<Event> {
        Event::from_bus_positioned(bytes).map(|(event, _)| event)
    }

    /// Rebuilds an event and its position among the ids: its id, or for an event that is
    /// not recorded the position a Redis Cluster gave it (0: none).
    pub fn from_bus_positioned(bytes: &[u8]) -> Option<(Event, u64)> {
        let bus = <proto::BusEvent as prost::Message>::decode(bytes).ok()?;
        let mut event = Event::from_trusted(bus.event?)?;
        event.id = bus.event_id;
        let position = if bus.event_id != 0 {
            bus.event_id
        } else {
            bus.position
        };
        Some((event, position))
    }

    /// What one socket gets of this event, by Baserow's rules: `None` for the socket that
    /// caused it, for excluded users and for users it is not addressed to. A group event
    /// is assumed to reach a member of its group.
    pub fn payload_for(&self, web_socket_id: &str, user_id: i64) -> Option<&Payload> {
        if self.ignore_web_socket_id.as_deref() == Some(web_socket_id) {
            return None;
        }
        match &self.target {
            Target::Group {
                exclude_user_ids,
                payload,
                ..
            }
            | Target::Everyone {
                exclude_user_ids,
                payload,
            } => (!exclude_user_ids.contains(&user_id)).then_some(payload),
            Target::Users { user_ids, payload } => {
                user_ids.binary_search(&user_id).is_ok().then_some(payload)
            }
            Target::Individual { payloads } => payloads
                .binary_search_by_key(&user_id, |(user, _)| *user)
                .ok()
                .map(|i| &payloads[i].1),
        }
    }

    /// Rebuilds an event another node validated and sent with [`Event::to_request`]; its
    /// payloads are not parsed again. `None` when the request has no target.
    pub fn from_trusted(request: proto::PublishRequest) -> Option<Event> {
        let payload = || Payload::from(request.payload.clone());
        let target = match request.target? {
            publish_request::Target::Group(group) if group == EVERYONE_GROUP => Target::Everyone {
                exclude_user_ids: request.exclude_user_ids.clone(),
                payload: payload(),
            },
            publish_request::Target::Group(group) => Target::Group {
                group,
                exclude_user_ids: request.exclude_user_ids.clone(),
                payload: payload(),
            },
            publish_request::Target::Users(users) if users.all_users => Target::Everyone {
                exclude_user_ids: Vec::new(),
                payload: payload(),
            },
            publish_request::Target::Users(users) => {
                let mut user_ids = users.user_ids;
                user_ids.sort_unstable();
                Target::Users {
                    user_ids,
                    payload: payload(),
                }
            }
            publish_request::Target::Individual(individual) => {
                let mut payloads: Vec<_> = individual
                    .payloads
                    .into_iter()
                    .map(|(user_id, payload)| (user_id, Payload::from(payload)))
                    .collect();
                payloads.sort_unstable_by_key(|(user_id, _)| *user_id);
                Target::Individual { payloads }
            }
        };
        Some(Event {
            target,
            ignore_web_socket_id: Some(request.ignore_web_socket_id).filter(|id| !id.is_empty()),
            record: !request.skip_history,
            id: 0,
            idempotency_key: None,
            lost: request.lost,
        })
    }
}

fn check_group(group: &str) -> Result<(), InvalidEvent> {
    if group.is_empty() {
        return Err(InvalidEvent::new("group", "must not be empty"));
    }
    if group.len() > MAX_GROUP_LEN {
        return Err(InvalidEvent::new(
            "group",
            format!("is {} bytes; the limit is {MAX_GROUP_LEN}", group.len()),
        ));
    }
    if !group.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(InvalidEvent::new(
            "group",
            "must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

/// Only `type` is read; the rest of the object is checked for syntax and then ignored.
#[derive(Deserialize)]
struct TypedObject<'a> {
    #[serde(rename = "type", borrow)]
    _kind: Cow<'a, str>,
}

/// A payload must be a JSON object with a string `type`; it is then sent verbatim.
fn check_payload(field: &str, payload: String, max_bytes: usize) -> Result<Payload, InvalidEvent> {
    if payload.len() > max_bytes {
        return Err(InvalidEvent::new(
            field,
            format!("is {} bytes; the limit is {max_bytes}", payload.len()),
        ));
    }
    if !payload.trim_start().starts_with('{') {
        return Err(InvalidEvent::new(field, "must be a JSON object"));
    }
    serde_json::from_str::<TypedObject>(&payload).map_err(|e| {
        InvalidEvent::new(
            field,
            format!("must be a JSON object with a string \"type\": {e}"),
        )
    })?;
    Ok(Payload::from(payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{IndividualTarget, PublishRequest, UserTarget};

    fn group(name: &str, payload: &str) -> PublishRequest {
        PublishRequest {
            target: Some(publish_request::Target::Group(name.into())),
            payload: payload.into(),
            ..Default::default()
        }
    }

    fn field_of(request: PublishRequest) -> String {
        from_request(request, 1024).unwrap_err().field
    }

    #[test]
    fn a_group_event_keeps_its_payload_verbatim() {
        let event = from_request(group("table-1", r#"{"type":"x", "n": 1}"#), 1024).unwrap();
        let Target::Group { group, payload, .. } = event.target else {
            panic!("not a group target");
        };
        assert_eq!(group, "table-1");
        assert_eq!(payload.as_str(), r#"{"type":"x", "n": 1}"#);
        assert_eq!(event.ignore_web_socket_id, None);
    }

    #[test]
    fn the_users_group_means_everyone() {
        let event = from_request(group("users", r#"{"type":"x"}"#), 1024).unwrap();
        assert!(matches!(event.target, Target::Everyone { .. }));
    }

    #[test]
    fn events_survive_the_trip_between_nodes() {
        let requests = [
            PublishRequest {
                exclude_user_ids: vec![3],
                ignore_web_socket_id: "tab".into(),
                ..group("table-1", r#"{"type":"x"}"#)
            },
            group("users", r#"{"type":"x"}"#),
            PublishRequest {
                target: Some(publish_request::Target::Users(UserTarget {
                    user_ids: vec![2, 1],
                    all_users: false,
                })),
                payload: r#"{"type":"u"}"#.into(),
                ..Default::default()
            },
            PublishRequest {
                target: Some(publish_request::Target::Individual(IndividualTarget {
                    payloads: [
                        (1, r#"{"type":"a"}"#.to_string()),
                        (2, r#"{"type":"b"}"#.to_string()),
                    ]
                    .into(),
                })),
                ..Default::default()
            },
        ];
        for request in requests {
            let mut event = from_request(request, 1024).unwrap();
            assert_eq!(Event::from_trusted(event.to_request()), Some(event.clone()));
            event.id = 7;
            let bytes = prost::Message::encode_to_vec(&event.to_bus());
            assert_eq!(Event::from_bus(&bytes), Some(event));
        }
    }

    #[test]
    fn an_id_appended_to_the_bus_bytes_is_the_events_id() {
        // What the Redis script does: field 2 (varint) after the event's own bytes.
        let event = from_request(group("table-1", r#"{"type":"x"}"#), 1024).unwrap();
        let mut bytes = prost::Message::encode_to_vec(&event.to_bus());
        bytes.extend_from_slice(&[0x10, 0xac, 0x02]);
        assert_eq!(Event::from_bus(&bytes).map(|e| e.id), Some(300));
    }

    #[test]
    fn skip_history_is_kept_across_nodes() {
        let request = PublishRequest {
            skip_history: true,
            ..group("table-1", r#"{"type":"x"}"#)
        };
        let event = from_request(request, 1024).unwrap();
        assert!(!event.record);
        assert_eq!(Event::from_trusted(event.to_request()), Some(event));
    }

    #[test]
    fn each_socket_gets_what_baserow_would_send_it() {
        let of = |request: PublishRequest| from_request(request, 1024).unwrap();
        let grouped = of(PublishRequest {
            exclude_user_ids: vec![3],
            ignore_web_socket_id: "mine".into(),
            ..group("table-1", r#"{"type":"g"}"#)
        });
        assert!(grouped.payload_for("other", 1).is_some());
        assert!(grouped.payload_for("mine", 1).is_none());
        assert!(grouped.payload_for("other", 3).is_none());
        let users = of(PublishRequest {
            target: Some(publish_request::Target::Users(UserTarget {
                user_ids: vec![9, 2],
                all_users: false,
            })),
            payload: r#"{"type":"u"}"#.into(),
            ..Default::default()
        });
        assert!(users.payload_for("s", 2).is_some());
        assert!(users.payload_for("s", 5).is_none());
        let individual = of(PublishRequest {
            target: Some(publish_request::Target::Individual(IndividualTarget {
                payloads: [
                    (1, r#"{"type":"a"}"#.to_string()),
                    (2, r#"{"type":"b"}"#.to_string()),
                ]
                .into(),
            })),
            ..Default::default()
        });
        assert_eq!(
            individual.payload_for("s", 2).map(|p| p.as_str()),
            Some(r#"{"type":"b"}"#)
        );
        assert!(individual.payload_for("s", 3).is_none());
    }

    #[test]
    fn bad_requests_name_their_field() {
        assert_eq!(field_of(PublishRequest::default()), "target");
        assert_eq!(field_of(group("", r#"{"type":"x"}"#)), "group");
        assert_eq!(field_of(group("a b", r#"{"type":"x"}"#)), "group");
        for payload in ["", "[1]", "{}", r#"{"type":1}"#, "{\"type\":\"x\"", "\"s\""] {
            assert_eq!(field_of(group("g", payload)), "payload", "{payload}");
        }
        let big = format!(r#"{{"type":"x","pad":"{}"}}"#, "a".repeat(2000));
        assert_eq!(field_of(group("g", &big)), "payload");
        let users = PublishRequest {
            target: Some(publish_request::Target::Users(UserTarget::default())),
            payload: r#"{"type":"x"}"#.into(),
            ..Default::default()
        };
        assert_eq!(field_of(users), "users.user_ids");
        let individual = PublishRequest {
            target: Some(publish_request::Target::Individual(IndividualTarget {
                payloads: [(3, "nope".to_string())].into(),
            })),
            ..Default::default()
        };
        assert_eq!(field_of(individual), "individual.payloads[3]");
    }
}
