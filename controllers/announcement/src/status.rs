//! The `ServiceL2Status` writer: performs `palisade_loadbalancer::l2status::plan` (which
//! objects this node creates, updates or deletes) in its own loop, so a slow or absent API
//! never delays a failover.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::DynamicObject;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::Store;
use kube::{Api, Client};
use palisade_loadbalancer::l2status::{
    fits_label_value, plan, Existing, Op, Snapshot, MIN_INTERVAL, NODE_LABEL, SERVICE_LABEL,
};
use palisade_loadbalancer::{ServiceL2Status, ServiceL2StatusSpec, ServiceL2StatusStatus};
use palisade_runtime::config::SyncSettings;
use palisade_runtime::metrics::{Labels, Metrics};
use palisade_runtime::stores::{palisade_api_resource, typed_objects, CacheGroup, Caches};
use palisade_runtime::sync::{poke_on_change, run_sync_loop, JobError, Trigger};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Why a status pass failed: some writes did not go through (retried with backoff).
#[derive(Debug, thiserror::Error)]
#[error("{0} ServiceL2Status writes failed")]
pub struct WriteError(usize);

impl JobError for WriteError {
    fn label(&self) -> &'static str {
        "status_write"
    }
}

/// The cache the status writer reads: the `ServiceL2Status` objects.
#[derive(Clone)]
pub struct StatusCaches {
    pub service_l2_statuses: Store<DynamicObject>,
    pub group: CacheGroup,
}

impl StatusCaches {
    /// Registers what the writer reads; every change pokes `trigger`.
    pub fn register(caches: &mut Caches, trigger: &Trigger) -> StatusCaches {
        let mut r = caches.register(trigger);
        StatusCaches {
            service_l2_statuses: r.watch_custom(&palisade_api_resource(
                "ServiceL2Status",
                "servicel2statuses",
            )),
            group: r.finish(),
        }
    }
}

/// Keeps this node's `ServiceL2Status` objects true (see the module docs).
pub struct StatusWriter {
    pub client: Client,
    pub node_name: String,
    pub stores: StatusCaches,
    pub metrics: Arc<Metrics>,
    pub settings: SyncSettings,
    pub snapshot: watch::Receiver<Option<Snapshot>>,
}

impl StatusWriter {
    pub async fn run(self, trigger: Trigger, shutdown: CancellationToken) {
        poke_on_change(self.snapshot.clone(), trigger.clone(), shutdown.clone());
        if !self.stores.group.synced(&shutdown).await {
            return;
        }
        let mut settings = self.settings;
        settings.min_interval = settings.min_interval.max(MIN_INTERVAL);
        let this = Arc::new(self);
        trigger.poke();
        {
            let this = this.clone();
            let metrics = Some(this.metrics.clone());
            run_sync_loop(
                settings,
                trigger,
                shutdown,
                "l2status",
                metrics,
                move |_| {
                    let this = this.clone();
                    async move { this.pass().await }
                },
            )
            .await;
        }
        // On the way out the speaker stops answering: say so, within a short bound (the new
        // owner would delete the objects anyway once this node has left the membership).
        let _ = tokio::time::timeout(Duration::from_secs(2), this.delete_own()).await;
    }

    fn existing(&self) -> Vec<Existing> {
        let (objs, bad) =
            typed_objects::<ServiceL2Status>(&self.stores.service_l2_statuses.state());
        for (name, err) in bad {
            tracing::debug!(%name, error = %err, "ignoring a malformed ServiceL2Status");
        }
        objs.iter().filter_map(Existing::from_object).collect()
    }

    async fn pass(&self) -> Result<(), WriteError> {
        let Some(snap) = self.snapshot.borrow().clone() else {
            return Ok(());
        };
        let ops = plan(&self.node_name, &snap, &self.existing());
        let mut failed = 0;
        for op in ops {
            if !self.execute(op).await {
                failed += 1;
            }
        }
        if failed == 0 {
            Ok(())
        } else {
            Err(WriteError(failed))
        }
    }

    async fn delete_own(&self) {
        for e in self.existing() {
            if e.node == self.node_name {
                self.execute(Op::Delete {
                    namespace: e.namespace,
                    name: e.name,
                    uid: e.uid,
                    why: "the agent is stopping".into(),
                })
                .await;
            }
        }
    }

    fn count(&self, op: &'static str, result: &'static str) {
        let labels: Labels = vec![("op", op.into()), ("result", result.into())];
        self.metrics.l2_status_writes.get_or_create(&labels).inc();
    }

    /// Carries out one write; false if it failed and should be retried.
    async fn execute(&self, op: Op) -> bool {
        let (kind, result) = match op {
            Op::Create {
                namespace,
                name,
                service_uid,
                status,
            } => {
                let api: Api<ServiceL2Status> = Api::namespaced(self.client.clone(), &namespace);
                let mut labels =
                    BTreeMap::from([(SERVICE_LABEL.to_string(), status.service_name.clone())]);
                if fits_label_value(&status.node) {
                    labels.insert(NODE_LABEL.to_string(), status.node.clone());
                }
                let owner = service_uid.map(|uid| OwnerReference {
                    api_version: "v1".into(),
                    kind: "Service".into(),
                    name: status.service_name.clone(),
                    uid,
                    ..Default::default()
                });
                let obj = ServiceL2Status {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(namespace.clone()),
                        labels: Some(labels),
                        owner_references: owner.map(|o| vec![o]),
                        ..Default::default()
                    },
                    spec: ServiceL2StatusSpec {},
                    status: None,
                };
                let created = match api.create(&PostParams::default(), &obj).await {
                    Ok(_) => Ok(()),
                    // Our cache was behind: the object is there, its status is what matters.
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                    Err(e) => Err(e),
                };
                let result = match created {
                    Ok(()) => write_status(&api, &name, &status).await,
                    Err(e) => Err(e),
                };
                if result.is_ok() {
                    tracing::info!(%namespace, %name, ips = ?status.ips, "ServiceL2Status created");
                }
                ("create", result)
            }
            Op::Update {
                namespace,
                name,
                status,
            } => {
                let api: Api<ServiceL2Status> = Api::namespaced(self.client.clone(), &namespace);
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
                why,
            } => {
                let api: Api<ServiceL2Status> = Api::namespaced(self.client.clone(), &namespace);
                let params = DeleteParams {
                    preconditions: uid.map(|uid| Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                let result = match api.delete(&name, &params).await {
                    Ok(_) => {
                        tracing::info!(%namespace, %name, %why, "ServiceL2Status deleted");
                        Ok(())
                    }
                    // Gone already, or replaced by a new object of the same name.
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
                    Err(e) => Err(e),
                };
                ("delete", result)
            }
        };
        match result {
            Ok(()) => {
                self.count(kind, "ok");
                true
            }
            Err(e) => {
                self.count(kind, "error");
                tracing::warn!(op = kind, error = %e, "ServiceL2Status write failed; retrying");
                false
            }
        }
    }
}

async fn write_status(
    api: &Api<ServiceL2Status>,
    name: &str,
    status: &ServiceL2StatusStatus,
) -> Result<(), kube::Error> {
    let patch = json!({ "status": status });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}
