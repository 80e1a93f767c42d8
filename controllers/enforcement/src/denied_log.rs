//! The denied-traffic log: reads what our chains sent to NFLOG, names the pods and the
//! isolating policies, and reports each denied flow once.
//!
//! ```text
//!  NflogSocket (palisade-dataplane) ─► parse_packet ─► DenyIndex::resolve (palisade-netpol,
//!                                                      rebuilt by the reconciler each sync)
//!      ├─► palisade_netpol_denied_packets_total{direction,namespace,pod}  (every logged packet)
//!      └─► Dedup (one per flow per window) ─► log line "denied traffic" + Event on the pod
//! ```
//!
//! Only this node's pods are counted (the isolated side of a drop here is always local),
//! so the metric's cardinality is bounded by the node's pods. The kernel rate-limits per pod
//! before NFLOG (`DenyLog::rate`), which bounds this loop's work under a flood.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use palisade_dataplane::nflog::NflogSocket;
use palisade_netpol::denied::{parse_packet, Dedup, DeniedFlow, DenyIndex};
use palisade_runtime::events::EventSink;
use palisade_runtime::metrics::Metrics;
use tokio_util::sync::CancellationToken;

/// Event reason of a denied flow on the pod.
pub const REASON_DENIED: &str = "NetworkPolicyDenied";
/// Event reason of a flow an audit-mode policy would deny.
pub const REASON_WOULD_DENY: &str = "NetworkPolicyWouldDeny";

/// The index the reconciler keeps current and the logger reads.
pub type SharedIndex = Arc<RwLock<Arc<DenyIndex>>>;

/// A flow is logged once per this window.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(60);
/// Flows remembered for de-duplication.
pub const DEDUP_CAPACITY: usize = 16_384;

pub struct DeniedLogger {
    pub group: u16,
    pub index: SharedIndex,
    pub metrics: Arc<Metrics>,
    pub events: EventSink,
}

impl DeniedLogger {
    /// Runs until `shutdown`. A socket that cannot be bound is logged once (the rules still
    /// drop; only the log is missing).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut socket = match NflogSocket::bind(self.group).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(group = self.group, error = %e, "denied-traffic log cannot read NFLOG; denials are not logged");
                return;
            }
        };
        tracing::info!(group = self.group, "denied-traffic log reading NFLOG");
        let start = Instant::now();
        let mut dedup = Dedup::new(DEDUP_WINDOW, DEDUP_CAPACITY);
        loop {
            let batch = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = socket.recv() => r,
            };
            let messages = match batch {
                Ok(m) => m,
                Err(e) => {
                    // ENOBUFS (the kernel dropped messages) and the like: keep reading.
                    tracing::warn!(error = %e, "reading NFLOG");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let index = match self.index.read() {
                Ok(i) => i.clone(),
                Err(_) => return,
            };
            for m in messages {
                let Some(pkt) = parse_packet(&m.payload) else {
                    continue;
                };
                let Some(flow) = index.resolve(&m.prefix, &pkt) else {
                    continue;
                };
                self.count(&flow);
                if dedup.first(&flow, start.elapsed()) {
                    self.report(&flow).await;
                }
            }
        }
    }

    fn count(&self, flow: &DeniedFlow) {
        let (ns, pod) = flow.local_pod.clone().unwrap_or_default();
        let family = if flow.cause == "would-deny" {
            &self.metrics.netpol_would_deny_packets
        } else {
            &self.metrics.netpol_denied_packets
        };
        family
            .get_or_create(&vec![
                ("direction", flow.direction.to_string()),
                ("namespace", ns),
                ("pod", pod),
            ])
            .inc();
    }

    async fn report(&self, flow: &DeniedFlow) {
        tracing::info!(
            target: "palisade::denied",
            verdict = %flow.cause,
            direction = %flow.direction,
            protocol = %flow.protocol,
            src = %flow.src.ip,
            dst = %flow.dst.ip,
            dport = flow.dport.map(i64::from).unwrap_or(-1),
            src_pod = %flow.src.name(),
            dst_pod = %flow.dst.name(),
            policies = %flow.policies.join(","),
            "{}",
            if flow.cause == "would-deny" {
                "would-deny traffic (audit mode)"
            } else {
                "denied traffic"
            }
        );
        if let Some((ns, name)) = &flow.local_pod {
            let pod = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(ns.clone()),
                name: Some(name.clone()),
                ..Default::default()
            };
            self.events
                .warning(
                    &pod,
                    if flow.cause == "would-deny" {
                        REASON_WOULD_DENY
                    } else {
                        REASON_DENIED
                    },
                    "Deny",
                    flow.event_note(),
                )
                .await;
        }
    }
}
