//! `ServiceL2Status` objects: which node announces a Service's IPs, readable with kubectl.
//!
//! ```text
//!  announcer pass ──► Snapshot (what the speaker was told, every IP's winner, live agents)
//!                          │
//!  ServiceL2Status cache ──┼─► plan() ──► create / update status / delete
//!                          │      (pure; `palisade-announcement` performs the writes)
//! ```
//!
//! Each agent writes the objects of the Services it announces: one per (Service, node), in the
//! Service's namespace, named `<service>.<node>`, its `status` equal to what its speaker
//! answers for. When it stops announcing a Service it deletes its object. An agent that dies
//! cannot, so the objects of a node that is not alive in the membership are deleted by the
//! node that announces the Service now, or — when no node does — by the live agent with the
//! smallest name (every agent computes the same janitor alone, as with the election).
//!
//! The writes run in their own loop, never in the announcer's: an API outage or a slow write
//! does not delay a failover; the objects catch up when the API is back. In a network
//! partition both sides announce an IP and both write their object (which is the truth), and
//! each deletes the other's — the loop's minimum interval bounds that churn to one write per
//! object per [`MIN_INTERVAL`] until the partition heals.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::l2::{IpDecision, Owned};
use crate::{ServiceL2Status, ServiceL2StatusStatus};

/// Label with the announcing node's name (when it fits a label value).
pub const NODE_LABEL: &str = "palisade.dev/node";
/// Label with the Service's name.
pub const SERVICE_LABEL: &str = "palisade.dev/service-name";

/// At most one round of writes per this interval (see the module docs on partitions).
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// What the announcer knows after a pass: the input of [`plan`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// False until the membership has warmed up: nothing is known about other nodes yet.
    pub warmed_up: bool,
    /// Agents alive in this node's view.
    pub live: BTreeSet<String>,
    /// What this node's speaker was told to answer for, by IP.
    pub owned: Owned,
    /// Every announced IP with its winner.
    pub decisions: Vec<IpDecision>,
}

/// A `ServiceL2Status` as found in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Existing {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    /// `status.node`, or the node label of an object whose status was never written.
    pub node: String,
    pub service: String,
    pub status: ServiceL2StatusStatus,
}

impl Existing {
    pub fn from_object(o: &ServiceL2Status) -> Option<Existing> {
        let status = o.status.clone().unwrap_or_default();
        let labels = o.metadata.labels.clone().unwrap_or_default();
        let pick = |field: &str, label: &str| {
            if field.is_empty() {
                labels.get(label).cloned().unwrap_or_default()
            } else {
                field.to_string()
            }
        };
        Some(Existing {
            namespace: o.metadata.namespace.clone()?,
            name: o.metadata.name.clone()?,
            uid: o.metadata.uid.clone(),
            node: pick(&status.node, NODE_LABEL),
            service: pick(&status.service_name, SERVICE_LABEL),
            status,
        })
    }
}

/// A write [`plan`] asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Create {
        namespace: String,
        name: String,
        service_uid: Option<String>,
        status: ServiceL2StatusStatus,
    },
    Update {
        namespace: String,
        name: String,
        status: ServiceL2StatusStatus,
    },
    Delete {
        namespace: String,
        name: String,
        uid: Option<String>,
        why: String,
    },
}

/// The object name for `service` announced by `node`: `<service>.<node>` (a valid DNS
/// subdomain, since Service names are DNS labels and node names DNS subdomains), or, when
/// that exceeds 253 characters, the node part replaced by a hash of it.
pub fn object_name(service: &str, node: &str) -> String {
    let name = format!("{service}.{node}");
    if name.len() <= 253 {
        return name;
    }
    let digest = Sha256::digest(node.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{service}.node-{hex}")
}

/// Pure: the writes that make the cache agree with what `me` announces, plus the cleanup of
/// dead nodes' objects that falls to `me` (see the module docs).
pub fn plan(me: &str, snap: &Snapshot, existing: &[Existing]) -> Vec<Op> {
    // What this node announces, by Service.
    struct Mine {
        uid: Option<String>,
        ips: BTreeSet<IpAddr>,
        interfaces: BTreeSet<String>,
    }
    let mut mine: BTreeMap<(String, String), Mine> = BTreeMap::new();
    // Services with at least one IP some live node announces.
    let mut announced: BTreeSet<(String, String)> = BTreeSet::new();
    for d in &snap.decisions {
        if d.winner.is_some() {
            announced.insert(d.service.clone());
        }
        let Some(ifaces) = snap.owned.get(&d.ip) else {
            continue;
        };
        if d.winner.as_deref() != Some(me) {
            continue;
        }
        let m = mine.entry(d.service.clone()).or_insert_with(|| Mine {
            uid: d.uid.clone(),
            ips: BTreeSet::new(),
            interfaces: BTreeSet::new(),
        });
        m.ips.insert(d.ip);
        m.interfaces.extend(ifaces.iter().cloned());
    }
    let by_name: BTreeMap<(&str, &str), &Existing> = existing
        .iter()
        .map(|e| ((e.namespace.as_str(), e.name.as_str()), e))
        .collect();

    let mut ops = Vec::new();
    let mut wanted: BTreeSet<(String, String)> = BTreeSet::new();
    for ((ns, svc), m) in &mine {
        let name = object_name(svc, me);
        let status = ServiceL2StatusStatus {
            node: me.to_string(),
            service_name: svc.clone(),
            ips: m.ips.iter().map(ToString::to_string).collect(),
            interfaces: m.interfaces.iter().cloned().collect(),
        };
        match by_name.get(&(ns.as_str(), name.as_str())) {
            Some(e) if e.status == status => {}
            Some(_) => ops.push(Op::Update {
                namespace: ns.clone(),
                name: name.clone(),
                status,
            }),
            None => ops.push(Op::Create {
                namespace: ns.clone(),
                name: name.clone(),
                service_uid: m.uid.clone(),
                status,
            }),
        }
        wanted.insert((ns.clone(), name));
    }

    let janitor = snap
        .live
        .iter()
        .map(String::as_str)
        .chain([me])
        .min()
        .unwrap_or(me);
    for e in existing {
        if wanted.contains(&(e.namespace.clone(), e.name.clone())) {
            continue;
        }
        let svc = (e.namespace.clone(), e.service.clone());
        let why = if e.node == me {
            Some(format!("node {me} no longer announces {}", e.service))
        } else if !snap.warmed_up || e.node.is_empty() || snap.live.contains(&e.node) {
            // A live node manages its own objects; before warm-up nobody is known dead.
            None
        } else if mine.contains_key(&svc) {
            Some(format!(
                "node {} is gone; node {me} announces {} now",
                e.node, e.service
            ))
        } else if !announced.contains(&svc) && janitor == me {
            Some(format!(
                "node {} is gone and no node announces {}",
                e.node, e.service
            ))
        } else {
            None
        };
        if let Some(why) = why {
            ops.push(Op::Delete {
                namespace: e.namespace.clone(),
                name: e.name.clone(),
                uid: e.uid.clone(),
                why,
            });
        }
    }
    ops
}

/// Whether `v` is a valid label value (at most 63 characters of `[A-Za-z0-9._-]`, starting
/// and ending alphanumeric).
pub fn fits_label_value(v: &str) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(svc: &str, ip: &str, winner: Option<&str>) -> IpDecision {
        IpDecision {
            service: ("shop".into(), svc.into()),
            uid: Some(format!("uid-{svc}")),
            ip: ip.parse().unwrap(),
            winner: winner.map(str::to_string),
            interfaces: Vec::new(),
        }
    }

    fn snap(live: &[&str], owned: &[(&str, &str)], decisions: Vec<IpDecision>) -> Snapshot {
        Snapshot {
            warmed_up: true,
            live: live.iter().map(|s| s.to_string()).collect(),
            owned: owned
                .iter()
                .map(|(ip, i)| (ip.parse().unwrap(), vec![i.to_string()]))
                .collect(),
            decisions,
        }
    }

    fn existing(svc: &str, node: &str, ips: &[&str], ifaces: &[&str]) -> Existing {
        Existing {
            namespace: "shop".into(),
            name: object_name(svc, node),
            uid: Some(format!("obj-{svc}-{node}")),
            node: node.into(),
            service: svc.into(),
            status: ServiceL2StatusStatus {
                node: node.into(),
                service_name: svc.into(),
                ips: ips.iter().map(|s| s.to_string()).collect(),
                interfaces: ifaces.iter().map(|s| s.to_string()).collect(),
            },
        }
    }

    fn summary(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|op| match op {
                Op::Create { name, status, .. } => {
                    format!("create {name} {:?} {:?}", status.ips, status.interfaces)
                }
                Op::Update { name, status, .. } => {
                    format!("update {name} {:?} {:?}", status.ips, status.interfaces)
                }
                Op::Delete { name, .. } => format!("delete {name}"),
            })
            .collect()
    }

    #[test]
    fn the_announcing_node_creates_one_object_per_service_with_all_its_ips() {
        let s = snap(
            &["n1", "n2"],
            &[("198.51.100.10", "eth0"), ("2001:db8::10", "eth1")],
            vec![
                decision("web", "198.51.100.10", Some("n1")),
                decision("web", "2001:db8::10", Some("n1")),
                decision("api", "198.51.100.11", Some("n2")),
            ],
        );
        let ops = plan("n1", &s, &[]);
        assert_eq!(
            summary(&ops),
            [r#"create web.n1 ["198.51.100.10", "2001:db8::10"] ["eth0", "eth1"]"#]
        );
        let Op::Create {
            namespace,
            service_uid,
            status,
            ..
        } = &ops[0]
        else {
            unreachable!()
        };
        assert_eq!(namespace, "shop");
        assert_eq!(service_uid.as_deref(), Some("uid-web"));
        assert_eq!(status.node, "n1");
        assert_eq!(status.service_name, "web");
        // n2 writes its own; n1 has nothing to do for it.
        assert_eq!(
            summary(&plan("n2", &s, &[])).len(),
            0,
            "n2 owns nothing yet"
        );
    }

    #[test]
    fn an_up_to_date_object_is_left_alone_and_a_changed_one_updated() {
        let s = snap(
            &["n1"],
            &[("198.51.100.10", "eth0")],
            vec![decision("web", "198.51.100.10", Some("n1"))],
        );
        let same = existing("web", "n1", &["198.51.100.10"], &["eth0"]);
        assert!(plan("n1", &s, std::slice::from_ref(&same)).is_empty());
        let other_iface = existing("web", "n1", &["198.51.100.10"], &["eth1"]);
        assert_eq!(
            summary(&plan("n1", &s, &[other_iface])),
            [r#"update web.n1 ["198.51.100.10"] ["eth0"]"#]
        );
        // Created but its status never written (crash in between): found by its label name.
        let mut blank = existing("web", "n1", &[], &[]);
        blank.status = ServiceL2StatusStatus::default();
        assert_eq!(
            summary(&plan("n1", &s, &[blank])),
            [r#"update web.n1 ["198.51.100.10"] ["eth0"]"#]
        );
    }

    #[test]
    fn what_the_speaker_was_not_told_is_not_claimed() {
        // n1 wins the election but the IP was held back (link settling): not announced, so
        // not in the status either, and an old object is removed.
        let s = snap(
            &["n1"],
            &[],
            vec![decision("web", "198.51.100.10", Some("n1"))],
        );
        assert!(plan("n1", &s, &[]).is_empty());
        let old = existing("web", "n1", &["198.51.100.10"], &["eth0"]);
        assert_eq!(summary(&plan("n1", &s, &[old])), ["delete web.n1"]);
    }

    #[test]
    fn failover_the_new_owner_replaces_the_dead_nodes_object() {
        // n2 died; n1 announces web now. n3 (alive, not announcing web) stays out of it.
        let s = snap(
            &["n1", "n3"],
            &[("198.51.100.10", "eth0")],
            vec![decision("web", "198.51.100.10", Some("n1"))],
        );
        let dead = existing("web", "n2", &["198.51.100.10"], &["eth0"]);
        assert_eq!(
            summary(&plan("n1", &s, std::slice::from_ref(&dead))),
            [
                r#"create web.n1 ["198.51.100.10"] ["eth0"]"#,
                "delete web.n2"
            ]
        );
        let s3 = snap(
            &["n1", "n3"],
            &[],
            vec![decision("web", "198.51.100.10", Some("n1"))],
        );
        assert!(plan("n3", &s3, std::slice::from_ref(&dead)).is_empty());
        // The delete carries the object's uid: a recreated object of that name survives.
        let ops = plan("n1", &s, std::slice::from_ref(&dead));
        assert!(matches!(&ops[1], Op::Delete { uid: Some(u), .. } if u == "obj-web-n2"));
    }

    #[test]
    fn a_live_nodes_object_is_never_touched_by_another_node() {
        // A moment after n2 lost web to n1 (n2 alive, its object not yet updated): n1 does
        // not delete it; n2 will, on its next pass.
        let s = snap(
            &["n1", "n2"],
            &[("198.51.100.10", "eth0")],
            vec![decision("web", "198.51.100.10", Some("n1"))],
        );
        let n2 = existing("web", "n2", &["198.51.100.10"], &["eth0"]);
        assert_eq!(
            summary(&plan("n1", &s, std::slice::from_ref(&n2))),
            [r#"create web.n1 ["198.51.100.10"] ["eth0"]"#]
        );
        let s2 = snap(
            &["n1", "n2"],
            &[],
            vec![decision("web", "198.51.100.10", Some("n1"))],
        );
        assert_eq!(summary(&plan("n2", &s2, &[n2])), ["delete web.n2"]);
    }

    #[test]
    fn with_no_owner_left_the_smallest_live_node_cleans_up() {
        // Nobody may announce web any more (its only eligible node n3 died), or the Service
        // is gone: the janitor (smallest live name) deletes n3's object; the others do not.
        let none = snap(
            &["n1", "n2"],
            &[],
            vec![decision("web", "198.51.100.10", None)],
        );
        let dead = existing("web", "n3", &["198.51.100.10"], &["eth0"]);
        assert_eq!(
            summary(&plan("n1", &none, std::slice::from_ref(&dead))),
            ["delete web.n3"]
        );
        assert!(plan("n2", &none, std::slice::from_ref(&dead)).is_empty());
        let gone = snap(&["n1", "n2"], &[], vec![]);
        assert_eq!(
            summary(&plan("n1", &gone, std::slice::from_ref(&dead))),
            ["delete web.n3"]
        );
        // Someone (n2) announces it: n2's job, not the janitor's.
        let n2_has_it = snap(
            &["n1", "n2"],
            &[],
            vec![decision("web", "198.51.100.10", Some("n2"))],
        );
        assert!(plan("n1", &n2_has_it, &[dead]).is_empty());
    }

    #[test]
    fn before_warm_up_no_node_is_taken_for_dead() {
        let mut s = snap(&["n1"], &[], vec![]);
        s.warmed_up = false;
        let other = existing("web", "n2", &["198.51.100.10"], &["eth0"]);
        let own = existing("api", "n1", &["198.51.100.11"], &["eth0"]);
        // Nothing is announced yet (the speaker was told nothing): only the own object goes.
        assert_eq!(summary(&plan("n1", &s, &[other, own])), ["delete api.n1"]);
    }

    #[test]
    fn names_fit_the_api_limits() {
        assert_eq!(object_name("web", "node-1.lab"), "web.node-1.lab");
        let long_node = format!("{}.example", "n".repeat(250));
        let name = object_name("web", &long_node);
        assert!(name.len() <= 253, "{}", name.len());
        assert!(name.starts_with("web.node-"));
        assert_ne!(
            name,
            object_name("web", &format!("{}.example", "m".repeat(250)))
        );
        assert!(fits_label_value("node-1.lab"));
        assert!(!fits_label_value(&"n".repeat(64)));
        assert!(!fits_label_value("-x"));
        assert!(!fits_label_value(""));
    }
}
