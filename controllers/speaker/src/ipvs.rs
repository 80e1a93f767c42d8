//! kube-proxy IPVS mode puts every LoadBalancer IP on the dummy interface `kube-ipvs0` of
//! every node. Unless its `strictARP` is set (`arp_ignore=1`, `arp_announce=2`), every
//! node's kernel then answers ARP for every LoadBalancer IP, on every interface, with its own
//! MAC: several MACs answer and clients flap between nodes. This module detects that and keeps
//! the kernel quiet for the IPs this node does not own, without touching kube-proxy:
//!
//! ```text
//!   detect(lb_ips):  LB IP on a local interface  ∧  arp_ignore < 1 or arp_announce < 2
//!                    (max of `all` and the interface, as the kernel takes it)
//!   ArpFilter::apply(foreign):  nft table `arp palisade_l2` (ours alone, replaced whole):
//!       set foreign { LB IPs on local interfaces that this node does not own }
//!       chain output (hook output): arp operation reply, sender IP in @foreign ─► drop
//! ```
//!
//! The `arp` family's output hook sits in the kernel's own ARP transmit path (`arp_xmit`);
//! the speaker's replies leave through an `AF_PACKET` socket straight to the device and never
//! pass it, so the owner keeps answering (checked by `tests/l2.rs`). IPv6 is not affected:
//! Linux answers a Neighbor Solicitation only for addresses on the interface it arrived on.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};

use pnet::datalink::{self, NetworkInterface};

/// The nftables table this module owns (family `arp`).
pub const TABLE: &str = "palisade_l2";

/// LoadBalancer IPs the kernel itself would answer ARP for, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpvsFinding {
    /// Interfaces holding LoadBalancer IPs (usually `kube-ipvs0`).
    pub interfaces: BTreeSet<String>,
    /// The LoadBalancer IPv4 addresses on them.
    pub ips: BTreeSet<Ipv4Addr>,
    /// Effective `arp_ignore` / `arp_announce` (max of `all` and the interface's own).
    pub arp_ignore: u32,
    pub arp_announce: u32,
}

/// Whether the kernel's ARP is strict enough to leave IPs on other interfaces alone
/// (what kube-proxy's `strictARP` sets).
pub fn strict(arp_ignore: u32, arp_announce: u32) -> bool {
    arp_ignore >= 1 && arp_announce >= 2
}

/// Pure: which of `lb_ips` sit on `links`, given sysctl values by interface (`all` included).
pub fn find(
    links: &[NetworkInterface],
    lb_ips: &BTreeSet<IpAddr>,
    sysctl: impl Fn(&str, &str) -> u32,
) -> Option<IpvsFinding> {
    let mut f = IpvsFinding::default();
    for l in links.iter().filter(|l| !l.is_loopback()) {
        for n in &l.ips {
            if let IpAddr::V4(v4) = n.ip() {
                if lb_ips.contains(&IpAddr::V4(v4)) {
                    f.ips.insert(v4);
                    f.interfaces.insert(l.name.clone());
                }
            }
        }
    }
    if f.ips.is_empty() {
        return None;
    }
    // The kernel replies on the interface a request came in on and takes the larger of `all`
    // and that interface's value; report the weakest interface with addresses.
    let candidates: Vec<&NetworkInterface> = links
        .iter()
        .filter(|l| !l.is_loopback() && !f.interfaces.contains(&l.name) && !l.ips.is_empty())
        .collect();
    let eff = |key: &str, name: &str| sysctl("all", key).max(sysctl(name, key));
    f.arp_ignore = candidates
        .iter()
        .map(|l| eff("arp_ignore", &l.name))
        .min()
        .unwrap_or_else(|| sysctl("all", "arp_ignore"));
    f.arp_announce = candidates
        .iter()
        .map(|l| eff("arp_announce", &l.name))
        .min()
        .unwrap_or_else(|| sysctl("all", "arp_announce"));
    (!strict(f.arp_ignore, f.arp_announce)).then_some(f)
}

fn read_sysctl(iface: &str, key: &str) -> u32 {
    if iface.contains('/') || iface == ".." || iface == "." {
        return 0;
    }
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{iface}/{key}"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// [`find`] on this network namespace (the calling thread's).
pub fn detect(lb_ips: &BTreeSet<IpAddr>) -> Option<IpvsFinding> {
    find(&datalink::interfaces(), lb_ips, read_sysctl)
}

/// The whole table for `foreign`, as one `nft -f` transaction (create-then-delete makes the
/// delete valid when the table does not exist yet).
pub fn ruleset(foreign: &BTreeSet<Ipv4Addr>) -> String {
    let mut out = format!("table arp {TABLE} {{}}\ndelete table arp {TABLE}\n");
    out.push_str(&format!(
        "table arp {TABLE} {{\n  set foreign {{\n    type ipv4_addr\n"
    ));
    if !foreign.is_empty() {
        let list: Vec<String> = foreign.iter().map(ToString::to_string).collect();
        out.push_str(&format!("    elements = {{ {} }}\n", list.join(", ")));
    }
    out.push_str(
        "  }\n  chain output {\n    type filter hook output priority 0; policy accept;\n    \
         arp operation reply arp saddr ip @foreign counter drop\n  }\n}\n",
    );
    out
}

/// Keeps the kernel from answering ARP for LoadBalancer IPs this node does not own.
#[derive(Debug, Default)]
pub struct ArpFilter {
    applied: Option<BTreeSet<Ipv4Addr>>,
}

impl ArpFilter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs (or updates) the table so the kernel's replies for `foreign` are dropped; a
    /// no-op when nothing changed since the last successful call.
    pub fn apply(&mut self, foreign: &BTreeSet<Ipv4Addr>) -> std::io::Result<()> {
        if self.applied.as_ref() == Some(foreign) {
            return Ok(());
        }
        nft(&ruleset(foreign))?;
        self.applied = Some(foreign.clone());
        Ok(())
    }

    /// [`ArpFilter::remove`] if this filter installed the table.
    pub fn remove_if_applied(&mut self) -> std::io::Result<()> {
        if self.applied.is_some() {
            self.remove()
        } else {
            Ok(())
        }
    }

    /// Removes the table (nothing is filtered afterwards).
    pub fn remove(&mut self) -> std::io::Result<()> {
        nft(&format!(
            "table arp {TABLE} {{}}\ndelete table arp {TABLE}\n"
        ))?;
        self.applied = None;
        Ok(())
    }
}

fn nft(script: &str) -> std::io::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet::datalink::MacAddr;

    fn link(name: &str, ips: &[&str]) -> NetworkInterface {
        NetworkInterface {
            name: name.into(),
            description: String::new(),
            index: 1,
            mac: Some(MacAddr::new(2, 0, 0, 0, 0, 1)),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            flags: 0x41,
        }
    }

    #[test]
    fn detects_lb_ips_on_local_interfaces_unless_arp_is_strict() {
        let links = [
            link("eth0", &["198.51.100.11/24"]),
            link("kube-ipvs0", &["198.51.100.200/32", "10.96.0.1/32"]),
        ];
        let lb: BTreeSet<IpAddr> = ["198.51.100.200".parse().unwrap()].into();
        let lax = |_: &str, _: &str| 0;
        let f = find(&links, &lb, lax).expect("finding");
        assert_eq!(f.interfaces, ["kube-ipvs0".to_string()].into());
        assert_eq!(f.ips, ["198.51.100.200".parse().unwrap()].into());
        // strictARP: all.arp_ignore=1, all.arp_announce=2.
        let strict_all = |i: &str, k: &str| match (i, k) {
            ("all", "arp_ignore") => 1,
            ("all", "arp_announce") => 2,
            _ => 0,
        };
        assert_eq!(find(&links, &lb, strict_all), None);
        // Strict on eth0 alone counts too (the kernel takes the max).
        let strict_eth0 = |i: &str, k: &str| match (i, k) {
            ("eth0", "arp_ignore") => 1,
            ("eth0", "arp_announce") => 2,
            _ => 0,
        };
        assert_eq!(find(&links, &lb, strict_eth0), None);
        let none: BTreeSet<IpAddr> = ["198.51.100.201".parse().unwrap()].into();
        assert_eq!(find(&links, &none, lax), None);
    }

    #[test]
    fn ruleset_is_one_table_replaced_whole() {
        let s = ruleset(
            &[
                "198.51.100.200".parse().unwrap(),
                "198.51.100.201".parse().unwrap(),
            ]
            .into(),
        );
        assert!(s.starts_with("table arp palisade_l2 {}\ndelete table arp palisade_l2\n"));
        assert!(s.contains("elements = { 198.51.100.200, 198.51.100.201 }"));
        assert!(s.contains("arp operation reply arp saddr ip @foreign counter drop"));
        assert!(!ruleset(&BTreeSet::new()).contains("elements"));
    }
}
