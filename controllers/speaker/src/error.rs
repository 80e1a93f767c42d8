//! The speaker's one error type.

use std::net::IpAddr;

/// Everything that can go wrong while announcing. [`SpeakerError::label`] is a constant,
/// suitable as a metric label.
#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    /// The interface named for an IP does not exist in the speaker's network namespace.
    #[error("interface {0:?} not found")]
    InterfaceNotFound(String),
    /// The interface is administratively down or has no carrier; it is announced again (with
    /// a gratuitous burst) once it is up and running.
    #[error("interface {0:?} is down")]
    InterfaceDown(String),
    /// IPv6 is disabled on the interface (`disable_ipv6`, or no IPv6 at all): no Neighbor
    /// Discovery is sent or answered there.
    #[error("interface {0:?} has IPv6 disabled")]
    NoIpv6(String),
    /// The interface has no Ethernet (MAC) address, so ARP/NDP cannot be answered on it.
    #[error("interface {0:?} has no MAC address (not Ethernet)")]
    NotEthernet(String),
    /// Opening the raw (AF_PACKET) socket failed; usually missing CAP_NET_RAW.
    #[error("raw socket on {interface:?}: {source}")]
    Socket {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    /// pnet returned something other than an Ethernet channel.
    #[error("interface {0:?}: unsupported datalink channel type")]
    UnsupportedChannel(String),
    /// Sending a frame failed.
    #[error("send on {interface:?}: {source}")]
    Send {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading a routing table failed.
    #[error("reading {path}: {source}")]
    RouteTable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// No route to the IP, so there is no default interface to announce it on.
    #[error("no route to {0}: name the interface in the L2Advertisement")]
    NoRoute(IpAddr),
    /// The speaker's control thread could not be started.
    #[error("starting the speaker thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The speaker's control thread is gone (stopped or panicked).
    #[error("speaker stopped")]
    Stopped,
    /// The control thread did not answer in time.
    #[error("speaker did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// Some IPs are not (yet) announced everywhere they should be; everything else was
    /// applied, and the failed parts are retried periodically.
    #[error("{} announcement problem(s): {}", .0.len(), list(.0))]
    Incomplete(Vec<SpeakerError>),
}

fn list(errors: &[SpeakerError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl SpeakerError {
    /// A constant name for the error kind (metric label, Event reason).
    pub fn label(&self) -> &'static str {
        match self {
            SpeakerError::InterfaceNotFound(_) => "InterfaceNotFound",
            SpeakerError::InterfaceDown(_) => "InterfaceDown",
            SpeakerError::NoIpv6(_) => "NoIpv6",
            SpeakerError::NotEthernet(_) => "NotEthernet",
            SpeakerError::Socket { .. } => "Socket",
            SpeakerError::UnsupportedChannel(_) => "UnsupportedChannel",
            SpeakerError::Send { .. } => "Send",
            SpeakerError::RouteTable { .. } => "RouteTable",
            SpeakerError::NoRoute(_) => "NoRoute",
            SpeakerError::Spawn(_) => "Spawn",
            SpeakerError::Stopped => "Stopped",
            SpeakerError::Timeout(_) => "Timeout",
            SpeakerError::Incomplete(_) => "Incomplete",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_lists_every_problem() {
        let e = SpeakerError::Incomplete(vec![
            SpeakerError::InterfaceNotFound("eth9".into()),
            SpeakerError::NoRoute("198.51.100.200".parse().unwrap()),
        ]);
        assert_eq!(
            e.to_string(),
            "2 announcement problem(s): interface \"eth9\" not found; no route to 198.51.100.200: \
             name the interface in the L2Advertisement"
        );
        assert_eq!(e.label(), "Incomplete");
    }
}
