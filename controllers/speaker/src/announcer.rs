//! The narrow interface the runtime uses, and a recording fake for its tests.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::error::SpeakerError;

/// The desired announcements: each owned IP with the interfaces to answer on. An empty
/// interface list means "the interface holding the route to the IP"
/// ([`crate::route_interface`]).
pub type Owned = BTreeMap<IpAddr, Vec<String>>;

/// Counters since the speaker started (monotonic, except `owned_ips` and `responders`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpeakerStats {
    /// ARP requests and Neighbor Solicitations received on any responder socket, for any IP.
    pub requests_received: u64,
    /// ARP replies and solicited Neighbor Advertisements sent (requests for owned IPs).
    pub replies_sent: u64,
    /// Gratuitous ARP requests + replies and unsolicited Neighbor Advertisements sent.
    pub gratuitous_sent: u64,
    /// Periodic refresh rounds queued (one per answered IP and interface and interval);
    /// their frames are counted in `gratuitous_sent` too.
    pub refresh_rounds: u64,
    /// Frames that could not be sent.
    pub send_errors: u64,
    /// IPs currently owned (keys of the last `set_owned`).
    pub owned_ips: u64,
    /// Open responder sockets (one per interface and address family in use).
    pub responders: u64,
}

/// Announces LoadBalancer IPs at layer 2. Implemented by [`crate::Speaker`] and by
/// [`RecordingAnnouncer`].
pub trait Announcer: Send + Sync {
    /// Replaces the desired set. IPs (or IP/interface pairs) not in `owned` stop being answered
    /// before this returns; new ones are answered and announced gratuitously. Partial failures
    /// (a missing interface) are returned as [`SpeakerError::Incomplete`] after everything
    /// else was applied.
    fn set_owned(&self, owned: Owned) -> Result<(), SpeakerError>;
    /// Current counters.
    fn stats(&self) -> SpeakerStats;
}

/// A fake [`Announcer`] that records every desired set it is given.
#[derive(Debug, Default)]
pub struct RecordingAnnouncer {
    calls: Mutex<Vec<Owned>>,
}

impl RecordingAnnouncer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every `set_owned` argument, oldest first.
    pub fn calls(&self) -> Vec<Owned> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The last desired set (empty before the first call).
    pub fn current(&self) -> Owned {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

impl Announcer for RecordingAnnouncer {
    fn set_owned(&self, owned: Owned) -> Result<(), SpeakerError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(owned);
        Ok(())
    }

    fn stats(&self) -> SpeakerStats {
        SpeakerStats {
            owned_ips: self.current().len() as u64,
            ..SpeakerStats::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_calls() {
        let fake = RecordingAnnouncer::new();
        let a: &dyn Announcer = &fake;
        assert_eq!(a.stats().owned_ips, 0);
        let owned: Owned = [("198.51.100.200".parse().unwrap(), vec!["eth0".to_string()])].into();
        a.set_owned(owned.clone()).unwrap();
        a.set_owned(Owned::new()).unwrap();
        assert_eq!(fake.calls(), vec![owned, Owned::new()]);
        assert_eq!(fake.current(), Owned::new());
        assert_eq!(a.stats().owned_ips, 0);
    }
}
