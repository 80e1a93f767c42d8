//! Where each local pod's packets enter the node (anti-spoofing input), read from the kernel.
//!
//! ```text
//!  pod IP ──► longest-prefix route (main table) ──► dev
//!               dev is not a bridge ──► PodInterface::Routed(dev)        (routed CNI, /32 via veth)
//!               dev is a bridge     ──► neighbour entry of the IP on dev ──► MAC
//!                                       ──► bridge FDB entry (MAC, master dev) ──► port
//!                                       ──► PodInterface::BridgePort(port) (bridged CNI, br_netfilter)
//! ```
//!
//! The kernel is read through [`LinkSource`] (four `ip -j` / `bridge -j` dumps, whatever the
//! number of pods); [`resolve`] is pure, so tests feed it recorded JSON. A pod whose IP has
//! no route, only a route via the loopback / a non-bridge shared device, or (bridged) no
//! neighbour or FDB entry yet, is left out: the compiler reports it as `PodInterfaceUnknown`.
//! Policy routing (rules other than the main table) is not followed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::str::FromStr;

use palisade_netpol::{IpNetwork, PodInterface};
use serde_json::Value;

use crate::DataplaneError;

/// JSON dumps of the kernel state [`resolve`] needs.
#[derive(Clone, Debug, Default)]
pub struct LinkDump {
    /// `ip -j -4 route show table main`.
    pub routes4: String,
    /// `ip -j -6 route show table main`.
    pub routes6: String,
    /// `ip -j neigh show` (both families).
    pub neighbours: String,
    /// `bridge -j fdb show`.
    pub fdb: String,
    /// `ip -j link show type bridge`.
    pub bridges: String,
}

/// Reads [`LinkDump`]s (the kernel, or a fake in tests).
pub trait LinkSource: Send + Sync {
    fn dump(&self) -> Result<LinkDump, DataplaneError>;
}

/// Runs `ip` and `bridge` (optionally inside a named network namespace).
#[derive(Clone, Debug)]
pub struct KernelLinks {
    netns: Option<String>,
    ip: PathBuf,
    bridge: PathBuf,
}

impl KernelLinks {
    /// Uses `ip` and `bridge` from the PATH (or /usr/sbin, /sbin).
    pub fn detect() -> Result<Self, DataplaneError> {
        Self::build(None)
    }

    /// The same, inside network namespace `netns` (tests, the lab).
    pub fn in_netns(netns: &str) -> Result<Self, DataplaneError> {
        Self::build(Some(netns.to_string()))
    }

    fn build(netns: Option<String>) -> Result<Self, DataplaneError> {
        Ok(KernelLinks {
            netns,
            ip: crate::kernel::require("ip")?,
            bridge: crate::kernel::require("bridge")?,
        })
    }

    fn run(&self, prog: &PathBuf, args: &[&str]) -> Result<String, DataplaneError> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new(&self.ip);
                c.args(["netns", "exec", ns.as_str()]).arg(prog);
                c
            }
            None => Command::new(prog),
        };
        let command = format!("{} {}", prog.display(), args.join(" "));
        let out = cmd
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| DataplaneError::Spawn {
                command: command.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(DataplaneError::CommandFailed {
                command,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                line: None,
                offending: None,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl LinkSource for KernelLinks {
    fn dump(&self) -> Result<LinkDump, DataplaneError> {
        Ok(LinkDump {
            routes4: self.run(&self.ip, &["-j", "-4", "route", "show", "table", "main"])?,
            routes6: self.run(&self.ip, &["-j", "-6", "route", "show", "table", "main"])?,
            neighbours: self.run(&self.ip, &["-j", "neigh", "show"])?,
            fdb: self.run(&self.bridge, &["-j", "fdb", "show"])?,
            bridges: self.run(&self.ip, &["-j", "link", "show", "type", "bridge"])?,
        })
    }
}

/// Reads the kernel once and resolves `ips`.
pub fn pod_interfaces(
    src: &dyn LinkSource,
    ips: &[IpAddr],
) -> Result<BTreeMap<IpAddr, PodInterface>, DataplaneError> {
    Ok(resolve(&src.dump()?, ips))
}

fn array(text: &str) -> Vec<Value> {
    // An empty dump prints nothing (or `[]`); anything unparsable counts as empty.
    match serde_json::from_str::<Value>(text.trim()) {
        Ok(Value::Array(a)) => a,
        _ => Vec::new(),
    }
}

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// The interfaces of the `ips` the dump can place (see the module docs). Pure.
pub fn resolve(dump: &LinkDump, ips: &[IpAddr]) -> BTreeMap<IpAddr, PodInterface> {
    let mut routes: Vec<(IpNetwork, String)> = Vec::new();
    for r in array(&dump.routes4).iter().chain(&array(&dump.routes6)) {
        // Only plain unicast routes with a device (no blackhole / unreachable / multipath).
        if field(r, "type").is_some_and(|t| t != "unicast") {
            continue;
        }
        let (Some(dst), Some(dev)) = (field(r, "dst"), field(r, "dev")) else {
            continue;
        };
        let net = match dst {
            "default" => continue,
            d => match IpNetwork::from_str(d) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        routes.push((net, dev.to_string()));
    }
    let bridges: HashSet<String> = array(&dump.bridges)
        .iter()
        .filter_map(|b| field(b, "ifname").map(str::to_string))
        .collect();
    // (ip, dev) → MAC, from entries that have a link-layer address.
    let mut neigh: HashMap<(IpAddr, &str), String> = HashMap::new();
    let neighbours = array(&dump.neighbours);
    for n in &neighbours {
        let (Some(dst), Some(dev), Some(mac)) =
            (field(n, "dst"), field(n, "dev"), field(n, "lladdr"))
        else {
            continue;
        };
        if let Ok(ip) = IpAddr::from_str(dst) {
            neigh.insert((ip, dev), mac.to_ascii_lowercase());
        }
    }
    // (bridge, MAC) → port, from learned or static entries of a port (not the bridge's own
    // or a port's own `permanent` address).
    let mut fdb: HashMap<(&str, String), &str> = HashMap::new();
    let fdb_entries = array(&dump.fdb);
    for e in &fdb_entries {
        let (Some(mac), Some(port), Some(master)) =
            (field(e, "mac"), field(e, "ifname"), field(e, "master"))
        else {
            continue;
        };
        if field(e, "state") == Some("permanent") {
            continue;
        }
        fdb.insert((master, mac.to_ascii_lowercase()), port);
    }

    let mut out = BTreeMap::new();
    for &ip in ips {
        let best = routes
            .iter()
            .filter(|(net, _)| net.contains(ip))
            .max_by_key(|(net, _)| net.prefix());
        let Some((_, dev)) = best else { continue };
        if dev == "lo" {
            continue;
        }
        let iface = if bridges.contains(dev) {
            let Some(mac) = neigh.get(&(ip, dev.as_str())) else {
                continue;
            };
            let Some(port) = fdb.get(&(dev.as_str(), mac.clone())) else {
                continue;
            };
            PodInterface::BridgePort(port.to_string())
        } else {
            PodInterface::Routed(dev.clone())
        };
        if PodInterface::valid_name(iface.name()) {
            out.insert(ip, iface);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Recorded from `ip`/`bridge` in a netns: bridge cni0 (10.9.1.0/24) with port vh1 behind
    /// which 10.9.1.5 (02:00:00:00:00:05) lives, and a routed pod 10.9.2.7 / fd00::7 on vr1.
    fn dump() -> LinkDump {
        LinkDump {
            routes4: r#"[{"dst":"10.9.1.0/24","dev":"cni0","protocol":"kernel","scope":"link","prefsrc":"10.9.1.1","flags":[]},{"dst":"10.9.2.7","dev":"vr1","scope":"link","flags":["linkdown"]},{"dst":"default","gateway":"10.9.0.1","dev":"eth0"},{"type":"blackhole","dst":"10.9.3.0/24","flags":[]},{"dst":"10.9.4.0/24","dev":"lo"}]"#.into(),
            routes6: r#"[{"dst":"fd00::7","dev":"vr1","metric":1024,"flags":["linkdown"],"pref":"medium"},{"dst":"fe80::/64","dev":"cni0","protocol":"kernel","metric":256,"flags":[],"pref":"medium"}]"#.into(),
            neighbours: r#"[{"dst":"10.9.1.5","dev":"cni0","lladdr":"02:00:00:00:00:05","state":["STALE"]},{"dst":"10.9.1.6","dev":"cni0","state":["FAILED"]},{"dst":"10.9.1.8","dev":"cni0","lladdr":"02:00:00:00:00:08","state":["REACHABLE"]}]"#.into(),
            fdb: r#"[{"mac":"33:33:00:00:00:01","ifname":"cni0","flags":["self"],"state":"permanent"},{"mac":"02:00:00:00:00:05","ifname":"vh1","flags":[],"master":"cni0","state":""},{"mac":"b6:f1:66:f7:bb:4c","ifname":"vh1","flags":[],"master":"cni0","state":"permanent"},{"mac":"02:00:00:00:00:08","ifname":"cni0","flags":[],"master":"cni0","state":"permanent"}]"#.into(),
            bridges: r#"[{"ifindex":2,"ifname":"cni0","flags":["UP"],"mtu":1500}]"#.into(),
        }
    }

    #[test]
    fn routed_and_bridged_pods_are_placed() {
        let got = resolve(&dump(), &[ip("10.9.1.5"), ip("10.9.2.7"), ip("fd00::7")]);
        assert_eq!(got[&ip("10.9.1.5")], PodInterface::BridgePort("vh1".into()));
        assert_eq!(got[&ip("10.9.2.7")], PodInterface::Routed("vr1".into()));
        assert_eq!(got[&ip("fd00::7")], PodInterface::Routed("vr1".into()));
    }

    #[test]
    fn what_cannot_be_placed_is_left_out() {
        let got = resolve(
            &dump(),
            &[
                ip("10.9.1.6"),  // neighbour without MAC
                ip("10.9.1.7"),  // no neighbour entry
                ip("10.9.1.8"),  // MAC is the bridge's own (permanent)
                ip("10.9.3.1"),  // blackhole
                ip("10.9.4.1"),  // via lo
                ip("192.0.2.1"), // only the default route
                ip("fd00::99"),  // no route
            ],
        );
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn garbage_dumps_place_nothing_and_never_panic() {
        let bad = LinkDump {
            routes4: "not json".into(),
            routes6: r#"{"dst":1}"#.into(),
            neighbours: r#"[1,null,{"dst":"x"}]"#.into(),
            fdb: "[[]]".into(),
            bridges: String::new(),
        };
        assert!(resolve(&bad, &[ip("10.9.1.5")]).is_empty());
        // A device name we could not use in a rule is left out too.
        let mut d = dump();
        d.routes4 = r#"[{"dst":"10.9.2.7","dev":"bad dev!"}]"#.into();
        assert!(resolve(&d, &[ip("10.9.2.7")]).is_empty());
    }
}
