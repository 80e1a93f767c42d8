//! Where this node can announce: its Ethernet interfaces with their state and subnets, as
//! the membership reports them to peers (`palisade_membership::ServedInterface`) so that the
//! election admits only nodes that can answer where an IP's clients are.
//!
//! ```text
//!   interfaces ─► skip loopback, NOARP (kube-ipvs0, tunnels), no MAC
//!              ─► keep: named by an L2Advertisement (even without an address: VLANs)
//!                       or holding a subnet (host routes /32 /128 and fe80::/10 don't count)
//!              ─► named ones first, then by name (the wire format cuts at 16)
//! ```

use std::collections::BTreeSet;
use std::net::IpAddr;

use pnet::datalink::{self, NetworkInterface};

/// `IFF_NOARP`: the interface does no ARP (dummy devices such as `kube-ipvs0`, tunnels).
const IFF_NOARP: u32 = 0x80;

/// One interface this node could announce on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalInterface {
    pub name: String,
    /// Up and running (carrier).
    pub up: bool,
    /// Subnets: network address and prefix length.
    pub nets: Vec<(IpAddr, u8)>,
}

/// This network namespace's interfaces as [`select`] keeps them.
pub fn local_interfaces(named: &BTreeSet<String>) -> Vec<LocalInterface> {
    select(&datalink::interfaces(), named)
}

/// Pure: the interfaces worth reporting, see the module docs.
pub fn select(links: &[NetworkInterface], named: &BTreeSet<String>) -> Vec<LocalInterface> {
    let mut out: Vec<(bool, LocalInterface)> = links
        .iter()
        .filter(|l| {
            !l.is_loopback() && l.flags & IFF_NOARP == 0 && l.mac.is_some_and(|m| !m.is_zero())
        })
        .filter_map(|l| {
            let mut nets: Vec<(IpAddr, u8)> = l
                .ips
                .iter()
                .filter(|n| {
                    let full = if n.is_ipv4() { 32 } else { 128 };
                    let link_local = match n.ip() {
                        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
                        IpAddr::V4(v4) => v4.is_link_local(),
                    };
                    n.prefix() < full && !link_local
                })
                .map(|n| (n.network(), n.prefix()))
                .collect();
            nets.sort();
            nets.dedup();
            let listed = named.contains(&l.name);
            (listed || !nets.is_empty()).then(|| {
                (
                    !listed,
                    LocalInterface {
                        name: l.name.clone(),
                        up: l.is_up() && l.is_running(),
                        nets,
                    },
                )
            })
        })
        .collect();
    out.sort_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
    out.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet::datalink::MacAddr;
    use pnet::ipnetwork::IpNetwork;

    const UP_RUNNING: u32 = 0x1 | 0x40; // IFF_UP | IFF_RUNNING
    const LOOPBACK: u32 = 0x8;

    fn link(name: &str, flags: u32, mac: bool, ips: &[&str]) -> NetworkInterface {
        NetworkInterface {
            name: name.into(),
            description: String::new(),
            index: 1,
            mac: mac.then(|| MacAddr::new(2, 0, 0, 0, 0, 1)),
            ips: ips
                .iter()
                .map(|s| s.parse::<IpNetwork>().unwrap())
                .collect(),
            flags,
        }
    }

    #[test]
    fn keeps_subnets_and_named_interfaces_only() {
        let links = [
            link("lo", UP_RUNNING | LOOPBACK, false, &["127.0.0.1/8"]),
            link(
                "eth0",
                UP_RUNNING,
                true,
                &["198.51.100.11/24", "fe80::1/64", "fd00:51:100::11/64"],
            ),
            link("kube-ipvs0", IFF_NOARP, true, &["198.51.100.200/32"]),
            link("cali123", UP_RUNNING, true, &[]),
            link("eth0.100", UP_RUNNING, true, &[]),
            link("eth1", 0x1, true, &["198.51.101.11/24", "10.0.0.1/32"]),
            link("tun0", UP_RUNNING, false, &["10.8.0.1/24"]),
        ];
        let named: BTreeSet<String> = ["eth0.100".to_string(), "absent".into()].into();
        let got = select(&links, &named);
        let names: Vec<&str> = got.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["eth0.100", "eth0", "eth1"]);
        assert!(got[0].up && got[0].nets.is_empty());
        assert_eq!(
            got[1].nets,
            vec![
                ("198.51.100.0".parse().unwrap(), 24),
                ("fd00:51:100::".parse().unwrap(), 64)
            ]
        );
        assert!(!got[2].up, "no carrier");
        assert_eq!(got[2].nets, vec![("198.51.101.0".parse().unwrap(), 24)]);
    }
}
