//! The BGP status objects a node keeps, pure: which `BGPSessionStatus` (one per peer of this
//! node) and `ServiceBGPStatus` (one per Service this node announces) objects to create,
//! update or delete so that the API shows what the node's speaker does.
//!
//! Each node owns exactly the objects whose `status.node` (or `palisade.dev/node` label) is
//! its name; it never touches another node's. A node that disappears leaves its objects
//! behind until its agent runs again (a `ServiceBGPStatus` also goes with its Service, which
//! owns it).
use std::collections::{BTreeMap, BTreeSet};

use crate::crd::{
    BGPSessionStatus, BGPSessionStatusStatus, ServiceBGPStatus, ServiceBGPStatusStatus,
};
use crate::l2status::{object_name, NODE_LABEL, SERVICE_LABEL};

/// Label naming the BGPPeer of a `BGPSessionStatus`.
pub const PEER_LABEL: &str = "palisade.dev/peer";

/// An object that should exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted<S> {
    /// `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The owning Service's (name, uid), for garbage collection with it.
    pub owner: Option<(String, String)>,
    pub status: S,
}

/// An object that exists (from the cache).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Existing<S> {
    pub namespace: Option<String>,
    pub name: String,
    pub uid: Option<String>,
    pub node: String,
    pub status: Option<S>,
}

/// One write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op<S> {
    Create(Wanted<S>),
    Update {
        namespace: Option<String>,
        name: String,
        status: S,
    },
    Delete {
        namespace: Option<String>,
        name: String,
        uid: Option<String>,
    },
}

/// Pure: the writes that make `me`'s existing objects equal to `wanted`.
pub fn plan<S: Clone + PartialEq>(
    me: &str,
    wanted: &[Wanted<S>],
    existing: &[Existing<S>],
) -> Vec<Op<S>> {
    let mine: BTreeMap<(Option<&str>, &str), &Existing<S>> = existing
        .iter()
        .filter(|e| e.node == me)
        .map(|e| ((e.namespace.as_deref(), e.name.as_str()), e))
        .collect();
    let mut ops = Vec::new();
    let mut keep = BTreeSet::new();
    for w in wanted {
        let key = (w.namespace.as_deref(), w.name.as_str());
        keep.insert(key);
        match existing
            .iter()
            .find(|e| (e.namespace.as_deref(), e.name.as_str()) == key)
        {
            None => ops.push(Op::Create(w.clone())),
            Some(e) if e.status.as_ref() != Some(&w.status) => ops.push(Op::Update {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                status: w.status.clone(),
            }),
            Some(_) => {}
        }
    }
    for (key, e) in mine {
        if !keep.contains(&key) {
            ops.push(Op::Delete {
                namespace: e.namespace.clone(),
                name: e.name.clone(),
                uid: e.uid.clone(),
            });
        }
    }
    ops
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .filter(|(_, v)| crate::l2status::fits_label_value(v))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The `BGPSessionStatus` object of `status` (its `node` and `peer` fields name it).
pub fn session_object(status: BGPSessionStatusStatus) -> Wanted<BGPSessionStatusStatus> {
    Wanted {
        namespace: None,
        name: object_name(&status.peer, &status.node),
        labels: labels(&[(NODE_LABEL, &status.node), (PEER_LABEL, &status.peer)]),
        owner: None,
        status,
    }
}

/// The `ServiceBGPStatus` object for Service `namespace/name` (uid for its owner reference).
pub fn service_object(
    namespace: &str,
    name: &str,
    uid: Option<&str>,
    node: &str,
    peers: &BTreeSet<String>,
) -> Wanted<ServiceBGPStatusStatus> {
    Wanted {
        namespace: Some(namespace.to_string()),
        name: object_name(name, node),
        labels: labels(&[(NODE_LABEL, node), (SERVICE_LABEL, name)]),
        owner: uid.map(|u| (name.to_string(), u.to_string())),
        status: ServiceBGPStatusStatus {
            node: node.to_string(),
            service_name: name.to_string(),
            peers: peers.iter().cloned().collect(),
        },
    }
}

fn node_of(labels: Option<&BTreeMap<String, String>>, status_node: Option<&str>) -> String {
    status_node
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .or_else(|| labels.and_then(|l| l.get(NODE_LABEL)).cloned())
        .unwrap_or_default()
}

impl Existing<BGPSessionStatusStatus> {
    pub fn from_session(o: &BGPSessionStatus) -> Option<Self> {
        Some(Existing {
            namespace: None,
            name: o.metadata.name.clone()?,
            uid: o.metadata.uid.clone(),
            node: node_of(
                o.metadata.labels.as_ref(),
                o.status.as_ref().map(|s| s.node.as_str()),
            ),
            status: o.status.clone(),
        })
    }
}

impl Existing<ServiceBGPStatusStatus> {
    pub fn from_service(o: &ServiceBGPStatus) -> Option<Self> {
        Some(Existing {
            namespace: o.metadata.namespace.clone(),
            name: o.metadata.name.clone()?,
            uid: o.metadata.uid.clone(),
            node: node_of(
                o.metadata.labels.as_ref(),
                o.status.as_ref().map(|s| s.node.as_str()),
            ),
            status: o.status.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(node: &str, peer: &str, state: &str) -> BGPSessionStatusStatus {
        BGPSessionStatusStatus {
            node: node.into(),
            peer: peer.into(),
            peer_address: "192.0.2.254".into(),
            state: state.into(),
            ..Default::default()
        }
    }

    fn existing(w: &Wanted<BGPSessionStatusStatus>) -> Existing<BGPSessionStatusStatus> {
        Existing {
            namespace: None,
            name: w.name.clone(),
            uid: Some(format!("uid-{}", w.name)),
            node: w.status.node.clone(),
            status: Some(w.status.clone()),
        }
    }

    #[test]
    fn creates_updates_and_deletes_only_own_objects() {
        let a = session_object(session("n1", "tor", "Established"));
        let b = session_object(session("n1", "spine", "Connect"));
        assert_eq!(a.name, "tor.n1");
        assert_eq!(a.labels[NODE_LABEL], "n1");
        assert_eq!(a.labels[PEER_LABEL], "tor");
        // Nothing there: both created.
        let ops = plan("n1", &[a.clone(), b.clone()], &[]);
        assert_eq!(ops, vec![Op::Create(a.clone()), Op::Create(b.clone())]);
        // a is current, b changed state, an old peer of n1 and n2's object exist.
        let old = session_object(session("n1", "gone", "Idle"));
        let other = session_object(session("n2", "tor", "Established"));
        let mut b_old = existing(&b);
        b_old.status = Some(session("n1", "spine", "Idle"));
        let ex = vec![existing(&a), b_old, existing(&old), existing(&other)];
        let ops = plan("n1", &[a.clone(), b.clone()], &ex);
        assert_eq!(
            ops,
            vec![
                Op::Update {
                    namespace: None,
                    name: "spine.n1".into(),
                    status: b.status.clone()
                },
                Op::Delete {
                    namespace: None,
                    name: "gone.n1".into(),
                    uid: Some("uid-gone.n1".into())
                },
            ]
        );
        // In sync: nothing to do.
        assert!(plan(
            "n1",
            std::slice::from_ref(&a),
            &[existing(&a), existing(&other)]
        )
        .is_empty());
    }

    #[test]
    fn service_objects_are_owned_and_labelled() {
        let peers: BTreeSet<String> = ["tor".to_string(), "spine".to_string()].into();
        let w = service_object("shop", "web", Some("u1"), "n1", &peers);
        assert_eq!(
            (w.namespace.as_deref(), w.name.as_str()),
            (Some("shop"), "web.n1")
        );
        assert_eq!(w.owner, Some(("web".into(), "u1".into())));
        assert_eq!(w.status.peers, vec!["spine", "tor"]);
        assert_eq!(w.labels[SERVICE_LABEL], "web");
        let long = "n".repeat(300);
        let w = service_object("shop", "web", None, &long, &peers);
        assert!(w.name.len() <= 253);
        assert!(
            !w.labels.contains_key(NODE_LABEL),
            "too long for a label value"
        );
    }
}
