//! The coalescing sync job every reconciler uses (kube-network-policies' runner, in tokio).
//!
//! Any number of [`Trigger::poke`]s between two runs cause exactly one run. Runs are at
//! least `min_interval` apart; a failed run is retried after an exponential backoff; with no
//! events at all the job still runs every `resync_interval`.
//!
//! ```text
//!   poke ─┐   poke poke ─┐                      (failure)        resync timer
//!         ▼              ▼                         │                  │
//!   ──── run ── wait min_interval ── run ──────── run ── backoff ── run ── ... ── run
//! ```
use std::{future::Future, sync::Arc, time::Duration};

use futures::FutureExt;
use tokio::sync::Notify;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::SyncSettings;
use crate::metrics::Metrics;

/// A cheap, cloneable handle that asks for a sync.
#[derive(Clone, Debug, Default)]
pub struct Trigger(Arc<Notify>);

impl Trigger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask for a sync. Pokes made while a sync runs are remembered and coalesced.
    pub fn poke(&self) {
        self.0.notify_one();
    }

    async fn wait(&self) {
        self.0.notified().await
    }

    /// Consumes a poke stored since the last wait, if any: the run about to start reads the
    /// state after it, so it needs no run of its own.
    fn absorb(&self) {
        let _ = self.0.notified().now_or_never();
    }
}

/// Why a run happened (for logs and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    Event,
    Resync,
    Retry,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Event => "event",
            Cause::Resync => "resync",
            Cause::Retry => "retry",
        }
    }
}

/// An error of a sync job: shown in logs, and counted by its short constant label in
/// `palisade_sync_errors_total{job, error}`.
pub trait JobError: std::fmt::Display {
    fn label(&self) -> &'static str;
}

impl std::fmt::Display for Unreported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("failed (reported by the job)")
    }
}

/// The error of a closure job that reported its failure itself.
#[derive(Debug)]
pub struct Unreported;

impl JobError for Unreported {
    fn label(&self) -> &'static str {
        "failed"
    }
}

/// One reconciler's sync: everything it does on a poke, a retry or a resync.
pub trait SyncJob {
    /// Name in logs and in the `job` metric label.
    fn name(&self) -> &'static str;
    type Error: JobError;
    fn sync(&mut self, cause: Cause) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Runs `job` whenever the trigger is poked, rate-limited and retried, until `shutdown`.
/// A failed run is logged with its error, counted by its label, and retried after a backoff.
pub async fn run_job<J: SyncJob>(
    settings: SyncSettings,
    trigger: Trigger,
    shutdown: CancellationToken,
    job: &mut J,
    metrics: Option<&Metrics>,
) {
    let mut backoff = settings.backoff_initial;
    let mut last_start: Option<Instant> = None;
    let mut retry_at: Option<Instant> = None;
    loop {
        // Wait for a reason to run.
        let deadline = retry_at.unwrap_or_else(|| Instant::now() + settings.resync_interval);
        let cause = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = trigger.wait() => {
                // A failed sync is retried in full after its backoff; events do not cut
                // the backoff short (they would hammer a failing kernel or API).
                if retry_at.is_some() { continue; }
                Cause::Event
            }
            _ = tokio::time::sleep_until(deadline) => {
                if retry_at.is_some() { Cause::Retry } else { Cause::Resync }
            }
        };
        // Rate limit: at most one run per min_interval.
        if let Some(start) = last_start {
            let next = start + settings.min_interval;
            if next > Instant::now() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(next) => {}
                }
            }
        }
        last_start = Some(Instant::now());
        trigger.absorb();
        match job.sync(cause).await {
            Ok(()) => {
                backoff = settings.backoff_initial;
                retry_at = None;
            }
            Err(e) => {
                if let Some(m) = metrics {
                    m.sync_errors
                        .get_or_create(&vec![
                            ("job", job.name().to_string()),
                            ("error", e.label().to_string()),
                        ])
                        .inc();
                }
                tracing::debug!(job = job.name(), error = %e, retry_in = ?backoff, "sync failed; retrying");
                retry_at = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(settings.backoff_max);
            }
        }
    }
}

/// A closure as a [`SyncJob`] (for jobs whose state lives in the closure).
struct FnJob<F> {
    name: &'static str,
    job: F,
}

impl<F, Fut, E> SyncJob for FnJob<F>
where
    F: FnMut(Cause) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send,
    E: JobError,
{
    fn name(&self) -> &'static str {
        self.name
    }
    type Error = E;
    fn sync(&mut self, cause: Cause) -> impl Future<Output = Result<(), E>> + Send {
        (self.job)(cause)
    }
}

/// [`run_job`] for a closure job named `name`: its typed errors are logged and, with
/// `metrics`, counted in `palisade_sync_errors_total{job, error}`.
pub async fn run_sync_loop<F, Fut, E>(
    settings: SyncSettings,
    trigger: Trigger,
    shutdown: CancellationToken,
    name: &'static str,
    metrics: Option<Arc<Metrics>>,
    job: F,
) where
    F: FnMut(Cause) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send,
    E: JobError,
{
    run_job(
        settings,
        trigger,
        shutdown,
        &mut FnJob { name, job },
        metrics.as_deref(),
    )
    .await
}

/// Pokes `trigger` every time `rx` changes (leadership, membership), until `shutdown`.
pub fn poke_on_change<T: Send + Sync + 'static>(
    mut rx: tokio::sync::watch::Receiver<T>,
    trigger: Trigger,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            trigger.poke();
        }
    });
}

/// Sleep that ends early on shutdown; returns false when shutdown won.
pub async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = sleep(d) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    fn settings() -> SyncSettings {
        SyncSettings {
            min_interval: Duration::from_millis(100),
            resync_interval: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn many_pokes_coalesce_into_few_runs() {
        let trigger = Trigger::new();
        let shutdown = CancellationToken::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let task = tokio::spawn(run_sync_loop(
            settings(),
            trigger.clone(),
            shutdown.clone(),
            "test",
            None,
            move |_| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Ok::<(), Unreported>(())
                }
            },
        ));
        for _ in 0..1000 {
            trigger.poke();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..1000 {
            trigger.poke();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        shutdown.cancel();
        task.await.unwrap();
        // One run for the first burst, one (rate-limited) for the second.
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn runs_are_rate_limited_and_resync_happens() {
        let trigger = Trigger::new();
        let shutdown = CancellationToken::new();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let s = starts.clone();
        let t0 = Instant::now();
        let task = tokio::spawn(run_sync_loop(
            settings(),
            trigger.clone(),
            shutdown.clone(),
            "test",
            None,
            move |cause| {
                s.lock().unwrap().push((Instant::now() - t0, cause));
                async { Ok::<(), Unreported>(()) }
            },
        ));
        for _ in 0..5 {
            trigger.poke();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_secs(61)).await;
        shutdown.cancel();
        task.await.unwrap();
        let starts = starts.lock().unwrap();
        for w in starts.windows(2) {
            assert!(w[1].0 - w[0].0 >= Duration::from_millis(100), "{starts:?}");
        }
        assert_eq!(starts[0].1, Cause::Event);
        assert!(
            starts.iter().any(|(_, c)| *c == Cause::Resync),
            "{starts:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_retry_with_growing_backoff() {
        let trigger = Trigger::new();
        let shutdown = CancellationToken::new();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let s = starts.clone();
        let t0 = Instant::now();
        let task = tokio::spawn(run_sync_loop(
            settings(),
            trigger.clone(),
            shutdown.clone(),
            "test",
            None,
            move |cause| {
                let mut g = s.lock().unwrap();
                g.push((Instant::now() - t0, cause));
                let fail = g.len() <= 4;
                async move {
                    if fail {
                        Err(Unreported)
                    } else {
                        Ok(())
                    }
                }
            },
        ));
        trigger.poke();
        tokio::time::sleep(Duration::from_secs(5)).await;
        shutdown.cancel();
        task.await.unwrap();
        let starts = starts.lock().unwrap();
        assert_eq!(starts.len(), 5, "{starts:?}");
        let gaps: Vec<u128> = starts
            .windows(2)
            .map(|w| (w[1].0 - w[0].0).as_millis())
            .collect();
        // 200, 400, 800, then capped at 1000.
        assert_eq!(gaps, vec![200, 400, 800, 1000]);
        assert!(starts[1..].iter().all(|(_, c)| *c == Cause::Retry));
    }
}
