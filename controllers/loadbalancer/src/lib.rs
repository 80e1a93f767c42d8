//! Palisade LoadBalancer: pure domain logic for LoadBalancer IPs on bare metal.
//!
//! ```text
//!   crd        IPAddressPool / L2Advertisement types (source of crds/*.yaml)
//!   constants  annotation keys, condition types, Event/condition reasons
//!   selector   metav1.LabelSelector matching
//!   pool       address entries ─► Pool (ranges, sizes, membership, overlaps)
//!   allocator  Pools + ServiceRequests ─► IPs per Service (set_pools/assign/restore/unassign)
//!   service    core/v1 Service ─► ServiceRequest; status.loadBalancer.ingress ─► IPs
//!   plan       one allocation pass: API objects in, status writes and Events out
//!   l2         the L2 announcement decision: which IPs this node answers for
//!   l2status   the ServiceL2Status plan: which objects this node creates, updates, deletes
//!   bgp        the BGP plan: this node's peers (BGPPeer, BFDProfile) and routes per peer
//!   bgpstatus  the BGPSessionStatus / ServiceBGPStatus plan of one node
//!   error      the crate's one error enum; Error::reason() gives the constant reason
//!   types      shared value types (ServiceKey, Port, Protocol, Family): a leaf module
//! ```
//!
//! Nothing here talks to the API server or the kernel; the reconciler crates
//! (`palisade-allocation`, `palisade-announcement`) adapt API objects into these types and
//! perform the plans.
#![forbid(unsafe_code)]

pub mod allocator;
pub mod announce;
pub mod bgp;
pub mod bgpstatus;
pub mod constants;
pub mod crd;
pub mod error;
pub mod l2;
pub mod l2status;
pub mod plan;
pub mod pool;
pub mod selector;
pub mod service;
pub mod types;

pub use allocator::{
    parse_requested_ips, Allocator, Invalidated, IpFamilyPolicy, PoolCounters, PoolsReport, Port,
    Protocol, ServiceKey, ServiceRequest,
};
pub use crd::{
    crds, IPAddressPool, IPAddressPoolSpec, IPAddressPoolStatus, L2Advertisement,
    L2AdvertisementSpec, L2AdvertisementStatus, PreferredNodeSelector, ServiceAllocation,
    ServiceL2Status, ServiceL2StatusSpec, ServiceL2StatusStatus,
};
pub use error::{AddressProblem, AllocError, Error, SharingProblem};
pub use pool::{find_overlaps, parse_entry, AddrRange, Family, Overlap, Pool};
pub use service::{is_ours, service_key, service_request, status_ips};
