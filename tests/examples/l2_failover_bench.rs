//! L2 failover with real agents, measured: three `palisade agent` processes in the lab (the
//! harness `palisade_e2e::l2` (`e2e/src/l2.rs`): node netns, test API server in the lab, client with a raw
//! socket and TCP probes; see that file's docs).
//!
//! Phases (each prints a table row; `L2_BENCH_PHASES=kill,link,outage` selects):
//! - **kill**: SIGKILL the agent owning the VIP → the client's first TCP connection served by
//!   the new owner (TCP probes every 20 ms, 200 ms timeout). Also: first ARP answer and first
//!   gratuitous ARP from the new owner. The killed agent is restarted between runs and the
//!   cluster waits for stable ownership (the restarted node is the hash winner again, so it
//!   takes the VIP back: that hand-over gap is reported too). `L2_BENCH_RUNS` (20).
//! - **link**: the owner's LAN cable is pulled (its bridge-side veth set down) → first TCP
//!   connection served by the new owner; then the cable is put back and the cluster settles.
//!   After each heal, claims (ARP answers, gratuitous ARP) from the healed node for VIPs it
//!   does not own are counted. `L2_BENCH_LINK_RUNS` (10).
//! - **outage**: the API server drops every connection for `L2_BENCH_OUTAGE_SECS` (600); three
//!   VIPs are probed every 100 ms by ARP and TCP; every probe must succeed.
//!
//! `L2_BENCH_SATURATE=1` runs the selected phases with every CPU busy (one busy thread per CPU
//! plus one, `palisade_e2e::saturate::Saturator`, started once the cluster is up; the client's
//! wire and TCP probes share the busy CPUs too). The last line says how busy the CPUs were
//! (`/proc/stat`). The kill phase's restart row counts probe rounds answered by two MACs.
//!
//! ```text
//! cargo build --release -p palisade
//! PALISADE_BIN=target/release/palisade cargo run --release -p palisade-tests --example l2_failover_bench
//! ```
//! Needs root. Everything lives in lab namespaces, removed on exit (also on panic).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use palisade_e2e::l2::*;
use palisade_e2e::saturate::Saturator;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn row(what: &str, samples: &[Duration], note: &str) {
    let (p50, p90, max) = stats(samples);
    println!(
        "| {what} | {} | {} | {} | {} | {note} |",
        samples.len(),
        ms(p50),
        ms(p90),
        ms(max)
    );
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

struct Bench {
    c: L2Cluster,
    vips: Vec<IpAddr>,
    all: Vec<String>,
    owners: BTreeMap<IpAddr, String>,
}

impl Bench {
    fn expect(
        &self,
        owners: &BTreeMap<IpAddr, String>,
    ) -> BTreeMap<IpAddr, pnet::datalink::MacAddr> {
        owners.iter().map(|(v, n)| (*v, self.c.mac(n))).collect()
    }

    /// A wire on `targets` that has seen `expect` answer alone for 10 rounds, then TCP probes
    /// of `vip` (every 20 ms, 200 ms timeout) running for 200 ms: ready for a failover.
    fn armed(
        &self,
        targets: &[IpAddr],
        expect: &BTreeMap<IpAddr, pnet::datalink::MacAddr>,
        vip: IpAddr,
        what: &str,
    ) -> Result<(Wire, TcpProber)> {
        let wire = self.c.start_wire(targets, Duration::from_secs(120))?;
        wire.wait_stable(expect, Instant::now(), 10, Duration::from_secs(30))
            .with_context(|| format!("stable before the {what}"))?;
        let tcp = self.c.start_tcp(
            &[vip],
            Duration::from_millis(20),
            Duration::from_millis(200),
            Duration::from_secs(60),
        )?;
        std::thread::sleep(Duration::from_millis(200));
        Ok((wire, tcp))
    }

    /// SIGKILL of the owner of vips[0] → first TCP connection served by the new owner.
    fn kill_runs(&mut self, runs: u64) -> Result<()> {
        let vip = self.vips[0];
        let w0 = self.owners[&vip].clone();
        let rest = without(&self.all, &w0);
        let w1 = expected_winner(vip, &rest);
        let mut tcp_s = Vec::new();
        let mut arp_s = Vec::new();
        let mut garp_s = Vec::new();
        let mut back_gap = Vec::new();
        let mut status_s = Vec::new();
        let mut doubles = 0;
        let expect: BTreeMap<_, _> = [(vip, self.c.mac(&w0))].into();
        for run in 0..runs {
            let (wire, tcp) = self.armed(&[vip], &expect, vip, "kill")?;
            let t_kill = self.c.kill_agent(&w0)?;
            let served = poll(Duration::from_secs(15), Duration::from_millis(5), || {
                Ok(tcp.first_served_by(vip, &w1, t_kill))
            })?
            .with_context(|| format!("run {run}: no TCP connection served by {w1}"))?;
            drop(tcp);
            // kubectl's view: the Service's only ServiceL2Status names the new owner.
            let want = vec![(format!("web-a.{w1}"), w1.clone(), vec![vip.to_string()])];
            let status = poll(Duration::from_secs(15), Duration::from_millis(5), || {
                Ok((self.c.l2_statuses("web-a")? == want).then(Instant::now))
            })?
            .with_context(|| {
                format!(
                    "run {run}: ServiceL2Status never showed {w1} alone: {:?}",
                    self.c.l2_statuses("web-a")
                )
            })?;
            status_s.push(status - t_kill);
            let m1 = self.c.mac(&w1);
            tcp_s.push(served.done - t_kill);
            wire.wait_stable(&[(vip, m1)].into(), t_kill, 3, Duration::from_secs(10))
                .context("new owner answers")?;
            let claims = wire.log().claims_for(vip, t_kill);
            let first_answer = claims
                .iter()
                .find(|c| c.mac == m1 && !c.gratuitous)
                .copied();
            let first_garp = claims.iter().find(|c| c.mac == m1 && c.gratuitous).copied();
            if let Some(c) = first_answer {
                arp_s.push(c.at - t_kill);
            }
            if let Some(c) = first_garp {
                garp_s.push(c.at - t_kill);
            }
            // Restart; the restarted node is the hash winner and takes the VIP back.
            self.c.start_agent(&w0)?;
            let t_restart = Instant::now();
            self.c.agents.wait_ready(&w0, Duration::from_secs(30))?;
            wire.wait_stable(&expect, t_restart, 10, Duration::from_secs(30))
                .context("stable after the restart")?;
            let log = wire.finish()?;
            doubles += log.double_answers().len();
            back_gap.push(
                log.handover_gap(vip, m1, self.c.mac(&w0), t_restart)
                    .context("the restarted owner never claimed its VIP")?,
            );
            eprintln!(
                "kill run {run}: TCP {} (ARP {}, GARP {}, ServiceL2Status {}), restart hand-over gap {}",
                ms(served.done - t_kill),
                first_answer.map(|c| ms(c.at - t_kill)).unwrap_or_default(),
                first_garp.map(|c| ms(c.at - t_kill)).unwrap_or_default(),
                ms(status - t_kill),
                ms(*back_gap.last().expect("gap"))
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        row(
            "SIGKILL owner agent → first TCP connect served by new owner",
            &tcp_s,
            "TCP probes every 20 ms, 200 ms timeout",
        );
        row(
            "SIGKILL → first ARP answer from new owner",
            &arp_s,
            "ARP request every 100 ms",
        );
        row("SIGKILL → first gratuitous ARP from new owner", &garp_s, "");
        row(
            "SIGKILL → ServiceL2Status names the new owner alone",
            &status_s,
            "object read from the API every 5 ms; writes at most every 500 ms",
        );
        row(
            "restart of the killed agent: hand-over back to it, last answer of the stand-in → first claim of the restarted owner",
            &back_gap,
            &format!("ARP requests every 100 ms; probe rounds answered by two MACs: {doubles}"),
        );
        Ok(())
    }

    /// The owner's cable is pulled → first TCP connection served by the new owner; then
    /// put back.
    fn link_runs(&mut self, runs: u64) -> Result<()> {
        let vip = self.vips[0];
        let w0 = self.owners[&vip].clone();
        let rest = without(&self.all, &w0);
        let w1 = expected_winner(vip, &rest);
        let m0 = self.c.mac(&w0);
        let expect = self.expect(&self.owners);
        let mut tcp_s = Vec::new();
        let mut heal_gap = Vec::new();
        let mut spurious_total = 0;
        let mut overlap_rounds = 0;
        for run in 0..runs {
            let (wire, tcp) = self.armed(&self.vips, &expect, vip, "cut")?;
            let t_cut = Instant::now();
            self.c.set_link(&w0, false)?;
            let served = poll(Duration::from_secs(15), Duration::from_millis(5), || {
                Ok(tcp.first_served_by(vip, &w1, t_cut))
            })?
            .with_context(|| format!("link run {run}: no TCP connection served by {w1}"))?;
            drop(tcp);
            tcp_s.push(served.done - t_cut);
            // Isolated for a few seconds (it believes it is alone meanwhile).
            std::thread::sleep(Duration::from_secs(3));
            self.c.set_link(&w0, true)?;
            let t_heal = Instant::now();
            wire.wait_stable(&expect, t_heal, 10, Duration::from_secs(30))
                .context("stable after the heal")?;
            std::thread::sleep(Duration::from_millis(1500));
            let log = wire.finish()?;
            heal_gap.push(
                log.handover_gap(vip, self.c.mac(&w1), m0, t_heal)
                    .context("the healed owner never claimed its VIP")?,
            );
            // Claims by the healed node for VIPs that were never its own.
            let spurious: usize = self
                .vips
                .iter()
                .filter(|v| self.owners[*v] != w0)
                .map(|v| {
                    log.claims_for(*v, t_heal)
                        .iter()
                        .filter(|c| c.mac == m0)
                        .count()
                })
                .sum();
            spurious_total += spurious;
            overlap_rounds += log
                .rounds
                .iter()
                .filter(|r| r.at >= t_heal && r.answers.values().any(|s| s.len() > 1))
                .count();
            eprintln!(
                "link run {run}: TCP {}, heal gap {}, spurious claims after heal {spurious}",
                ms(served.done - t_cut),
                ms(*heal_gap.last().expect("gap"))
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        row(
            "owner's link down → first TCP connect served by new owner",
            &tcp_s,
            "TCP probes every 20 ms, 200 ms timeout",
        );
        row(
            "link back up: hand-over back to the healed owner, last answer of the stand-in → its first claim",
            &heal_gap,
            &format!(
                "claims by the healed node for other nodes' VIPs: {spurious_total}; probe rounds answered by two MACs: {overlap_rounds}"
            ),
        );
        Ok(())
    }

    /// API server unreachable for `secs`; every probe must succeed.
    fn outage(&mut self, secs: u64) -> Result<()> {
        let expect = self.expect(&self.owners);
        let wire = self
            .c
            .start_wire(&self.vips, Duration::from_secs(secs + 120))?;
        wire.wait_stable(&expect, Instant::now(), 10, Duration::from_secs(30))?;
        let tcp = self.c.start_tcp(
            &self.vips,
            Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::from_secs(secs + 120),
        )?;
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        self.c.set_outage(palisade_testapi::Outage::Disconnect)?;
        let end = t0 + Duration::from_secs(secs);
        while Instant::now() < end {
            std::thread::sleep(Duration::from_secs(1).min(end - Instant::now()));
        }
        let t1 = Instant::now();
        self.c.set_outage(palisade_testapi::Outage::Off)?;
        let attempts = tcp.finish();
        let log = wire.finish()?;
        let rounds = log.rounds_between(t0, t1);
        let mut arp_fail = 0;
        let mut arp_wrong = 0;
        for r in &rounds {
            for (vip, set) in &r.answers {
                if set.is_empty() {
                    arp_fail += 1;
                } else if set.len() != 1 || !set.contains(&expect[vip]) {
                    arp_wrong += 1;
                }
            }
        }
        let in_outage: Vec<_> = attempts
            .iter()
            .filter(|a| a.at >= t0 && a.at < t1)
            .collect();
        let tcp_fail = in_outage.iter().filter(|a| a.result.is_err()).count();
        let tcp_wrong = in_outage
            .iter()
            .filter(|a| a.result.as_ref().is_ok_and(|n| *n != self.owners[&a.vip]))
            .count();
        let mut gap = Duration::ZERO;
        for v in &self.vips {
            gap = gap.max(log.longest_gap(*v, t0, t1));
        }
        println!(
            "| API unreachable {} s, {} VIPs | ARP: {} probes, {arp_fail} unanswered, {arp_wrong} answered by another MAC | TCP: {} connects, {tcp_fail} failed, {tcp_wrong} served by another node | longest ARP gap {} |",
            secs,
            self.vips.len(),
            rounds.len() * self.vips.len(),
            in_outage.len(),
            ms(gap)
        );
        for n in self.all.clone() {
            self.c
                .agents
                .wait_ready(&n, Duration::from_secs(60))
                .with_context(|| format!("{n} ready after the outage"))?;
        }
        if arp_fail + arp_wrong + tcp_fail + tcp_wrong > 0 {
            bail!("probes failed during the API outage");
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    if !palisade_e2e::lab_ready("l2_failover_bench") {
        return Ok(());
    }
    let phases = std::env::var("L2_BENCH_PHASES").unwrap_or_else(|_| "kill,link,outage".into());
    let started = Instant::now();
    let c = L2Cluster::start(Options {
        nodes: 3,
        ipv6: false,
        segment_b: Vec::new(),
        extra_flags: Vec::new(),
    })?;
    for n in ["web-a", "web-b", "web-c"] {
        c.add_service(n, false)?;
    }
    let vips: Vec<IpAddr> = ["web-a", "web-b", "web-c"]
        .iter()
        .map(|n| c.wait_vip(n, Duration::from_secs(20)))
        .collect::<Result<_>>()?;
    let all = c.node_names();
    let owners: BTreeMap<IpAddr, String> = vips
        .iter()
        .map(|v| (*v, expected_winner(*v, &all)))
        .collect();
    eprintln!("VIPs and owners: {owners:?}; load {}", load());
    let mut b = Bench {
        c,
        vips,
        all,
        owners,
    };
    println!("| measurement | runs | median | p90 | max | notes |");
    println!("|---|---:|---:|---:|---:|---|");
    let load_before = load();
    let busy = std::env::var("L2_BENCH_SATURATE")
        .is_ok_and(|v| v == "1")
        .then(Saturator::start)
        .transpose()?;
    if let Some(b) = &busy {
        eprintln!("every CPU busy: {} busy threads", b.threads());
    }
    let result = (|| {
        if phases.contains("kill") {
            b.kill_runs(env_num("L2_BENCH_RUNS", 20))?;
        }
        if phases.contains("link") {
            b.link_runs(env_num("L2_BENCH_LINK_RUNS", 10))?;
        }
        if phases.contains("outage") {
            println!();
            b.outage(env_num("L2_BENCH_OUTAGE_SECS", 600))?;
        }
        anyhow::Ok(())
    })();
    let busy_note = busy.as_ref().map(|b| {
        format!(
            "; {} busy threads, CPUs {:.0} % busy during the phases",
            b.threads(),
            b.busy_share().unwrap_or(f64::NAN) * 100.0
        )
    });
    drop(busy);
    if std::env::var("L2_BENCH_LOGS").is_ok_and(|v| v == "1") {
        eprintln!("{}", b.c.agents.log_tails(200));
    }
    if let Err(e) = result {
        eprintln!("{}", b.c.agents.log_tails(60));
        return Err(e);
    }
    let panics = b.c.agents.panics();
    if !panics.is_empty() {
        bail!("agents panicked: {panics:?}");
    }
    println!(
        "\nload average before {load_before}, after {}; {:.0} s in all{}",
        load(),
        started.elapsed().as_secs_f64(),
        busy_note.unwrap_or_default()
    );
    Ok(())
}
