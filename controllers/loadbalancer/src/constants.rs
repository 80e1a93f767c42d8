//! String constants shared by the allocator, the runtime adapters and the docs.
//!
//! This module owns every user-visible name that is not a Rust type: the API group and
//! version, the Service annotations we read, the default `loadBalancerClass`, condition
//! types for our custom resources, and the constant *reasons* used in Kubernetes Events and
//! status conditions. Reasons are CamelCase (Kubernetes convention) and never change once
//! shipped, because people alert on them.

/// API group of the Palisade custom resources.
pub const GROUP: &str = "palisade.dev";
/// API version of the Palisade custom resources.
pub const VERSION: &str = "v1alpha1";

/// `spec.loadBalancerClass` handled when the operator does not configure another one.
pub const DEFAULT_LOAD_BALANCER_CLASS: &str = "palisade.dev/palisade";

/// Service annotations read by the LoadBalancer controller.
pub mod annotations {
    /// Comma-separated list of requested IPs (at most one per family). Takes precedence over
    /// the deprecated `spec.loadBalancerIP`.
    pub const LOAD_BALANCER_IPS: &str = "palisade.dev/loadBalancerIPs";
    /// Name of the `IPAddressPool` to allocate from (also allows pools with `autoAssign: false`).
    pub const ADDRESS_POOL: &str = "palisade.dev/address-pool";
    /// Sharing key: Services with the same key may share an IP if their ports do not clash.
    pub const ALLOW_SHARED_IP: &str = "palisade.dev/allow-shared-ip";
}

/// Condition types set in `IPAddressPool.status.conditions` / `L2Advertisement.status.conditions`.
pub mod conditions {
    /// The object is valid and in use.
    pub const READY: &str = "Ready";
    /// The spec could not be parsed (bad address entry, bad selector, ...).
    pub const INVALID: &str = "Invalid";
    /// The pool shares addresses with another pool.
    pub const OVERLAPPING: &str = "Overlapping";
}

/// Reasons for Events (on Services and pools) and for status conditions.
pub mod reasons {
    /// An IP was assigned to a Service.
    pub const IP_ALLOCATED: &str = "IPAllocated";
    /// A Service's IP was released (Service deleted, changed type/class, or IP became invalid).
    pub const IP_RELEASED: &str = "IPReleased";
    /// Generic allocation failure (used when no more specific reason applies).
    pub const ALLOCATION_FAILED: &str = "AllocationFailed";
    /// Every candidate pool is full.
    pub const POOL_EXHAUSTED: &str = "PoolExhausted";
    /// A requested IP is outside every pool the Service may use.
    pub const IP_NOT_IN_POOL: &str = "IPNotInPool";
    /// A requested IP is held by another Service and cannot be shared.
    pub const IP_IN_USE: &str = "IPInUse";
    /// No auto-assign pool selects the Service.
    pub const NO_MATCHING_POOL: &str = "NoMatchingPool";
    /// The `palisade.dev/address-pool` annotation (or an L2Advertisement) names no existing pool.
    pub const UNKNOWN_POOL: &str = "UnknownPool";
    /// An address entry, a requested IP or a selector could not be parsed.
    pub const INVALID_ADDRESS: &str = "InvalidAddress";
    /// A label selector in a pool or advertisement is malformed.
    pub const INVALID_SELECTOR: &str = "InvalidSelector";
    /// An L2Advertisement's `preferredNodeSelectors` term is malformed or its weight is out
    /// of range: that term is ignored (Event and `Invalid` condition on the advertisement).
    pub const INVALID_PREFERENCE: &str = "InvalidPreference";
    /// Two pools contain the same addresses.
    pub const OVERLAPPING_POOL: &str = "OverlappingPool";
    /// Sharing an IP was refused (key mismatch, port clash or traffic policy mismatch).
    pub const SHARING_CONFLICT: &str = "SharingConflict";
    /// The Service needs an IP family the pool/cluster cannot provide.
    pub const FAMILY_NOT_SUPPORTED: &str = "FamilyNotSupported";
    /// Condition reason for `Ready=True` on a valid object.
    pub const VALID: &str = "Valid";
    /// Condition reason for `Overlapping=False`.
    pub const NO_OVERLAP: &str = "NoOverlap";
}
