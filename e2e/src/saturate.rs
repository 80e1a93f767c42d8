//! Every CPU busy: one busy-looping thread per CPU (`available_parallelism()`) plus one, for
//! the tests and benchmarks that check the agents under load (issue 10: "with every core
//! saturated"). No `stress-ng` needed.
//!
//! Threads of the test process rather than child processes: they end with the process on
//! every exit path, a SIGKILLed test run included. [`Saturator`]'s `Drop` stops and joins them
//! (also while unwinding from a panic). The busy threads run at the default priority, like the
//! agents, so the scheduler shares the CPUs between them fairly.
//!
//! [`Saturator::busy_share`] tells how busy the CPUs really were meanwhile (from `/proc/stat`),
//! so a run that was not saturated shows it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};

/// Busy threads, stopped and joined on drop.
pub struct Saturator {
    stop: Arc<AtomicBool>,
    spins: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    cpu_at_start: Option<CpuTimes>,
}

/// Jiffies from the first line of `/proc/stat`: (busy, total).
#[derive(Clone, Copy, Debug)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

fn cpu_times() -> Option<CpuTimes> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is counted in user already).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total.saturating_sub(idle),
        total,
    })
}

impl Saturator {
    /// Starts `available_parallelism() + 1` busy threads.
    pub fn start() -> Result<Saturator> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Saturator::with_threads(cpus + 1)
    }

    /// Starts `n` busy threads.
    pub fn with_threads(n: usize) -> Result<Saturator> {
        let stop = Arc::new(AtomicBool::new(false));
        let spins = Arc::new(AtomicU64::new(0));
        let mut s = Saturator {
            stop: stop.clone(),
            spins: spins.clone(),
            threads: Vec::new(),
            cpu_at_start: cpu_times(),
        };
        for i in 0..n {
            let (stop, spins) = (stop.clone(), spins.clone());
            let t = std::thread::Builder::new()
                .name(format!("busy{i}"))
                .spawn(move || {
                    let mut x: u64 = i as u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..100_000 {
                            x = std::hint::black_box(
                                x.wrapping_mul(6364136223846793005).wrapping_add(1),
                            );
                        }
                        spins.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .context("spawning a busy thread")?;
            s.threads.push(t);
        }
        Ok(s)
    }

    /// How many busy threads run.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Blocks of 100 000 iterations the busy threads have done so far (they did run).
    pub fn spins(&self) -> u64 {
        self.spins.load(Ordering::Relaxed)
    }

    /// The share of CPU time (all CPUs, every process) that was not idle since the start,
    /// 0.0–1.0; `None` without `/proc/stat`.
    pub fn busy_share(&self) -> Option<f64> {
        let (a, b) = (self.cpu_at_start?, cpu_times()?);
        let total = b.total.checked_sub(a.total).filter(|t| *t > 0)?;
        Some(b.busy.saturating_sub(a.busy) as f64 / total as f64)
    }

    /// Stops and joins the threads.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Saturator {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_threads_run_and_stop() {
        let mut s = Saturator::with_threads(2).unwrap();
        assert_eq!(s.threads(), 2);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while s.spins() < 4 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(s.spins() >= 4, "busy threads did not run");
        s.stop();
        assert_eq!(s.threads(), 0);
        let after = s.spins();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(s.spins(), after, "threads still running after stop");
    }
}
