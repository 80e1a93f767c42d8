//! Throw-away network namespaces for tests, benchmarks and demos.
//!
//! [`Netns::create`] makes `PREFIX-<pid>-<n>` with `ip netns add`; dropping the guard runs
//! `ip netns del`, which also frees every ipset and iptables rule inside it. Nothing here
//! touches the namespace the caller runs in.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::DataplaneError;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

/// Whether this process runs as root (uid 0), from `/proc/self/status`.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Why a network-namespace test cannot run here: not root, or one of `tools` missing (each
/// is run with `-V`). `None`: it can.
pub fn lab_skip_reason(tools: &[&str]) -> Option<String> {
    if !is_root() {
        return Some("needs root".into());
    }
    tools
        .iter()
        .find(|tool| {
            Command::new(tool)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
        .map(|tool| format!("{tool} not installed"))
}

impl Netns {
    /// Creates a fresh namespace named `PREFIX-<pid>-<n>`.
    pub fn create(prefix: &str) -> Result<Netns, DataplaneError> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        Ok(Netns { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `prog args...` inside the namespace; returns stdout.
    pub fn exec(&self, prog: &str, args: &[&str]) -> Result<String, DataplaneError> {
        let mut full = vec!["netns", "exec", self.name.as_str(), prog];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a shell snippet inside the namespace; returns stdout.
    pub fn sh(&self, script: &str) -> Result<String, DataplaneError> {
        self.exec("sh", &["-c", script])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            tracing::warn!(netns = %self.name, error = %e, "could not delete network namespace");
        }
    }
}

fn run(prog: &str, args: &[&str]) -> Result<String, DataplaneError> {
    let command = format!("{prog} {}", args.join(" "));
    let out = Command::new(prog)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| DataplaneError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(DataplaneError::CommandFailed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            line: None,
            offending: None,
        })
    }
}
