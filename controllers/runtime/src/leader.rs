//! Lease-based leader election for the cluster-wide singleton writer (the IP allocator).
//!
//! client-go's algorithm, in our words: every `retry_period` the agent reads the Lease. A
//! Lease held by someone else is respected until it has not changed for `lease_duration` as
//! measured on *our* monotonic clock (so clock skew between nodes does not matter). An
//! expired, released or missing Lease is taken with an optimistic-concurrency update (a stale
//! `resourceVersion` gets 409 Conflict, so two candidates cannot both win). The leader renews
//! every `retry_period`; if it cannot renew for `renew_deadline` (< `lease_duration`) it steps
//! down on its own, before anyone else may take over. On shutdown it steps down first, then
//! releases the Lease so a successor need not wait for expiry.
//!
//! Leadership is published on a `watch` channel; the allocator checks it before each write.
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::LeaseSettings;
use crate::metrics::Metrics;

pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    identity: String,
    tx: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    /// The last Lease spec seen and when (our clock) it last changed.
    observed: Option<(LeaseSpec, Instant)>,
    last_renew: Option<Instant>,
}

/// What one round concluded.
#[derive(Debug, PartialEq, Eq)]
enum Round {
    Leading,
    Following(String),
    Failed,
}

impl LeaderElector {
    pub fn new(
        client: Client,
        settings: LeaseSettings,
        identity: String,
        metrics: Arc<Metrics>,
    ) -> (Self, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        let api = Api::namespaced(client, &settings.namespace);
        (
            LeaderElector {
                api,
                settings,
                identity,
                tx,
                metrics,
                observed: None,
                last_renew: None,
            },
            rx,
        )
    }

    fn is_leader(&self) -> bool {
        *self.tx.borrow()
    }

    fn set_leader(&self, leading: bool) {
        if self.is_leader() != leading {
            self.metrics.leader_transitions.inc();
            if leading {
                tracing::info!(lease = %self.settings.name, identity = %self.identity, "became leader");
            } else {
                tracing::info!(lease = %self.settings.name, identity = %self.identity, "stepped down");
            }
        }
        self.metrics.is_leader.set(leading as i64);
        self.tx.send_replace(leading);
    }

    /// Runs rounds until `shutdown`, then steps down and releases the Lease if held.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let round = self.round().await;
            match &round {
                Round::Leading => self.set_leader(true),
                Round::Following(holder) => {
                    tracing::trace!(holder, "lease held by another agent");
                    self.set_leader(false)
                }
                Round::Failed => {
                    // Step down once we have failed to renew for renew_deadline.
                    let overdue = self
                        .last_renew
                        .is_none_or(|t| t.elapsed() >= self.settings.renew_deadline);
                    if self.is_leader() && overdue {
                        tracing::warn!("could not renew the lease within the renew deadline");
                        self.set_leader(false);
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.settings.retry_period) => {}
            }
        }
        if self.is_leader() {
            self.set_leader(false);
            self.release().await;
        }
    }

    async fn round(&mut self) -> Round {
        let current = match self.api.get_opt(&self.settings.name).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the lease");
                return Round::Failed;
            }
        };
        let Some(lease) = current else {
            return self.create().await;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let now = Instant::now();
        match &self.observed {
            Some((seen, _)) if *seen == spec => {}
            _ => self.observed = Some((spec.clone(), now)),
        }
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(self.settings.lease_duration);
        let changed_at = self.observed.as_ref().map(|(_, t)| *t).unwrap_or(now);
        let held_by_other = !holder.is_empty() && holder != self.identity;
        if held_by_other && changed_at + duration > now {
            return Round::Following(holder);
        }
        // Ours to renew, or free to take.
        let now_ts = MicroTime(jiff::Timestamp::now());
        let taking_over = holder != self.identity;
        let mut new_spec = spec.clone();
        new_spec.holder_identity = Some(self.identity.clone());
        new_spec.lease_duration_seconds = Some(self.settings.lease_duration.as_secs() as i32);
        new_spec.renew_time = Some(now_ts.clone());
        if taking_over {
            new_spec.acquire_time = Some(now_ts);
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        let mut updated = lease;
        updated.spec = Some(new_spec.clone());
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &updated)
            .await
        {
            Ok(_) => {
                self.observed = Some((new_spec, Instant::now()));
                self.last_renew = Some(Instant::now());
                Round::Leading
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tracing::debug!("lease update conflicted; another agent wrote it first");
                Round::Following(String::new())
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot update the lease");
                Round::Failed
            }
        }
    }

    async fn create(&mut self) -> Round {
        let now_ts = MicroTime(jiff::Timestamp::now());
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.settings.lease_duration.as_secs() as i32),
            acquire_time: Some(now_ts.clone()),
            renew_time: Some(now_ts),
            lease_transitions: Some(0),
            ..Default::default()
        };
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.settings.name.clone()),
                namespace: Some(self.settings.namespace.clone()),
                ..Default::default()
            },
            spec: Some(spec.clone()),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(_) => {
                self.observed = Some((spec, Instant::now()));
                self.last_renew = Some(Instant::now());
                Round::Leading
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Round::Following(String::new()),
            Err(e) => {
                tracing::debug!(error = %e, "cannot create the lease");
                Round::Failed
            }
        }
    }

    /// Gives the Lease up (holder cleared), so that a successor need not wait for expiry.
    async fn release(&mut self) {
        let lease = match self.api.get_opt(&self.settings.name).await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the lease to release it; it will expire");
                return;
            }
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        let mut updated = lease;
        updated.spec = Some(spec);
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &updated)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.settings.name, "released the lease"),
            Err(e) => tracing::warn!(error = %e, "cannot release the lease; it will expire"),
        }
    }
}
