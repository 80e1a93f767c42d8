//! The offline CLI's input at cluster scale: the synthetic 13,103-object cluster written as
//! one multi-document YAML file, one YAML `List`, one JSON `List` and split files must all
//! read back to the same objects and compile to the same payload as the in-memory cluster.

use palisade_netpol::synthetic::{build_cluster, dumps, NODE};
use palisade_netpol::{compile, manifests, render, ClusterState, NodeConfig};

fn payload(state: &ClusterState) -> (String, String) {
    let p = render(&compile(state, &NodeConfig::new(NODE)));
    (p.ipset_restore, p.iptables_restore)
}

#[test]
fn every_format_compiles_to_the_same_payload() {
    let cluster = build_cluster().state;
    let total = cluster.nodes.len()
        + cluster.namespaces.len()
        + cluster.pods.len()
        + cluster.policies.len();
    assert_eq!(total, 13_103);
    let want = payload(&cluster);
    assert!(
        want.1.contains("PAL-PI-"),
        "the cluster has policies for the node"
    );
    let d = dumps(&cluster);
    assert!(d.split.len() > 20);
    let mut split = ClusterState::default();
    for f in &d.split {
        split.merge(manifests::parse(f).expect("split file"));
    }
    let forms = [
        ("multi-document YAML", manifests::parse(&d.multi_yaml)),
        ("YAML List", manifests::parse(&d.yaml_list)),
        ("JSON List", manifests::parse(&d.json_list)),
        ("split files", Ok(split)),
    ];
    for (name, parsed) in forms {
        let st = parsed.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(st.pods.len(), cluster.pods.len(), "{name}");
        assert_eq!(st.policies.len(), cluster.policies.len(), "{name}");
        assert_eq!(st.namespaces.len(), cluster.namespaces.len(), "{name}");
        assert_eq!(st.nodes.len(), cluster.nodes.len(), "{name}");
        let got = payload(&st);
        assert!(
            got == want,
            "{name}: payload differs from the in-memory cluster's"
        );
    }
}
