//! The one retry loop: capped, jittered exponential backoff within a time
//! budget, for everything that can heal (IMDS coming up, throttling, 5xx,
//! network, FlakeHub login). Each caller classifies its own errors as
//! retryable or permanent; the loop owns the timing.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay (before jitter).
    pub initial: Duration,
    /// Cap on a backoff delay.
    pub max: Duration,
    /// Cap on a server's `Retry-After`, which may ask for longer.
    pub max_retry_after: Duration,
    /// Total time allowed for one remote step, attempts and delays together.
    pub budget: Duration,
}

impl Backoff {
    pub fn with_budget(budget: Duration) -> Self {
        Self {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(5),
            budget,
        }
    }

    /// IMDS is link-local and cheap to ask, and at boot the agent waits on
    /// it: retry every 75–150 ms once backed off (no more than ~13 requests
    /// a second), so a late IMDS is noticed within ~150 ms.
    pub fn imds(budget: Duration) -> Self {
        Self {
            max: Duration::from_millis(150),
            ..Self::with_budget(budget)
        }
    }

    /// Equal jitter: half of the exponential delay fixed, half random, so
    /// a fleet booting together does not retry in lockstep and the first
    /// retry still comes soon (25–50 ms).
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
            .min(self.max);
        let half = exp / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// How one attempt went wrong.
#[derive(Debug)]
pub enum Attempt<E> {
    /// Try again, after `after` if the server said so, else after backoff.
    Retry {
        error: E,
        after: Option<Duration>,
    },
    Fail(E),
}

impl<E> Attempt<E> {
    pub fn retry(error: E) -> Self {
        Attempt::Retry { error, after: None }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum RetryError<E> {
    Permanent(E),
    /// The run was asked to stop: no further attempt.
    Stopped(crate::stop::Interrupted),
    /// The budget ran out; `last` is the last attempt's error.
    Exhausted {
        last: E,
        attempts: u32,
        elapsed: Duration,
    },
}

/// What an attempt knows about its place in the loop.
#[derive(Debug, Clone, Copy)]
pub struct Try {
    pub number: u32,
    pub deadline: Instant,
}

impl Try {
    /// Time left in the budget, for the attempt's own timeout.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

pub async fn retry<T, E, F, Fut>(
    policy: &Backoff,
    what: &str,
    mut op: F,
) -> Result<T, RetryError<E>>
where
    E: Display,
    F: FnMut(Try) -> Fut,
    Fut: Future<Output = Result<T, Attempt<E>>>,
{
    let start = Instant::now();
    let deadline = start + policy.budget;
    let mut number = 0;
    loop {
        number += 1;
        if let Some(s) = crate::stop::requested() {
            return Err(RetryError::Stopped(crate::stop::Interrupted(s)));
        }
        let (error, after) = match op(Try { number, deadline }).await {
            Ok(v) => return Ok(v),
            Err(Attempt::Fail(e)) => return Err(RetryError::Permanent(e)),
            Err(Attempt::Retry { error, after }) => (error, after),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(RetryError::Exhausted {
                last: error,
                attempts: number,
                elapsed: start.elapsed(),
            });
        }
        let delay = after
            .map_or_else(|| policy.delay(number), |a| a.min(policy.max_retry_after))
            .min(remaining);
        tracing::warn!(
            step = what,
            attempt = number,
            retry_in_ms = delay.as_millis() as u64,
            "{what} failed, will retry: {error}"
        );
        if let Err(i) = crate::stop::or_stop(tokio::time::sleep(delay)).await {
            return Err(RetryError::Stopped(i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn policy(budget_ms: u64) -> Backoff {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(5),
            budget: Duration::from_millis(budget_ms),
        }
    }

    #[test]
    fn imds_retries_quickly_but_not_in_a_tight_loop() {
        let p = Backoff::imds(Duration::from_secs(120));
        for n in 1..50 {
            let d = p.delay(n);
            assert!(
                d >= Duration::from_millis(25) && d <= Duration::from_millis(150),
                "{d:?}"
            );
        }
        assert!(
            p.delay(10) >= Duration::from_millis(75),
            "at most ~13 requests a second"
        );
        assert_eq!(p.max_retry_after, Duration::from_secs(5));
    }

    #[test]
    fn delays_grow_capped_and_jittered() {
        let p = policy(1000);
        for _ in 0..100 {
            let d1 = p.delay(1);
            assert!(
                d1 >= Duration::from_millis(25) && d1 <= Duration::from_millis(50),
                "{d1:?}"
            );
            let d4 = p.delay(4);
            assert!(
                d4 >= Duration::from_millis(200) && d4 <= Duration::from_millis(400),
                "{d4:?}"
            );
            let d30 = p.delay(30);
            assert!(
                d30 >= Duration::from_millis(2500) && d30 <= Duration::from_secs(5),
                "{d30:?}"
            );
        }
        let distinct: std::collections::HashSet<_> = (0..20).map(|_| p.delay(5)).collect();
        assert!(distinct.len() > 1, "jitter");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success() {
        let calls = Cell::new(0);
        let r: Result<u32, RetryError<String>> = retry(&policy(10_000), "test", |t| {
            calls.set(t.number);
            async move {
                if t.number < 3 {
                    Err(Attempt::retry("flaky".to_string()))
                } else {
                    Ok(t.number)
                }
            }
        })
        .await;
        assert_eq!(r, Ok(3));
        assert_eq!(calls.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_stops_at_once() {
        let r: Result<(), _> = retry(&policy(10_000), "test", |_| async {
            Err(Attempt::Fail("denied"))
        })
        .await;
        assert_eq!(r, Err(RetryError::Permanent("denied")));
    }

    #[tokio::test(start_paused = true)]
    async fn budget_bounds_the_loop_and_honours_retry_after() {
        let start = Instant::now();
        let r: Result<(), _> = retry(&policy(3_000), "test", |_| async {
            Err(Attempt::Retry {
                error: "busy",
                after: Some(Duration::from_secs(1)),
            })
        })
        .await;
        match r {
            Err(RetryError::Exhausted { last, attempts, .. }) => {
                assert_eq!(last, "busy");
                // 0s, 1s, 2s, 3s: Retry-After spaced the attempts.
                assert_eq!(attempts, 4);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_capped() {
        let start = Instant::now();
        let _: Result<(), _> = retry(&policy(12_000), "test", |t| async move {
            if t.number == 1 {
                Err(Attempt::Retry {
                    error: "busy",
                    after: Some(Duration::from_secs(3600)),
                })
            } else {
                Ok(())
            }
        })
        .await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
