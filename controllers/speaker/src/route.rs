//! The default interface for an IP: the one holding the best route to it, read from the kernel's
//! routing tables in procfs (`/proc/thread-self/net/route`, `/proc/thread-self/net/ipv6_route`).
//!
//! ```text
//!  route_interface(198.51.100.200)
//!     /proc/thread-self/net/route:  eth0 198.51.100.0/24 ◄── longest prefix, then lowest metric
//!                                   eth1 0.0.0.0/0
//!     ─► "eth0"
//! ```
//!
//! Why procfs and not `ip -j route get` or netlink: no subprocess, no extra dependency, no
//! `unsafe`, and the parsers are pure and unit-tested. `thread-self` (not `self`) matters: the
//! tables are those of the calling thread's network namespace, which is what a speaker created
//! inside a namespace (tests, `ip netns exec`) must see. Limits: only the main table counts
//! (policy routing rules are not evaluated), and an IP outside every connected subnet resolves
//! to the default route's interface. Name interfaces in the L2Advertisement when that matters.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::error::SpeakerError;

const RTF_UP: u32 = 0x0001;
const RTF_REJECT: u32 = 0x0200;
const IPV4_ROUTES: &str = "/proc/thread-self/net/route";
const IPV6_ROUTES: &str = "/proc/thread-self/net/ipv6_route";

/// One usable route: destination network, prefix length, metric, interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dest: IpAddr,
    pub prefix: u8,
    pub metric: u32,
    pub iface: String,
}

impl Route {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.dest, ip) {
            (IpAddr::V4(d), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(d) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(d), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(d) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Parses `/proc/net/route` (IPv4 main table). Lines that do not parse, routes that are down
/// or `reject`, and routes via `lo` are skipped.
pub fn parse_ipv4_routes(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[0] == "lo" {
                return None;
            }
            let hex = |s: &str| u32::from_str_radix(s, 16).ok();
            // The kernel prints the big-endian words as native integers.
            let dest = Ipv4Addr::from(hex(f[1])?.to_ne_bytes());
            let flags = hex(f[3])?;
            let metric: u32 = f[6].parse().ok()?;
            let mask = u32::from(Ipv4Addr::from(hex(f[7])?.to_ne_bytes()));
            if flags & RTF_UP == 0
                || flags & RTF_REJECT != 0
                || mask.leading_ones() + mask.trailing_zeros() != 32
            {
                return None;
            }
            Some(Route {
                dest: IpAddr::V4(dest),
                prefix: mask.leading_ones() as u8,
                metric,
                iface: f[0].to_owned(),
            })
        })
        .collect()
}

/// Parses `/proc/net/ipv6_route`. Skips `lo`, rejected and down routes, and malformed lines.
pub fn parse_ipv6_routes(text: &str) -> Vec<Route> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[9] == "lo" {
                return None;
            }
            let dest = Ipv6Addr::from(u128::from_str_radix(f[0], 16).ok()?);
            let prefix = u8::from_str_radix(f[1], 16).ok().filter(|p| *p <= 128)?;
            let metric = u32::from_str_radix(f[5], 16).ok()?;
            let flags = u32::from_str_radix(f[8], 16).ok()?;
            if flags & RTF_UP == 0 || flags & RTF_REJECT != 0 {
                return None;
            }
            Some(Route {
                dest: IpAddr::V6(dest),
                prefix,
                metric,
                iface: f[9].to_owned(),
            })
        })
        .collect()
}

/// The interface of the best route to `ip` among `routes`: longest prefix, then lowest metric,
/// then interface name (for a stable answer).
pub fn best_route(routes: &[Route], ip: IpAddr) -> Option<&Route> {
    routes
        .iter()
        .filter(|r| !r.dest.is_multicast() && r.contains(ip))
        .min_by(|a, b| {
            b.prefix
                .cmp(&a.prefix)
                .then(a.metric.cmp(&b.metric))
                .then(a.iface.cmp(&b.iface))
        })
}

/// Reads the routing table of `ip`'s family in the calling thread's network namespace.
pub fn read_routes(ip: IpAddr) -> Result<Vec<Route>, SpeakerError> {
    let (path, parse): (&str, fn(&str) -> Vec<Route>) = match ip {
        IpAddr::V4(_) => (IPV4_ROUTES, parse_ipv4_routes),
        IpAddr::V6(_) => (IPV6_ROUTES, parse_ipv6_routes),
    };
    let text = std::fs::read_to_string(path).map_err(|source| SpeakerError::RouteTable {
        path: path.to_owned(),
        source,
    })?;
    Ok(parse(&text))
}

/// The interface holding the route to `ip` in the calling thread's network namespace.
pub fn route_interface(ip: IpAddr) -> Result<String, SpeakerError> {
    let routes = read_routes(ip)?;
    best_route(&routes, ip)
        .map(|r| r.iface.clone())
        .ok_or(SpeakerError::NoRoute(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth1\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t006433C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth2\t006433C6\t00000000\t0001\t0\t0\t50\t00FFFFFF\t0\t0\t0
eth3\tC86433C6\t00000000\t0201\t0\t0\t0\tFFFFFFFF\t0\t0\t0
lo\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0
garbage line
eth4\tZZZZ\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";

    const V6: &str = "fd000051010000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth1
fd000051010000000000000000000200 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000001 00000000 00000201     eth3
fd000051010000000000000000000011 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000004 00000000 00000001     eth0
";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_longest_prefix_then_metric() {
        let routes = parse_ipv4_routes(V4);
        assert_eq!(routes.len(), 3, "{routes:?}");
        assert_eq!(
            routes[1],
            Route {
                dest: ip("198.51.100.0"),
                prefix: 24,
                metric: 0,
                iface: "eth0".into()
            }
        );
        assert_eq!(
            best_route(&routes, ip("198.51.100.200")).unwrap().iface,
            "eth0"
        );
        assert_eq!(
            best_route(&routes, ip("203.0.113.9")).unwrap().iface,
            "eth1"
        );
        assert!(best_route(&routes, ip("fd00::1")).is_none());
        assert!(best_route(&[], ip("198.51.100.1")).is_none());
    }

    #[test]
    fn ipv6_routes() {
        let routes = parse_ipv6_routes(V6);
        assert!(
            routes.iter().all(|r| r.iface != "lo" && r.iface != "eth3"),
            "{routes:?}"
        );
        assert_eq!(
            best_route(&routes, ip("fd00:51:100::200")).unwrap().iface,
            "eth0"
        );
        assert_eq!(
            best_route(&routes, ip("2001:db8::1")).unwrap().iface,
            "eth1"
        );
        assert_eq!(best_route(&routes, ip("fe80::5")).unwrap().iface, "eth0");
    }

    #[test]
    fn garbage_never_panics() {
        for text in [
            "",
            "\n\n",
            "a b c d e f g h i j k",
            "x\n1 2 3 4 5 6 7 8 9 10 11",
        ] {
            let _ = parse_ipv4_routes(text);
            let _ = parse_ipv6_routes(text);
        }
        // Prefix 0 and 32/128 masks work.
        let r = Route {
            dest: ip("0.0.0.0"),
            prefix: 0,
            metric: 0,
            iface: "x".into(),
        };
        assert!(r.contains(ip("1.2.3.4")));
        let r = Route {
            dest: ip("::"),
            prefix: 0,
            metric: 0,
            iface: "x".into(),
        };
        assert!(r.contains(ip("fd00::1")));
        assert!(!r.contains(ip("1.2.3.4")));
    }

    #[test]
    fn reads_this_threads_namespace() {
        // Whatever the host has, the call must not panic; with no route it says so.
        match route_interface(ip("198.51.100.200")) {
            Ok(iface) => assert!(!iface.is_empty()),
            Err(e) => assert!(matches!(
                e,
                SpeakerError::NoRoute(_) | SpeakerError::RouteTable { .. }
            )),
        }
    }
}
