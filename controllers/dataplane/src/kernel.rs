//! The real executor: `ipset` and `iptables-restore` / `iptables-save` subprocesses
//! (`ip6tables-restore` / `ip6tables-save` for an IPv6 executor: one executor per family).
//!
//! Apply order (never a window where an isolated pod is open):
//!
//! 1. `ipset -exist restore`: create missing sets and fill them; replace the members of
//!    changed sets through a temporary set + `swap` (atomic per set). Sets are named by what
//!    they select, so new members are always correct for any rule that references them.
//! 2. `iptables-restore -w 5 --noflush`: one transaction with all our chains (`:C - [0:0]`
//!    flushes only ours), hook fix-ups in the built-in chains (`-D` by rule text, `-I … 1`),
//!    and `:S - [0:0]` + `-X S` for stale chains of ours. Skipped when the kernel already
//!    has exactly this (compared against `iptables-save`, whose format the renderer matches).
//! 3. `ipset destroy` for our sets no rule references any more.
//!
//! The executor remembers the last payload it applied. A *different* payload is diffed
//! against that memory (pod churn → only the changed sets are swapped, iptables untouched);
//! the *same* payload again (the agent's periodic resync) reads the kernel back and repairs
//! any drift. Any failure forgets the memory, so the next apply re-reads the kernel.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use palisade_netpol::compile::{IpSet, SetKind, SetMember};
use palisade_netpol::render::{ipset_create_script, ipset_swap_script};
use palisade_netpol::{names, Family, Payload};

use crate::observe::{
    error_line, parse_ipset_save, parse_iptables_save, plan_iptables, ObservedFilter, ObservedSet,
};
use crate::{ApplyReport, DataplaneError, Executor};

/// Environment variable that overrides backend detection (`nft` or `legacy`).
pub const BACKEND_ENV: &str = "PALISADE_IPTABLES_BACKEND";

/// Which iptables flavour the executor drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft-restore` / `iptables-nft-save`.
    Nft,
    /// `iptables-legacy-restore` / `iptables-legacy-save`.
    Legacy,
    /// Plain `iptables-restore` / `iptables-save` (whatever the system links them to).
    System,
}

#[derive(Clone, Debug)]
struct Tools {
    restore: PathBuf,
    save: PathBuf,
    ipset: PathBuf,
    /// `ip`, to run commands in a named network namespace.
    ip: Option<PathBuf>,
}

impl Backend {
    /// The `--iptables-backend` spelling that selects this backend again (`auto` for the
    /// system's plain tools), e.g. to give an IPv6 executor the IPv4 executor's choice.
    pub fn as_flag(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
            Backend::System => "auto",
        }
    }
}

/// Applies payloads of one address family with the kernel tools, in the current network
/// namespace or in a named one (`ip netns exec`). The sets of both families share one ipset
/// namespace: an executor only ever creates, changes or destroys sets of its own family.
#[derive(Debug)]
pub struct KernelExecutor {
    tools: Tools,
    backend: Backend,
    family: Family,
    netns: Option<String>,
    /// The last payload applied successfully.
    last: Mutex<Option<Arc<Payload>>>,
}

const SEARCH_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin"];

/// Finds an executable in PATH or the usual sbin directories.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SEARCH_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub(crate) fn require(name: &str) -> Result<PathBuf, DataplaneError> {
    which(name).ok_or_else(|| DataplaneError::BinaryNotFound {
        tool: name.to_string(),
    })
}

impl KernelExecutor {
    /// Detects the tools for the current network namespace; the backend comes from
    /// `PALISADE_IPTABLES_BACKEND` (`nft` | `legacy`) or is auto-detected.
    pub fn detect() -> Result<Self, DataplaneError> {
        let wanted = std::env::var(BACKEND_ENV).unwrap_or_default();
        Self::detect_with(&wanted)
    }

    /// Like [`KernelExecutor::detect`] with an explicit backend: `auto` (or empty), `nft`,
    /// `legacy`. The environment variable, when set, still wins over `auto`.
    pub fn detect_with(backend: &str) -> Result<Self, DataplaneError> {
        Self::build(backend, None, Family::V4)
    }

    /// Detects the tools and runs every command inside the named network namespace
    /// (`ip netns exec NAME ...`). For tests, benchmarks and the lab.
    pub fn detect_in_netns(netns: &str, backend: &str) -> Result<Self, DataplaneError> {
        Self::build(backend, Some(netns.to_string()), Family::V4)
    }

    /// An executor for `family` (IPv6: the `ip6tables` tools), optionally inside a named
    /// network namespace. `backend` as for [`KernelExecutor::detect_with`].
    pub fn for_family(
        family: Family,
        backend: &str,
        netns: Option<&str>,
    ) -> Result<Self, DataplaneError> {
        Self::build(backend, netns.map(str::to_string), family)
    }

    /// The address family this executor applies.
    pub fn family(&self) -> Family {
        self.family
    }

    fn build(backend: &str, netns: Option<String>, family: Family) -> Result<Self, DataplaneError> {
        let env = std::env::var(BACKEND_ENV).unwrap_or_default();
        let wanted = match backend.trim() {
            "" | "auto" => env.trim().to_string(),
            other => other.to_string(),
        };
        let ipset = require("ipset")?;
        let ip = if netns.is_some() {
            Some(require("ip")?)
        } else {
            which("ip")
        };
        let pair = |prefix: &str| -> Option<(PathBuf, PathBuf)> {
            Some((
                which(&format!("{prefix}-restore"))?,
                which(&format!("{prefix}-save"))?,
            ))
        };
        let tool = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let nft = pair(&format!("{tool}-nft"));
        let legacy = pair(&format!("{tool}-legacy"));
        let mut exec = KernelExecutor {
            tools: Tools {
                restore: PathBuf::new(),
                save: PathBuf::new(),
                ipset,
                ip,
            },
            backend: Backend::System,
            family,
            netns,
            last: Mutex::new(None),
        };
        let (backend, (restore, save)) = match wanted.as_str() {
            "" | "auto" => match (nft, legacy) {
                (Some(n), Some(l)) => {
                    // Prefer the backend whose tables are in use (like iptables-wrapper):
                    // ours first, then anyone's rules; nft on a tie.
                    let score = |save: &Path| {
                        exec.run(save, &[], None)
                            .map(|out| {
                                let ours = out.matches("PALISADE-").count();
                                let rules = out.lines().filter(|l| l.starts_with("-A ")).count();
                                (ours, rules)
                            })
                            .unwrap_or((0, 0))
                    };
                    if score(&l.1) > score(&n.1) {
                        (Backend::Legacy, l)
                    } else {
                        (Backend::Nft, n)
                    }
                }
                (Some(n), None) => (Backend::Nft, n),
                (None, Some(l)) => (Backend::Legacy, l),
                (None, None) => (
                    Backend::System,
                    (
                        require(&format!("{tool}-restore"))?,
                        require(&format!("{tool}-save"))?,
                    ),
                ),
            },
            "nft" => (
                Backend::Nft,
                nft.ok_or_else(|| DataplaneError::BinaryNotFound {
                    tool: format!("{tool}-nft-restore"),
                })?,
            ),
            "legacy" => (
                Backend::Legacy,
                legacy.ok_or_else(|| DataplaneError::BinaryNotFound {
                    tool: format!("{tool}-legacy-restore"),
                })?,
            ),
            other => return Err(DataplaneError::InvalidBackend(other.to_string())),
        };
        exec.backend = backend;
        exec.tools.restore = restore;
        exec.tools.save = save;
        tracing::info!(
            ?backend,
            ?family,
            restore = %exec.tools.restore.display(),
            netns = exec.netns.as_deref().unwrap_or("(current)"),
            "iptables backend selected"
        );
        Ok(exec)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Forgets the last applied payload: the next apply reads the kernel back.
    pub fn invalidate(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn command_line(&self, prog: &Path, args: &[&str]) -> String {
        let mut s = String::new();
        if let Some(ns) = &self.netns {
            s.push_str(&format!("ip netns exec {ns} "));
        }
        s.push_str(&prog.display().to_string());
        for a in args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    /// Runs a program (in the netns, if any), feeding `input` on stdin; returns stdout.
    fn run(
        &self,
        prog: &Path,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, DataplaneError> {
        let command = self.command_line(prog, args);
        let mut cmd = match (&self.netns, &self.tools.ip) {
            (Some(ns), Some(ip)) => {
                let mut c = Command::new(ip);
                c.args(["netns", "exec", ns.as_str()]).arg(prog);
                c
            }
            _ => Command::new(prog),
        };
        cmd.args(args)
            .env("LC_ALL", "C")
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| DataplaneError::Spawn {
            command: command.clone(),
            source,
        })?;
        // Feed stdin from another thread so a chatty child cannot dead-lock us.
        let output = std::thread::scope(|s| {
            if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
                s.spawn(move || {
                    let _ = stdin.write_all(text.as_bytes());
                });
            }
            child.wait_with_output()
        })
        .map_err(|source| DataplaneError::Spawn {
            command: command.clone(),
            source,
        })?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let line = input.and_then(|_| error_line(&stderr));
        let offending = line.and_then(|n| {
            input
                .and_then(|t| t.lines().nth(n.saturating_sub(1)))
                .map(str::to_string)
        });
        if let (Some(n), Some(text)) = (line, input) {
            let lines: Vec<&str> = text.lines().collect();
            let from = n.saturating_sub(3);
            let to = (n + 2).min(lines.len());
            let context: Vec<String> = (from..to)
                .map(|i| {
                    format!(
                        "{:>6}{} {}",
                        i + 1,
                        if i + 1 == n { ">" } else { ":" },
                        lines[i]
                    )
                })
                .collect();
            tracing::error!(%command, line = n, "restore input rejected:\n{}", context.join("\n"));
        }
        Err(DataplaneError::CommandFailed {
            command,
            status: output.status.to_string(),
            stderr,
            line,
            offending,
        })
    }

    /// Our sets of this executor's family, as the kernel holds them.
    fn observe_sets(&self) -> Result<BTreeMap<String, ObservedSet>, DataplaneError> {
        let out = self.run(&self.tools.ipset, &["save"], None)?;
        let mut sets = parse_ipset_save(&out);
        sets.retain(|name, _| names::set_family(name) == Some(self.family));
        Ok(sets)
    }

    fn ipset_restore(&self, script: &str) -> Result<(), DataplaneError> {
        self.run(&self.tools.ipset, &["-exist", "restore"], Some(script))
            .map(|_| ())
    }

    fn apply_locked(
        &self,
        p: &Payload,
        last: Option<&Payload>,
        report: &mut ApplyReport,
    ) -> Result<bool, DataplaneError> {
        // The same payload again is a resync: read the kernel back.
        let verify = last.is_none_or(|l| l == p);
        report.verified = verify;

        // 1. Sets.
        let t = Instant::now();
        // A read-back reads the filter table on another thread meanwhile (the sets script
        // below never touches it, so it reads what it would read after): the first apply
        // after a start waits for one `*-save` process instead of two in a row.
        let mut filter_read: Option<Result<String, DataplaneError>> = None;
        // What the kernel holds: read back, or (between resyncs) the last payload's sets.
        let observed: BTreeMap<String, ObservedSet>;
        let current: BTreeMap<&str, SetView<'_>> = match (verify, last) {
            (false, Some(l)) => l
                .set_specs
                .iter()
                .map(|s| {
                    let view = SetView {
                        kind: Some(s.kind),
                        kind_text: s.kind.as_str(),
                        members: &s.members,
                        unparsed: false,
                    };
                    (s.name.as_str(), view)
                })
                .collect(),
            _ => {
                let (sets, filter) = std::thread::scope(|s| {
                    let filter = s.spawn(|| self.run(&self.tools.save, &["-t", "filter"], None));
                    let sets = self.observe_sets();
                    let filter = filter
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                    (sets, filter)
                });
                filter_read = Some(filter);
                observed = sets?;
                observed
                    .iter()
                    .map(|(n, o)| {
                        let view = SetView {
                            kind: o.kind,
                            kind_text: &o.kind_text,
                            members: &o.members,
                            unparsed: o.unparsed,
                        };
                        (n.as_str(), view)
                    })
                    .collect()
            }
        };
        let mut script = String::new();
        // Temp sets this script creates and destroys itself (not stale afterwards).
        let mut swapped = std::collections::BTreeSet::new();
        for set in &p.set_specs {
            match current.get(set.name.as_str()) {
                None => {
                    ipset_create_script(&mut script, set);
                    report.sets_created += 1;
                }
                Some(cur) if cur.kind != Some(set.kind) => {
                    return Err(DataplaneError::SetConflict {
                        name: set.name.clone(),
                        found: cur.kind_text.to_string(),
                        want: set.kind.as_str().to_string(),
                    });
                }
                Some(cur) if cur.unparsed || *cur.members != set.members => {
                    if !cur.unparsed && delta_script(&mut script, set, cur.members) {
                        report.sets_patched += 1;
                    } else {
                        ipset_swap_script(&mut script, set);
                        swapped.insert(palisade_netpol::names::temp_set_name(&set.name));
                    }
                    report.sets_updated += 1;
                }
                Some(_) => {}
            }
        }
        if !script.is_empty() {
            self.ipset_restore(&script)?;
        }
        report.ipset_duration = t.elapsed();

        // 2. Chains, hooks, stale chains: one iptables-restore transaction that rewrites
        //    only the chains that differ. Between resyncs the kernel is assumed to hold the
        //    last payload; a resync (or the first apply) reads it back.
        let t = Instant::now();
        let rules_unchanged =
            !verify && last.is_some_and(|l| l.iptables_restore == p.iptables_restore);
        if !rules_unchanged {
            let observed = match (verify, last) {
                (false, Some(l)) => ObservedFilter::assumed(l),
                _ => parse_iptables_save(&match filter_read.take() {
                    Some(read) => read?,
                    None => self.run(&self.tools.save, &["-t", "filter"], None)?,
                }),
            };
            let desired = p.chain_rules();
            let plan = plan_iptables(&desired, &p.hooks, &observed);
            report.warnings.extend(plan.warnings.iter().cloned());
            if !plan.up_to_date {
                let text = plan.restore_text(&desired);
                self.run(&self.tools.restore, &["-w", "5", "--noflush"], Some(&text))?;
                report.iptables_applied = true;
                report.chains_written = plan.changed_chains.len();
                report.chains_deleted = plan.stale_chains.len();
                report.hooks_fixed = plan.hooks_fixed;
            }
        }
        report.iptables_duration = t.elapsed();

        // 3. Stale sets (nothing of ours references them any more).
        let stale: Vec<&str> = current
            .keys()
            .copied()
            .filter(|n| !p.sets.contains(*n) && !swapped.contains(*n))
            .collect();
        let mut clean = true;
        if !stale.is_empty() {
            let script: String = stale.iter().map(|n| format!("destroy {n}\n")).collect();
            if self.ipset_restore(&script).is_err() {
                // One at a time, so one busy set does not keep the others.
                for n in &stale {
                    match self.run(&self.tools.ipset, &["destroy", n], None) {
                        Ok(_) => report.sets_destroyed += 1,
                        Err(e) => {
                            clean = false;
                            report
                                .warnings
                                .push(format!("stale set {n} not destroyed: {e}"));
                        }
                    }
                }
            } else {
                report.sets_destroyed = stale.len();
            }
        }
        Ok(clean)
    }
}

impl Executor for KernelExecutor {
    fn apply(&self, p: &Payload) -> Result<ApplyReport, DataplaneError> {
        self.apply_inner(p, || Arc::new(p.clone()))
    }

    fn apply_shared(&self, p: Arc<Payload>) -> Result<ApplyReport, DataplaneError> {
        let keep = p.clone();
        self.apply_inner(&p, move || keep)
    }
}

impl KernelExecutor {
    /// Applies `p`; on success remembers it as `keep()` (the caller's `Arc`, or a copy).
    fn apply_inner(
        &self,
        p: &Payload,
        keep: impl FnOnce() -> Arc<Payload>,
    ) -> Result<ApplyReport, DataplaneError> {
        if p.family != self.family {
            return Err(DataplaneError::WrongFamily {
                executor: self.family,
                payload: p.family,
            });
        }
        let start = Instant::now();
        let mut guard = self.last.lock().unwrap_or_else(|e| e.into_inner());
        // Forget first: if anything below fails, the next apply re-reads the kernel.
        let last = guard.take();
        let mut report = ApplyReport::default();
        let clean = self.apply_locked(p, last.as_deref(), &mut report)?;
        report.changed = report.sets_created + report.sets_updated + report.sets_destroyed > 0
            || report.iptables_applied;
        report.total_duration = start.elapsed();
        for w in &report.warnings {
            tracing::warn!("{w}");
        }
        if clean {
            *guard = Some(keep());
        }
        Ok(report)
    }
}

/// A set as the kernel holds it (borrowed from a read-back or from the last payload).
struct SetView<'a> {
    kind: Option<SetKind>,
    kind_text: &'a str,
    members: &'a std::collections::BTreeSet<SetMember>,
    unparsed: bool,
}

/// Writes per-element `del`/`add` lines that turn `current` into `set`'s members, when that
/// is both safe and smaller than a swap. Returns false (nothing written) otherwise.
///
/// Safe for hash:ip and hash:ip,port: whether a packet matches depends on exactly one element,
/// and each `add`/`del` is atomic, so every packet sees either the old or the new answer —
/// the same guarantee `swap` gives. Not for hash:net with `nomatch`, where the answer depends
/// on the most specific of several elements: those are always swapped.
fn delta_script(
    out: &mut String,
    set: &IpSet,
    current: &std::collections::BTreeSet<SetMember>,
) -> bool {
    if set.kind == SetKind::HashNet {
        return false;
    }
    let removed: Vec<&SetMember> = current.difference(&set.members).collect();
    let added: Vec<&SetMember> = set.members.difference(current).collect();
    if removed.len() + added.len() >= set.members.len().max(1) {
        return false;
    }
    use std::fmt::Write as _;
    for m in removed {
        let _ = writeln!(out, "del {} {m}", set.name);
    }
    for m in added {
        let _ = writeln!(out, "add {} {m}", set.name);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn set(kind: SetKind, members: &[&str]) -> IpSet {
        IpSet {
            name: "PAL-X".into(),
            kind,
            family: palisade_netpol::Family::V4,
            identity: String::new(),
            members: members
                .iter()
                .filter_map(|m| SetMember::parse(kind, m))
                .collect(),
        }
    }

    #[test]
    fn small_changes_of_independent_sets_are_patched() {
        let old = set(SetKind::HashIp, &["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        let new = set(SetKind::HashIp, &["10.0.0.1", "10.0.0.2", "10.0.0.4"]);
        let mut out = String::new();
        assert!(delta_script(&mut out, &new, &old.members));
        assert_eq!(out, "del PAL-X 10.0.0.3\nadd PAL-X 10.0.0.4\n");
        // Replacing most members: a swap is cheaper.
        let other = set(SetKind::HashIp, &["10.9.9.9"]);
        assert!(!delta_script(&mut String::new(), &other, &old.members));
        // hash:net (nomatch semantics) is always swapped.
        let net = set(SetKind::HashNet, &["10.0.0.0/8", "10.1.0.0/16 nomatch"]);
        assert!(!delta_script(&mut String::new(), &net, &BTreeSet::new()));
    }
}
