//! The lab on its own, no policy: pods on two nodes reach each other over TCP, UDP and SCTP
//! (raw INITs), the client reaches a node and the pods, processes run inside node namespaces,
//! the root namespace is never touched, and everything is gone afterwards.

use std::process::Command;
use std::time::Duration;

use palisade_e2e::lab::{cleanup_stale, leftovers};
use palisade_e2e::{lab_ready, netns, probe, sctp, Endpoint, Lab, LabSpec, Matrix, Protocol};

fn root_view() -> String {
    let run = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    format!("{}\n{}", run(&["-o", "-4", "addr"]), run(&["-4", "route"]))
}

fn all_reachable(eps: &[Endpoint]) -> Matrix {
    let names: Vec<String> = eps.iter().map(|e| e.name.clone()).collect();
    Matrix::new(names.clone(), names, true)
}

#[test]
fn pods_on_two_nodes_reach_each_other_and_everything_is_removed() {
    if !lab_ready("pods_on_two_nodes_reach_each_other_and_everything_is_removed") {
        return;
    }
    let root_before = root_view();
    let mut lab = Lab::new(LabSpec::new(2)).expect("lab");
    let prefix = lab.prefix().to_string();
    lab.add_pod(1, "x", "a", None).expect("x/a");
    lab.add_pod(1, "x", "b", None).expect("x/b");
    lab.add_pod(2, "y", "a", None).expect("y/a");
    lab.add_pod(2, "y", "b", Some("10.244.2.77".parse().unwrap()))
        .expect("y/b");
    assert_eq!(lab.pod("x", "a").unwrap().ip.to_string(), "10.244.1.2");
    assert_eq!(lab.pod("y", "b").unwrap().ip.to_string(), "10.244.2.77");
    assert_eq!(lab.node(2).unwrap().ip.to_string(), "198.51.100.12");

    let pods: Vec<Endpoint> = lab.pods().iter().map(|p| p.endpoint()).collect();
    let started = std::time::Instant::now();
    for (port, protocol) in [
        (80, Protocol::Tcp),
        (81, Protocol::Tcp),
        (80, Protocol::Udp),
        (81, Protocol::Sctp),
    ] {
        lab.check_matrix(&pods, &pods, port, protocol, &all_reachable(&pods))
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    println!("4 matrices of 4x4 in {:?}", started.elapsed());

    // Servers saw the probes, with the real source addresses (no NAT anywhere).
    let ya = lab.pod("y", "a").unwrap().clone();
    let xa = lab.pod("x", "a").unwrap().clone();
    let log = lab.server_log(ya.ip).expect("y/a serves");
    assert!(log.count(Protocol::Tcp, xa.ip, 80) >= 1);
    assert!(log.count(Protocol::Sctp, xa.ip, 81) >= 1);

    // The client reaches the pods through their nodes, and a node's own servers.
    let client = lab.client().expect("client").clone();
    let node1 = lab.node(1).unwrap().endpoint();
    lab.serve(&node1).expect("serve on node1");
    let mut to = pods.clone();
    to.push(node1.clone());
    let names: Vec<String> = to.iter().map(|e| e.name.clone()).collect();
    for protocol in Protocol::ALL {
        let expected = Matrix::new(vec!["client".into()], names.clone(), true);
        lab.check_matrix(std::slice::from_ref(&client), &to, 80, protocol, &expected)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    // Another LAN host (e.g. a control plane) reaches pods and nodes too.
    let cp = lab
        .add_lan_host("control-plane", "198.51.100.2".parse().unwrap())
        .expect("host");
    assert!(lab
        .add_lan_host("dup", "198.51.100.2".parse().unwrap())
        .is_err());
    assert!(
        lab.probe(&cp, &pods[3], 80, Protocol::Tcp)
            .unwrap()
            .reachable
    );
    assert!(lab.probe(&cp, &node1, 81, Protocol::Udp).unwrap().reachable);
    assert_eq!(lab.lan_hosts().len(), 2);

    // A node reaches pods on both nodes.
    let expected = Matrix::new(
        vec!["node1".into()],
        pods.iter().map(|e| e.name.clone()).collect(),
        true,
    );
    lab.check_matrix(
        std::slice::from_ref(&node1),
        &pods,
        81,
        Protocol::Udp,
        &expected,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));

    // Nothing unknown answers: a port nobody serves is refused, an address nobody has times out.
    let nobody = Endpoint {
        name: "nobody".into(),
        netns: String::new(),
        ip: "10.244.2.200".parse().unwrap(),
    };
    let outcome = lab
        .probe(&pods[0], &pods[2], 9, Protocol::Tcp)
        .expect("probe");
    assert_eq!(
        (outcome.reachable, outcome.detail.as_str()),
        (false, "refused")
    );
    assert!(
        !lab.probe(&pods[0], &nobody, 80, Protocol::Tcp)
            .expect("probe")
            .reachable
    );

    // Remove a pod: its namespace goes, the others stay reachable.
    lab.remove_pod("x", "b").expect("remove x/b");
    assert!(!netns::exists(&format!("{prefix}-x-b")));
    assert!(
        lab.probe(&pods[0], &pods[2], 80, Protocol::Tcp)
            .expect("probe")
            .reachable
    );

    // Inside the lab: forwarding on, LAN address on eth0, routes to the other node's pods.
    let n1 = lab.node_netns(1).unwrap().to_string();
    assert_eq!(
        lab.exec_ok(&n1, &["cat", "/proc/sys/net/ipv4/ip_forward"])
            .unwrap()
            .trim(),
        "1"
    );
    let routes = lab.exec_ok(&n1, &["ip", "-4", "route"]).unwrap();
    assert!(
        routes.contains("10.244.2.0/24 via 198.51.100.12"),
        "{routes}"
    );

    // The root namespace has none of it.
    assert_eq!(
        root_view(),
        root_before,
        "the lab changed the root namespace"
    );
    let root_links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&root_links.stdout).contains(&prefix));

    let ours = leftovers(&prefix).unwrap();
    assert!(ours.len() >= 2 + 1 + 1 + 3, "{ours:?}");
    drop(lab);
    assert_eq!(
        leftovers(&prefix).unwrap(),
        Vec::<String>::new(),
        "namespaces left behind"
    );
    assert!(!std::env::temp_dir()
        .join(format!("palisade-lab-{prefix}"))
        .exists());
}

#[test]
fn sctp_inits_are_valid_for_conntrack_and_iptables_matches_them() {
    if !lab_ready("sctp_inits_are_valid_for_conntrack_and_iptables_matches_them") {
        return;
    }
    let mut lab = Lab::new(LabSpec {
        client: false,
        ..LabSpec::new(2)
    })
    .expect("lab");
    let a = lab.add_pod(1, "x", "a", None).expect("x/a").endpoint();
    let b = lab.add_pod(2, "y", "b", None).expect("y/b").endpoint();
    let n1 = lab.node_netns(1).unwrap().to_string();
    let log = lab.server_log(b.ip).unwrap();
    let send_corrupted = |tag: u32| {
        let mut packet = sctp::build_init(40000, 80, tag, 1);
        packet[8] ^= 0xff;
        netns::run_in(&a.netns, || {
            use nix::sys::socket::*;
            use std::os::fd::AsRawFd;
            let fd = socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::Sctp,
            )?;
            let dst = SockaddrIn::from(std::net::SocketAddrV4::new(b.ip, 0));
            sendto(fd.as_raw_fd(), &packet, &dst, MsgFlags::empty())?;
            Ok(())
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        log.saw_init(tag)
    };
    // Raw sockets do not check SCTP checksums: without a conntrack rule a bad one arrives.
    assert!(
        send_corrupted(0x5eed_0001),
        "a corrupted INIT did not even arrive without rules"
    );

    lab.exec_ok(
        &n1,
        &[
            "iptables",
            "-A",
            "FORWARD",
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ],
    )
    .unwrap();
    lab.exec_ok(
        &n1,
        &[
            "iptables", "-A", "FORWARD", "-p", "sctp", "--dport", "81", "-j", "DROP",
        ],
    )
    .unwrap();
    let sctp80 = lab.probe(&a, &b, 80, Protocol::Sctp).unwrap();
    assert!(
        sctp80.reachable,
        "a valid INIT must pass a conntrack INVALID drop: {sctp80:?}"
    );
    assert!(
        !lab.probe(&a, &b, 81, Protocol::Sctp).unwrap().reachable,
        "-p sctp --dport 81 must match"
    );
    assert!(lab.probe(&a, &b, 81, Protocol::Tcp).unwrap().reachable);
    // With it, the corrupted checksum is INVALID and dropped: conntrack does check, and ours pass.
    assert!(
        !send_corrupted(0x5eed_0002),
        "a bad checksum passed conntrack"
    );
    assert!(probe::random_u64() != probe::random_u64());
}

#[test]
fn processes_run_inside_node_namespaces_and_die_with_their_guard() {
    if !lab_ready("processes_run_inside_node_namespaces_and_die_with_their_guard") {
        return;
    }
    let lab = Lab::new(LabSpec {
        client: false,
        ..LabSpec::new(1)
    })
    .expect("lab");
    let n1 = lab.node_netns(1).unwrap().to_string();
    let addr = lab
        .exec_ok(&n1, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(addr.contains("198.51.100.11/24"), "{addr}");
    let mut p = lab
        .spawn_in(&n1, "printer", &["sh", "-c", "ip -o -4 addr show dev eth0"])
        .unwrap();
    assert!(p
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .is_some_and(|s| s.success()));
    assert!(p.output().contains("198.51.100.11"), "{}", p.output());
    let sleeper = lab.spawn_in(&n1, "sleeper", &["sleep", "60"]).unwrap();
    let pid = sleeper.pid();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(sleeper);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "sleeper survived its guard"
    );
}

#[test]
fn namespaces_of_dead_runs_are_cleaned_up() {
    if !lab_ready("namespaces_of_dead_runs_are_cleaned_up") {
        return;
    }
    // A pid that does not run: lab names of dead processes are stale.
    let dead = (100_000..4_000_000u32)
        .rev()
        .step_by(7919)
        .find(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .expect("a free pid");
    let stale = format!("pl{dead}zz-node1");
    // Not a lab name ("plx..."), and unique to this run.
    let unrelated = format!("plx{}-keep", std::process::id());
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = netns::delete(&self.0);
        }
    }
    let _guards = (Remove(stale.clone()), Remove(unrelated.clone()));
    for name in [&stale, &unrelated] {
        // Plain `ip netns add`: a lab built meanwhile by a parallel test may remove the stale
        // one at any moment, which is fine.
        let status = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap();
        assert!(status.success(), "ip netns add {name}");
    }
    let removed = cleanup_stale().unwrap();
    assert!(
        !netns::exists(&stale),
        "stale namespace kept; removed {removed:?}"
    );
    assert!(
        netns::exists(&unrelated),
        "cleanup touched a namespace that is not the lab's"
    );
}
