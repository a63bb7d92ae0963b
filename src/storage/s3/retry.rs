//! The one retry policy of S3 requests, whichever transport sends them: how many attempts, how
//! long to back off between them, and how long one attempt and one connect may take. The SDK is
//! configured from it and the [direct](super::direct) transport follows it, so a failing server
//! costs the same whichever path a request took.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;

/// Attempts, backoff and per-attempt bounds; every request is also bounded as a whole by
/// `s3-timeout`, retries included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RetryPolicy {
    /// Attempts per request, the first included.
    pub(super) attempts: u32,
    /// The cap on the backoff before the first retry, doubled for each later one.
    pub(super) first_backoff: Duration,
    /// The cap on one backoff.
    pub(super) max_backoff: Duration,
    /// The bound on one connect.
    pub(super) connect_timeout: Duration,
    /// The bound on one attempt (the direct transport: on each wait for the socket).
    pub(super) attempt_timeout: Duration,
}

impl RetryPolicy {
    /// Every request the plugin makes: the SDK's standard policy, spelled out.
    pub(super) const REQUESTS: RetryPolicy = RetryPolicy {
        attempts: 5,
        first_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(5),
        attempt_timeout: Duration::from_secs(10),
    };

    /// The start-up probes (bucket, conditional writes): one retry only, so that a typo in the
    /// endpoint fails in a second, not after backoff.
    pub(super) const PROBES: RetryPolicy = RetryPolicy { attempts: 2, ..RetryPolicy::REQUESTS };

    /// The SDK's retry configuration for this policy.
    pub(super) fn sdk_retries(&self) -> RetryConfig {
        RetryConfig::standard()
            .with_max_attempts(self.attempts)
            .with_initial_backoff(self.first_backoff)
            .with_max_backoff(self.max_backoff)
    }

    /// The SDK's bounds on one request of at most `operation`, retries included.
    pub(super) fn sdk_timeouts(&self, operation: Duration) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(operation.min(self.connect_timeout))
            .operation_attempt_timeout(operation.min(self.attempt_timeout))
            .operation_timeout(operation)
            .build()
    }

    /// The wait before attempt `attempt + 1`, or `None` when `attempt` was the last: full
    /// jitter, as the SDK's, a random wait up to 1 s, 2 s, 4 s ... capped.
    pub(super) fn backoff(&self, attempt: u32) -> Option<Duration> {
        if attempt >= self.attempts {
            return None;
        }
        let cap = self.first_backoff.saturating_mul(1 << (attempt.saturating_sub(1)).min(16)).min(self.max_backoff);
        Some(cap.mul_f64(random_fraction()))
    }
}

/// A random number in `0..1`, from the standard library's per-process random keys.
fn random_fraction() -> f64 {
    (RandomState::new().build_hasher().finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_ends_with_the_attempts() {
        let policy = RetryPolicy::REQUESTS;
        for attempt in 1..policy.attempts {
            let cap = Duration::from_secs(1 << (attempt - 1));
            assert!(policy.backoff(attempt).unwrap() <= cap, "attempt {attempt}");
        }
        assert_eq!(policy.backoff(policy.attempts), None);
        assert_eq!(RetryPolicy::PROBES.backoff(2), None);
    }
}
