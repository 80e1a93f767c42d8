//! The one bounded poll of the tests and the lab: call a check every `every` until it is
//! [`Done`] or `timeout` has passed, and hand back the last answer. [`poll`] sleeps the
//! thread, [`poll_async`] awaits a tokio timer (for checks that run next to the code under
//! test on the same runtime); both make the same calls at the same times.
//!
//! The check is always called at least once, and once more after the deadline, so a
//! condition that became true while the last sleep ran is still seen. What the check returns
//! says when it is done:
//! - `bool`: done when `true` (the poll returns `false` on timeout);
//! - `Option<T>`: done when `Some` (`None` on timeout);
//! - `anyhow::Result<Option<T>>`: done on `Ok(Some)` or on an error, which stops the poll
//!   at once (`Ok(None)` on timeout).
//!
//! Timeouts are the caller's: a test keeps its own bound and its own message.
#![forbid(unsafe_code)]

use std::future::Future;
use std::time::{Duration, Instant};

/// A check's answer: whether polling can stop.
pub trait Done {
    /// True when this answer ends the poll.
    fn done(&self) -> bool;
}

impl Done for bool {
    fn done(&self) -> bool {
        *self
    }
}

impl<T> Done for Option<T> {
    fn done(&self) -> bool {
        self.is_some()
    }
}

impl<T> Done for anyhow::Result<Option<T>> {
    fn done(&self) -> bool {
        !matches!(self, Ok(None))
    }
}

/// Calls `check` every `every` until its answer is [`Done`] or `timeout` has passed; returns
/// the last answer.
pub fn poll<R: Done>(timeout: Duration, every: Duration, mut check: impl FnMut() -> R) -> R {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = check();
        if answer.done() || Instant::now() >= deadline {
            return answer;
        }
        std::thread::sleep(every);
    }
}

/// [`poll`] for async checks: the same calls at the same times, sleeping on the tokio timer.
pub async fn poll_async<R, F, Fut>(timeout: Duration, every: Duration, mut check: F) -> R
where
    R: Done,
    F: FnMut() -> Fut,
    Fut: Future<Output = R>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let answer = check().await;
        if answer.done() || Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn stops_at_the_first_done_answer() {
        let mut calls = 0;
        let got = poll(Duration::from_secs(10), MS, || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(got, Some(3));
        assert_eq!(calls, 3);
    }

    #[test]
    fn times_out_with_the_last_answer_after_a_call_past_the_deadline() {
        let started = Instant::now();
        let mut last = None;
        let got = poll(Duration::from_millis(30), MS, || {
            last = Some(Instant::now());
            false
        });
        assert!(!got);
        assert!(last.unwrap() >= started + Duration::from_millis(30));
    }

    #[test]
    fn zero_timeout_calls_once() {
        let mut calls = 0;
        let got: Option<()> = poll(Duration::ZERO, MS, || {
            calls += 1;
            None
        });
        assert_eq!((got, calls), (None, 1));
    }

    #[test]
    fn an_error_stops_the_poll() {
        let mut calls = 0;
        let got = poll(Duration::from_secs(10), MS, || {
            calls += 1;
            if calls == 2 {
                anyhow::bail!("broken");
            }
            Ok(None::<()>)
        });
        assert_eq!(got.unwrap_err().to_string(), "broken");
        assert_eq!(calls, 2);
    }

    #[tokio::test]
    async fn async_flavour_makes_the_same_calls() {
        let mut calls = 0;
        let got = poll_async(Duration::from_secs(10), MS, || {
            calls += 1;
            std::future::ready(calls == 4)
        })
        .await;
        assert!(got);
        assert_eq!(calls, 4);
        let timed_out = poll_async(Duration::from_millis(5), MS, || async { None::<u8> }).await;
        assert_eq!(timed_out, None);
    }
}
