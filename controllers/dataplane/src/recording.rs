//! A fake executor for tests: records every payload, can be told to fail.

use std::sync::Mutex;

use palisade_netpol::Payload;

use crate::{ApplyReport, DataplaneError, Executor};

#[derive(Debug, Default)]
struct State {
    applied: Vec<Payload>,
    attempts: usize,
    fail_next: usize,
    fail_always: bool,
}

/// Records payloads instead of touching the kernel.
#[derive(Debug, Default)]
pub struct RecordingExecutor {
    state: Mutex<State>,
}

impl RecordingExecutor {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every payload applied successfully, oldest first.
    pub fn payloads(&self) -> Vec<Payload> {
        self.lock().applied.clone()
    }

    /// The last payload applied successfully.
    pub fn last(&self) -> Option<Payload> {
        self.lock().applied.last().cloned()
    }

    /// Calls of `apply`, failed ones included.
    pub fn attempts(&self) -> usize {
        self.lock().attempts
    }

    /// The next `n` applies fail with [`DataplaneError::Simulated`].
    pub fn fail_next(&self, n: usize) {
        self.lock().fail_next = n;
    }

    /// Every apply fails until turned off again.
    pub fn set_failing(&self, failing: bool) {
        self.lock().fail_always = failing;
    }
}

impl Executor for RecordingExecutor {
    fn apply(&self, p: &Payload) -> Result<ApplyReport, DataplaneError> {
        let mut s = self.lock();
        s.attempts += 1;
        if s.fail_always {
            return Err(DataplaneError::Simulated("executor set to fail".into()));
        }
        if s.fail_next > 0 {
            s.fail_next -= 1;
            return Err(DataplaneError::Simulated("injected failure".into()));
        }
        let changed = s.applied.last() != Some(p);
        s.applied.push(p.clone());
        Ok(ApplyReport {
            changed,
            verified: !changed,
            iptables_applied: changed,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_fails_on_request() {
        let x = RecordingExecutor::new();
        let p = palisade_netpol::render(&palisade_netpol::compile(
            &Default::default(),
            &palisade_netpol::NodeConfig::new("n1"),
        ));
        assert!(x.apply(&p).unwrap().changed);
        assert!(!x.apply(&p).unwrap().changed);
        x.fail_next(1);
        assert!(x.apply(&p).is_err());
        assert!(x.apply(&p).is_ok());
        x.set_failing(true);
        assert!(matches!(x.apply(&p), Err(DataplaneError::Simulated(_))));
        assert_eq!(x.attempts(), 5);
        assert_eq!(x.payloads().len(), 3);
        let shared: std::sync::Arc<dyn Executor> = std::sync::Arc::new(RecordingExecutor::new());
        assert!(shared.apply(&p).is_ok());
    }
}
