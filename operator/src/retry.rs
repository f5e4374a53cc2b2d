//! Backoff between failed reconciles of one table.
//!
//! Each table's consecutive failures are counted; the delay doubles from a first delay
//! that depends on what failed (pods still stopping are checked again soon, a refused
//! object waits for an edit) up to five minutes, with up to a quarter of jitter so tables
//! that failed together (an ensemble outage) do not retry together. A successful reconcile
//! forgets the count.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;

/// The longest wait between two attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(300);

/// What kind of failure, for the first delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Something expected to pass by itself soon (pods terminating, a session reconnecting).
    Transient,
    /// Something that needs a change elsewhere (a refused object, missing credentials).
    NeedsChange,
}

/// The delay before attempt `failures + 1`, without jitter.
pub fn delay(class: Class, failures: u32) -> Duration {
    let first = match class {
        Class::Transient => Duration::from_secs(2),
        Class::NeedsChange => Duration::from_secs(10),
    };
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
    first.saturating_mul(factor).min(MAX_DELAY)
}

/// `delay` plus up to a quarter of it, drawn from `random` in [0, 1).
pub fn with_jitter(delay: Duration, random: f64) -> Duration {
    delay + delay.mul_f64(random.clamp(0.0, 1.0) / 4.0)
}

/// Consecutive failures per table (`namespace/name`).
#[derive(Debug, Default)]
pub struct Failures(Mutex<HashMap<String, u32>>);

impl Failures {
    /// Counts one more failure of `key` and returns the new count.
    pub fn record(&self, key: &str) -> u32 {
        let mut map = self.0.lock();
        let n = map.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    pub fn forget(&self, key: &str) {
        self.0.lock().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_the_classs_first_delay_up_to_five_minutes() {
        let secs = |class, n| delay(class, n).as_secs();
        assert_eq!(
            (1..=5)
                .map(|n| secs(Class::Transient, n))
                .collect::<Vec<_>>(),
            [2, 4, 8, 16, 32]
        );
        assert_eq!(secs(Class::NeedsChange, 1), 10);
        assert_eq!(secs(Class::NeedsChange, 6), 300);
        assert_eq!(secs(Class::Transient, u32::MAX), 300);
        assert_eq!(
            with_jitter(Duration::from_secs(8), 0.5),
            Duration::from_secs(9)
        );
    }

    #[test]
    fn a_success_forgets_the_count() {
        let f = Failures::default();
        assert_eq!(
            (f.record("ns/a"), f.record("ns/a"), f.record("ns/b")),
            (1, 2, 1)
        );
        f.forget("ns/a");
        assert_eq!(f.record("ns/a"), 1);
    }
}
