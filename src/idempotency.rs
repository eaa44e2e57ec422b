//! Idempotency keys on one node: which keys were published, with their event ids, for
//! the idempotency window (DESIGN §3). Pure; the in-memory bus checks and records a key in
//! the same step as it publishes. On Redis the keys live in Redis, in the publish script.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long keys are remembered, and how many one node keeps at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencySettings {
    pub window: Duration,
    /// On one node (the in-memory bus): past this many keys the oldest are forgotten early,
    /// so memory stays bounded whatever the callers send.
    pub max_keys: usize,
}

/// Keys seen within the window, oldest first.
#[derive(Debug)]
pub struct Remembered {
    settings: IdempotencySettings,
    ids: HashMap<String, (u64, Instant)>,
    order: VecDeque<(Instant, String)>,
    /// Keys forgotten before their window ended because `max_keys` was reached.
    pub forgotten_early: u64,
}

impl Remembered {
    pub fn new(settings: IdempotencySettings) -> Remembered {
        Remembered {
            settings,
            ids: HashMap::new(),
            order: VecDeque::new(),
            forgotten_early: 0,
        }
    }

    /// The event id published under `key` within the window, if any.
    pub fn get(&mut self, key: &str, now: Instant) -> Option<u64> {
        self.expire(now);
        self.ids.get(key).map(|(id, _)| *id)
    }

    /// Remembers that `key` published the event `id`.
    pub fn insert(&mut self, key: String, id: u64, now: Instant) {
        self.expire(now);
        while self.ids.len() >= self.settings.max_keys.max(1) {
            let Some((_, oldest)) = self.order.pop_front() else {
                break;
            };
            self.ids.remove(&oldest);
            self.forgotten_early += 1;
        }
        self.order.push_back((now, key.clone()));
        self.ids.insert(key, (id, now));
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.settings.window {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                self.ids.remove(&key);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remembered(window_secs: u64, max_keys: usize) -> Remembered {
        Remembered::new(IdempotencySettings {
            window: Duration::from_secs(window_secs),
            max_keys,
        })
    }

    #[test]
    fn a_key_answers_its_first_id_within_the_window_only() {
        let t0 = Instant::now();
        let mut keys = remembered(600, 10);
        assert_eq!(keys.get("a", t0), None);
        keys.insert("a".into(), 7, t0);
        assert_eq!(keys.get("a", t0 + Duration::from_secs(599)), Some(7));
        assert_eq!(keys.get("a", t0 + Duration::from_secs(600)), None);
        assert!(keys.is_empty());
    }

    #[test]
    fn memory_stays_bounded_and_the_oldest_go_first() {
        let t0 = Instant::now();
        let mut keys = remembered(600, 3);
        for (i, key) in ["a", "b", "c", "d"].into_iter().enumerate() {
            keys.insert(key.into(), i as u64, t0 + Duration::from_secs(i as u64));
        }
        assert_eq!(keys.len(), 3);
        assert_eq!(keys.forgotten_early, 1);
        let now = t0 + Duration::from_secs(4);
        assert_eq!(keys.get("a", now), None);
        assert_eq!(keys.get("d", now), Some(3));
    }
}
