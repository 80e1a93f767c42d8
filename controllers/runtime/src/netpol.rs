//! The node-local NetworkPolicy reconciler.
//!
//! ```text
//!  Stores (pods, namespaces, policies, nodes) ── snapshot ──► IncrementalCompiler::sync
//!        ▲ pokes                                                     │
//!   Trigger ◄── reflectors                                   render ─┴─► Payload
//!                                                                        │ same as last? skip
//!                                            palisade_dataplane::Executor::apply (blocking pool)
//! ```
//!
//! Safety rules: nothing is applied before every watch it reads has listed once (an empty
//! cache would otherwise "converge" to no policies and open every pod). During an API outage
//! the caches keep their last content, so enforcement stays as it was. A failed apply leaves
//! the previous kernel state in place and is retried with backoff. Nothing is flushed on exit.
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::ObjectReference;
use palisade_dataplane::Executor;
use palisade_netpol::{ClusterState, Diagnostic, IncrementalCompiler, NodeConfig, Payload};
use tokio_util::sync::CancellationToken;

use crate::config::SyncSettings;
use crate::events::EventSink;
use crate::metrics::{labels1, Metrics};
use crate::stores::{names, Stores};
use crate::sync::{run_sync_loop, Cause, Trigger};

/// Event reasons of the netpol reconciler.
pub mod reasons {
    pub const APPLY_FAILED: &str = "NetworkPolicyApplyFailed";
}

pub struct NetpolReconciler {
    pub stores: Stores,
    pub node: NodeConfig,
    pub executor: Arc<dyn Executor>,
    pub metrics: Arc<Metrics>,
    pub events: EventSink,
    pub settings: SyncSettings,
}

struct LastState {
    /// Keeps the previous compile, so pod churn only recomputes what it touches.
    compiler: IncrementalCompiler,
    payload: Option<Payload>,
    /// Diagnostics already reported as Events (reported again only when they change).
    reported: BTreeSet<(String, String, String, String)>,
}

impl NetpolReconciler {
    /// Runs until `shutdown`. `trigger` must be subscribed to the stores it reads.
    pub async fn run(self, trigger: Trigger, shutdown: CancellationToken) {
        let readiness = self.stores.readiness.clone();
        // Wait for the first complete list of everything we read.
        let needed = [
            names::PODS,
            names::NAMESPACES,
            names::NETWORK_POLICIES,
            names::NODES,
        ];
        loop {
            let pending = readiness.pending();
            if !pending.iter().any(|p| needed.contains(p)) {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            }
        }
        tracing::info!(node = %self.node.node_name, "caches synced; NetworkPolicy enforcement starts");
        let this = Arc::new(self);
        let last = Arc::new(Mutex::new(LastState {
            compiler: IncrementalCompiler::new(this.node.clone()),
            payload: None,
            reported: BTreeSet::new(),
        }));
        trigger.poke();
        run_sync_loop(this.settings, trigger, shutdown, |cause| {
            let this = this.clone();
            let last = last.clone();
            async move { this.sync_once(cause, &last).await }
        })
        .await;
    }

    /// A snapshot of the caches as the pure compiler's input.
    pub fn snapshot(&self) -> ClusterState {
        ClusterState {
            nodes: self.stores.nodes.state(),
            namespaces: self.stores.namespaces.state(),
            pods: self.stores.pods.state(),
            policies: self.stores.network_policies.state(),
        }
    }

    async fn sync_once(&self, cause: Cause, last: &Mutex<LastState>) -> Result<(), ()> {
        let start = Instant::now();
        let state = self.snapshot();
        let (payload, diagnostics) = {
            let Ok(mut l) = last.lock() else {
                return Err(());
            };
            let payload = l.compiler.sync(&state).clone();
            let diagnostics = l
                .compiler
                .compiled()
                .map(|c| c.diagnostics.clone())
                .unwrap_or_default();
            (payload, diagnostics)
        };
        self.report_diagnostics(&diagnostics, last).await;

        let unchanged = last
            .lock()
            .map(|l| l.payload.as_ref() == Some(&payload))
            .unwrap_or(false);
        if unchanged && cause != Cause::Resync {
            self.metrics
                .netpol_syncs
                .get_or_create(&labels1("result", "unchanged"))
                .inc();
            return Ok(());
        }
        let executor = self.executor.clone();
        let to_apply = payload.clone();
        let result = tokio::task::spawn_blocking(move || executor.apply(&to_apply)).await;
        let elapsed = start.elapsed();
        self.metrics
            .netpol_sync_duration
            .observe(elapsed.as_secs_f64());
        match result {
            Ok(Ok(report)) => {
                self.metrics
                    .netpol_syncs
                    .get_or_create(&labels1("result", "applied"))
                    .inc();
                self.metrics.netpol_rules.set(payload.stats.rules as i64);
                self.metrics.netpol_ipsets.set(payload.stats.sets as i64);
                self.metrics
                    .netpol_ipset_members
                    .set(payload.stats.members as i64);
                self.metrics
                    .netpol_payload_bytes
                    .set((payload.ipset_restore.len() + payload.iptables_restore.len()) as i64);
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                self.metrics.netpol_last_success.set(now);
                tracing::debug!(
                    cause = cause.as_str(),
                    ?elapsed,
                    changed = report.changed,
                    rules = payload.stats.rules,
                    sets = payload.stats.sets,
                    "netpol sync applied"
                );
                if let Ok(mut l) = last.lock() {
                    l.payload = Some(payload);
                }
                Ok(())
            }
            Ok(Err(e)) => {
                self.metrics
                    .netpol_syncs
                    .get_or_create(&labels1("result", "failed"))
                    .inc();
                tracing::error!(error = %e, "applying NetworkPolicy rules failed; previous rules stay in force, retrying");
                let node_ref = ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Node".into()),
                    name: Some(self.node.node_name.clone()),
                    ..Default::default()
                };
                self.events
                    .warning(&node_ref, reasons::APPLY_FAILED, "Apply", e.to_string())
                    .await;
                // Force a full re-apply next time.
                if let Ok(mut l) = last.lock() {
                    l.payload = None;
                }
                Err(())
            }
            Err(join) => {
                tracing::error!(error = %join, "apply task died");
                Err(())
            }
        }
    }

    async fn report_diagnostics(&self, diags: &[Diagnostic], last: &Mutex<LastState>) {
        self.metrics.netpol_diagnostics.set(diags.len() as i64);
        let current: BTreeSet<_> = diags
            .iter()
            .map(|d| {
                (
                    d.kind.to_string(),
                    d.namespace.clone().unwrap_or_default(),
                    d.name.clone(),
                    format!("{}: {}", d.reason, d.message),
                )
            })
            .collect();
        let new: Vec<&Diagnostic> = {
            let Ok(mut l) = last.lock() else { return };
            let new = diags
                .iter()
                .filter(|d| {
                    !l.reported.contains(&(
                        d.kind.to_string(),
                        d.namespace.clone().unwrap_or_default(),
                        d.name.clone(),
                        format!("{}: {}", d.reason, d.message),
                    ))
                })
                .collect();
            l.reported = current;
            new
        };
        for d in new {
            let obj = ObjectReference {
                api_version: Some(
                    match d.kind {
                        "NetworkPolicy" => "networking.k8s.io/v1",
                        _ => "v1",
                    }
                    .into(),
                ),
                kind: Some(d.kind.to_string()),
                namespace: d.namespace.clone(),
                name: Some(d.name.clone()),
                ..Default::default()
            };
            self.events
                .warning(&obj, d.reason, "Compile", d.message.clone())
                .await;
        }
    }
}
