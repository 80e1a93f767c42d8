//! The one error type of this crate.
//!
//! Every variant maps to a constant reason in [`crate::constants::reasons`] via
//! [`Error::reason`]; the runtime uses that as the Event/condition reason and as a metric
//! label, and `Display` as the message. Messages say what is wrong *and* what to do.

use std::fmt;
use std::net::IpAddr;

use crate::constants::reasons;
use crate::types::{Family, Port, ServiceKey};

/// Alias under the name the allocator API uses.
pub type AllocError = Error;

/// Everything that can go wrong when parsing pools or assigning LoadBalancer IPs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A pool address entry could not be used.
    #[error("address entry {entry:?}: {problem}")]
    InvalidAddress {
        /// The entry as written in `spec.addresses`.
        entry: String,
        /// What is wrong with it.
        problem: AddressProblem,
    },

    /// A requested IP (annotation or `spec.loadBalancerIP`) is not an IP address.
    #[error("requested IP {value:?} is not an IP address; use e.g. 198.51.100.7 or 2001:db8::7")]
    InvalidRequestedIp {
        /// The offending text.
        value: String,
    },

    /// Two requested IPs of one family.
    #[error(
        "requested IPs {first} and {second} are both {family}; request at most one IP per family"
    )]
    DuplicateFamilyRequest {
        /// The family requested twice.
        family: Family,
        /// First IP of that family.
        first: IpAddr,
        /// Second IP of that family.
        second: IpAddr,
    },

    /// A label selector in a pool is malformed.
    #[error("IPAddressPool {pool:?}: invalid label selector: {detail}")]
    InvalidSelector {
        /// Pool holding the selector.
        pool: String,
        /// Which requirement is wrong and why.
        detail: String,
    },

    /// `palisade.dev/address-pool` names a pool that does not exist.
    #[error("IPAddressPool {pool:?} does not exist ({})", pool_list(.known))]
    UnknownPool {
        /// The requested name.
        pool: String,
        /// Existing pools.
        known: Vec<String>,
    },

    /// The named pool exists but its `serviceAllocation` excludes this Service.
    #[error("IPAddressPool {pool:?} does not serve Service {service}: {why}")]
    PoolNotAllowed {
        /// The pool.
        pool: String,
        /// The Service.
        service: ServiceKey,
        /// Which constraint failed.
        why: String,
    },

    /// No auto-assign pool selects the Service.
    #[error(
        "no IPAddressPool with autoAssign selects Service {service} ({}); \
         check serviceAllocation or name a pool with palisade.dev/address-pool",
        pool_list(.pools)
    )]
    NoMatchingPool {
        /// The Service.
        service: ServiceKey,
        /// All pools known.
        pools: Vec<String>,
    },

    /// Every candidate pool is full for the needed families.
    #[error(
        "no free {} address in IPAddressPool {}; add addresses or release Services",
        family_list(.families),
        .pools.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ")
    )]
    PoolExhausted {
        /// Pools that were tried, in order.
        pools: Vec<String>,
        /// Families that were needed.
        families: Vec<Family>,
    },

    /// A requested IP lies outside every pool the Service may use.
    #[error("requested IP {ip} is not in {}{}", not_in_pools(.pools, .named_pool), note_suffix(.note))]
    IpNotInPool {
        /// The requested IP.
        ip: IpAddr,
        /// Pools that were considered.
        pools: Vec<String>,
        /// The pool named by `palisade.dev/address-pool`, when that limited the choice.
        named_pool: Option<String>,
        /// Extra hint (e.g. avoidBuggyIPs excluded it).
        note: Option<String>,
    },

    /// A requested IP is held by Services that do not share it.
    #[error(
        "IP {ip} is in use by {}; to share it, set the same palisade.dev/allow-shared-ip \
         key on all Services using it",
        service_list(.holders)
    )]
    IpInUse {
        /// The IP.
        ip: IpAddr,
        /// Services holding it.
        holders: Vec<ServiceKey>,
    },

    /// Both sides allow sharing, but not with each other.
    #[error("cannot share IP {ip} with Service {other}: {problem}")]
    SharingConflict {
        /// The IP.
        ip: IpAddr,
        /// The Service already on the IP.
        other: ServiceKey,
        /// Why sharing was refused.
        problem: SharingProblem,
    },

    /// An IP family is needed (or configured) that cannot be served.
    #[error("{family} not supported: {detail}")]
    FamilyNotSupported {
        /// The family.
        family: Family,
        /// Context, e.g. "the cluster is IPv4-only".
        detail: String,
    },

    /// Two pools contain the same addresses.
    #[error(
        "IPAddressPool {pool:?} overlaps IPAddressPool {other:?} on {first}-{last}; \
         give each address to one pool only"
    )]
    OverlappingPool {
        /// The pool this problem is reported for.
        pool: String,
        /// The other pool.
        other: String,
        /// First shared address.
        first: IpAddr,
        /// Last shared address (of this overlapping stretch).
        last: IpAddr,
    },

    /// Two pools with one name were passed to `set_pools`; the later one is ignored.
    #[error("IPAddressPool {pool:?} is defined twice; the second definition is ignored")]
    DuplicatePool {
        /// The name.
        pool: String,
    },
}

impl Error {
    /// The constant Event / condition reason for this error (also a metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidAddress { .. }
            | Error::InvalidRequestedIp { .. }
            | Error::DuplicateFamilyRequest { .. } => reasons::INVALID_ADDRESS,
            Error::InvalidSelector { .. } => reasons::INVALID_SELECTOR,
            Error::UnknownPool { .. } => reasons::UNKNOWN_POOL,
            Error::PoolNotAllowed { .. } | Error::NoMatchingPool { .. } => {
                reasons::NO_MATCHING_POOL
            }
            Error::PoolExhausted { .. } => reasons::POOL_EXHAUSTED,
            Error::IpNotInPool { .. } => reasons::IP_NOT_IN_POOL,
            Error::IpInUse { .. } => reasons::IP_IN_USE,
            Error::SharingConflict { .. } => reasons::SHARING_CONFLICT,
            Error::FamilyNotSupported { .. } => reasons::FAMILY_NOT_SUPPORTED,
            Error::OverlappingPool { .. } => reasons::OVERLAPPING_POOL,
            Error::DuplicatePool { .. } => reasons::ALLOCATION_FAILED,
        }
    }
}

/// Why a pool address entry was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressProblem {
    /// Blank entry.
    Empty,
    /// Not a CIDR, range or IP.
    Unparsable,
    /// `first-last` with first > last.
    ReversedRange {
        /// Written start.
        first: IpAddr,
        /// Written end.
        last: IpAddr,
    },
    /// `first-last` with one IPv4 and one IPv6 side.
    MixedFamily,
    /// `/0` (or an equivalent range): the whole address family.
    TooBroad,
    /// A CIDR whose address has bits set beyond the prefix (`10.0.0.5/24`).
    HostBitsSet {
        /// The network the prefix denotes (`10.0.0.0/24`).
        network: String,
        /// The written address.
        address: IpAddr,
        /// Last address of the network.
        last: IpAddr,
    },
}

impl fmt::Display for AddressProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressProblem::Empty => f.write_str("empty entry"),
            AddressProblem::Unparsable => f.write_str(
                "not a CIDR (198.51.100.0/24), an inclusive range \
                 (198.51.100.10-198.51.100.20) or a single IP",
            ),
            AddressProblem::ReversedRange { first, last } => write!(
                f,
                "range start {first} is after its end {last}; write {last}-{first}"
            ),
            AddressProblem::MixedFamily => {
                f.write_str("range mixes IPv4 and IPv6; both ends must be of one family")
            }
            AddressProblem::TooBroad => f.write_str(
                "covers the whole address family (/0), including node, gateway and loopback \
                 addresses; announcing it would hijack the network. List only the addresses \
                 reserved for LoadBalancer Services",
            ),
            AddressProblem::HostBitsSet {
                network,
                address,
                last,
            } => write!(
                f,
                "host bits set; write {network} for the whole network, or the range \
                 {address}-{last} to start at {address}"
            ),
        }
    }
}

/// Why two Services with sharing keys cannot share an IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SharingProblem {
    /// Different `palisade.dev/allow-shared-ip` values.
    KeyMismatch {
        /// Key of the Service asking.
        ours: String,
        /// Key of the Service on the IP.
        theirs: String,
    },
    /// Both Services use one protocol/port.
    PortClash {
        /// The clashing port.
        port: Port,
    },
    /// Traffic policies differ, or both are `Local` with different pod selectors.
    TrafficPolicy,
}

impl fmt::Display for SharingProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SharingProblem::KeyMismatch { ours, theirs } => write!(
                f,
                "sharing key {ours:?} differs from its key {theirs:?}; \
                 use the same palisade.dev/allow-shared-ip value"
            ),
            SharingProblem::PortClash { port } => {
                write!(f, "both use port {port}; use distinct ports to share an IP")
            }
            SharingProblem::TrafficPolicy => f.write_str(
                "externalTrafficPolicy differs (Services sharing an IP must both be Cluster, \
                 or both Local with the same pod selector)",
            ),
        }
    }
}

fn pool_list(pools: &[String]) -> String {
    if pools.is_empty() {
        "no IPAddressPools are defined".to_string()
    } else {
        format!("pools: {}", pools.join(", "))
    }
}

fn not_in_pools(pools: &[String], named: &Option<String>) -> String {
    match named {
        Some(one) => format!("IPAddressPool {one:?} named by palisade.dev/address-pool"),
        None => format!("any IPAddressPool ({})", pool_list(pools)),
    }
}

fn family_list(families: &[Family]) -> String {
    families
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("+")
}

fn service_list(services: &[ServiceKey]) -> String {
    services
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn note_suffix(note: &Option<String>) -> String {
    note.as_ref().map(|n| format!("; {n}")).unwrap_or_default()
}
