//! The table of kinds the server serves, and how each behaves.

use std::collections::HashMap;

/// One servable kind: where it lives in the API and how the server treats it.
///
/// Build one with [`ResourceDef::new`] (or [`ResourceDef::cluster`] / [`ResourceDef::namespaced`])
/// and adjust it with the `with_*` methods, then pass it to
/// [`crate::TestApiServer::register`] or [`crate::Store::register`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceDef {
    /// API group, `""` for the core group.
    pub group: String,
    /// API version inside the group, e.g. `v1`.
    pub version: String,
    /// Kind, e.g. `Pod`.
    pub kind: String,
    /// Lower-case plural used in paths, e.g. `pods`.
    pub plural: String,
    /// Namespaced (`true`) or cluster-scoped (`false`).
    pub namespaced: bool,
    /// Whether the kind has a `/status` subresource. If so, writes to the main resource keep the
    /// stored `status`, writes to `/status` change only `status`, and `create` drops `status`
    /// unless [`ResourceDef::create_keeps_status`] is set.
    pub status_subresource: bool,
    /// Whether `create` keeps a client-supplied `status` although the kind has a status
    /// subresource (the real server does this for Nodes).
    pub create_keeps_status: bool,
    /// Whether `PUT` on a missing object creates it (the real server does this for Leases and
    /// Events); otherwise it answers 404.
    pub create_on_update: bool,
    /// Field-selector paths accepted besides `metadata.name` and `metadata.namespace`. Other
    /// paths are rejected with 400, as the real server does.
    pub selectable_fields: Vec<String>,
}

impl ResourceDef {
    /// A kind with no status subresource, no create-on-update and no extra selectable fields.
    pub fn new(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        Self {
            group: group.to_owned(),
            version: version.to_owned(),
            kind: kind.to_owned(),
            plural: plural.to_owned(),
            namespaced,
            status_subresource: false,
            create_keeps_status: false,
            create_on_update: false,
            selectable_fields: Vec::new(),
        }
    }

    /// Shorthand for a namespaced [`ResourceDef::new`].
    pub fn namespaced(group: &str, version: &str, kind: &str, plural: &str) -> Self {
        Self::new(group, version, kind, plural, true)
    }

    /// Shorthand for a cluster-scoped [`ResourceDef::new`].
    pub fn cluster(group: &str, version: &str, kind: &str, plural: &str) -> Self {
        Self::new(group, version, kind, plural, false)
    }

    /// Gives the kind a `/status` subresource.
    #[must_use]
    pub fn with_status(mut self) -> Self {
        self.status_subresource = true;
        self
    }

    /// Lets `create` keep a client-supplied `status`.
    #[must_use]
    pub fn with_create_keeps_status(mut self) -> Self {
        self.create_keeps_status = true;
        self
    }

    /// Lets `PUT` create a missing object.
    #[must_use]
    pub fn with_create_on_update(mut self) -> Self {
        self.create_on_update = true;
        self
    }

    /// Adds field-selector paths (dotted JSON paths such as `spec.nodeName`).
    #[must_use]
    pub fn with_selectable_fields(mut self, fields: &[&str]) -> Self {
        self.selectable_fields
            .extend(fields.iter().map(|f| (*f).to_owned()));
        self
    }

    /// `v1` for the core group, `group/version` otherwise.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural` for the core group, `plural.group` otherwise (as used in error messages).
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Lower-case kind, as discovery reports it.
    pub fn singular(&self) -> String {
        self.kind.to_ascii_lowercase()
    }
}

/// The kinds served out of the box.
pub fn default_resources() -> Vec<ResourceDef> {
    vec![
        ResourceDef::namespaced("", "v1", "Pod", "pods")
            .with_status()
            .with_selectable_fields(&[
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ]),
        ResourceDef::cluster("", "v1", "Namespace", "namespaces")
            .with_status()
            .with_selectable_fields(&["status.phase"]),
        ResourceDef::cluster("", "v1", "Node", "nodes")
            .with_status()
            .with_create_keeps_status()
            .with_selectable_fields(&["spec.unschedulable"]),
        ResourceDef::namespaced("", "v1", "Service", "services")
            .with_status()
            .with_selectable_fields(&["spec.clusterIP", "spec.type"]),
        ResourceDef::namespaced("", "v1", "Event", "events")
            .with_create_on_update()
            .with_selectable_fields(&[
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ]),
        ResourceDef::namespaced("", "v1", "ConfigMap", "configmaps"),
        ResourceDef::namespaced(
            "networking.k8s.io",
            "v1",
            "NetworkPolicy",
            "networkpolicies",
        ),
        ResourceDef::namespaced("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
        ResourceDef::namespaced("events.k8s.io", "v1", "Event", "events").with_create_on_update(),
        ResourceDef::namespaced("coordination.k8s.io", "v1", "Lease", "leases")
            .with_create_on_update(),
        ResourceDef::cluster(
            "palisade.dev",
            "v1alpha1",
            "IPAddressPool",
            "ipaddresspools",
        )
        .with_status(),
        ResourceDef::cluster(
            "palisade.dev",
            "v1alpha1",
            "L2Advertisement",
            "l2advertisements",
        )
        .with_status(),
        ResourceDef::namespaced(
            "palisade.dev",
            "v1alpha1",
            "ServiceL2Status",
            "servicel2statuses",
        )
        .with_status(),
        // network-policy-api's CRD (installed by the user, or by the chart on request).
        ResourceDef::cluster(
            "policy.networking.k8s.io",
            "v1alpha2",
            "ClusterNetworkPolicy",
            "clusternetworkpolicies",
        )
        .with_status(),
        ResourceDef::cluster("palisade.dev", "v1alpha1", "BGPPeer", "bgppeers").with_status(),
        ResourceDef::cluster(
            "palisade.dev",
            "v1alpha1",
            "BGPAdvertisement",
            "bgpadvertisements",
        )
        .with_status(),
        ResourceDef::cluster("palisade.dev", "v1alpha1", "BFDProfile", "bfdprofiles").with_status(),
        ResourceDef::cluster(
            "palisade.dev",
            "v1alpha1",
            "BGPSessionStatus",
            "bgpsessionstatuses",
        )
        .with_status(),
        ResourceDef::namespaced(
            "palisade.dev",
            "v1alpha1",
            "ServiceBGPStatus",
            "servicebgpstatuses",
        )
        .with_status(),
    ]
}

/// Index of a kind inside a [`Registry`]. Stable for the registry's lifetime.
pub(crate) type ResourceId = usize;

/// Lookup tables over the registered kinds. Append-only: re-registering a kind replaces its
/// definition but keeps its id (and its objects).
#[derive(Debug, Default)]
pub(crate) struct Registry {
    defs: Vec<ResourceDef>,
    by_path: HashMap<(String, String, String), ResourceId>,
    by_kind: HashMap<(String, String), ResourceId>,
}

impl Registry {
    pub(crate) fn register(&mut self, def: ResourceDef) -> ResourceId {
        let path_key = (def.group.clone(), def.version.clone(), def.plural.clone());
        let kind_key = (def.api_version(), def.kind.clone());
        if let Some(&id) = self.by_path.get(&path_key) {
            if let Some(old) = self.defs.get(id) {
                self.by_kind.remove(&(old.api_version(), old.kind.clone()));
            }
            self.by_kind.insert(kind_key, id);
            if let Some(slot) = self.defs.get_mut(id) {
                *slot = def;
            }
            return id;
        }
        let id = self.defs.len();
        self.by_path.insert(path_key, id);
        self.by_kind.insert(kind_key, id);
        self.defs.push(def);
        id
    }

    pub(crate) fn get(&self, id: ResourceId) -> Option<&ResourceDef> {
        self.defs.get(id)
    }

    pub(crate) fn by_path(&self, group: &str, version: &str, plural: &str) -> Option<ResourceId> {
        self.by_path
            .get(&(group.to_owned(), version.to_owned(), plural.to_owned()))
            .copied()
    }

    pub(crate) fn by_kind(&self, api_version: &str, kind: &str) -> Option<ResourceId> {
        self.by_kind
            .get(&(api_version.to_owned(), kind.to_owned()))
            .copied()
    }

    pub(crate) fn all(&self) -> &[ResourceDef] {
        &self.defs
    }
}
