//! [`NetlinkConntrack`] against the real kernel (root only; skipped otherwise): entries put
//! into a fresh network namespace's table with `conntrack -I`, listed over ctnetlink (the same
//! as `conntrack -L` reads), deleted by exact tuple in batches (zones included), an entry
//! already gone reported as such, nothing else touched.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use palisade_dataplane::conntrack::Conntrack;
use palisade_dataplane::netns::{lab_skip_reason, Netns};
use palisade_dataplane::{KernelConntrack, NetlinkConntrack};
use palisade_netpol::compile::Protocol;
use palisade_netpol::revoke::CtEntry;
use palisade_netpol::Family;

fn skip_reason() -> Option<String> {
    lab_skip_reason(&["ip", "conntrack"])
}

fn insert(ns: &Netns, n: usize, extra: &[&str]) {
    // conntrack -R: one -I per line.
    let mut lines = String::new();
    for i in 0..n {
        lines.push_str(&format!(
            "-I -p tcp --state ESTABLISHED -t 600 -s 10.9.7.20 -d 10.9.7.10 --sport {} --dport 80\n",
            1024 + i
        ));
    }
    for l in extra {
        lines.push_str(l);
        lines.push('\n');
    }
    let path = std::env::temp_dir().join(format!("pal-ctnl-{}-{}", std::process::id(), ns.name()));
    std::fs::write(&path, lines).expect("write");
    let ok = Command::new("ip")
        .args(["netns", "exec", ns.name(), "conntrack", "-R"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _ = std::fs::remove_file(&path);
    assert!(ok, "conntrack -R failed");
}

fn set(v: Vec<CtEntry>) -> BTreeSet<CtEntry> {
    v.into_iter().collect()
}

#[test]
fn lists_like_the_tool_and_deletes_exact_tuples_in_batches() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let ns = Netns::create("pal-ctnl").expect("netns");
    // 300 TCP (more than two delete batches), UDP in zone 7, SCTP, ICMP, IPv6 TCP.
    insert(
        &ns,
        300,
        &[
            "-I -p udp -t 600 -s 10.9.7.40 -d 10.9.7.10 --sport 53 --dport 53 --zone 7",
            "-I -p udp -t 600 -s 10.9.7.40 -d 10.9.7.10 --sport 53 --dport 53",
            "-I -p sctp --state ESTABLISHED --orig-vtag 1 --reply-vtag 2 -t 600 -s 10.9.7.30 -d 10.9.7.10 --sport 7 --dport 9",
            "-I -p icmp -t 600 -s 10.9.7.20 -d 10.9.7.10 --icmp-type 8 --icmp-code 0 --icmp-id 3",
            "-I -p tcp --state ESTABLISHED -t 600 -s fd97::20 -d fd97::10 --sport 1000 --dport 2000",
        ],
    );
    let nl = NetlinkConntrack::in_netns(ns.name()).expect("ctnetlink socket in the netns");
    let tool = KernelConntrack::in_netns(ns.name()).expect("conntrack");

    let v4 = nl.entries(Family::V4).expect("dump");
    assert_eq!(v4.len(), 303, "300 TCP + 2 UDP + SCTP (no ICMP)");
    assert_eq!(set(v4.clone()), set(tool.entries(Family::V4).expect("-L")));
    let v6 = nl.entries(Family::V6).expect("dump v6");
    assert_eq!(v6.len(), 1);
    assert_eq!(set(v6), set(tool.entries(Family::V6).expect("-L v6")));
    // The socket is the namespace's: the host's table has none of these.
    if let Ok(host) = NetlinkConntrack::open() {
        let h = host.entries(Family::V4).expect("host dump");
        assert!(!h.iter().any(|e| e.orig_src.to_string() == "10.9.7.20"));
    }

    // Delete every even TCP entry, the zone-7 UDP entry, and one that never existed.
    let gone = CtEntry::plain(
        Protocol::Tcp,
        "10.9.7.99".parse().unwrap(),
        1,
        "10.9.7.10".parse().unwrap(),
        80,
    );
    let zoned: Vec<&CtEntry> = v4.iter().filter(|e| e.proto == Protocol::Udp).collect();
    assert_eq!(zoned.len(), 2, "the zone-7 and the zone-0 UDP entry");
    let mut doomed: Vec<&CtEntry> = v4
        .iter()
        .filter(|e| e.proto == Protocol::Tcp && e.orig_sport % 2 == 0)
        .collect();
    assert_eq!(doomed.len(), 150);
    doomed.push(&gone);
    doomed.push(zoned[0]);
    let deleted = nl.delete_all(Family::V4, &doomed).expect("delete");
    assert_eq!(deleted.len(), doomed.len(), "one answer per entry");
    assert!(!deleted[150], "the made-up entry is reported as not there");
    // The UDP tuple lives in zones 0 and 7: one request entry deletes both.
    assert_eq!(
        deleted.iter().filter(|d| **d).count(),
        151,
        "150 TCP + the UDP tuple; the made-up entry was not there"
    );
    let left = nl.entries(Family::V4).expect("dump");
    let udp: Vec<_> = left.iter().filter(|e| e.proto == Protocol::Udp).collect();
    assert_eq!(left.len(), 303 - 152, "UDP left: {udp:?}");
    assert!(left
        .iter()
        .all(|e| !(e.proto == Protocol::Tcp && e.orig_sport % 2 == 0)));
    assert_eq!(
        left.iter().filter(|e| e.proto == Protocol::Tcp).count(),
        150
    );
    assert_eq!(left.iter().filter(|e| e.proto == Protocol::Udp).count(), 0);
    assert!(left.iter().any(|e| e.proto == Protocol::Sctp));
    assert_eq!(set(left), set(tool.entries(Family::V4).expect("-L")));
    // Deleting again: already gone.
    assert!(!nl.delete(Family::V4, doomed[0]).expect("delete again"));
    assert!(!nl.delete(Family::V4, zoned[0]).expect("delete again"));
    // One more, alone (not batched).
    let odd = nl
        .entries(Family::V4)
        .expect("dump")
        .into_iter()
        .find(|e| e.proto == Protocol::Tcp)
        .unwrap();
    assert!(nl.delete(Family::V4, &odd).expect("delete one"));
    assert_eq!(nl.entries(Family::V4).expect("dump").len(), 303 - 153);
    drop(ns);
}
