//! The BGP status writer: keeps this node's `BGPSessionStatus` (one per peer) and
//! `ServiceBGPStatus` (one per announced Service) objects equal to what the speaker does,
//! with the pure `palisade_loadbalancer::bgpstatus::plan`, in its own loop (every change of
//! the plan, and every [`REFRESH`] for session state), so the API never slows the sessions.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::Store;
use kube::{Api, Client};
use palisade_bgp::{PeerStatus, Speaker};
use palisade_loadbalancer::bgp::BgpPlan;
use palisade_loadbalancer::bgpstatus::{plan, service_object, session_object, Existing, Op};
use palisade_loadbalancer::crd::{BGPSessionStatus, BGPSessionStatusStatus, ServiceBGPStatus};
use palisade_runtime::config::SyncSettings;
use palisade_runtime::metrics::Metrics;
use palisade_runtime::stores::{palisade_api_resource, typed_objects, CacheGroup, Caches};
use palisade_runtime::sync::{poke_on_change, run_sync_loop, JobError, Trigger};
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often session state (uptime, prefixes, BFD) is looked at without other changes.
pub const REFRESH: Duration = Duration::from_secs(2);

/// Some writes failed (retried with backoff).
#[derive(Debug, thiserror::Error)]
#[error("{0} BGP status writes failed")]
pub struct WriteError(usize);

impl JobError for WriteError {
    fn label(&self) -> &'static str {
        "bgp_status_write"
    }
}

/// What the writer reads: both status kinds, and Services (for owner references).
#[derive(Clone)]
pub struct BgpStatusCaches {
    pub sessions: Store<DynamicObject>,
    pub services: Store<DynamicObject>,
    pub svc: Store<Service>,
    pub group: CacheGroup,
}

impl BgpStatusCaches {
    pub fn register(caches: &mut Caches, trigger: &Trigger) -> BgpStatusCaches {
        let mut r = caches.register(trigger);
        BgpStatusCaches {
            sessions: r.watch_custom(&palisade_api_resource(
                "BGPSessionStatus",
                "bgpsessionstatuses",
            )),
            services: r.watch_custom(&palisade_api_resource(
                "ServiceBGPStatus",
                "servicebgpstatuses",
            )),
            svc: r.watch(),
            group: r.finish(),
        }
    }
}

pub struct BgpStatusWriter {
    pub client: Client,
    pub node_name: String,
    pub stores: BgpStatusCaches,
    pub metrics: Arc<Metrics>,
    pub settings: SyncSettings,
    pub speaker: Arc<Speaker>,
    pub plan: watch::Receiver<Option<BgpPlan>>,
}

fn rfc3339(t: std::time::SystemTime) -> Option<String> {
    let ts = jiff::Timestamp::try_from(t).ok()?;
    jiff::Timestamp::from_second(ts.as_second())
        .ok()
        .map(|t| t.to_string())
}

/// The status of one session as the API shows it.
pub fn session_status(node: &str, peer_address: &str, s: &PeerStatus) -> BGPSessionStatusStatus {
    BGPSessionStatusStatus {
        node: node.to_string(),
        peer: s.name.clone(),
        peer_address: peer_address.to_string(),
        state: s.state.as_str().to_string(),
        established_at: s.established_wall.and_then(rfc3339),
        prefixes_sent: s.prefixes_sent as u64,
        hold_time_seconds: s.hold_time.map(|h| h.as_secs()),
        bfd_state: s.bfd_state.map(|b| b.as_str().to_string()),
        bfd_flaps: s.bfd_flaps,
        last_down_reason: s.last_down_reason.clone(),
    }
}

impl BgpStatusWriter {
    pub async fn run(self, trigger: Trigger, shutdown: CancellationToken) {
        poke_on_change(self.plan.clone(), trigger.clone(), shutdown.clone());
        if !self.stores.group.synced(&shutdown).await {
            return;
        }
        {
            let trigger = trigger.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(REFRESH) => trigger.poke(),
                    }
                }
            });
        }
        let mut settings = self.settings;
        settings.min_interval = settings.min_interval.max(Duration::from_millis(500));
        let this = Arc::new(self);
        trigger.poke();
        {
            let this = this.clone();
            let metrics = Some(this.metrics.clone());
            run_sync_loop(
                settings,
                trigger,
                shutdown,
                "bgpstatus",
                metrics,
                move |_| {
                    let this = this.clone();
                    async move { this.pass(false).await }
                },
            )
            .await;
        }
        // The sessions are closed on the way out: so are their objects.
        let _ = tokio::time::timeout(Duration::from_secs(2), this.pass(true)).await;
    }

    async fn pass(&self, stopping: bool) -> Result<(), WriteError> {
        let Some(planned) = self.plan.borrow().clone() else {
            return Ok(());
        };
        let mut sessions = Vec::new();
        let mut services = Vec::new();
        if !stopping {
            for s in self.speaker.status() {
                let Some(p) = planned.peers.get(&s.name) else {
                    continue;
                };
                let addr = p.peer_address.to_string();
                sessions.push(session_object(session_status(&self.node_name, &addr, &s)));
            }
            let uids: BTreeMap<(String, String), String> = self
                .stores
                .svc
                .state()
                .iter()
                .filter_map(|s| {
                    Some((
                        (s.metadata.namespace.clone()?, s.metadata.name.clone()?),
                        s.metadata.uid.clone()?,
                    ))
                })
                .collect();
            for ((ns, name), peers) in &planned.services {
                let uid = uids.get(&(ns.clone(), name.clone())).map(String::as_str);
                services.push(service_object(ns, name, uid, &self.node_name, peers));
            }
        }
        let (existing_sessions, _) =
            typed_objects::<BGPSessionStatus>(&self.stores.sessions.state());
        let existing_sessions: Vec<_> = existing_sessions
            .iter()
            .filter_map(Existing::from_session)
            .collect();
        let (existing_services, _) =
            typed_objects::<ServiceBGPStatus>(&self.stores.services.state());
        let existing_services: Vec<_> = existing_services
            .iter()
            .filter_map(Existing::from_service)
            .collect();
        let mut failed = 0;
        for op in plan(&self.node_name, &sessions, &existing_sessions) {
            if !self
                .execute("BGPSessionStatus", "bgpsessionstatuses", op)
                .await
            {
                failed += 1;
            }
        }
        for op in plan(&self.node_name, &services, &existing_services) {
            if !self
                .execute("ServiceBGPStatus", "servicebgpstatuses", op)
                .await
            {
                failed += 1;
            }
        }
        if failed == 0 {
            Ok(())
        } else {
            Err(WriteError(failed))
        }
    }

    fn api(&self, kind: &str, plural: &str, namespace: Option<&str>) -> Api<DynamicObject> {
        let ar = palisade_api_resource(kind, plural);
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        }
    }

    /// One write; false when it failed and should be retried.
    async fn execute<S: Serialize>(&self, kind: &str, plural: &str, op: Op<S>) -> bool {
        let (what, result) = match op {
            Op::Create(w) => {
                let api = self.api(kind, plural, w.namespace.as_deref());
                let mut metadata = json!({"name": w.name, "labels": w.labels});
                if let Some(ns) = &w.namespace {
                    metadata["namespace"] = json!(ns);
                }
                if let Some((name, uid)) = &w.owner {
                    metadata["ownerReferences"] = json!([OwnerReference {
                        api_version: "v1".into(),
                        kind: "Service".into(),
                        name: name.clone(),
                        uid: uid.clone(),
                        ..Default::default()
                    }]);
                }
                let obj = json!({"apiVersion": "palisade.dev/v1alpha1", "kind": kind,
                    "metadata": metadata, "spec": {}});
                let result = match serde_json::from_value::<DynamicObject>(obj) {
                    Err(e) => {
                        tracing::warn!(kind, error = %e, "cannot build a status object");
                        return true;
                    }
                    Ok(obj) => match api.create(&PostParams::default(), &obj).await {
                        Ok(_) => Ok(()),
                        // Our cache was behind: the object is there, its status is what matters.
                        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                        Err(e) => Err(e),
                    },
                };
                let result = match result {
                    Ok(()) => write_status(&api, &w.name, &w.status).await,
                    Err(e) => Err(e),
                };
                ("create", result)
            }
            Op::Update {
                namespace,
                name,
                status,
            } => {
                let api = self.api(kind, plural, namespace.as_deref());
                let result = match write_status(&api, &name, &status).await {
                    // Deleted meanwhile: the next pass creates it again if still wanted.
                    Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                    r => r,
                };
                ("update", result)
            }
            Op::Delete {
                namespace,
                name,
                uid,
            } => {
                let api = self.api(kind, plural, namespace.as_deref());
                let params = DeleteParams {
                    preconditions: uid.map(|uid| Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                let result = match api.delete(&name, &params).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
                    Err(e) => Err(e),
                };
                ("delete", result)
            }
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(kind, op = what, error = %e, "BGP status write failed; retrying");
                false
            }
        }
    }
}

async fn write_status<S: Serialize>(
    api: &Api<DynamicObject>,
    name: &str,
    status: &S,
) -> Result<(), kube::Error> {
    let patch = json!({ "status": status });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}
