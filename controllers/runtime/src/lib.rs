//! The shared agent runtime: the wiring every reconciler needs, and nothing domain-specific.
//!
//! ```text
//!  client ──► stores (reflectors, readiness) ──► triggers ──► sync loop (SyncJob) ──► reconcilers
//!     │                                                                (their own crates)
//!     ├── leader (Lease; only the allocator uses it)
//!     ├── events (Kubernetes Events with constant reasons)
//!     └── http (/healthz /readyz /metrics) ◄── metrics (shared registry)
//! ```
//!
//! The reconcilers (`palisade-enforcement`, `palisade-allocation`, `palisade-announcement`)
//! depend on this crate; it depends on none of them, nor on the pure cores.
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod error;
pub mod events;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod prune;
pub mod stores;
pub mod sync;

pub use config::{LeaseSettings, SyncSettings};
pub use error::Error;
pub use sync::{run_job, Cause, JobError, SyncJob, Trigger};
