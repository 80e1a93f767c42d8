//! Palisade speaker: answers ARP (IPv4) and NDP (IPv6) for the LoadBalancer IPs this node won,
//! MetalLB layer-2 style. Which IPs those are is decided elsewhere
//! (`palisade_loadbalancer::announce`); this crate only puts the decision on the wire.
//!
//! ```text
//!   runtime ── set_owned({ip ─► [ifaces]}) ──► Announcer (trait)
//!                                               ├─ Speaker            raw sockets, threads
//!                                               └─ RecordingAnnouncer fake for tests
//!
//!            client                    LAN                     this node (eth0)
//!   who-has 198.51.100.200? ───────────────────────────────►  owned on eth0? ─► is-at <eth0 MAC>
//!                          ◄─── gratuitous ARP ×3 (0/100/300 ms) after gaining an IP
//!   NS fd00:51:100::200 (ff02::1:ff00:200) ────────────────►  owned? ─► NA S|O + target LLA
//! ```
//!
//! The IP is never added to an interface: the node's kernel does not know it, the speaker
//! just claims it at layer 2 so traffic for it reaches this node (where kube-proxy or the
//! like takes over).
//!
//! ```text
//!   packet     frame parsing/building (pure, fuzzed)
//!   route      default interface = route to the IP (procfs, pure parsers)
//!   ipvs       kube-proxy IPVS: LB IPs on kube-ipvs0 with lax ARP sysctls, nft arp filter
//!   reach      interfaces and subnets this node can announce on (reported to peers)
//!   speaker    Speaker: control thread + one responder thread per (interface, family)
//!   announcer  Announcer trait, Owned, SpeakerStats, RecordingAnnouncer
//!   error      SpeakerError
//! ```
#![forbid(unsafe_code)]

pub mod announcer;
pub mod error;
pub mod ipvs;
pub mod packet;
pub mod reach;
pub mod route;
pub mod speaker;

pub use announcer::{Announcer, Owned, RecordingAnnouncer, SpeakerStats};
pub use error::SpeakerError;
pub use reach::{local_interfaces, LocalInterface};
pub use route::route_interface;
pub use speaker::{Speaker, SpeakerConfig, DEFAULT_GARP_SCHEDULE, DEFAULT_REFRESH_INTERVAL};
