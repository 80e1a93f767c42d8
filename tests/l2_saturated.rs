//! L2 failover with every CPU saturated (issue 10, "Dead peers and load"): the real-agent
//! cluster of `tests/l2_failover.rs` (three `palisade agent` processes with L2 on, the test API
//! server and the client's ARP wire inside the lab: `palisade_e2e::l2`), while busy threads,
//! one per CPU plus one (`palisade_e2e::saturate::Saturator`), keep every core at 100 %.
//!
//! With the CPUs saturated: a quiet stretch, then [`RUNS`] times SIGKILL of the VIP owner's
//! agent → the expected next winner answers alone → the killed agent is restarted → it answers
//! alone again. Checked:
//! - no probe round of the client's wire (ARP request every 100 ms) is answered by two MACs,
//!   and the nodes answering for the VIP come in exactly the expected order
//!   (owner, stand-in, owner, ... — never two interleaved);
//! - every failover and every restart converges to the one expected MAC within a generous
//!   bound (20 s / 40 s: a convergence check, not a timing; the bench measures times);
//! - the surviving agents' membership (their `agent membership changed` log lines and
//!   `palisade_members_alive`) changes only when the owner's agent really stops or comes back:
//!   exactly "all but the killed one", "all", once per run, nothing during the quiet stretch;
//! - no agent panics.
//!
//! Failover times under saturation are printed, and measured against the idle ones by
//! `tests/examples/l2_failover_bench.rs` with `L2_BENCH_SATURATE=1` (docs/benchmarks.md).
//!
//! Needs root and `cargo build -p palisade` first (or `PALISADE_BIN`); otherwise prints
//! `skipped: ...`. Lab namespaces are removed and the busy threads stopped on every exit,
//! panics included (both are guards).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use palisade_e2e::l2::*;
use palisade_e2e::saturate::Saturator;

/// Failovers per run of the test.
const RUNS: usize = 5;
/// Convergence bounds (not timings: failover is ~1 s idle, see docs/benchmarks.md).
const CONVERGE: Duration = Duration::from_secs(20);
const RESTART: Duration = Duration::from_secs(40);

/// The live sets `node`'s agent logged ("agent membership changed live={...}") in lines
/// after the first `skip` lines of its log; and the number of lines now.
fn membership_changes(
    c: &L2Cluster,
    node: &str,
    all: &[String],
    skip: usize,
) -> (Vec<BTreeSet<String>>, usize) {
    let log = c.agents.log(node);
    let lines: Vec<&str> = log.lines().collect();
    let sets = lines
        .iter()
        .skip(skip)
        .filter(|l| l.contains("agent membership changed"))
        .map(|l| {
            let live = l.split("live=").nth(1).unwrap_or("");
            all.iter()
                .filter(|n| live.contains(&format!("\"{n}\"")))
                .cloned()
                .collect()
        })
        .collect();
    (sets, lines.len())
}

/// Waits (20 s) until the agent of `node` reports `want` members alive.
fn wait_members(c: &L2Cluster, node: &str, want: f64) -> Option<f64> {
    poll(CONVERGE, Duration::from_millis(100), || {
        Ok(c.agents
            .metric(node, "palisade_members_alive")
            .filter(|v| *v == want))
    })
    .expect("metrics")
}

#[test]
fn failover_with_every_cpu_saturated_converges_without_double_answers_or_flaps() {
    let test = "failover_with_every_cpu_saturated_converges_without_double_answers_or_flaps";
    if !palisade_e2e::lab_ready(test) {
        return;
    }
    let started = Instant::now();
    let mut c = L2Cluster::start(Options {
        nodes: 3,
        ipv6: false,
        segment_b: Vec::new(),
        extra_flags: Vec::new(),
    })
    .expect("lab cluster");
    c.add_service("web", false).expect("service");
    let vip = c.wait_vip("web", Duration::from_secs(20)).expect("vip");
    let all = c.node_names();
    let w0 = expected_winner(vip, &all);
    let rest = without(&all, &w0);
    let w1 = expected_winner(vip, &rest);
    let (m0, m1) = (c.mac(&w0), c.mac(&w1));
    let wire = c
        .start_wire(&[vip], Duration::from_secs(600))
        .expect("wire");
    wire.wait_stable(&[(vip, m0)].into(), Instant::now(), 10, CONVERGE)
        .expect("the elected owner answers alone");
    for n in &all {
        assert_eq!(wait_members(&c, n, 3.0), Some(3.0), "{n}: members before");
    }

    // Every CPU busy from here on (stopped when `busy` drops, also on panic).
    let busy = Saturator::start().expect("busy threads");
    let t_busy = Instant::now();
    let marks: Vec<(String, usize)> = rest
        .iter()
        .map(|n| (n.clone(), membership_changes(&c, n, &all, 0).1))
        .collect();
    // Quiet stretch, saturated: nothing may move.
    std::thread::sleep(Duration::from_secs(5));
    let idle_spins = busy.spins();
    assert!(idle_spins > 0, "busy threads did not run");
    for (n, skip) in &marks {
        let (sets, _) = membership_changes(&c, n, &all, *skip);
        assert!(
            sets.is_empty(),
            "{n}: membership changed under load alone: {sets:?}"
        );
    }
    wire.wait_stable(&[(vip, m0)].into(), t_busy, 10, CONVERGE)
        .expect("the owner still answers alone under load");

    let mut failovers = Vec::new();
    let mut restarts = Vec::new();
    for run in 0..RUNS {
        let t_kill = c.kill_agent(&w0).expect("kill");
        let first = wire
            .wait_stable(&[(vip, m1)].into(), t_kill, 5, CONVERGE)
            .unwrap_or_else(|e| panic!("run {run}: no failover to {w1} under load: {e:#}"));
        let claimed = wire
            .log()
            .claims_for(vip, t_kill)
            .iter()
            .find(|cl| cl.mac == m1)
            .map(|cl| cl.at)
            .unwrap_or(first);
        failovers.push(claimed - t_kill);
        for n in &rest {
            assert_eq!(
                wait_members(&c, n, 2.0),
                Some(2.0),
                "run {run}: {n} after the kill"
            );
        }
        c.start_agent(&w0).expect("restart");
        let t_restart = Instant::now();
        c.agents
            .wait_ready(&w0, RESTART)
            .expect("restarted agent ready under load");
        let back = wire
            .wait_stable(&[(vip, m0)].into(), t_restart, 10, RESTART)
            .unwrap_or_else(|e| panic!("run {run}: {w0} never took its VIP back: {e:#}"));
        restarts.push(back - t_restart);
        for n in &all {
            assert_eq!(
                wait_members(&c, n, 3.0),
                Some(3.0),
                "run {run}: {n} after the restart"
            );
        }
        eprintln!(
            "run {run}: SIGKILL {w0} → first claim by {w1} after {}; restart → {w0} alone after {}",
            ms(claimed - t_kill),
            ms(back - t_restart)
        );
    }
    let busy_share = busy.busy_share();
    let spins = busy.spins();
    drop(busy);
    let log = wire.finish().expect("wire");

    let doubles = log.double_answers();
    assert!(
        doubles.is_empty(),
        "{} probe rounds answered by two MACs under load: {doubles:?}",
        doubles.len()
    );
    let order: Vec<String> = log
        .owner_runs(vip, t_busy)
        .into_iter()
        .map(|m| c.who(m))
        .collect();
    let mut want = vec![w0.clone()];
    for _ in 0..RUNS {
        want.push(w1.clone());
        want.push(w0.clone());
    }
    assert_eq!(order, want, "nodes answering for {vip}, in order");
    let full: BTreeSet<String> = all.iter().cloned().collect();
    let survivors: BTreeSet<String> = rest.iter().cloned().collect();
    let mut expected_changes = Vec::new();
    for _ in 0..RUNS {
        expected_changes.push(survivors.clone());
        expected_changes.push(full.clone());
    }
    for (n, skip) in &marks {
        let (sets, _) = membership_changes(&c, n, &all, *skip);
        assert_eq!(
            sets, expected_changes,
            "{n}: membership changes other than {w0} stopping and coming back"
        );
    }
    let panics = c.agents.panics();
    assert!(panics.is_empty(), "{panics:?}");
    let (p50, _, max) = stats(&failovers);
    let (r50, _, rmax) = stats(&restarts);
    println!(
        "{test}: {RUNS} failovers under load (CPU busy {:.0} %, {spins} busy blocks): \
         SIGKILL → first claim median {} max {}; restart → owner alone median {} max {}; {:.1} s",
        busy_share.unwrap_or(f64::NAN) * 100.0,
        ms(p50),
        ms(max),
        ms(r50),
        ms(rmax),
        started.elapsed().as_secs_f64()
    );
}
