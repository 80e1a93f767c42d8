//! The dataplane state that `palisade netpol apply` leaves behind, across re-runs, kills and
//! rapid re-applies:
//!
//! - re-applying the same manifests changes nothing (normalised `iptables-save` and
//!   `ipset save` identical, counters and hash tuning aside), and after A → B → A the state is
//!   the one a fresh namespace gets from A alone;
//! - an apply SIGKILLed part-way (at delays spread over one apply's duration, bounded
//!   attempts), then re-applied, converges to the fresh state;
//! - while policy variants that all keep x/a isolated from y/b (same node) and y/c (other
//!   node) are re-applied over and over, nothing from y/b or y/c ever reaches x/a — counted
//!   by x/a's own servers, for TCP, UDP and SCTP — while z pods (always allowed) keep getting
//!   through.
//!
//! Needs root and `cargo build -p palisade` first (or `PALISADE_BIN`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use palisade_e2e::k8s::{self, network_policy as np};
use palisade_e2e::netpol::{
    self, big_manifests, line_diff, palisade_bin, run_apply, snapshot, Cluster,
};
use palisade_e2e::{netns, probe, Lab, LabSpec, Protocol};
use palisade_tests::run_lab_test;
use serde_json::{json, Value};

fn policies_a() -> Vec<Value> {
    vec![
        np(
            "x",
            "deny-all",
            json!({ "podSelector": {}, "policyTypes": ["Ingress", "Egress"] }),
        ),
        np(
            "x",
            "a-from-y",
            json!({
                "podSelector": { "matchLabels": { "pod": "a" } },
                "ingress": [{
                    "from": [{ "namespaceSelector": { "matchLabels": { "ns": "y" } } },
                             { "ipBlock": { "cidr": "198.51.100.0/24", "except": ["198.51.100.100/32"] } }],
                    "ports": [{ "port": "serve-80-tcp" }, { "protocol": "SCTP", "port": 80, "endPort": 81 }],
                }],
                "egress": [{ "to": [{ "podSelector": { "matchLabels": { "pod": "b" } }, "namespaceSelector": {} }] }],
                "policyTypes": ["Ingress", "Egress"],
            }),
        ),
    ]
}

fn policies_b() -> Vec<Value> {
    vec![
        np(
            "y",
            "deny-all",
            json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
        ),
        np(
            "z",
            "c-from-x",
            json!({
                "podSelector": { "matchLabels": { "pod": "c" } },
                "ingress": [{ "from": [{ "namespaceSelector": { "matchLabels": { "ns": "x" } } }],
                              "ports": [{ "protocol": "UDP", "port": 81 }] }],
            }),
        ),
    ]
}

/// Applies the cluster's current manifests in a fresh namespace as `node` and snapshots it.
fn fresh_snapshot(c: &mut Cluster, node: &str, tag: &str) -> Result<String> {
    let bin = c.bin().to_path_buf();
    let dir = c.manifest_dir().to_path_buf();
    k8s::write_manifests(&dir, &c.objects())?;
    let ns = c.lab_mut().add_namespace(tag)?;
    run_apply(c.lab(), &bin, &ns, &dir, node, &format!("fresh-{tag}"))?;
    snapshot(c.lab(), &ns)
}

/// Compares two dataplane snapshots, leaving out the per-pod anti-spoofing rules (those that
/// name a pod's interface): those come
/// from the interfaces in each namespace's own kernel (a fresh namespace has none of the pods'
/// veths), not from the manifests; they are checked by the anti-spoofing tests.
fn same(what: &str, expected: &str, got: &str) -> Result<()> {
    let manifest_state = |s: &str| -> String {
        s.lines()
            .filter(|l| {
                !(l.starts_with("-A PALISADE-ANTISPOOF ")
                    && (l.contains(" -i ") || l.contains(" --physdev-in ")))
            })
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let (expected, got) = (&manifest_state(expected), &manifest_state(got));
    ensure!(
        expected == got,
        "{what}: dataplane state differs (- expected, + got):\n{}",
        line_diff(expected, got)
    );
    Ok(())
}

#[test]
fn reapply_is_idempotent_and_converges() {
    run_lab_test("reapply_is_idempotent_and_converges", Cluster::new, |c| {
        c.set_policies(policies_a());
        c.apply()?;
        let a = c.snapshots()?;
        c.apply()?;
        for (i, s) in c.snapshots()?.iter().enumerate() {
            same(
                &format!("node{} after the same apply twice", i + 1),
                &a[i],
                s,
            )?;
        }
        let fresh_a = [
            fresh_snapshot(c, "node1", "fresh-a1")?,
            fresh_snapshot(c, "node2", "fresh-a2")?,
        ];
        for i in 0..2 {
            same(
                &format!("node{} vs a fresh namespace", i + 1),
                &fresh_a[i],
                &a[i],
            )?;
        }

        c.set_policies(policies_b());
        c.apply()?;
        let b = c.snapshots()?;
        ensure!(
            b != a,
            "policies B left the same state as A: apply had no effect"
        );

        c.set_policies(policies_a());
        c.apply()?;
        for (i, s) in c.snapshots()?.iter().enumerate() {
            same(&format!("node{} after A, B, A", i + 1), &fresh_a[i], s)?;
        }
        // And the converged state enforces A.
        let exp = c.expect(|from, to| {
            let egress = from.ns != "x" || (from.is("x/a") && to.name == "b");
            let ingress = to.ns != "x" || (to.is("x/a") && from.ns == "y");
            egress && ingress
        });
        c.check(80, Protocol::Tcp, &exp)?;

        c.set_policies(vec![]);
        c.apply()?;
        let empty = c.snapshots()?;
        let fresh_empty = fresh_snapshot(c, "node1", "fresh-empty")?;
        same("node1 after A, B, A, none", &fresh_empty, &empty[0])?;
        c.check(80, Protocol::Tcp, &c.expect(|_, _| true))
    });
}

#[test]
fn apply_killed_midway_converges() {
    let build = || {
        Lab::new(LabSpec {
            client: false,
            serve_pods: false,
            ..LabSpec::new(2)
        })
    };
    run_lab_test("apply_killed_midway_converges", build, |lab| {
        let bin = palisade_bin()?;
        let nodes = lab.nodes().to_vec();
        let dir_m = lab.tmp_dir().join("m");
        let dir_v = lab.tmp_dir().join("v");
        k8s::write_manifests(&dir_m, &big_manifests(&nodes, 250, 150, 0))?;
        k8s::write_manifests(&dir_v, &big_manifests(&nodes, 250, 150, 1))?;

        // Reference: M applied once to a pristine namespace; its duration paces the kills.
        let reference_ns = lab.add_namespace("ref")?;
        let t = Instant::now();
        run_apply(lab, &bin, &reference_ns, &dir_m, "node1", "ref")?;
        let full = t.elapsed();
        let reference = snapshot(lab, &reference_ns)?;
        println!(
            "one apply of the big manifests takes {full:?}; reference has {} lines",
            reference.lines().count()
        );

        let node = nodes[0].netns.clone();
        run_apply(lab, &bin, &node, &dir_m, "node1", "m0")?;
        same(
            "node1 after a plain apply",
            &reference,
            &snapshot(lab, &node)?,
        )?;
        // How long the two transitions take (they pace the kills): M → V, then V → M.
        let t = Instant::now();
        run_apply(lab, &bin, &node, &dir_v, "node1", "m-to-v")?;
        let m_to_v = t.elapsed();
        let t = Instant::now();
        run_apply(lab, &bin, &node, &dir_m, "node1", "v-to-m")?;
        let v_to_m = t.elapsed();
        println!("transitions take {m_to_v:?} (M to V) and {v_to_m:?} (V to M)");
        same("node1 after M, V, M", &reference, &snapshot(lab, &node)?)?;

        const ATTEMPTS: u32 = 8;
        let mut killed_running = 0;
        for k in 0..ATTEMPTS {
            // Even attempts: in state M, kill an apply of V. Odd: in state V, kill an apply of
            // M. Each kind is killed at four delays spread over its duration.
            let (kill_dir, duration) = if k & 1 == 0 {
                (&dir_v, m_to_v)
            } else {
                run_apply(lab, &bin, &node, &dir_v, "node1", &format!("start-{k}"))?;
                (&dir_m, v_to_m)
            };
            let step = k / 2 + 1;
            let delay = duration * step / (ATTEMPTS / 2 + 1)
                + Duration::from_micros(probe::random_u64() % 2000);
            let argv = netpol::apply_argv(&bin, kill_dir, "node1");
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let mut process = lab.spawn_in(&node, &format!("killed-{k}"), &argv)?;
            std::thread::sleep(delay);
            if process.try_status()?.is_none() {
                killed_running += 1;
            }
            process.kill()?;
            // Like a container restart: whatever the killed apply started dies with it.
            lab.kill_all_in(&node)?;
            run_apply(lab, &bin, &node, &dir_m, "node1", &format!("reapply-{k}"))?;
            same(
                &format!("attempt {k} (kill after {delay:?}), re-applied"),
                &reference,
                &snapshot(lab, &node)?,
            )?;
        }

        // Killed in a pristine namespace (first apply ever), then re-applied.
        let pristine = lab.add_namespace("pristine")?;
        let argv = netpol::apply_argv(&bin, &dir_m, "node1");
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut process = lab.spawn_in(&pristine, "killed-pristine", &argv)?;
        std::thread::sleep(full / 2);
        process.kill()?;
        lab.kill_all_in(&pristine)?;
        run_apply(lab, &bin, &pristine, &dir_m, "node1", "pristine")?;
        same(
            "pristine namespace, killed then re-applied",
            &reference,
            &snapshot(lab, &pristine)?,
        )?;

        println!("{killed_running} of {ATTEMPTS} kills hit a running apply");
        ensure!(
            killed_running > 0,
            "no kill landed while palisade was still running (one apply took {full:?}); the test proved nothing"
        );
        Ok(())
    });
}

/// Policy variants that all keep x/a isolated from y/b and y/c, and all let z/a and z/b in.
/// Relabels of a variant: (pod `ns/name` or namespace, label key, value).
type Relabels = Vec<(&'static str, &'static str, &'static str)>;

fn no_gap_variants(yb: std::net::Ipv4Addr, yc: std::net::Ipv4Addr) -> Vec<(Vec<Value>, Relabels)> {
    let a_from_z = np(
        "x",
        "a-from-z",
        json!({
            "podSelector": { "matchLabels": { "pod": "a" } },
            "ingress": [{ "from": [{ "namespaceSelector": { "matchLabels": { "ns": "z" } } }] }],
        }),
    );
    let a_from_xc = np(
        "x",
        "a-from-xc",
        json!({
            "podSelector": { "matchLabels": { "pod": "a" } },
            "ingress": [{ "from": [{ "podSelector": { "matchLabels": { "pod": "c" } } }] }],
        }),
    );
    let deny = |ns: &str| {
        np(
            ns,
            "deny-all",
            json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
        )
    };
    let a_from_block = np(
        "x",
        "a-from-block",
        json!({
            "podSelector": { "matchLabels": { "pod": "a" } },
            "ingress": [{ "from": [{ "ipBlock": { "cidr": "10.244.0.0/16", "except": [format!("{yb}/32"), format!("{yc}/32")] } }] }],
        }),
    );
    let y_egress_to_z = np(
        "y",
        "egress-to-z",
        json!({
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{ "to": [{ "namespaceSelector": { "matchLabels": { "ns": "z" } } }] }],
        }),
    );
    vec![
        (vec![a_from_z.clone()], vec![]),
        (vec![a_from_z.clone(), a_from_xc.clone()], vec![]),
        (vec![deny("x"), a_from_z.clone()], vec![]),
        (vec![a_from_block.clone()], vec![]),
        (
            vec![a_from_z.clone(), deny("y"), deny("z")],
            vec![("y", "team", "blue")],
        ),
        (
            vec![a_from_z.clone(), a_from_xc],
            vec![("x/b", "pod", "bb"), ("z/c", "pod", "cc")],
        ),
        (vec![a_from_z, y_egress_to_z.clone()], vec![]),
        (
            vec![a_from_block, y_egress_to_z],
            vec![("z/a", "pod", "aa")],
        ),
    ]
}

#[test]
fn no_gap_while_reapplying() {
    run_lab_test("no_gap_while_reapplying", Cluster::new, |c| {
        let x = c.pod("x/a")?.endpoint();
        let denied = [c.pod("y/b")?.endpoint(), c.pod("y/c")?.endpoint()];
        let allowed = [c.pod("z/a")?.endpoint(), c.pod("z/b")?.endpoint()];
        let variants = no_gap_variants(denied[0].ip, denied[1].ip);

        let apply_variant = |c: &mut Cluster, i: usize| -> Result<()> {
            let (policies, relabels) = &variants[i % variants.len()];
            for ns in ["x", "y", "z"] {
                c.set_namespace_label(ns, "ns", Some(ns));
                c.set_namespace_label(ns, "team", None);
            }
            for id in [
                "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
            ] {
                c.set_pod_label(id, "pod", Some(&id[2..]));
            }
            for (target, key, value) in relabels {
                if target.contains('/') {
                    c.set_pod_label(target, key, Some(value));
                } else {
                    c.set_namespace_label(target, key, Some(value));
                }
            }
            c.set_policies(policies.clone());
            c.apply()
                .with_context(|| format!("applying variant {}", i % variants.len()))
        };

        apply_variant(c, 0)?;
        let log = c.lab().server_log(x.ip).context("x/a serves")?;
        log.clear();

        // Three rounds through the variants, ending on variant 0 (i % n == 0 for i = 3n).
        let applies = 3 * variants.len();
        let stop = AtomicBool::new(false);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut sent = Vec::new();
        let applied = std::thread::scope(|s| -> Result<usize> {
            let mut hammers = Vec::new();
            let flows = denied
                .iter()
                .flat_map(|from| {
                    [
                        (from, 80, Protocol::Tcp),
                        (from, 81, Protocol::Udp),
                        (from, 80, Protocol::Sctp),
                    ]
                })
                .chain(allowed.iter().map(|from| (from, 80, Protocol::Tcp)));
            for (from, port, protocol) in flows {
                let (stop, to) = (&stop, x.ip);
                hammers.push((
                    format!("{} -> x/a {protocol}/{port}", from.name),
                    s.spawn(move || {
                        netns::run_in(&from.netns, || {
                            probe::hammer_here(to, port, protocol, stop, 200_000, deadline)
                        })
                    }),
                ));
            }
            let mut applied = 0;
            let outcome = (|| -> Result<()> {
                for i in 1..=applies {
                    apply_variant(c, i)?;
                    applied += 1;
                }
                Ok(())
            })();
            std::thread::sleep(Duration::from_millis(200));
            stop.store(true, Ordering::Relaxed);
            for (name, hammer) in hammers {
                let n = hammer
                    .join()
                    .map_err(|_| anyhow::anyhow!("hammer {name} panicked"))??;
                sent.push((name, n));
            }
            outcome.map(|()| applied)
        })?;
        std::thread::sleep(Duration::from_millis(300));

        println!("{applied} applies; probes sent: {sent:?}");
        let seen = log.snapshot();
        for from in &denied {
            ensure!(
                log.total_from(from.ip) == 0,
                "a gap: {} reached x/a while every applied variant isolated it; x/a saw {seen:?}",
                from.name
            );
        }
        for from in &allowed {
            ensure!(
                log.count(Protocol::Tcp, from.ip, 80) > 0,
                "{} never reached x/a although every variant allows it (is the prober alive?); x/a saw {seen:?}",
                from.name
            );
        }
        // The last variant (0: x/a only from z) is in force.
        c.check(
            80,
            Protocol::Tcp,
            &c.expect(|from, to| !to.is("x/a") || from.ns == "z"),
        )
    });
}
