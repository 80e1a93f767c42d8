//! The shared agent runtime: everything both reconcilers need from the outside world.
//!
//! ```text
//!  config ──► client ──► stores (reflectors, readiness) ──► triggers ──► reconcilers
//!                │                                            │
//!                ├── leader (Lease; only the allocator uses it)
//!                ├── events (Kubernetes Events with constant reasons)
//!                └── http (/healthz /readyz /metrics) ◄── metrics
//! ```
//!
//! The pure cores (`palisade-netpol`, `palisade-loadbalancer`) know nothing of this crate;
//! the reconciler modules here translate store snapshots into their inputs and their outputs
//! into kernel operations (through `palisade-dataplane`) or API writes.
#![forbid(unsafe_code)]

pub mod agent;
pub mod allocation;
pub mod announcer;
pub mod client;
pub mod config;
pub mod error;
pub mod events;
pub mod http;
pub mod l2status;
pub mod leader;
pub mod loadbalancer;
pub mod memberlist_key;
pub mod memberlist_keyfile;
pub mod memberlist_wire;
pub mod membership;
pub mod metrics;
pub mod netpol;
pub mod stores;
pub mod sync;

pub use agent::run_agent;
pub use config::AgentConfig;
pub use error::Error;
