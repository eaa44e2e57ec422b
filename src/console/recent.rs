//! The last events published through this node (its gRPC API and its console), for the
//! console's "recent publishes" list.
//!
//! Noting an event costs a lock and a reference count: a payload is kept by reference
//! (payloads are shared, never copied) unless it is large, when only its start is copied,
//! so the list holds at most [`KEEP`] times [`KEEP_WHOLE_BYTES`]. Its type and the excerpt
//! shown are worked out when the console asks, not on the publish path.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::event::{Event, Payload, Target};

/// Publishes kept.
pub const KEEP: usize = 50;
/// Payloads up to this size are kept whole (by reference); larger ones by their start.
const KEEP_WHOLE_BYTES: usize = 16 << 10;
/// Characters of a payload shown.
const EXCERPT_CHARS: usize = 160;
/// User ids named in a target's description.
const USERS_SHOWN: usize = 10;

/// Where a publish came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    Grpc,
    Console,
}

/// What is kept of a payload.
#[derive(Debug, Clone)]
enum Kept {
    Whole(Payload),
    /// The start of a large payload, and its type, read when it was noted.
    Start {
        start: String,
        kind: Option<String>,
    },
}

/// An event described before it goes to the bus; [`Recent::push`] adds its id.
#[derive(Debug, Clone)]
pub struct Noted {
    target: String,
    payload: Kept,
    bytes: usize,
    record: bool,
}

/// One line of the list, as the console shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Published {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// 0: not recorded in the history.
    pub event_id: u64,
    pub target: String,
    /// The payload's `type`.
    #[serde(rename = "type")]
    pub kind: String,
    pub bytes: usize,
    /// The payload's first characters, `…` when cut.
    pub excerpt: String,
    pub via: Via,
    pub recorded: bool,
}

#[derive(Deserialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    kind: String,
}

fn kind_of(payload: &str) -> Option<String> {
    serde_json::from_str::<TypeOnly>(payload)
        .ok()
        .map(|t| t.kind)
}

fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

fn keep(payload: &Payload) -> Kept {
    if payload.len() <= KEEP_WHOLE_BYTES {
        return Kept::Whole(payload.clone());
    }
    let text = payload.as_str();
    let mut cut = EXCERPT_CHARS * 4;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    Kept::Start {
        start: text[..cut].to_string(),
        kind: kind_of(text),
    }
}

impl Noted {
    /// Describes an event for the list.
    pub fn of(event: &Event) -> Noted {
        let (target, payload, bytes) = match &event.target {
            Target::Group { group, payload, .. } => {
                (format!("group {group}"), keep(payload), payload.len())
            }
            Target::Everyone { payload, .. } => ("all users".into(), keep(payload), payload.len()),
            Target::Users { user_ids, payload } => {
                let mut shown: Vec<String> = user_ids
                    .iter()
                    .take(USERS_SHOWN)
                    .map(i64::to_string)
                    .collect();
                if user_ids.len() > USERS_SHOWN {
                    shown.push(format!("+{} more", user_ids.len() - USERS_SHOWN));
                }
                let target = format!("users {}", shown.join(", "));
                (target, keep(payload), payload.len())
            }
            Target::Individual { payloads } => {
                let bytes = payloads.iter().map(|(_, p)| p.len()).sum();
                let first = payloads
                    .first()
                    .map(|(_, p)| keep(p))
                    .unwrap_or(Kept::Start {
                        start: String::new(),
                        kind: None,
                    });
                (
                    format!("individual, {} users", payloads.len()),
                    first,
                    bytes,
                )
            }
        };
        Noted {
            target: if event.lost {
                format!("{target} (lost mark)")
            } else {
                target
            },
            payload,
            bytes,
            record: event.record,
        }
    }
}

/// The last [`KEEP`] publishes, newest last.
#[derive(Default)]
pub struct Recent {
    entries: Mutex<VecDeque<(u64, u64, Via, Noted)>>,
}

impl Recent {
    /// Adds a published event with the id the bus gave it.
    pub fn push(&self, noted: Noted, event_id: u64, via: Via) {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() == KEEP {
            entries.pop_front();
        }
        entries.push_back((at_ms, event_id, via, noted));
    }

    /// The list, newest first.
    pub fn list(&self) -> Vec<Published> {
        let entries: Vec<_> = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
            .cloned()
            .collect();
        // Parsed outside the lock: a publish never waits for the console.
        entries
            .into_iter()
            .map(|(at_ms, event_id, via, noted)| {
                let (kind, excerpt) = match &noted.payload {
                    Kept::Whole(payload) => (kind_of(payload.as_str()), excerpt(payload.as_str())),
                    Kept::Start { start, kind } => {
                        let cut = excerpt(start);
                        let cut = match cut.ends_with('…') {
                            true => cut,
                            false => format!("{cut}…"),
                        };
                        (kind.clone(), cut)
                    }
                };
                Published {
                    at_ms,
                    event_id,
                    target: noted.target,
                    kind: kind.unwrap_or_default(),
                    bytes: noted.bytes,
                    excerpt,
                    via,
                    recorded: noted.record,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{PublishRequest, UserTarget, publish_request};

    fn event(target: publish_request::Target, payload: &str) -> Event {
        crate::event::from_request(
            PublishRequest {
                target: Some(target),
                payload: payload.into(),
                ..Default::default()
            },
            1 << 20,
        )
        .unwrap()
    }

    #[test]
    fn lists_newest_first_with_type_size_and_a_cut_payload() {
        let recent = Recent::default();
        let group = event(
            publish_request::Target::Group("table-1".into()),
            r#"{"type":"rows_created","n":1}"#,
        );
        recent.push(Noted::of(&group), 7, Via::Grpc);
        let long = format!(r#"{{"type":"big","text":"{}"}}"#, "é".repeat(20_000));
        let users = event(
            publish_request::Target::Users(UserTarget {
                user_ids: (1..=12).collect(),
                all_users: false,
            }),
            &long,
        );
        recent.push(Noted::of(&users), 8, Via::Console);
        let list = recent.list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].event_id, 8);
        assert_eq!(list[0].kind, "big");
        assert_eq!(list[0].bytes, long.len());
        assert_eq!(
            list[0].target,
            "users 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, +2 more"
        );
        assert!(list[0].excerpt.ends_with('…'));
        assert_eq!(list[0].excerpt.chars().count(), EXCERPT_CHARS + 1);
        assert_eq!(list[1].target, "group table-1");
        assert_eq!(list[1].kind, "rows_created");
        assert_eq!(list[1].excerpt, r#"{"type":"rows_created","n":1}"#);
        assert_eq!(list[1].via, Via::Grpc);
    }

    #[test]
    fn keeps_the_last_ones_only() {
        let recent = Recent::default();
        let e = event(
            publish_request::Target::Group("users".into()),
            r#"{"type":"x"}"#,
        );
        for id in 0..(KEEP as u64 + 5) {
            recent.push(Noted::of(&e), id, Via::Grpc);
        }
        let list = recent.list();
        assert_eq!(list.len(), KEEP);
        assert_eq!(list[0].event_id, KEEP as u64 + 4);
        assert_eq!(list[0].target, "all users");
    }
}
