//! Table-driven tests of the allocator through the crate's public API.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use palisade_loadbalancer::constants::reasons;
use palisade_loadbalancer::selector::{self, Selector};
use palisade_loadbalancer::{
    Allocator, Error, Family, IPAddressPoolSpec, IpFamilyPolicy, Pool, Port, ServiceKey,
    ServiceRequest,
};

// ---- builders ---------------------------------------------------------------------------

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|_| panic!("bad test IP {s}"))
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| ip(s)).collect()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(k: &str, v: &str) -> Selector {
    selector::parse(&LabelSelector {
        match_labels: Some(labels(&[(k, v)])),
        ..Default::default()
    })
    .expect("valid selector")
}

fn pool(name: &str, addrs: &[&str]) -> Pool {
    Pool::new(name, addrs).unwrap_or_else(|e| panic!("pool {name}: {e}"))
}

trait PoolExt {
    fn prio(self, p: i32) -> Pool;
    fn manual(self) -> Pool;
    fn buggy(self) -> Pool;
    fn namespaces(self, ns: &[&str]) -> Pool;
    fn ns_sel(self, k: &str, v: &str) -> Pool;
    fn svc_sel(self, k: &str, v: &str) -> Pool;
}

impl PoolExt for Pool {
    fn prio(mut self, p: i32) -> Pool {
        self.priority = Some(p);
        self
    }
    fn manual(mut self) -> Pool {
        self.auto_assign = false;
        self
    }
    fn buggy(mut self) -> Pool {
        self.avoid_buggy_ips = true;
        self
    }
    fn namespaces(mut self, ns: &[&str]) -> Pool {
        self.namespaces = ns.iter().map(|s| s.to_string()).collect();
        self
    }
    fn ns_sel(mut self, k: &str, v: &str) -> Pool {
        self.namespace_selectors.push(sel(k, v));
        self
    }
    fn svc_sel(mut self, k: &str, v: &str) -> Pool {
        self.service_selectors.push(sel(k, v));
        self
    }
}

fn svc(ns: &str, name: &str) -> ServiceRequest {
    ServiceRequest::new(ns, name)
}

trait SvcExt {
    fn want(self, ips: &[&str]) -> ServiceRequest;
    fn in_pool(self, pool: &str) -> ServiceRequest;
    fn fams(self, f: &[Family], policy: IpFamilyPolicy) -> ServiceRequest;
    fn share(self, key: &str, ports: &[Port]) -> ServiceRequest;
    fn ports(self, ports: &[Port]) -> ServiceRequest;
    fn local(self, app: &str) -> ServiceRequest;
    fn label(self, k: &str, v: &str) -> ServiceRequest;
    fn ns_label(self, k: &str, v: &str) -> ServiceRequest;
}

impl SvcExt for ServiceRequest {
    fn want(mut self, list: &[&str]) -> ServiceRequest {
        self.requested_ips = ips(list);
        self
    }
    fn in_pool(mut self, pool: &str) -> ServiceRequest {
        self.requested_pool = Some(pool.into());
        self
    }
    fn fams(mut self, f: &[Family], policy: IpFamilyPolicy) -> ServiceRequest {
        self.ip_families = f.to_vec();
        self.ip_family_policy = policy;
        self
    }
    fn share(mut self, key: &str, ports: &[Port]) -> ServiceRequest {
        self.sharing_key = Some(key.into());
        self.ports = ports.to_vec();
        self
    }
    fn ports(mut self, ports: &[Port]) -> ServiceRequest {
        self.ports = ports.to_vec();
        self
    }
    fn local(mut self, app: &str) -> ServiceRequest {
        self.external_traffic_policy_local = true;
        self.selector = labels(&[("app", app)]);
        self
    }
    fn label(mut self, k: &str, v: &str) -> ServiceRequest {
        self.labels.insert(k.into(), v.into());
        self
    }
    fn ns_label(mut self, k: &str, v: &str) -> ServiceRequest {
        self.namespace_labels.insert(k.into(), v.into());
        self
    }
}

use Family::{V4, V6};
use IpFamilyPolicy::{PreferDualStack, RequireDualStack, SingleStack};

/// What a case expects from the final `assign`.
enum Want {
    Ips(&'static [&'static str]),
    /// Reason constant plus a fragment the message must contain.
    Err(&'static str, &'static str),
}

struct Case {
    name: &'static str,
    families: &'static [Family],
    pools: Vec<Pool>,
    /// Assigned first; each must succeed.
    before: Vec<ServiceRequest>,
    req: ServiceRequest,
    want: Want,
}

fn case(name: &'static str, pools: Vec<Pool>, req: ServiceRequest, want: Want) -> Case {
    Case {
        name,
        families: &[V4, V6],
        pools,
        before: Vec::new(),
        req,
        want,
    }
}

impl Case {
    fn after(mut self, before: Vec<ServiceRequest>) -> Case {
        self.before = before;
        self
    }
    fn only(mut self, families: &'static [Family]) -> Case {
        self.families = families;
        self
    }
}

fn run(c: Case) {
    let mut a = Allocator::with_families(c.families);
    a.set_pools(c.pools);
    for b in &c.before {
        if let Err(e) = a.assign(b) {
            panic!("{}: setup {} failed: {e}", c.name, b.key);
        }
    }
    let got = a.assign(&c.req);
    match (c.want, got) {
        (Want::Ips(want), Ok(got)) => assert_eq!(got, ips(want), "{}", c.name),
        (Want::Err(reason, frag), Err(e)) => {
            assert_eq!(e.reason(), reason, "{}: {e}", c.name);
            assert!(
                e.to_string().contains(frag),
                "{}: {e:?} lacks {frag:?}",
                c.name
            );
            assert_eq!(
                a.assigned(&c.req.key),
                None,
                "{}: failed assign left state",
                c.name
            );
        }
        (Want::Ips(want), Err(e)) => panic!("{}: want {want:?}, got error {e}", c.name),
        (Want::Err(reason, _), Ok(got)) => panic!("{}: want {reason}, got {got:?}", c.name),
    }
}

#[test]
fn assign_table() {
    let p30 = || pool("a", &["10.0.0.0/30"]);
    let cases = vec![
        // ---- address shapes
        case(
            "range, lowest first",
            vec![pool("a", &["10.0.0.10-10.0.0.12"])],
            svc("ns", "s"),
            Want::Ips(&["10.0.0.10"]),
        ),
        case(
            "range, next free",
            vec![pool("a", &["10.0.0.10-10.0.0.12"])],
            svc("ns", "s"),
            Want::Ips(&["10.0.0.11"]),
        )
        .after(vec![svc("ns", "x")]),
        case(
            "cidr includes network address without avoidBuggyIPs",
            vec![p30()],
            svc("ns", "s"),
            Want::Ips(&["10.0.0.0"]),
        ),
        case(
            "single ip",
            vec![pool("a", &["10.0.0.7"])],
            svc("ns", "s"),
            Want::Ips(&["10.0.0.7"]),
        ),
        case(
            "avoidBuggyIPs skips .0",
            vec![pool("a", &["10.0.0.0/24"]).buggy()],
            svc("ns", "s"),
            Want::Ips(&["10.0.0.1"]),
        ),
        case(
            "avoidBuggyIPs skips .255 and .0 across a boundary",
            vec![pool("a", &["10.0.0.254-10.0.1.1"]).buggy()],
            svc("ns", "s"),
            Want::Ips(&["10.0.1.1"]),
        )
        .after(vec![svc("ns", "x")]),
        case(
            "ipv6 cidr",
            vec![pool("a", &["2001:db8::/126"])],
            svc("ns", "s").fams(&[V6], SingleStack),
            Want::Ips(&["2001:db8::"]),
        ),
        case(
            "ipv6 range",
            vec![pool("a", &["2001:db8::10-2001:db8::11"])],
            svc("ns", "s").fams(&[V6], SingleStack),
            Want::Ips(&["2001:db8::11"]),
        )
        .after(vec![svc("ns", "x").fams(&[V6], SingleStack)]),
        // ---- exhaustion
        case(
            "exhausted names the pool",
            vec![pool("tiny", &["10.0.0.1"])],
            svc("ns", "s"),
            Want::Err(
                reasons::POOL_EXHAUSTED,
                "no free IPv4 address in IPAddressPool \"tiny\"",
            ),
        )
        .after(vec![svc("ns", "x")]),
        case(
            "exhausted names every pool tried",
            vec![pool("a", &["10.0.0.1"]), pool("b", &["10.0.0.2"])],
            svc("ns", "s"),
            Want::Err(reasons::POOL_EXHAUSTED, "\"a\", \"b\""),
        )
        .after(vec![svc("ns", "x"), svc("ns", "y")]),
        case(
            "all-buggy pool is exhausted",
            vec![pool("a", &["10.0.0.255-10.0.1.0"]).buggy()],
            svc("ns", "s"),
            Want::Err(reasons::POOL_EXHAUSTED, "\"a\""),
        ),
        // ---- pool choice
        case(
            "priority: lower number first, unset last",
            vec![
                pool("a", &["10.0.1.0/30"]).prio(10),
                pool("b", &["10.0.2.0/30"]).prio(5),
                pool("c", &["10.0.0.0/30"]),
            ],
            svc("ns", "s"),
            Want::Ips(&["10.0.2.0"]),
        ),
        case(
            "priority: falls through when full",
            vec![
                pool("a", &["10.0.1.0/30"]).prio(10),
                pool("b", &["10.0.2.0"]).prio(5),
                pool("c", &["10.0.0.0/30"]),
            ],
            svc("ns", "s"),
            Want::Ips(&["10.0.1.0"]),
        )
        .after(vec![svc("ns", "x")]),
        case(
            "no priority: by name",
            vec![pool("zz", &["10.0.0.0/30"]), pool("aa", &["10.0.9.0/30"])],
            svc("ns", "s"),
            Want::Ips(&["10.0.9.0"]),
        ),
        case(
            "autoAssign=false skipped",
            vec![
                pool("a", &["10.0.0.0/30"]).manual(),
                pool("b", &["10.0.1.0/30"]),
            ],
            svc("ns", "s"),
            Want::Ips(&["10.0.1.0"]),
        ),
        case(
            "only manual pools: no matching pool",
            vec![pool("a", &["10.0.0.0/30"]).manual()],
            svc("ns", "s"),
            Want::Err(
                reasons::NO_MATCHING_POOL,
                "no IPAddressPool with autoAssign selects Service ns/s (pools: a)",
            ),
        ),
        case(
            "no pools at all",
            vec![],
            svc("ns", "s"),
            Want::Err(reasons::NO_MATCHING_POOL, "no IPAddressPools are defined"),
        ),
        case(
            "namespaces: listed namespace uses restricted pool",
            vec![
                pool("a", &["10.0.0.0/30"]).namespaces(&["team-a"]),
                pool("b", &["10.0.1.0/30"]),
            ],
            svc("team-a", "s"),
            Want::Ips(&["10.0.0.0"]),
        ),
        case(
            "namespaces: other namespace skips restricted pool",
            vec![
                pool("a", &["10.0.0.0/30"]).namespaces(&["team-a"]),
                pool("b", &["10.0.1.0/30"]),
            ],
            svc("team-b", "s"),
            Want::Ips(&["10.0.1.0"]),
        ),
        case(
            "namespaceSelectors match namespace labels",
            vec![
                pool("a", &["10.0.0.0/30"]).ns_sel("tier", "gold"),
                pool("b", &["10.0.1.0/30"]),
            ],
            svc("x", "s").ns_label("tier", "gold"),
            Want::Ips(&["10.0.0.0"]),
        ),
        case(
            "serviceSelectors match service labels",
            vec![
                pool("a", &["10.0.0.0/30"]).svc_sel("expose", "public"),
                pool("b", &["10.0.1.0/30"]),
            ],
            svc("x", "s").label("expose", "public"),
            Want::Ips(&["10.0.0.0"]),
        ),
        case(
            "serviceSelectors miss",
            vec![pool("a", &["10.0.0.0/30"]).svc_sel("expose", "public")],
            svc("x", "s").label("expose", "internal"),
            Want::Err(reasons::NO_MATCHING_POOL, "Service x/s"),
        ),
        case(
            "annotation pool wins over priority, autoAssign not needed",
            vec![
                pool("a", &["10.0.0.0/30"]).prio(1),
                pool("b", &["10.0.1.0/30"]).manual(),
            ],
            svc("ns", "s").in_pool("b"),
            Want::Ips(&["10.0.1.0"]),
        ),
        case(
            "annotation pool unknown",
            vec![pool("a", &["10.0.0.0/30"]), pool("b", &["10.0.1.0/30"])],
            svc("ns", "s").in_pool("nope"),
            Want::Err(
                reasons::UNKNOWN_POOL,
                "IPAddressPool \"nope\" does not exist (pools: a, b)",
            ),
        ),
        case(
            "annotation pool does not admit the namespace",
            vec![pool("a", &["10.0.0.0/30"]).namespaces(&["team-a"])],
            svc("team-b", "s").in_pool("a"),
            Want::Err(reasons::NO_MATCHING_POOL, "namespace \"team-b\""),
        ),
        case(
            "annotation pool exhausted",
            vec![pool("a", &["10.0.0.0"]), pool("b", &["10.0.1.0/30"])],
            svc("ns", "s").in_pool("a"),
            Want::Err(reasons::POOL_EXHAUSTED, "\"a\""),
        )
        .after(vec![svc("ns", "x").in_pool("a")]),
        // ---- requested IPs
        case(
            "requested IP in pool",
            vec![p30()],
            svc("ns", "s").want(&["10.0.0.2"]),
            Want::Ips(&["10.0.0.2"]),
        ),
        case(
            "requested IP outside every pool",
            vec![pool("a", &["10.0.0.0/30"]), pool("b", &["10.0.1.0/30"])],
            svc("ns", "s").want(&["198.51.100.7"]),
            Want::Err(
                reasons::IP_NOT_IN_POOL,
                "requested IP 198.51.100.7 is not in any IPAddressPool (pools: a, b)",
            ),
        ),
        case(
            "requested IP taken",
            vec![p30()],
            svc("ns", "s").want(&["10.0.0.0"]),
            Want::Err(reasons::IP_IN_USE, "IP 10.0.0.0 is in use by ns/x"),
        )
        .after(vec![svc("ns", "x")]),
        case(
            "requested IP from a manual pool",
            vec![pool("m", &["10.0.5.0/30"]).manual()],
            svc("ns", "s").want(&["10.0.5.1"]),
            Want::Ips(&["10.0.5.1"]),
        ),
        case(
            "requested IP in a pool that does not admit the service",
            vec![pool("a", &["10.0.0.0/30"]).namespaces(&["team-a"])],
            svc("team-b", "s").want(&["10.0.0.1"]),
            Want::Err(
                reasons::NO_MATCHING_POOL,
                "IPAddressPool \"a\" does not serve Service team-b/s",
            ),
        ),
        case(
            "requested IP not in the annotated pool",
            vec![pool("a", &["10.0.0.0/30"]), pool("b", &["10.0.1.0/30"])],
            svc("ns", "s").in_pool("b").want(&["10.0.0.1"]),
            Want::Err(
                reasons::IP_NOT_IN_POOL,
                "not in IPAddressPool \"b\" named by palisade.dev/address-pool",
            ),
        ),
        case(
            "requested buggy IP explains avoidBuggyIPs",
            vec![pool("a", &["10.0.0.0/24"]).buggy()],
            svc("ns", "s").want(&["10.0.0.255"]),
            Want::Err(reasons::IP_NOT_IN_POOL, "avoidBuggyIPs"),
        ),
        case(
            "two requested IPs of one family",
            vec![p30()],
            svc("ns", "s").want(&["10.0.0.1", "10.0.0.2"]),
            Want::Err(reasons::INVALID_ADDRESS, "at most one IP per family"),
        ),
        case(
            "requested v6 IP on a single-stack v4 service",
            vec![pool("a", &["2001:db8::/120"])],
            svc("ns", "s").want(&["2001:db8::1"]),
            Want::Err(
                reasons::FAMILY_NOT_SUPPORTED,
                "requested IP 2001:db8::1 is IPv6",
            ),
        ),
        // ---- sharing
        case(
            "sharing: same key, disjoint ports",
            vec![p30()],
            svc("ns", "b")
                .share("k", &[Port::tcp(443)])
                .want(&["10.0.0.1"]),
            Want::Ips(&["10.0.0.1"]),
        )
        .after(vec![svc("ns", "a")
            .share("k", &[Port::tcp(80)])
            .want(&["10.0.0.1"])]),
        case(
            "sharing: same port number, other protocol is fine",
            vec![p30()],
            svc("ns", "b")
                .share("k", &[Port::udp(53)])
                .want(&["10.0.0.1"]),
            Want::Ips(&["10.0.0.1"]),
        )
        .after(vec![svc("ns", "a")
            .share("k", &[Port::tcp(53)])
            .want(&["10.0.0.1"])]),
        case(
            "sharing: port clash",
            vec![p30()],
            svc("ns", "b")
                .share("k", &[Port::tcp(80)])
                .want(&["10.0.0.1"]),
            Want::Err(reasons::SHARING_CONFLICT, "both use port TCP/80"),
        )
        .after(vec![svc("ns", "a")
            .share("k", &[Port::tcp(80)])
            .want(&["10.0.0.1"])]),
        case(
            "sharing: key mismatch",
            vec![p30()],
            svc("ns", "b")
                .share("k2", &[Port::tcp(443)])
                .want(&["10.0.0.1"]),
            Want::Err(
                reasons::SHARING_CONFLICT,
                "sharing key \"k2\" differs from its key \"k\"",
            ),
        )
        .after(vec![svc("ns", "a")
            .share("k", &[Port::tcp(80)])
            .want(&["10.0.0.1"])]),
        case(
            "sharing: holder has no key",
            vec![p30()],
            svc("ns", "b")
                .share("k", &[Port::tcp(443)])
                .want(&["10.0.0.1"]),
            Want::Err(reasons::IP_IN_USE, "in use by ns/a"),
        )
        .after(vec![svc("ns", "a")
            .ports(&[Port::tcp(80)])
            .want(&["10.0.0.1"])]),
        case(
            "sharing: policy mismatch (Local vs Cluster)",
            vec![p30()],
            svc("ns", "b")
                .share("k", &[Port::tcp(443)])
                .local("web")
                .want(&["10.0.0.1"]),
            Want::Err(reasons::SHARING_CONFLICT, "externalTrafficPolicy"),
        )
        .after(vec![svc("ns", "a")
            .share("k", &[Port::tcp(80)])
            .want(&["10.0.0.1"])]),
        case(
            "sharing: both Local, same selector",
            vec![p30()],
            svc("ns", "b")
                .share("k", &[Port::udp(80)])
                .local("web")
                .want(&["10.0.0.1"]),
            Want::Ips(&["10.0.0.1"]),
        )
        .after(vec![svc("ns", "a")
            .share("k", &[Port::tcp(80)])
            .local("web")
            .want(&["10.0.0.1"])]),
        case(
            "sharing: both Local, other selector",
            vec![p30()],
            svc("ns", "b")
                .share("k", &[Port::udp(80)])
                .local("db")
                .want(&["10.0.0.1"]),
            Want::Err(reasons::SHARING_CONFLICT, "externalTrafficPolicy"),
        )
        .after(vec![svc("ns", "a")
            .share("k", &[Port::tcp(80)])
            .local("web")
            .want(&["10.0.0.1"])]),
        case(
            "sharing: auto-assign joins the key's IP",
            vec![p30()],
            svc("ns", "b").share("k", &[Port::tcp(443)]),
            Want::Ips(&["10.0.0.2"]),
        )
        .after(vec![
            svc("ns", "x"),
            svc("ns", "y"),
            svc("ns", "a").share("k", &[Port::tcp(80)]),
        ]),
        case(
            "sharing: auto-assign with clashing port takes a fresh IP",
            vec![p30()],
            svc("ns", "b").share("k", &[Port::tcp(80)]),
            Want::Ips(&["10.0.0.1"]),
        )
        .after(vec![svc("ns", "a").share("k", &[Port::tcp(80)])]),
        // ---- dual-stack
        case(
            "RequireDualStack gets both",
            vec![pool("ds", &["10.0.0.0/30", "2001:db8::/126"])],
            svc("ns", "s").fams(&[V4, V6], RequireDualStack),
            Want::Ips(&["10.0.0.0", "2001:db8::"]),
        ),
        case(
            "RequireDualStack keeps the Service's family order",
            vec![pool("ds", &["10.0.0.0/30", "2001:db8::/126"])],
            svc("ns", "s").fams(&[V6, V4], RequireDualStack),
            Want::Ips(&["2001:db8::", "10.0.0.0"]),
        ),
        case(
            "RequireDualStack without a dual pool",
            vec![
                pool("v4", &["10.0.0.0/30"]),
                pool("v6", &["2001:db8::/126"]),
            ],
            svc("ns", "s").fams(&[V4, V6], RequireDualStack),
            Want::Err(reasons::FAMILY_NOT_SUPPORTED, "takes both from one pool"),
        ),
        case(
            "RequireDualStack with only v4 pools",
            vec![pool("v4", &["10.0.0.0/30"])],
            svc("ns", "s").fams(&[V4, V6], RequireDualStack),
            Want::Err(reasons::FAMILY_NOT_SUPPORTED, "has IPv6 addresses"),
        ),
        case(
            "RequireDualStack on a v4-only cluster",
            vec![pool("ds", &["10.0.0.0/30"])],
            svc("ns", "s").fams(&[V4, V6], RequireDualStack),
            Want::Err(reasons::FAMILY_NOT_SUPPORTED, "serves only IPv4"),
        )
        .only(&[V4]),
        case(
            "RequireDualStack with v6 exhausted",
            vec![pool("ds", &["10.0.0.0/30", "2001:db8::1"])],
            svc("ns", "s").fams(&[V4, V6], RequireDualStack),
            Want::Err(reasons::POOL_EXHAUSTED, "IPv4+IPv6"),
        )
        .after(vec![svc("ns", "x").fams(&[V6], SingleStack)]),
        case(
            "PreferDualStack gets both from a dual pool",
            vec![
                pool("a4", &["10.0.9.0/30"]).prio(1),
                pool("ds", &["10.0.0.0/30", "2001:db8::/126"]).prio(2),
            ],
            svc("ns", "s").fams(&[V4, V6], PreferDualStack),
            Want::Ips(&["10.0.0.0", "2001:db8::"]),
        ),
        case(
            "PreferDualStack falls back to one family",
            vec![pool("v4", &["10.0.0.0/30"])],
            svc("ns", "s").fams(&[V4, V6], PreferDualStack),
            Want::Ips(&["10.0.0.0"]),
        ),
        case(
            "PreferDualStack with v6 exhausted",
            vec![pool("ds", &["10.0.0.0/30", "2001:db8::1"])],
            svc("ns", "s").fams(&[V4, V6], PreferDualStack),
            Want::Ips(&["10.0.0.0"]),
        )
        .after(vec![svc("ns", "x").fams(&[V6], SingleStack)]),
        case(
            "PreferDualStack on a v4-only cluster",
            vec![pool("ds", &["10.0.0.0/30"])],
            svc("ns", "s").fams(&[V4, V6], PreferDualStack),
            Want::Ips(&["10.0.0.0"]),
        )
        .only(&[V4]),
        case(
            "SingleStack takes ipFamilies[0]",
            vec![pool("ds", &["10.0.0.0/30", "2001:db8::/126"])],
            svc("ns", "s").fams(&[V6, V4], SingleStack),
            Want::Ips(&["2001:db8::"]),
        ),
        case(
            "SingleStack v6 in a v4-only cluster",
            vec![pool("ds", &["10.0.0.0/30"])],
            svc("ns", "s").fams(&[V6], SingleStack),
            Want::Err(reasons::FAMILY_NOT_SUPPORTED, "serves only IPv4"),
        )
        .only(&[V4]),
        case(
            "SingleStack v6 with v4-only pools",
            vec![pool("a", &["10.0.0.0/30"])],
            svc("ns", "s").fams(&[V6], SingleStack),
            Want::Err(reasons::FAMILY_NOT_SUPPORTED, "has IPv6 addresses"),
        ),
        case(
            "dual-stack requested IPs",
            vec![pool("ds", &["10.0.0.0/30", "2001:db8::/126"])],
            svc("ns", "s")
                .fams(&[V4, V6], RequireDualStack)
                .want(&["2001:db8::2", "10.0.0.3"]),
            Want::Ips(&["10.0.0.3", "2001:db8::2"]),
        ),
        case(
            "RequireDualStack with one requested IP",
            vec![pool("ds", &["10.0.0.0/30", "2001:db8::/126"])],
            svc("ns", "s")
                .fams(&[V4, V6], RequireDualStack)
                .want(&["10.0.0.3"]),
            Want::Err(
                reasons::FAMILY_NOT_SUPPORTED,
                "request one IP of each family",
            ),
        ),
    ];
    for c in cases {
        run(c);
    }
}

fn alloc_with(pools: Vec<Pool>) -> Allocator {
    let mut a = Allocator::new();
    let report = a.set_pools(pools);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    a
}

#[test]
fn assign_is_idempotent_and_does_not_churn() {
    let mut a = alloc_with(vec![pool("a", &["10.0.0.0/29"])]);
    let s1 = svc("ns", "s1");
    let s2 = svc("ns", "s2");
    assert_eq!(a.assign(&s1).unwrap(), ips(&["10.0.0.0"]));
    assert_eq!(a.assign(&s2).unwrap(), ips(&["10.0.0.1"]));
    assert_eq!(a.assign(&s2).unwrap(), ips(&["10.0.0.1"]));
    a.unassign(&s1.key);
    // s2 keeps its address even though a lower one is free now.
    assert_eq!(a.assign(&s2).unwrap(), ips(&["10.0.0.1"]));
    // The freed address is reused first.
    assert_eq!(a.assign(&svc("ns", "s3")).unwrap(), ips(&["10.0.0.0"]));
}

#[test]
fn failed_assign_leaves_previous_assignment() {
    let mut a = alloc_with(vec![pool("a", &["10.0.0.0/29"])]);
    a.assign(&svc("ns", "x").want(&["10.0.0.5"])).unwrap();
    let s = svc("ns", "s");
    assert_eq!(a.assign(&s).unwrap(), ips(&["10.0.0.0"]));
    let err = a.assign(&s.clone().want(&["10.0.0.5"])).unwrap_err();
    assert_eq!(err.reason(), reasons::IP_IN_USE);
    assert_eq!(a.assigned(&s.key), Some(&ips(&["10.0.0.0"])[..]));
    // Moving to a free requested IP releases the old one.
    assert_eq!(
        a.assign(&s.clone().want(&["10.0.0.6"])).unwrap(),
        ips(&["10.0.0.6"])
    );
    assert!(a.holders(ip("10.0.0.0")).is_empty());
}

#[test]
fn assign_moves_service_when_its_pool_stops_admitting_it() {
    let mut a = alloc_with(vec![
        pool("a", &["10.0.0.0/30"]),
        pool("b", &["10.0.1.0/30"]),
    ]);
    let s = svc("ns", "s").in_pool("a");
    assert_eq!(a.assign(&s).unwrap(), ips(&["10.0.0.0"]));
    let moved = svc("ns", "s").in_pool("b");
    assert_eq!(a.assign(&moved).unwrap(), ips(&["10.0.1.0"]));
    assert!(a.holders(ip("10.0.0.0")).is_empty());
}

#[test]
fn prefer_dual_stack_completes_in_place_when_v6_frees_up() {
    let mut a = alloc_with(vec![pool("ds", &["10.0.0.0/30", "2001:db8::1"])]);
    let hog = svc("ns", "hog").fams(&[V6], SingleStack);
    a.assign(&hog).unwrap();
    let s = svc("ns", "s").fams(&[V4, V6], PreferDualStack);
    assert_eq!(a.assign(&s).unwrap(), ips(&["10.0.0.0"]));
    a.unassign(&hog.key);
    assert_eq!(a.assign(&s).unwrap(), ips(&["10.0.0.0", "2001:db8::1"]));
}

#[test]
fn pool_shrink_reports_invalid_then_reassign_works() {
    let mut a = alloc_with(vec![pool("a", &["10.0.0.0/29"])]);
    let svcs: Vec<ServiceRequest> = (0..6).map(|i| svc("ns", &format!("s{i}"))).collect();
    for s in &svcs {
        a.assign(s).unwrap();
    }
    let report = a.set_pools(vec![
        pool("a", &["10.0.0.0/30"]),
        pool("b", &["10.0.1.0/30"]),
    ]);
    assert!(report.problems.is_empty());
    let bad: Vec<_> = report
        .invalidated
        .iter()
        .map(|i| (i.service.name.as_str(), i.ips.clone()))
        .collect();
    assert_eq!(
        bad,
        vec![("s4", ips(&["10.0.0.4"])), ("s5", ips(&["10.0.0.5"]))]
    );
    // Still recorded until the caller acts.
    assert_eq!(a.assigned(&svcs[4].key), Some(&ips(&["10.0.0.4"])[..]));
    // assign moves it; unassign + assign also works.
    assert_eq!(a.assign(&svcs[4]).unwrap(), ips(&["10.0.1.0"]));
    assert_eq!(a.unassign(&svcs[5].key), ips(&["10.0.0.5"]));
    assert_eq!(a.assign(&svcs[5]).unwrap(), ips(&["10.0.1.1"]));
    // Untouched services keep their IPs.
    assert_eq!(a.assign(&svcs[0]).unwrap(), ips(&["10.0.0.0"]));
    let c = a.counters("a").unwrap();
    assert_eq!((c.assigned_v4, c.available_v4), (4, 0));
    let c = a.counters("b").unwrap();
    assert_eq!((c.assigned_v4, c.available_v4), (2, 2));
}

#[test]
fn restore_never_double_assigns() {
    let mut a = alloc_with(vec![pool("a", &["10.0.0.0/29"])]);
    let old = svc("ns", "old");
    let young = svc("ns", "young");
    a.restore(&old, &ips(&["10.0.0.3"])).unwrap();
    let err = a.restore(&young, &ips(&["10.0.0.3"])).unwrap_err();
    assert_eq!(err.reason(), reasons::IP_IN_USE);
    assert_eq!(
        err.to_string(),
        "IP 10.0.0.3 is in use by ns/old; to share it, set the same \
         palisade.dev/allow-shared-ip key on all Services using it"
    );
    assert_eq!(a.assigned(&young.key), None);
    // The loser gets a fresh address on assign; the restored one is skipped.
    a.assign(&svc("ns", "x")).unwrap();
    a.assign(&svc("ns", "y")).unwrap();
    a.assign(&svc("ns", "z")).unwrap();
    assert_eq!(a.assign(&young).unwrap(), ips(&["10.0.0.4"]));
    // The restored service keeps its IP on assign.
    assert_eq!(a.assign(&old).unwrap(), ips(&["10.0.0.3"]));

    // Compatible sharing is restored for both.
    let s1 = svc("ns", "tcp").share("k", &[Port::tcp(80)]);
    let s2 = svc("ns", "udp").share("k", &[Port::udp(80)]);
    let s3 = svc("ns", "clash").share("k", &[Port::tcp(80)]);
    a.restore(&s1, &ips(&["10.0.0.7"])).unwrap();
    a.restore(&s2, &ips(&["10.0.0.7"])).unwrap();
    assert_eq!(
        a.restore(&s3, &ips(&["10.0.0.7"])).unwrap_err().reason(),
        reasons::SHARING_CONFLICT
    );
    assert_eq!(a.holders(ip("10.0.0.7")).len(), 2);

    // Nothing in status: nothing recorded.
    a.restore(&svc("ns", "empty"), &[]).unwrap();
    assert_eq!(a.assigned(&ServiceKey::new("ns", "empty")), None);

    // Not in any pool.
    let err = a
        .restore(&svc("ns", "gone"), &ips(&["192.0.2.1"]))
        .unwrap_err();
    assert_eq!(err.reason(), reasons::IP_NOT_IN_POOL);
    let c = a.counters("a").unwrap();
    assert_eq!((c.assigned_v4, c.available_v4), (6, 2));
}

#[test]
fn overlapping_pools_are_reported_and_never_double_assign() {
    let mut a = Allocator::new();
    let report = a.set_pools(vec![
        pool("a", &["10.0.0.0/30"]),
        pool("b", &["10.0.0.2-10.0.0.5"]),
    ]);
    assert_eq!(report.problems.len(), 2);
    for (name, other) in [("a", "b"), ("b", "a")] {
        let errs = &report.problems[name];
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].reason(), reasons::OVERLAPPING_POOL);
        assert_eq!(
            errs[0],
            Error::OverlappingPool {
                pool: name.into(),
                other: other.into(),
                first: ip("10.0.0.2"),
                last: ip("10.0.0.3"),
            }
        );
    }
    let mut seen = Vec::new();
    for i in 0..6 {
        let p = if i % 2 == 0 { "a" } else { "b" };
        if let Ok(got) = a.assign(&svc("ns", &format!("s{i}")).in_pool(p)) {
            seen.extend(got);
        }
    }
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(seen.len(), dedup.len(), "double assignment: {seen:?}");
    // a: .0 .1 (its .2 .3 went to b first), then a is full; b: .2 .3 .4.
    assert_eq!(
        seen,
        ips(&["10.0.0.0", "10.0.0.2", "10.0.0.1", "10.0.0.3", "10.0.0.4"])
    );
    assert_eq!(a.counters("a").unwrap().available_v4, 0);
    assert_eq!(a.counters("b").unwrap().available_v4, 1);
}

#[test]
fn v6_range_in_v4_only_cluster() {
    let mut a = Allocator::with_families(&[V4]);
    let report = a.set_pools(vec![pool("mixed", &["10.0.0.0/30", "2001:db8::/120"])]);
    let errs = &report.problems["mixed"];
    assert_eq!(errs[0].reason(), reasons::FAMILY_NOT_SUPPORTED);
    assert!(
        errs[0].to_string().contains("lists IPv6 addresses"),
        "{}",
        errs[0]
    );
    let c = a.counters("mixed").unwrap();
    assert_eq!((c.available_v4, c.available_v6), (4, 0));
    let err = a
        .assign(&svc("ns", "s").want(&["2001:db8::1"]))
        .unwrap_err();
    assert_eq!(err.reason(), reasons::FAMILY_NOT_SUPPORTED);
    assert_eq!(a.assign(&svc("ns", "s")).unwrap(), ips(&["10.0.0.0"]));
}

#[test]
fn bad_pool_specs_name_the_entry() {
    for (entry, frag) in [
        (
            "10.0.0.9-10.0.0.1",
            "range start 10.0.0.9 is after its end 10.0.0.1",
        ),
        ("0.0.0.0/0", "whole address family"),
        ("::/0", "whole address family"),
        ("10.0.0.1-2001:db8::1", "mixes IPv4 and IPv6"),
        ("banana", "not a CIDR"),
    ] {
        let spec = IPAddressPoolSpec {
            addresses: vec!["10.1.0.0/24".into(), entry.into()],
            ..Default::default()
        };
        let err = Pool::from_spec("p", &BTreeMap::new(), &spec).unwrap_err();
        assert_eq!(err.reason(), reasons::INVALID_ADDRESS, "{entry}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("{entry:?}")) && msg.contains(frag),
            "{msg}"
        );
    }
}

#[test]
fn counters_and_status_saturate() {
    let mut a = alloc_with(vec![
        pool("v4", &["10.0.0.0/24"]).buggy(),
        pool("v6", &["2001:db8::/64"]),
    ]);
    a.assign(&svc("ns", "a")).unwrap();
    a.assign(&svc("ns", "b").fams(&[V6], SingleStack)).unwrap();
    let c = a.counters("v4").unwrap();
    assert_eq!((c.assigned_v4, c.available_v4), (1, 253));
    let c = a.counters("v6").unwrap();
    assert_eq!((c.assigned_v6, c.available_v6), (1, (1u128 << 64) - 1));
    let mut status = palisade_loadbalancer::IPAddressPoolStatus::default();
    c.write_status(&mut status);
    assert_eq!(status.assigned_ipv6, 1);
    assert_eq!(status.available_ipv6, i64::MAX);
    assert_eq!(a.counters("nope"), None);
    assert_eq!(a.pool_for_ip(ip("2001:db8::5")), Some("v6"));
    assert_eq!(a.pool_for_ip(ip("10.0.0.0")), None, "avoidBuggyIPs");
}

#[test]
fn sharing_index_forgets_released_ips() {
    let mut a = alloc_with(vec![pool("a", &["10.0.0.0/30"])]);
    let s1 = svc("ns", "s1").share("k", &[Port::tcp(80)]);
    let s2 = svc("ns", "s2").share("k", &[Port::tcp(81)]);
    assert_eq!(a.assign(&s1).unwrap(), ips(&["10.0.0.0"]));
    assert_eq!(a.assign(&s2).unwrap(), ips(&["10.0.0.0"]));
    a.unassign(&s1.key);
    a.unassign(&s2.key);
    a.assign(&svc("ns", "x")).unwrap();
    // The key's old IP now belongs to x; a new key holder must not join it.
    let s3 = svc("ns", "s3").share("k", &[Port::tcp(82)]);
    assert_eq!(a.assign(&s3).unwrap(), ips(&["10.0.0.1"]));
}

#[test]
fn ten_thousand_services_over_a_slash_16_are_unique() {
    let pools: Vec<Pool> = (0..4)
        .map(|i| pool(&format!("p{i}"), &[&format!("10.{i}.0.0/18")]).prio(i))
        .collect();
    // /18s inside different /16s sum to a /16.
    let mut a = alloc_with(pools);
    let mut all = Vec::new();
    for i in 0..10_000 {
        let got = a.assign(&svc("ns", &format!("s{i}"))).unwrap();
        all.extend(got);
    }
    let mut d = all.clone();
    d.sort();
    d.dedup();
    assert_eq!(d.len(), 10_000);
    assert_eq!(a.counters("p0").unwrap().assigned_v4, 10_000);
}

/// Random operations; after each, invariants hold and nothing panics.
#[test]
fn random_operations_keep_invariants() {
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let pools = || {
        vec![
            pool("a", &["10.0.0.0/28", "2001:db8::/124"]).prio(1),
            pool("b", &["10.0.0.8-10.0.0.40"]).buggy(),
            pool("c", &["10.0.1.0/30"]).manual().namespaces(&["n1"]),
        ]
    };
    let mut a = Allocator::new();
    a.set_pools(pools());
    let keys = ["k1", "k2"];
    for step in 0..5_000 {
        let name = format!("s{}", next(40));
        let ns = format!("n{}", next(3));
        let mut req = svc(&ns, &name);
        match next(10) {
            0 => {
                a.unassign(&req.key);
                continue;
            }
            1 if step % 500 == 0 => {
                a.set_pools(if next(2) == 0 {
                    pools()
                } else {
                    pools()[..2].to_vec()
                });
                continue;
            }
            _ => {}
        }
        if next(3) == 0 {
            req.sharing_key = Some(keys[next(2) as usize].into());
        }
        req.ports = vec![Port::tcp(80 + next(3) as u16)];
        if next(4) == 0 {
            req.requested_ips = vec![ip(&format!("10.0.{}.{}", next(2), next(50)))];
        }
        if next(5) == 0 {
            req.requested_pool = Some(["a", "b", "c", "zz"][next(4) as usize].into());
        }
        req.ip_families = [vec![V4], vec![V6], vec![V4, V6]][next(3) as usize].clone();
        req.ip_family_policy = [SingleStack, PreferDualStack, RequireDualStack][next(3) as usize];
        let restore = next(8) == 0;
        let result = if restore {
            let list = vec![ip(&format!("10.0.0.{}", next(50)))];
            a.restore(&req, &list).map(|_| list)
        } else {
            a.assign(&req)
        };
        if let Ok(got) = &result {
            assert_eq!(a.assigned(&req.key), Some(&got[..]), "step {step}");
        }
        // Invariants: every held IP lists its holders; holders of one IP share a key and
        // have disjoint ports.
        let mut held: BTreeMap<IpAddr, Vec<ServiceKey>> = BTreeMap::new();
        for i in 0..40 {
            for n in 0..3 {
                let k = ServiceKey::new(format!("n{n}"), format!("s{i}"));
                for x in a.assigned(&k).unwrap_or_default() {
                    held.entry(*x).or_default().push(k.clone());
                }
            }
        }
        for (x, hs) in &held {
            let mut got = a.holders(*x).to_vec();
            got.sort();
            let mut want = hs.clone();
            want.sort();
            assert_eq!(got, want, "step {step} ip {x}");
        }
        for name in ["a", "b"] {
            if let Some(c) = a.counters(name) {
                let p = a.pools().find(|p| p.name == name).unwrap();
                let v4 = held
                    .keys()
                    .filter(|x| x.is_ipv4() && p.contains(**x))
                    .count();
                assert_eq!(c.assigned_v4, v4 as u128, "step {step} pool {name}");
                assert_eq!(c.assigned_v4 + c.available_v4, p.size(V4));
            }
        }
    }
}
