//! Address pools: parsing and validating `IPAddressPool.spec`, membership, sizes, overlaps.
//!
//! This module owns the meaning of an address entry and of a pool's selection constraints:
//!
//! ```text
//!   spec.addresses ── parse_entry ──► AddrRange (inclusive, one family)
//!          │                               │ sorted + merged per family
//!          ▼                               ▼
//!   Pool { ranges v4/v6, autoAssign, avoidBuggyIPs, priority, selectors }
//!          │ contains(ip) · size(family) · selects(service)
//!          ▼
//!   find_overlaps(&[Pool]) ──► Overlap { pool, other, first, last }
//! ```
//!
//! Accepted entries (surrounding whitespace ignored everywhere):
//! - a CIDR, `198.51.100.0/24`, `2001:db8::/120`;
//! - an inclusive range, `198.51.100.200 - 198.51.100.250` (one family, start ≤ end);
//! - a single IP (a /32 or /128).
//!
//! Rejected on purpose:
//! - `/0` (or a range spanning a whole family): it contains node, gateway and loopback
//!   addresses, and answering ARP for all of it would take over the LAN.
//! - a CIDR with host bits set (`198.51.100.201/29`). MetalLB silently masks these to the
//!   network; we refuse, because the masked network contains addresses the writer did not
//!   list (here `.200`), and handing those out can steal an address in use on the LAN. The
//!   error suggests both intended readings (the network, or a range from the address).
//!
//! Entries that overlap within one pool are merged silently (harmless). Overlaps *between*
//! pools are reported by [`find_overlaps`]; both pools stay usable because the allocator keys
//! assignments by IP, so an address is never given out twice either way.
//!
//! All sizes are `u128` and saturate, so a `/64` or larger IPv6 pool never overflows.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnetwork::IpNetwork;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::crd::IPAddressPoolSpec;
use crate::error::{AddressProblem, Error};
use crate::selector::{self, any_matches, Selector};
pub use crate::types::Family;

/// An IP as (family, number); IPv4 numbers are below 2^32.
pub(crate) fn ip_to_num(ip: IpAddr) -> (Family, u128) {
    match ip {
        IpAddr::V4(v4) => (Family::V4, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (Family::V6, u128::from(v6)),
    }
}

/// Inverse of [`ip_to_num`]; IPv4 numbers above 2^32-1 saturate (never produced here).
pub(crate) fn num_to_ip(family: Family, n: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or(u32::MAX))),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// IPv4 addresses ending in `.0` or `.255`, which some CPE firmwares drop.
pub(crate) fn is_buggy(family: Family, n: u128) -> bool {
    family == Family::V4 && matches!(n & 0xff, 0 | 0xff)
}

/// Number of `.0`/`.255` addresses in `[0, n]`.
fn buggy_upto(n: u128) -> u128 {
    2 * (n >> 8) + 1 + u128::from(n & 0xff == 0xff)
}

/// Number of `.0`/`.255` addresses in `[first, last]` (IPv4 numbers).
fn buggy_in(first: u128, last: u128) -> u128 {
    let below = if first == 0 { 0 } else { buggy_upto(first - 1) };
    buggy_upto(last) - below
}

/// An inclusive range of addresses of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrRange {
    /// First address.
    pub first: IpAddr,
    /// Last address (inclusive, same family as `first`).
    pub last: IpAddr,
}

impl AddrRange {
    /// The family of the range.
    pub fn family(&self) -> Family {
        Family::of(&self.first)
    }

    /// Number of addresses (saturating at `u128::MAX`).
    pub fn len(&self) -> u128 {
        let (_, a) = ip_to_num(self.first);
        let (_, b) = ip_to_num(self.last);
        (b - a).saturating_add(1)
    }

    /// Always false: a range holds at least one address.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for AddrRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Parses one `spec.addresses` entry. Errors name the entry and say how to fix it.
pub fn parse_entry(entry: &str) -> Result<AddrRange, Error> {
    let bad = |problem| Error::InvalidAddress {
        entry: entry.to_string(),
        problem,
    };
    let text = entry.trim();
    if text.is_empty() {
        return Err(bad(AddressProblem::Empty));
    }
    if let Some((a, b)) = text.split_once('-') {
        let first = IpAddr::from_str(a.trim()).map_err(|_| bad(AddressProblem::Unparsable))?;
        let last = IpAddr::from_str(b.trim()).map_err(|_| bad(AddressProblem::Unparsable))?;
        let (fa, na) = ip_to_num(first);
        let (fb, nb) = ip_to_num(last);
        if fa != fb {
            return Err(bad(AddressProblem::MixedFamily));
        }
        if na > nb {
            return Err(bad(AddressProblem::ReversedRange { first, last }));
        }
        if na == 0 && nb == fa.max() {
            return Err(bad(AddressProblem::TooBroad));
        }
        return Ok(AddrRange { first, last });
    }
    if let Some((addr, prefix)) = text.split_once('/') {
        let address = IpAddr::from_str(addr.trim()).map_err(|_| bad(AddressProblem::Unparsable))?;
        let prefix: u8 = prefix
            .trim()
            .parse()
            .map_err(|_| bad(AddressProblem::Unparsable))?;
        let net = IpNetwork::new(address, prefix).map_err(|_| bad(AddressProblem::Unparsable))?;
        if prefix == 0 {
            return Err(bad(AddressProblem::TooBroad));
        }
        let first = net.network();
        let last = net.broadcast_or_last();
        if first != address {
            return Err(bad(AddressProblem::HostBitsSet {
                network: format!("{first}/{prefix}"),
                address,
                last,
            }));
        }
        return Ok(AddrRange { first, last });
    }
    let ip = IpAddr::from_str(text).map_err(|_| bad(AddressProblem::Unparsable))?;
    Ok(AddrRange {
        first: ip,
        last: ip,
    })
}

/// Last address of a network (`broadcast` for v4; computed for v6).
trait LastAddr {
    fn broadcast_or_last(&self) -> IpAddr;
}

impl LastAddr for IpNetwork {
    fn broadcast_or_last(&self) -> IpAddr {
        let (family, n) = ip_to_num(self.network());
        let bits: u32 = match family {
            Family::V4 => 32,
            Family::V6 => 128,
        };
        let host_bits = bits - u32::from(self.prefix());
        let host_mask = if host_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        num_to_ip(family, n | host_mask)
    }
}

/// A validated `IPAddressPool`, ready for the allocator.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels` (for L2Advertisement pool selectors).
    pub labels: BTreeMap<String, String>,
    /// `spec.autoAssign` (default true).
    pub auto_assign: bool,
    /// `spec.avoidBuggyIPs`.
    pub avoid_buggy_ips: bool,
    /// `spec.serviceAllocation.priority`: lower first, `None` after all `Some`.
    pub priority: Option<i32>,
    /// `spec.serviceAllocation.namespaces`.
    pub namespaces: Vec<String>,
    /// `spec.serviceAllocation.namespaceSelectors`, parsed.
    pub namespace_selectors: Vec<Selector>,
    /// `spec.serviceAllocation.serviceSelectors`, parsed.
    pub service_selectors: Vec<Selector>,
    /// Sorted, merged, inclusive ranges as numbers, per family (index = `Family::index`).
    ranges: [Vec<(u128, u128)>; 2],
}

impl Pool {
    /// A pool from address entries with defaults (autoAssign, no constraints). For tests
    /// and tools; the controller uses [`Pool::from_spec`].
    pub fn new<S: AsRef<str>>(name: &str, addresses: &[S]) -> Result<Pool, Error> {
        let spec = IPAddressPoolSpec {
            addresses: addresses.iter().map(|a| a.as_ref().to_string()).collect(),
            ..Default::default()
        };
        Pool::from_spec(name, &BTreeMap::new(), &spec)
    }

    /// Validates a pool spec. The error names the first bad entry or selector.
    pub fn from_spec(
        name: &str,
        labels: &BTreeMap<String, String>,
        spec: &IPAddressPoolSpec,
    ) -> Result<Pool, Error> {
        let mut ranges: [Vec<(u128, u128)>; 2] = [Vec::new(), Vec::new()];
        for entry in &spec.addresses {
            let r = parse_entry(entry)?;
            let (family, a) = ip_to_num(r.first);
            let (_, b) = ip_to_num(r.last);
            ranges[family.index()].push((a, b));
        }
        for list in &mut ranges {
            merge(list);
        }
        let alloc = spec.service_allocation.clone().unwrap_or_default();
        let parse_all = |list: &[LabelSelector]| {
            list.iter()
                .map(|sel| {
                    selector::parse(sel).map_err(|detail| Error::InvalidSelector {
                        pool: name.to_string(),
                        detail,
                    })
                })
                .collect::<Result<Vec<Selector>, Error>>()
        };
        let namespace_selectors = parse_all(&alloc.namespace_selectors)?;
        let service_selectors = parse_all(&alloc.service_selectors)?;
        Ok(Pool {
            name: name.to_string(),
            labels: labels.clone(),
            auto_assign: spec.auto_assign(),
            avoid_buggy_ips: spec.avoid_buggy_ips,
            priority: alloc.priority,
            namespaces: alloc.namespaces,
            namespace_selectors,
            service_selectors,
            ranges,
        })
    }

    /// The pool's (merged) ranges of one family, ascending.
    pub fn ranges(&self, family: Family) -> impl Iterator<Item = AddrRange> + '_ {
        self.ranges[family.index()]
            .iter()
            .map(move |&(a, b)| AddrRange {
                first: num_to_ip(family, a),
                last: num_to_ip(family, b),
            })
    }

    pub(crate) fn raw_ranges(&self, family: Family) -> &[(u128, u128)] {
        &self.ranges[family.index()]
    }

    /// Drops every range of `family` (used when the cluster does not serve it).
    pub(crate) fn strip_family(&mut self, family: Family) {
        self.ranges[family.index()].clear();
    }

    /// Whether the pool has any address of `family`.
    pub fn has_family(&self, family: Family) -> bool {
        !self.ranges[family.index()].is_empty()
    }

    /// Whether the allocator may hand out `ip` from this pool (honours `avoidBuggyIPs`).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (family, n) = ip_to_num(ip);
        self.contains_num(family, n)
    }

    pub(crate) fn contains_num(&self, family: Family, n: u128) -> bool {
        if self.avoid_buggy_ips && is_buggy(family, n) {
            return false;
        }
        self.covers_num(family, n)
    }

    /// Whether `ip` lies in a range of the pool, ignoring `avoidBuggyIPs`.
    pub fn covers(&self, ip: IpAddr) -> bool {
        let (family, n) = ip_to_num(ip);
        self.covers_num(family, n)
    }

    fn covers_num(&self, family: Family, n: u128) -> bool {
        let list = &self.ranges[family.index()];
        let i = list.partition_point(|&(_, b)| b < n);
        list.get(i).is_some_and(|&(a, _)| a <= n)
    }

    /// Number of addresses the allocator may hand out for `family` (saturating).
    pub fn size(&self, family: Family) -> u128 {
        self.ranges[family.index()]
            .iter()
            .fold(0u128, |acc, &(a, b)| {
                let mut n = (b - a).saturating_add(1);
                if self.avoid_buggy_ips && family == Family::V4 {
                    n -= buggy_in(a, b);
                }
                acc.saturating_add(n)
            })
    }

    /// Whether the pool's `serviceAllocation` admits a Service. `Err` says which
    /// constraint failed.
    ///
    /// The namespace constraint passes if `namespaces` and `namespaceSelectors` are both
    /// empty, or the namespace is listed, or any namespace selector matches. The Service
    /// constraint passes if `serviceSelectors` is empty or any matches. Both must pass.
    pub fn selects(
        &self,
        namespace: &str,
        namespace_labels: &BTreeMap<String, String>,
        service_labels: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let ns_constrained = !self.namespaces.is_empty() || !self.namespace_selectors.is_empty();
        if ns_constrained
            && !self.namespaces.iter().any(|n| n == namespace)
            && !self
                .namespace_selectors
                .iter()
                .any(|s| s.matches(namespace_labels))
        {
            return Err(format!(
                "namespace {namespace:?} is not in serviceAllocation.namespaces and matches no \
                 serviceAllocation.namespaceSelectors"
            ));
        }
        if !any_matches(&self.service_selectors, service_labels) {
            return Err("the Service's labels match no serviceAllocation.serviceSelectors".into());
        }
        Ok(())
    }

    /// Ordering key for auto-assignment: priority set before unset, lower first, then name.
    pub(crate) fn order_key(&self) -> (bool, i32, &str) {
        (
            self.priority.is_none(),
            self.priority.unwrap_or(0),
            &self.name,
        )
    }
}

/// Sorts and merges touching/overlapping inclusive ranges.
fn merge(list: &mut Vec<(u128, u128)>) {
    list.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(list.len());
    for &(a, b) in list.iter() {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    *list = out;
}

/// Two pools sharing addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overlap {
    /// One pool (the name that sorts first).
    pub pool: String,
    /// The other pool.
    pub other: String,
    /// First shared address of this stretch.
    pub first: IpAddr,
    /// Last shared address of this stretch.
    pub last: IpAddr,
}

impl Overlap {
    /// The problem as seen from `pool` (swap names when reporting for `other`).
    pub fn error_for(&self, pool: &str) -> Error {
        let other = if pool == self.pool {
            &self.other
        } else {
            &self.pool
        };
        Error::OverlappingPool {
            pool: pool.to_string(),
            other: other.clone(),
            first: self.first,
            last: self.last,
        }
    }
}

/// Every pair of pools that share addresses (one entry per overlapping stretch), sorted.
/// Quadratic only in the number of mutually overlapping ranges.
pub fn find_overlaps(pools: &[Pool]) -> Vec<Overlap> {
    let mut out = Vec::new();
    for family in Family::ALL {
        let mut all: Vec<(u128, u128, &str)> = pools
            .iter()
            .flat_map(|p| {
                p.raw_ranges(family)
                    .iter()
                    .map(|&(a, b)| (a, b, p.name.as_str()))
            })
            .collect();
        all.sort_unstable();
        for (i, &(a, b, name)) in all.iter().enumerate() {
            for &(c, d, other) in &all[i + 1..] {
                if c > b {
                    break;
                }
                if other == name {
                    continue;
                }
                let (first, second) = if name <= other {
                    (name, other)
                } else {
                    (other, name)
                };
                out.push(Overlap {
                    pool: first.to_string(),
                    other: second.to_string(),
                    first: num_to_ip(family, a.max(c)),
                    last: num_to_ip(family, b.min(d)),
                });
            }
        }
    }
    out.sort_by(|x, y| {
        (&x.pool, &x.other, ip_to_num(x.first)).cmp(&(&y.pool, &y.other, ip_to_num(y.first)))
    });
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_entries_table() {
        let ok: &[(&str, &str, &str)] = &[
            ("198.51.100.0/24", "198.51.100.0", "198.51.100.255"),
            (" 198.51.100.0/30 ", "198.51.100.0", "198.51.100.3"),
            ("198.51.100.7", "198.51.100.7", "198.51.100.7"),
            ("198.51.100.7/32", "198.51.100.7", "198.51.100.7"),
            (
                "198.51.100.200-198.51.100.250",
                "198.51.100.200",
                "198.51.100.250",
            ),
            (
                "198.51.100.200 - 198.51.100.250",
                "198.51.100.200",
                "198.51.100.250",
            ),
            ("198.51.100.5-198.51.100.5", "198.51.100.5", "198.51.100.5"),
            ("2001:db8::/126", "2001:db8::", "2001:db8::3"),
            ("2001:db8::10-2001:db8::1f", "2001:db8::10", "2001:db8::1f"),
            ("2001:db8::1", "2001:db8::1", "2001:db8::1"),
            (
                "2001:db8::/64",
                "2001:db8::",
                "2001:db8::ffff:ffff:ffff:ffff",
            ),
            ("0.0.0.0/1", "0.0.0.0", "127.255.255.255"),
        ];
        for (entry, first, last) in ok {
            let r = parse_entry(entry).unwrap_or_else(|e| panic!("{entry}: {e}"));
            assert_eq!((r.first, r.last), (ip(first), ip(last)), "{entry}");
        }

        let bad: Vec<(&str, AddressProblem)> = vec![
            ("", AddressProblem::Empty),
            ("  ", AddressProblem::Empty),
            ("198.51.100", AddressProblem::Unparsable),
            ("198.51.100.0/33", AddressProblem::Unparsable),
            ("198.51.100.0/", AddressProblem::Unparsable),
            ("2001:db8::/129", AddressProblem::Unparsable),
            ("198.51.100.1-", AddressProblem::Unparsable),
            ("198.51.100.1-2001:db8::1", AddressProblem::MixedFamily),
            (
                "198.51.100.9-198.51.100.1",
                AddressProblem::ReversedRange {
                    first: ip("198.51.100.9"),
                    last: ip("198.51.100.1"),
                },
            ),
            ("0.0.0.0/0", AddressProblem::TooBroad),
            ("::/0", AddressProblem::TooBroad),
            ("0.0.0.0-255.255.255.255", AddressProblem::TooBroad),
            (
                "198.51.100.201/29",
                AddressProblem::HostBitsSet {
                    network: "198.51.100.200/29".into(),
                    address: ip("198.51.100.201"),
                    last: ip("198.51.100.207"),
                },
            ),
        ];
        for (entry, problem) in bad {
            let err = parse_entry(entry).expect_err(entry);
            assert_eq!(
                err,
                Error::InvalidAddress {
                    entry: entry.into(),
                    problem
                },
                "{entry}"
            );
            assert!(err.to_string().contains(&format!("{entry:?}")), "{err}");
        }
    }

    #[test]
    fn error_messages_are_actionable() {
        let e = parse_entry("198.51.100.9-198.51.100.1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "address entry \"198.51.100.9-198.51.100.1\": range start 198.51.100.9 is after \
             its end 198.51.100.1; write 198.51.100.1-198.51.100.9"
        );
        let e = parse_entry("10.0.0.5/24").unwrap_err();
        assert!(e.to_string().contains("write 10.0.0.0/24"), "{e}");
        assert!(e.to_string().contains("10.0.0.5-10.0.0.255"), "{e}");
        assert!(parse_entry("::/0")
            .unwrap_err()
            .to_string()
            .contains("hijack"));
    }

    #[test]
    fn sizes_with_buggy_ips_and_huge_v6() {
        let mut p = Pool::new("p", &["10.0.0.0/23", "10.0.2.10-10.0.2.20"]).unwrap();
        assert_eq!(p.size(Family::V4), 512 + 11);
        p.avoid_buggy_ips = true;
        assert_eq!(p.size(Family::V4), 512 - 4 + 11);
        assert!(!p.contains(ip("10.0.0.0")));
        assert!(!p.contains(ip("10.0.1.255")));
        assert!(p.covers(ip("10.0.1.255")));
        assert!(p.contains(ip("10.0.1.1")));

        let edge = Pool {
            avoid_buggy_ips: true,
            ..Pool::new("e", &["10.0.0.255-10.0.1.0"]).unwrap()
        };
        assert_eq!(edge.size(Family::V4), 0);

        let big = Pool::new("v6", &["2001:db8::/32", "2001:db9::/1"]);
        assert!(big.is_err(), "host bits set");
        let big = Pool::new("v6", &["::/1", "8000::/1"]).unwrap();
        assert_eq!(big.size(Family::V6), u128::MAX, "saturates");
        let p = Pool::new("v6", &["2001:db8::/64"]).unwrap();
        assert_eq!(p.size(Family::V6), 1u128 << 64);
        assert_eq!(p.size(Family::V4), 0);
        assert!(!p.has_family(Family::V4));
    }

    #[test]
    fn entries_merge_within_pool() {
        let p = Pool::new("p", &["10.0.0.0/25", "10.0.0.100-10.0.0.200", "10.0.0.201"]).unwrap();
        let r: Vec<_> = p.ranges(Family::V4).map(|r| r.to_string()).collect();
        assert_eq!(r, ["10.0.0.0-10.0.0.201"]);
        assert_eq!(p.size(Family::V4), 202);
    }

    #[test]
    fn overlaps_name_both_pools() {
        let pools = vec![
            Pool::new("a", &["10.0.0.0/24"]).unwrap(),
            Pool::new("b", &["10.0.1.0/24", "10.0.0.250-10.0.1.5"]).unwrap(),
            Pool::new("c", &["10.0.2.0/24", "2001:db8::/120"]).unwrap(),
            Pool::new("d", &["2001:db8::80-2001:db8::100"]).unwrap(),
        ];
        let o = find_overlaps(&pools);
        assert_eq!(
            o,
            vec![
                Overlap {
                    pool: "a".into(),
                    other: "b".into(),
                    first: ip("10.0.0.250"),
                    last: ip("10.0.0.255"),
                },
                Overlap {
                    pool: "c".into(),
                    other: "d".into(),
                    first: ip("2001:db8::80"),
                    last: ip("2001:db8::ff"),
                },
            ]
        );
        let e = o[0].error_for("b");
        assert_eq!(
            e.to_string(),
            "IPAddressPool \"b\" overlaps IPAddressPool \"a\" on 10.0.0.250-10.0.0.255; \
             give each address to one pool only"
        );
        assert!(find_overlaps(&pools[2..3]).is_empty());
    }

    #[test]
    fn selects_namespaces_or_selectors_and_service_selectors() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
        let l = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        let sel = |k: &str, v: &str| {
            selector::parse(&LabelSelector {
                match_labels: Some(l(k, v)),
                ..Default::default()
            })
            .unwrap()
        };
        let mut p = Pool::new("p", &["10.0.0.0/24"]).unwrap();
        let none = BTreeMap::new();
        assert!(p.selects("x", &none, &none).is_ok());
        p.namespaces = vec!["team-a".into()];
        p.namespace_selectors = vec![sel("tier", "gold")];
        assert!(p.selects("team-a", &none, &none).is_ok());
        assert!(p.selects("team-b", &l("tier", "gold"), &none).is_ok());
        assert!(p.selects("team-b", &none, &none).is_err());
        p.service_selectors = vec![sel("expose", "public")];
        assert!(p.selects("team-a", &none, &none).is_err());
        assert!(p.selects("team-a", &none, &l("expose", "public")).is_ok());
    }

    #[test]
    fn bad_selector_is_reported_with_pool_name() {
        use crate::crd::ServiceAllocation;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
            LabelSelector, LabelSelectorRequirement,
        };
        let spec = IPAddressPoolSpec {
            addresses: vec!["10.0.0.0/24".into()],
            service_allocation: Some(ServiceAllocation {
                service_selectors: vec![LabelSelector {
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: "a".into(),
                        operator: "Equals".into(),
                        values: Some(vec!["b".into()]),
                    }]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = Pool::from_spec("p", &BTreeMap::new(), &spec).unwrap_err();
        assert_eq!(e.reason(), "InvalidSelector");
        assert!(e.to_string().contains("\"p\""), "{e}");
    }
}
