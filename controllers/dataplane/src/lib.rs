//! Palisade's kernel side: apply a [`Payload`] (ipsets + iptables chains) atomically.
//!
//! ```text
//!            Executor::apply(&Payload) -> ApplyReport
//!              │
//!   ┌──────────┴───────────────┐
//!   KernelExecutor              RecordingExecutor (tests: records payloads, can fail)
//!   │ 1. ipset -exist restore   create missing sets; new members via temp set + swap
//!   │                           (or per-element add/del where that is equally atomic)
//!   │ 2. iptables-restore --noflush
//!   │      changed chains of ours (":C - [0:0]" flushes only that chain), hook fix-ups in
//!   │      FORWARD/INPUT, stale PAL chains flushed and deleted, all in one transaction
//!   │ 3. ipset destroy          stale sets of ours, once nothing references them
//! ```
//!
//! Only names for which `palisade_netpol::names::is_ours_chain` / `is_ours_set` hold are ever
//! modified; built-in chains only get our hook inserted or a jump to one of our chains removed.
//! Nothing is flushed at start-up. A failed step leaves the previous rules in force.
#![forbid(unsafe_code)]

pub mod conntrack;
pub mod ctnetlink;
mod error;
pub mod interfaces;
mod kernel;
pub mod netns;
pub mod nflog;
mod observe;
mod recording;

use std::sync::Arc;
use std::time::Duration;

pub use conntrack::{
    revoke_denied, sweep_resurrected, Conntrack, KernelConntrack, RevokeReport, RESURRECTION_SWEEPS,
};
pub use ctnetlink::NetlinkConntrack;
pub use error::DataplaneError;
pub use interfaces::{pod_interfaces, KernelLinks, LinkSource};
pub use kernel::{Backend, KernelExecutor};
pub use palisade_netpol::Payload;
pub use recording::RecordingExecutor;

/// Applies payloads to a dataplane.
pub trait Executor: Send + Sync {
    /// Makes the dataplane match `p`. Idempotent: applying the same payload again changes
    /// nothing (and re-verifies the kernel state, repairing drift).
    fn apply(&self, p: &Payload) -> Result<ApplyReport, DataplaneError>;

    /// [`Executor::apply`] of a shared payload: an executor that remembers what it applied
    /// keeps the `Arc` instead of a copy (a payload is megabytes at scale).
    fn apply_shared(&self, p: Arc<Payload>) -> Result<ApplyReport, DataplaneError> {
        self.apply(&p)
    }
}

/// What one [`Executor::apply`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Anything in the kernel changed.
    pub changed: bool,
    /// The kernel state was read back and compared (first apply, or the same payload again).
    pub verified: bool,
    pub sets_created: usize,
    /// Sets whose members changed (temp set + swap, or per-element add/del).
    pub sets_updated: usize,
    /// Of `sets_updated`, those changed by per-element `add`/`del` instead of a swap.
    pub sets_patched: usize,
    pub sets_destroyed: usize,
    /// Whether `iptables-restore` ran.
    pub iptables_applied: bool,
    /// Chains of ours (re)written by the restore.
    pub chains_written: usize,
    /// Stale chains of ours deleted.
    pub chains_deleted: usize,
    /// Hooks (jumps from FORWARD / INPUT) inserted or moved back to position 1.
    pub hooks_fixed: usize,
    pub ipset_duration: Duration,
    pub iptables_duration: Duration,
    pub total_duration: Duration,
    /// Non-fatal problems (e.g. a stale set still referenced by someone else's rule).
    pub warnings: Vec<String>,
}
