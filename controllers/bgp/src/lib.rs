//! A small BGP-4 speaker that announces LoadBalancer IPs to routers.
//!
//! - [`wire`]: the message codec (OPEN with capabilities, UPDATE, NOTIFICATION, KEEPALIVE,
//!   ROUTE-REFRESH), strict and panic-free on hostile input.
//! - [`Speaker`]: one session per configured peer. Each session opens the TCP connection
//!   itself (routers often only accept from dynamic neighbour ranges), negotiates the hold
//!   time, announces the peer's prefix set with the local address as next hop, keeps it in sync
//!   as [`Speaker::set_prefixes`] changes it, and reconnects with backoff. Nothing is installed
//!   into the local routing table; routes the peer sends are ignored.
//!
//! The speaker only announces: it implements the subset of RFC 4271 an announcer needs
//! (active open only, no RIB of received routes, no collision detection since it never listens).

#![forbid(unsafe_code)]

pub mod bfd;
pub mod session;
pub mod wire;

pub use session::{PeerConfig, PeerStatus, RouteAttrs, Routes, SessionState, Speaker};
