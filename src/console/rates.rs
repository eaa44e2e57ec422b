//! Rates over the last minutes, for the console's charts.
//!
//! A sampler task reads the node's counters every [`INTERVAL`] and keeps the last
//! [`SAMPLES`] readings; the console turns each pair of neighbours into a per-second rate.
//! Reading a handful of atomics every two seconds is all it costs while nobody looks.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

/// How often the counters are read.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Readings kept: five minutes.
pub const SAMPLES: usize = 151;

/// The series, in the order of a reading's counters.
pub const SERIES: [&str; 7] = [
    "deliveries",
    "publishes",
    "connects",
    "slow_consumer_closes",
    "replays",
    "authorizer_calls",
    "authorizer_failures",
];

/// One reading of every counter, in [`SERIES`] order; counters only grow.
pub type Reading = [u64; SERIES.len()];

/// The last readings, oldest first.
pub struct Rates {
    readings: Mutex<VecDeque<(Instant, Reading)>>,
}

/// Per-second rates between consecutive readings, oldest first, one list per series.
#[derive(Debug, Serialize, PartialEq)]
pub struct Series {
    pub interval_seconds: f64,
    pub series: Vec<(&'static str, Vec<f64>)>,
}

impl Default for Rates {
    fn default() -> Self {
        Rates {
            readings: Mutex::new(VecDeque::with_capacity(SAMPLES)),
        }
    }
}

impl Rates {
    pub fn record(&self, at: Instant, reading: Reading) {
        let mut readings = self.readings.lock().unwrap_or_else(|e| e.into_inner());
        if readings.len() == SAMPLES {
            readings.pop_front();
        }
        readings.push_back((at, reading));
    }

    /// The rates, rounded to hundredths.
    pub fn series(&self) -> Series {
        let readings = self.readings.lock().unwrap_or_else(|e| e.into_inner());
        let pairs = readings.iter().zip(readings.iter().skip(1));
        let mut series: Vec<(&'static str, Vec<f64>)> = SERIES
            .iter()
            .map(|name| (*name, Vec::with_capacity(readings.len())))
            .collect();
        for ((before, a), (after, b)) in pairs {
            let seconds = after.duration_since(*before).as_secs_f64().max(0.001);
            for (i, (_, points)) in series.iter_mut().enumerate() {
                let rate = b[i].saturating_sub(a[i]) as f64 / seconds;
                points.push((rate * 100.0).round() / 100.0);
            }
        }
        Series {
            interval_seconds: INTERVAL.as_secs_f64(),
            series,
        }
    }
}

/// Reads the counters every [`INTERVAL`] into `rates` until `shutdown` turns true.
pub async fn sample(
    rates: std::sync::Arc<Rates>,
    read: impl Fn() -> Reading + Send + 'static,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => rates.record(Instant::now(), read()),
            _ = crate::stopped(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_differences_per_second_and_old_readings_go() {
        let rates = Rates::default();
        let start = Instant::now();
        rates.record(start, [0; 7]);
        rates.record(start + Duration::from_secs(2), [10, 1, 0, 0, 0, 0, 0]);
        rates.record(start + Duration::from_secs(4), [13, 1, 0, 0, 0, 4, 1]);
        let series = rates.series();
        assert_eq!(series.series[0], ("deliveries", vec![5.0, 1.5]));
        assert_eq!(series.series[1], ("publishes", vec![0.5, 0.0]));
        assert_eq!(series.series[6], ("authorizer_failures", vec![0.0, 0.5]));
        for i in 0..SAMPLES as u64 {
            rates.record(start + Duration::from_secs(10 + i), [i; 7]);
        }
        let series = rates.series();
        assert_eq!(series.series[0].1.len(), SAMPLES - 1);
        assert!(series.series[0].1.iter().all(|r| *r == 1.0));
    }
}
