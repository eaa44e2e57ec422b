//! A token bucket for inbound client frames.

use std::time::Instant;

/// Allows `burst` frames at once and `rate` frames per second sustained.
pub struct TokenBucket {
    tokens: f64,
    burst: f64,
    rate: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(burst: u32, rate: u32, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            rate: f64::from(rate),
            last: now,
        }
    }

    /// Takes one token; `false` when the client is over its rate.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100, 200, start);
        assert!((0..100).all(|_| bucket.take(start)));
        assert!(!bucket.take(start));
        // 200 per second: 10 ms refills two frames.
        let later = start + Duration::from_millis(10);
        assert!(bucket.take(later));
        assert!(bucket.take(later));
        assert!(!bucket.take(later));
        // A long pause refills the burst, no more.
        let much_later = later + Duration::from_secs(60);
        assert_eq!((0..150).filter(|_| bucket.take(much_later)).count(), 100);
    }
}
