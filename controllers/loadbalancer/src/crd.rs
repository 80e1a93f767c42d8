//! Custom resource types of the LoadBalancer controller (`palisade.dev/v1alpha1`).
//!
//! This module owns the Rust types that are the source of truth for `crds/*.yaml`:
//!
//! ```text
//!   IPAddressPool (cluster)            L2Advertisement (cluster)
//!   spec.addresses ──► pool::parse     spec.ipAddressPools / ipAddressPoolSelectors
//!   spec.autoAssign                    spec.nodeSelectors / interfaces
//!   spec.avoidBuggyIPs                 status.conditions
//!   spec.serviceAllocation
//!   status.{assigned,available}IPv{4,6}, conditions
//! ```
//!
//! Field names follow MetalLB (`metallb.io/v1beta1`) so manifests port by changing the
//! `apiVersion`. Only what OpenAPI can express is validated here; everything else (address
//! syntax, overlaps) is checked by [`crate::pool`] and reported through status conditions.
//!
//! Status counters are `int64` like MetalLB's. An IPv6 pool can hold more than `i64::MAX`
//! addresses; the counters then saturate at `i64::MAX` (9.2e18), which reads as "practically
//! unlimited" and keeps the printer columns numeric and sortable. Exact counts are available
//! from [`crate::pool`] as `u128`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A set of addresses LoadBalancer Services may get their IPs from.
// Several printcolumn(...) entries repeat `type_`/`priority`; clippy reads them as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "IPAddressPool",
    plural = "ipaddresspools",
    singular = "ipaddresspool",
    shortname = "ipp",
    category = "palisade",
    status = "IPAddressPoolStatus",
    derive = "PartialEq",
    doc = "A pool of IP addresses that LoadBalancer Services are assigned from.",
    printcolumn(name = "Addresses", type_ = "string", json_path = ".spec.addresses"),
    printcolumn(
        name = "Auto Assign",
        type_ = "boolean",
        json_path = ".spec.autoAssign"
    ),
    printcolumn(
        name = "Assigned v4",
        type_ = "integer",
        json_path = ".status.assignedIPv4"
    ),
    printcolumn(
        name = "Available v4",
        type_ = "integer",
        json_path = ".status.availableIPv4"
    ),
    printcolumn(
        name = "Assigned v6",
        type_ = "integer",
        json_path = ".status.assignedIPv6",
        priority = 1
    ),
    printcolumn(
        name = "Available v6",
        type_ = "integer",
        json_path = ".status.availableIPv6",
        priority = 1
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct IPAddressPoolSpec {
    /// Address entries: CIDRs (`198.51.100.0/24`, `2001:db8::/120`), inclusive ranges
    /// (`198.51.100.200-198.51.100.250`) or single IPs. IPv4 and IPv6 may be mixed.
    #[schemars(length(min = 1))]
    pub addresses: Vec<String>,

    /// Whether Services may get addresses from this pool without naming it. Default true.
    #[serde(
        default = "default_auto_assign",
        skip_serializing_if = "Option::is_none"
    )]
    pub auto_assign: Option<bool>,

    /// Skip IPv4 addresses ending in `.0` and `.255` (some broken clients drop them).
    #[serde(default, rename = "avoidBuggyIPs")]
    pub avoid_buggy_ips: bool,

    /// Restricts which Services may get addresses from this pool, and in which order pools
    /// are tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,
}

#[allow(clippy::unnecessary_wraps)]
fn default_auto_assign() -> Option<bool> {
    Some(true)
}

impl IPAddressPoolSpec {
    /// `autoAssign` with its default applied.
    pub fn auto_assign(&self) -> bool {
        self.auto_assign.unwrap_or(true)
    }
}

/// Which Services a pool serves, and its priority.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    /// Lower numbers are tried first; pools with a priority come before pools without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Namespaces whose Services may use this pool (empty: no restriction by name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Selectors over Namespace labels (empty: no restriction). Any one matching is enough.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace_selectors: Vec<LabelSelector>,
    /// Selectors over Service labels (empty: no restriction). Any one matching is enough.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_selectors: Vec<LabelSelector>,
}

/// Observed state of an `IPAddressPool`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct IPAddressPoolStatus {
    /// IPv4 addresses assigned to Services (saturates at `i64::MAX`).
    #[serde(default, rename = "assignedIPv4")]
    pub assigned_ipv4: i64,
    /// IPv6 addresses assigned to Services (saturates at `i64::MAX`).
    #[serde(default, rename = "assignedIPv6")]
    pub assigned_ipv6: i64,
    /// IPv4 addresses still free (saturates at `i64::MAX`).
    #[serde(default, rename = "availableIPv4")]
    pub available_ipv4: i64,
    /// IPv6 addresses still free (saturates at `i64::MAX`).
    #[serde(default, rename = "availableIPv6")]
    pub available_ipv6: i64,
    /// `Ready`, `Invalid` and `Overlapping` conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Announces the IPs of some pools over ARP (IPv4) from some nodes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "L2Advertisement",
    plural = "l2advertisements",
    singular = "l2advertisement",
    shortname = "l2adv",
    category = "palisade",
    status = "L2AdvertisementStatus",
    derive = "PartialEq",
    doc = "Announces LoadBalancer IPs of selected pools at layer 2 from selected nodes.",
    printcolumn(
        name = "IPAddressPools",
        type_ = "string",
        json_path = ".spec.ipAddressPools"
    ),
    printcolumn(
        name = "IPAddressPool Selectors",
        type_ = "string",
        json_path = ".spec.ipAddressPoolSelectors",
        priority = 1
    ),
    printcolumn(name = "Interfaces", type_ = "string", json_path = ".spec.interfaces"),
    printcolumn(
        name = "Node Selectors",
        type_ = "string",
        json_path = ".spec.nodeSelectors",
        priority = 1
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct L2AdvertisementSpec {
    /// Pools (by name) to announce. Empty together with empty `ipAddressPoolSelectors`:
    /// announce every pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pools: Vec<String>,
    /// Selectors over pool labels, OR-ed with `ipAddressPools`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pool_selectors: Vec<LabelSelector>,
    /// Nodes allowed to announce (any selector matching is enough; empty: all nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<LabelSelector>,
    /// Interfaces to answer ARP/NDP on (empty: the interface holding the route to the IP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
    /// Soft preference among the allowed nodes (MetalLB's field of the same name, shaped like
    /// Kubernetes' `preferredDuringSchedulingIgnoredDuringExecution`): of the nodes that may
    /// announce an IP, those with the highest summed `weight` of matching `preference`s win;
    /// ties, and no preferences at all, fall back to the hash election. Weights of every
    /// advertisement announcing the pool add up. A malformed `preference` matches nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred_node_selectors: Vec<PreferredNodeSelector>,
}

/// One weighted soft preference of an `L2Advertisement`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreferredNodeSelector {
    /// 1..100, added to the score of every node `preference` matches.
    #[schemars(range(min = 1, max = 100))]
    pub weight: i32,
    /// Nodes this preference applies to (an empty selector matches every node).
    pub preference: LabelSelector,
}

/// Observed state of an `L2Advertisement`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct L2AdvertisementStatus {
    /// `Ready` and `Invalid` conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

// Which node answers ARP/NDP for a Service's IPs, written by that node's agent.
//
// One object per (Service, announcing node), in the Service's namespace, named
// `<service>.<node>` (see `palisade-runtime`'s `l2status`). The agent that announces creates
// it when it starts, keeps `status` equal to what its speaker answers for, and deletes it
// when it stops; the new owner of an IP deletes the object of a node that died. Two objects
// for one IP mean two nodes believe they own it (a network partition between them).
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "ServiceL2Status",
    plural = "servicel2statuses",
    singular = "servicel2status",
    shortname = "l2status",
    category = "palisade",
    namespaced,
    status = "ServiceL2StatusStatus",
    derive = "PartialEq",
    doc = "The node announcing a LoadBalancer Service's IPs at layer 2 (written by Palisade).",
    printcolumn(name = "Service", type_ = "string", json_path = ".status.serviceName"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.node"),
    printcolumn(name = "IPs", type_ = "string", json_path = ".status.ips"),
    printcolumn(
        name = "Interfaces",
        type_ = "string",
        json_path = ".status.interfaces"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
/// Empty: Palisade writes these objects and everything they say is in `status`.
pub struct ServiceL2StatusSpec {}

/// What one node announces for one Service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceL2StatusStatus {
    /// The announcing node.
    #[serde(default)]
    pub node: String,
    /// The Service (in this object's namespace).
    #[serde(default)]
    pub service_name: String,
    /// The Service's IPs this node answers ARP (IPv4) / Neighbor Solicitations (IPv6) for.
    #[serde(default)]
    pub ips: Vec<String>,
    /// The interfaces it answers on.
    #[serde(default)]
    pub interfaces: Vec<String>,
}

/// A BGP router the nodes' agents open sessions to (MetalLB's `BGPPeer` fields).
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "BGPPeer",
    plural = "bgppeers",
    singular = "bgppeer",
    shortname = "bgpp",
    category = "palisade",
    status = "BGPConfigStatus",
    derive = "PartialEq",
    doc = "A BGP router that selected nodes announce LoadBalancer IPs to.",
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.peerAddress"),
    printcolumn(name = "ASN", type_ = "integer", json_path = ".spec.peerASN"),
    printcolumn(name = "My ASN", type_ = "integer", json_path = ".spec.myASN"),
    printcolumn(name = "BFD Profile", type_ = "string", json_path = ".spec.bfdProfile"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct BGPPeerSpec {
    /// Our AS number (4-octet ASNs are fine).
    #[serde(rename = "myASN")]
    pub my_asn: u32,
    /// The router's AS number; equal to `myASN` for iBGP.
    #[serde(rename = "peerASN")]
    pub peer_asn: u32,
    /// The router's address (IPv4 or IPv6).
    #[serde(rename = "peerAddress")]
    pub peer_address: String,
    /// The router's TCP port.
    #[serde(rename = "peerPort", default = "default_bgp_port")]
    pub peer_port: u16,
    /// Local address the session is opened from (default: chosen by the routing table).
    #[serde(
        rename = "sourceAddress",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub source_address: Option<String>,
    /// Proposed hold time as a duration string (`90s`, `3m`); the session uses the smaller of
    /// both sides' proposals. Default `90s`.
    #[serde(rename = "holdTime", default, skip_serializing_if = "Option::is_none")]
    pub hold_time: Option<String>,
    /// Keepalive interval (default: a third of the hold time).
    #[serde(
        rename = "keepaliveTime",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub keepalive_time: Option<String>,
    /// BGP identifier to send (default: the node's IPv4 address).
    #[serde(rename = "routerID", default, skip_serializing_if = "Option::is_none")]
    pub router_id: Option<String>,
    /// Nodes that peer with this router (any selector matching is enough; empty: all nodes).
    #[serde(
        rename = "nodeSelectors",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub node_selectors: Vec<LabelSelector>,
    /// Secret (type `kubernetes.io/basic-auth`, key `password`) holding the TCP MD5 password.
    #[serde(
        rename = "passwordSecret",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub password_secret: Option<SecretReference>,
    /// Name of a `BFDProfile`: run BFD on this session and drop it when BFD goes down.
    #[serde(
        rename = "bfdProfile",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub bfd_profile: Option<String>,
    /// Whether the router may be more than one hop away (eBGP multihop).
    #[serde(rename = "ebgpMultiHop", default)]
    pub ebgp_multi_hop: bool,
}

fn default_bgp_port() -> u16 {
    179
}

/// A reference to a Secret by name and namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretReference {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Observed state of `BGPPeer`, `BGPAdvertisement` and `BFDProfile` objects.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BGPConfigStatus {
    /// `Ready` and `Invalid` conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Announces the IPs of some pools over BGP from some nodes to some peers.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "BGPAdvertisement",
    plural = "bgpadvertisements",
    singular = "bgpadvertisement",
    shortname = "bgpadv",
    category = "palisade",
    status = "BGPConfigStatus",
    derive = "PartialEq",
    doc = "Announces LoadBalancer IPs of selected pools over BGP from selected nodes.",
    printcolumn(
        name = "IPAddressPools",
        type_ = "string",
        json_path = ".spec.ipAddressPools"
    ),
    printcolumn(name = "Peers", type_ = "string", json_path = ".spec.peers"),
    printcolumn(
        name = "Node Selectors",
        type_ = "string",
        json_path = ".spec.nodeSelectors",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BGPAdvertisementSpec {
    /// Pools (by name) to announce; empty together with `ipAddressPoolSelectors`: every pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pools: Vec<String>,
    /// Selectors over pool labels, OR-ed with `ipAddressPools`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pool_selectors: Vec<LabelSelector>,
    /// Nodes that announce (empty: all nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<LabelSelector>,
    /// `BGPPeer` names to announce to (empty: every peer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// Prefix length IPv4 addresses are announced with.
    #[serde(default = "default_aggregation_v4")]
    pub aggregation_length: u8,
    /// Prefix length IPv6 addresses are announced with.
    #[serde(rename = "aggregationLengthV6", default = "default_aggregation_v6")]
    pub aggregation_length_v6: u8,
    /// LOCAL_PREF attached on iBGP sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pref: Option<u32>,
    /// Communities attached to the announcements, as `ASN:VALUE` (e.g. `64500:100`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
}

fn default_aggregation_v4() -> u8 {
    32
}

fn default_aggregation_v6() -> u8 {
    128
}

/// BFD timers for the sessions of peers that name this profile (MetalLB's `BFDProfile`).
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "BFDProfile",
    plural = "bfdprofiles",
    singular = "bfdprofile",
    shortname = "bfdp",
    category = "palisade",
    status = "BGPConfigStatus",
    derive = "PartialEq",
    doc = "BFD timers for BGP sessions whose BGPPeer names this profile.",
    printcolumn(
        name = "Receive Interval",
        type_ = "integer",
        json_path = ".spec.receiveInterval"
    ),
    printcolumn(
        name = "Transmit Interval",
        type_ = "integer",
        json_path = ".spec.transmitInterval"
    ),
    printcolumn(
        name = "Multiplier",
        type_ = "integer",
        json_path = ".spec.detectMultiplier"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BFDProfileSpec {
    /// Minimum interval between received packets we ask for, in milliseconds (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_interval: Option<u32>,
    /// Minimum interval between transmitted packets, in milliseconds (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transmit_interval: Option<u32>,
    /// Packets that may be lost before the session is declared down (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_multiplier: Option<u32>,
    /// Echo interval in milliseconds (echo mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo_interval: Option<u32>,
    /// Whether to use echo mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo_mode: Option<bool>,
    /// Whether to wait for the peer to start BFD instead of sending first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive_mode: Option<bool>,
    /// Minimum TTL of incoming packets (single hop: 254).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_ttl: Option<u32>,
}

// One node's session with one BGPPeer, written by that node's agent (cluster-scoped, named
// `<peer>.<node>`, labels `palisade.dev/node`, `palisade.dev/peer`). The agent creates it with
// the session, keeps it true every few seconds and deletes it when the peer no longer applies
// to the node or the agent stops.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "BGPSessionStatus",
    plural = "bgpsessionstatuses",
    singular = "bgpsessionstatus",
    shortname = "bgpsess",
    category = "palisade",
    status = "BGPSessionStatusStatus",
    derive = "PartialEq",
    doc = "One node's BGP session with one BGPPeer (written by Palisade).",
    printcolumn(name = "Node", type_ = "string", json_path = ".status.node"),
    printcolumn(name = "Peer", type_ = "string", json_path = ".status.peer"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Prefixes",
        type_ = "integer",
        json_path = ".status.prefixesSent"
    ),
    printcolumn(name = "BFD", type_ = "string", json_path = ".status.bfdState"),
    printcolumn(
        name = "Established",
        type_ = "date",
        json_path = ".status.establishedAt"
    ),
    printcolumn(
        name = "Last Down",
        type_ = "string",
        json_path = ".status.lastDownReason",
        priority = 1
    )
)]
/// Empty: Palisade writes these objects and everything they say is in `status`.
pub struct BGPSessionStatusSpec {}

/// The state of one node's session with one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BGPSessionStatusStatus {
    #[serde(default)]
    pub node: String,
    /// The BGPPeer's name.
    #[serde(default)]
    pub peer: String,
    #[serde(default)]
    pub peer_address: String,
    /// `Idle`, `Connect`, `OpenSent`, `OpenConfirm` or `Established`.
    #[serde(default)]
    pub state: String,
    /// When the session reached Established (RFC 3339); absent while it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub established_at: Option<String>,
    /// Prefixes the router has from this node.
    #[serde(default)]
    pub prefixes_sent: u64,
    /// Negotiated hold time in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_time_seconds: Option<u64>,
    /// `Up`, `Down`, `Init` or `AdminDown`; absent without a BFD profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd_state: Option<String>,
    /// Times BFD went from Up to Down.
    #[serde(default)]
    pub bfd_flaps: u64,
    /// Why the last established session ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_down_reason: Option<String>,
}

// Which node announces a Service's IPs over BGP, written by that node's agent (like MetalLB's
// ServiceBGPStatus): one object per (Service, announcing node) in the Service's namespace,
// named `<service>.<node>`, owned by the Service.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "ServiceBGPStatus",
    plural = "servicebgpstatuses",
    singular = "servicebgpstatus",
    shortname = "bgpstatus",
    category = "palisade",
    namespaced,
    status = "ServiceBGPStatusStatus",
    derive = "PartialEq",
    doc = "A node announcing a LoadBalancer Service's IPs over BGP (written by Palisade).",
    printcolumn(name = "Service", type_ = "string", json_path = ".status.serviceName"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.node"),
    printcolumn(name = "Peers", type_ = "string", json_path = ".status.peers"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
/// Empty: Palisade writes these objects and everything they say is in `status`.
pub struct ServiceBGPStatusSpec {}

/// What one node announces for one Service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceBGPStatusStatus {
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub service_name: String,
    /// The BGPPeers this node announces the Service's IPs to.
    #[serde(default)]
    pub peers: Vec<String>,
}

/// Parses a duration as MetalLB (Go's `time.ParseDuration`) writes them: one or more
/// `<number><unit>` with units `h`, `m`, `s`, `ms` (e.g. `90s`, `1m30s`, `500ms`); `0` alone is
/// zero. Fractions and negative values are rejected.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if text.is_empty() {
        return Err("empty duration".into());
    }
    let mut total: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return Err(format!("{text:?}: expected a number"));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?}: number too large"))?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else {
            return Err(format!("{text:?}: unit must be h, m, s or ms"));
        };
        rest = &rest[len..];
        total = value
            .checked_mul(unit_ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{text:?}: too long"))?;
    }
    Ok(std::time::Duration::from_millis(total))
}

/// `conditions` as a list-map keyed by `type`, so server-side apply merges per condition.
fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}

/// The CRDs of this crate, in a stable order: `ipaddresspools`, `l2advertisements`,
/// `servicel2statuses`, `bgppeers`, `bgpadvertisements`, `bfdprofiles`,
/// `bgpsessionstatuses`, `servicebgpstatuses`.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        IPAddressPool::crd(),
        L2Advertisement::crd(),
        ServiceL2Status::crd(),
        BGPPeer::crd(),
        BGPAdvertisement::crd(),
        BFDProfile::crd(),
        BGPSessionStatus::crd(),
        ServiceBGPStatus::crd(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn crd_json(crd: &CustomResourceDefinition) -> Value {
        serde_json::to_value(crd).expect("CRD serializes")
    }

    /// Walks a schema and collects every key that a structural schema must not contain.
    fn forbidden_keys(v: &Value, path: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    if matches!(
                        k.as_str(),
                        "$ref" | "anyOf" | "oneOf" | "allOf" | "$defs" | "definitions" | "$schema"
                    ) {
                        out.push(format!("{path}/{k}"));
                    }
                    // `type` must be a single string, never a list (e.g. ["string","null"]).
                    if k == "type" && !child.is_string() && path.ends_with("properties") {
                        // a property literally named "type" (Condition.type) is an object here
                    } else if k == "type" && !child.is_string() {
                        out.push(format!("{path}/type={child}"));
                    }
                    forbidden_keys(child, &format!("{path}/{k}"), out);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    forbidden_keys(child, &format!("{path}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn crds_have_status_and_structural_schema() {
        let crds = crds();
        let names: Vec<_> = crds
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "ipaddresspools.palisade.dev",
                "l2advertisements.palisade.dev",
                "servicel2statuses.palisade.dev",
                "bgppeers.palisade.dev",
                "bgpadvertisements.palisade.dev",
                "bfdprofiles.palisade.dev",
                "bgpsessionstatuses.palisade.dev",
                "servicebgpstatuses.palisade.dev"
            ]
        );
        for crd in &crds {
            let v = crd_json(crd);
            // Configuration is cluster-wide; a status lives next to its Service.
            let kind = &v["spec"]["names"]["kind"];
            let scope = if kind == "ServiceL2Status" || kind == "ServiceBGPStatus" {
                "Namespaced"
            } else {
                "Cluster"
            };
            assert_eq!(v["spec"]["scope"], scope);
            assert_eq!(v["spec"]["group"], "palisade.dev");
            let version = &v["spec"]["versions"][0];
            assert_eq!(version["name"], "v1alpha1");
            assert_eq!(version["served"], true);
            assert_eq!(version["storage"], true);
            assert_eq!(version["subresources"]["status"], json!({}));
            let schema = &version["schema"]["openAPIV3Schema"];
            let mut bad = Vec::new();
            forbidden_keys(schema, "", &mut bad);
            assert!(bad.is_empty(), "non-structural schema parts: {bad:#?}");
            // Objects Palisade writes itself carry their state in plain fields, not conditions.
            if scope == "Namespaced" || kind == "BGPSessionStatus" {
                continue;
            }
            let conditions = &schema["properties"]["status"]["properties"]["conditions"];
            assert_eq!(conditions["x-kubernetes-list-type"], "map");
            assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
            assert_eq!(conditions["items"]["properties"]["type"]["type"], "string");
        }
    }

    #[test]
    fn ipaddresspool_schema_has_defaults_validation_and_columns() {
        let v = crd_json(&IPAddressPool::crd());
        assert_eq!(v["spec"]["names"]["kind"], "IPAddressPool");
        assert_eq!(v["spec"]["names"]["plural"], "ipaddresspools");
        assert_eq!(v["spec"]["names"]["shortNames"], json!(["ipp"]));
        let version = &v["spec"]["versions"][0];
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], json!(["addresses"]));
        let props = &spec["properties"];
        assert_eq!(props["addresses"]["minItems"], 1);
        assert_eq!(props["addresses"]["items"]["type"], "string");
        assert_eq!(props["autoAssign"]["type"], "boolean");
        assert_eq!(props["autoAssign"]["default"], true);
        assert_eq!(props["avoidBuggyIPs"]["default"], false);
        let alloc = &props["serviceAllocation"]["properties"];
        assert_eq!(alloc["priority"]["type"], "integer");
        assert_eq!(alloc["namespaces"]["items"]["type"], "string");
        let sel = &alloc["serviceSelectors"]["items"]["properties"];
        assert_eq!(sel["matchLabels"]["type"], "object");
        assert_eq!(sel["matchExpressions"]["type"], "array");
        let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
        for k in [
            "assignedIPv4",
            "assignedIPv6",
            "availableIPv4",
            "availableIPv6",
        ] {
            assert_eq!(status[k]["type"], "integer", "{k}");
            assert_eq!(status[k]["format"], "int64", "{k}");
        }
        let cols: Vec<_> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c.get("priority").is_none())
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            cols,
            [
                "Addresses",
                "Auto Assign",
                "Assigned v4",
                "Available v4",
                "Ready",
                "Age"
            ]
        );
    }

    #[test]
    fn l2advertisement_schema_and_columns() {
        let v = crd_json(&L2Advertisement::crd());
        assert_eq!(v["spec"]["names"]["kind"], "L2Advertisement");
        assert_eq!(v["spec"]["names"]["shortNames"], json!(["l2adv"]));
        let version = &v["spec"]["versions"][0];
        let props = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        for k in [
            "ipAddressPools",
            "ipAddressPoolSelectors",
            "nodeSelectors",
            "interfaces",
        ] {
            assert_eq!(props[k]["type"], "array", "{k}");
        }
        let cols: Vec<_> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        assert!(cols.contains(&"IPAddressPools".to_string()));
        assert!(cols.contains(&"Age".to_string()));
    }

    #[test]
    fn pool_round_trips_with_metallb_field_names_and_defaults() {
        let pool: IPAddressPool = serde_json::from_value(json!({
            "apiVersion": "palisade.dev/v1alpha1",
            "kind": "IPAddressPool",
            "metadata": {"name": "lan"},
            "spec": {
                "addresses": ["198.51.100.200-198.51.100.250"],
                "serviceAllocation": {
                    "priority": 10,
                    "namespaces": ["a"],
                    "serviceSelectors": [{"matchLabels": {"app": "web"}}]
                }
            }
        }))
        .unwrap();
        assert_eq!(pool.spec.auto_assign, Some(true));
        assert!(pool.spec.auto_assign());
        assert!(!pool.spec.avoid_buggy_ips);
        let back = serde_json::to_value(&pool).unwrap();
        assert_eq!(back["spec"]["autoAssign"], true);
        assert_eq!(back["spec"]["avoidBuggyIPs"], false);
        assert_eq!(back["spec"]["serviceAllocation"]["priority"], 10);

        let status = IPAddressPoolStatus {
            assigned_ipv4: 1,
            available_ipv6: i64::MAX,
            ..Default::default()
        };
        let s = serde_json::to_value(&status).unwrap();
        assert_eq!(s["assignedIPv4"], 1);
        assert_eq!(s["availableIPv6"], i64::MAX);
    }

    /// The issue's example, as written in MetalLB style, deserializes with its defaults.
    #[test]
    fn bgp_types_take_metallb_manifests() {
        let peer: BGPPeer = serde_json::from_value(json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "BGPPeer",
            "metadata": {"name": "tor"},
            "spec": {"myASN": 64500, "peerASN": 64501, "peerAddress": "192.0.2.254",
                     "holdTime": "9s", "keepaliveTime": "3s", "bfdProfile": "fast"}
        }))
        .unwrap();
        assert_eq!(peer.spec.my_asn, 64500);
        assert_eq!(peer.spec.peer_port, 179);
        assert_eq!(
            parse_duration(peer.spec.hold_time.as_deref().unwrap()),
            Ok(std::time::Duration::from_secs(9))
        );
        assert_eq!(peer.spec.bfd_profile.as_deref(), Some("fast"));
        let bfd: BFDProfile = serde_json::from_value(json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "BFDProfile",
            "metadata": {"name": "fast"},
            "spec": {"receiveInterval": 100, "transmitInterval": 100, "detectMultiplier": 3}
        }))
        .unwrap();
        assert_eq!(bfd.spec.detect_multiplier, Some(3));
        let adv: BGPAdvertisement = serde_json::from_value(json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "BGPAdvertisement",
            "metadata": {"name": "adv"},
            "spec": {"ipAddressPools": ["pool"]}
        }))
        .unwrap();
        assert_eq!(
            (adv.spec.aggregation_length, adv.spec.aggregation_length_v6),
            (32, 128)
        );
        let v = serde_json::to_value(&peer.spec).unwrap();
        assert_eq!(v["myASN"], 64500);
        assert_eq!(v["peerASN"], 64501);
        let schema = crd_json(&BGPPeer::crd());
        let props = &schema["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["spec"]["properties"];
        for key in [
            "myASN",
            "peerASN",
            "routerID",
            "ebgpMultiHop",
            "passwordSecret",
        ] {
            assert!(props.get(key).is_some(), "BGPPeer schema lacks {key}");
        }
    }

    #[test]
    fn durations_parse_like_metallb() {
        use std::time::Duration;
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "9", "s", "1.5s", "-1s", "9x", "99999999999999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
