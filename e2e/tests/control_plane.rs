//! The lab's control plane and kubelet, without the agents' policy logic in the way:
//!
//! - the test API server lives in the control-plane namespace only (the root namespace cannot
//!   even connect to it), agents in node namespaces reach it over the LAN;
//! - the lab's kubelet turns Pod objects into namespaces with servers, writes their status
//!   (Running, IP, Ready after the delay), keeps an EndpointSlice per Service and removes
//!   pods whose objects are deleted;
//! - the real-cluster path (`--kubeconfig`): a "real" API server on the host's loopback
//!   (the only place the lab may not go) is reached by agents through the relay in the
//!   control-plane namespace, and the scenario code works unchanged.

use std::time::Duration;

use palisade_e2e::cluster::Cluster;
use palisade_e2e::scenarios::Model;
use palisade_e2e::{k8s, lab_ready, LabCluster, LabClusterSpec, Protocol};
use serde_json::json;

fn palisade_built() -> bool {
    match palisade_e2e::netpol::palisade_bin() {
        Ok(_) => true,
        Err(e) => {
            // The lab crate's own tests may run before the binary is built.
            println!("skipped: {e:#}");
            false
        }
    }
}

#[test]
fn kubelet_plays_pods_and_endpoints_and_the_api_stays_inside_the_lab() {
    if !lab_ready("kubelet_plays_pods_and_endpoints_and_the_api_stays_inside_the_lab")
        || !palisade_built()
    {
        return;
    }
    let mut spec = LabClusterSpec::new(2);
    spec.agents = false;
    let mut c = LabCluster::start(spec).expect("lab cluster");
    // The API's listening socket is in the control-plane namespace, and the root namespace
    // has no lab address and no socket of it. (A TCP connect from the root namespace proves
    // nothing: some sandboxes accept every outgoing connection.)
    let listening = |ns: Option<&str>| {
        let out = match ns {
            Some(ns) => std::process::Command::new("ip")
                .args(["netns", "exec", ns, "ss", "-ltnH"])
                .output(),
            None => std::process::Command::new("ss").args(["-ltnH"]).output(),
        };
        String::from_utf8_lossy(&out.expect("ss").stdout).into_owned()
    };
    assert!(listening(Some(c.cp_netns())).contains("198.51.100.2:6443"));
    assert!(!listening(None).contains("198.51.100.2:6443"));
    let root_addrs = std::process::Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&root_addrs.stdout).contains("198.51.100."));
    // Nodes registered with pod CIDRs and InternalIPs.
    let node = c.get("v1", "Node", None, "node2").unwrap().expect("node2");
    assert_eq!(node["spec"]["podCIDRs"][0], "10.244.2.0/24");
    assert_eq!(node["status"]["addresses"][0]["address"], "198.51.100.12");

    c.apply(&k8s::namespace("web", &k8s::labels([("ns", "web")])))
        .unwrap();
    for (i, node) in ["node1", "node2"].iter().enumerate() {
        let pod = c.pod_manifest(
            "web",
            &format!("w{i}"),
            &k8s::labels([("app", "web")]),
            node,
        );
        c.apply(&pod).unwrap();
    }
    c.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "web", "namespace": "web" },
        "spec": { "selector": { "app": "web" }, "ports": [{ "name": "http", "port": 8080, "targetPort": "serve-80-tcp", "protocol": "TCP" }] },
    }))
    .unwrap();
    c.wait_pods_ready(&["web/w0".into(), "web/w1".into()], Duration::from_secs(20))
        .unwrap();
    let pod = c.get("v1", "Pod", Some("web"), "w1").unwrap().unwrap();
    assert_eq!(pod["status"]["phase"], "Running");
    assert_eq!(pod["status"]["hostIP"], "198.51.100.12");
    let ip = c.pod_ip("web/w1").unwrap();
    assert_eq!(ip.octets()[..3], [10, 244, 2]);
    // The pod is real: its servers answer.
    let m = c
        .probe_matrix(
            &[palisade_e2e::Peer::Client],
            &[("w1".into(), ip)],
            80,
            Protocol::Tcp,
        )
        .unwrap();
    assert!(m.at(0, 0), "the client cannot reach the pod");

    c.settle().unwrap();
    let slice = c
        .get(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            Some("web"),
            "web-lab",
        )
        .unwrap()
        .expect("EndpointSlice web-lab");
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "web"
    );
    assert_eq!(slice["endpoints"].as_array().unwrap().len(), 2, "{slice}");
    assert_eq!(
        slice["ports"][0]["port"], 80,
        "named targetPort resolved: {slice}"
    );
    assert!(slice["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["conditions"]["ready"] == true));

    // Graceful deletion: leaves the slice as not ready, then the namespace goes.
    c.delete_pod_gracefully("web/w0").unwrap();
    c.settle().unwrap();
    let slice = c
        .get(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            Some("web"),
            "web-lab",
        )
        .unwrap()
        .unwrap();
    assert_eq!(slice["endpoints"].as_array().unwrap().len(), 1, "{slice}");
    assert!(c.lab().pod("web", "w0").is_err());
    c.delete("v1", "Service", Some("web"), "web").unwrap();
    c.settle().unwrap();
    assert!(c
        .get(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            Some("web"),
            "web-lab"
        )
        .unwrap()
        .is_none());
    let prefix = c.prefix().to_string();
    drop(c);
    assert!(palisade_e2e::lab::leftovers(&prefix).unwrap().is_empty());
}

#[test]
fn a_real_cluster_is_reached_through_the_relay() {
    if !lab_ready("a_real_cluster_is_reached_through_the_relay") || !palisade_built() {
        return;
    }
    // The "real cluster": a test API server on the host's loopback, where a real API server
    // would be (outside the lab). Its runtime lives in the root namespace.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = rt
        .block_on(palisade_testapi::TestApiServer::start(
            "127.0.0.1:0".parse().unwrap(),
        ))
        .unwrap();
    let dir = std::env::temp_dir().join(format!("palisade-e2e-relay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();

    let mut spec = LabClusterSpec::new(2);
    spec.kubeconfig = Some(kubeconfig);
    let result = (|| -> anyhow::Result<()> {
        let mut c = LabCluster::start(spec)?;
        assert_eq!(c.control_plane().url(), "http://198.51.100.2:6443");
        let m = Model::deploy(&mut c, 2)?;
        c.apply(&k8s::network_policy(
            "x",
            "deny",
            json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
        ))?;
        m.converge(
            &mut c,
            "deny in x via the relay",
            80,
            Protocol::Tcp,
            &m.expect(|_, to| to.ns != "x"),
        )?;
        // The agents' requests really came through the relay (only agents touch Leases).
        let leases = server
            .request_log()
            .iter()
            .filter(|r| r.resource == "leases")
            .count();
        assert!(leases > 0, "no agent request reached the server");
        let nodes = server.store().list_objects("v1", "Node", None);
        assert_eq!(nodes.len(), 2);
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    drop(server);
    result.unwrap_or_else(|e| panic!("{e:#}"));
}
