//! Revocation of denied connections, kernel side: read the conntrack table, let
//! `palisade_netpol::revoke` judge each entry against the payload just applied, delete the
//! denied ones.
//!
//! ```text
//!  revoke_denied(conntrack, payload, local pods)
//!    ├ Tracer::new(payload)                 the rules now in force
//!    ├ conntrack -L -f ipv4|ipv6            every entry (parse_conntrack)
//!    ├ ip -j addr show                      the node's addresses (INPUT vs FORWARD)
//!    ├ revoke::denied(...)                  pure: only entries touching a local pod
//!    └ conntrack -D -f F -p P -s -d --sport --dport   one per denied entry (original tuple)
//! ```
//!
//! The `conntrack` tool (conntrack-tools) does the netlink work; the agent image ships it.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use palisade_netpol::compile::Protocol;
use palisade_netpol::revoke::{self, CtEntry, RevokeContext};
use palisade_netpol::trace::Tracer;
use palisade_netpol::{Family, Payload};
use serde_json::Value;

use crate::DataplaneError;

/// Parses `conntrack -L` output: one entry per line, the first `src= dst= sport= dport=` the
/// original tuple, the second the reply tuple. Lines of other protocols (ICMP has no ports)
/// or that do not parse are skipped.
pub fn parse_conntrack(text: &str) -> Vec<CtEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<CtEntry> {
    let mut words = line.split_whitespace();
    let proto = Protocol::from_kernel(words.next()?)?;
    let mut addrs: Vec<IpAddr> = Vec::with_capacity(4);
    let mut ports: Vec<u16> = Vec::with_capacity(4);
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            continue;
        };
        match k {
            "src" | "dst" if addrs.len() < 4 => addrs.push(v.parse().ok()?),
            "sport" | "dport" if ports.len() < 4 => ports.push(v.parse().ok()?),
            _ => {}
        }
    }
    if addrs.len() != 4 || ports.len() != 4 {
        return None;
    }
    Some(CtEntry {
        proto,
        orig_src: addrs[0],
        orig_dst: addrs[1],
        orig_sport: ports[0],
        orig_dport: ports[1],
        reply_src: addrs[2],
        reply_dst: addrs[3],
        reply_sport: ports[2],
        reply_dport: ports[3],
    })
}

/// Parses `ip -j addr show`: every local address of every interface.
pub fn parse_addresses(json: &str) -> BTreeSet<IpAddr> {
    let v: Value = serde_json::from_str(json).unwrap_or(Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| {
            l.get("addr_info")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .filter_map(|a| a.get("local").and_then(Value::as_str))
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The conntrack table and the node's addresses (the kernel, or a fake in tests).
pub trait Conntrack: Send + Sync {
    /// Every TCP/UDP/SCTP entry of `family`.
    fn entries(&self, family: Family) -> Result<Vec<CtEntry>, DataplaneError>;
    /// Deletes the entry with `e`'s original tuple; `false` when it was already gone.
    fn delete(&self, family: Family, e: &CtEntry) -> Result<bool, DataplaneError>;
    /// Deletes every entry of `entries` (original tuples); per entry, in order, whether it
    /// was still there. The netlink backend batches them; the default deletes one by one.
    fn delete_all(
        &self,
        family: Family,
        entries: &[&CtEntry],
    ) -> Result<Vec<bool>, DataplaneError> {
        entries.iter().map(|e| self.delete(family, e)).collect()
    }
    /// The node's own addresses.
    fn local_addresses(&self) -> Result<BTreeSet<IpAddr>, DataplaneError>;
}

/// The node's addresses from `ip -j addr show` (inside `netns` when given).
pub(crate) fn ip_addresses(
    ip: &PathBuf,
    netns: Option<&str>,
) -> Result<BTreeSet<IpAddr>, DataplaneError> {
    let mut cmd = Command::new(ip);
    if let Some(ns) = netns {
        cmd.args(["netns", "exec", ns]).arg(ip);
    }
    let command = "ip -j addr show".to_string();
    let out = cmd
        .args(["-j", "addr", "show"])
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| DataplaneError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(DataplaneError::CommandFailed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            line: None,
            offending: None,
        });
    }
    Ok(parse_addresses(&String::from_utf8_lossy(&out.stdout)))
}

/// Runs `conntrack` and `ip` (optionally inside a named network namespace).
#[derive(Clone, Debug)]
pub struct KernelConntrack {
    netns: Option<String>,
    conntrack: PathBuf,
    ip: PathBuf,
}

impl KernelConntrack {
    /// Uses `conntrack` and `ip` from the PATH (or /usr/sbin, /sbin).
    pub fn detect() -> Result<Self, DataplaneError> {
        Self::build(None)
    }

    /// The same, inside network namespace `netns` (tests, the lab).
    pub fn in_netns(netns: &str) -> Result<Self, DataplaneError> {
        Self::build(Some(netns.to_string()))
    }

    fn build(netns: Option<String>) -> Result<Self, DataplaneError> {
        Ok(KernelConntrack {
            netns,
            conntrack: crate::kernel::require("conntrack")?,
            ip: crate::kernel::require("ip")?,
        })
    }

    /// Runs `prog args`; returns (success, stdout, stderr).
    fn run(&self, prog: &PathBuf, args: &[&str]) -> Result<(bool, String, String), DataplaneError> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new(&self.ip);
                c.args(["netns", "exec", ns.as_str()]).arg(prog);
                c
            }
            None => Command::new(prog),
        };
        let command = format!("{} {}", prog.display(), args.join(" "));
        let out = cmd
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| DataplaneError::Spawn { command, source })?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }

    fn failed(&self, args: &[&str], stderr: String) -> DataplaneError {
        DataplaneError::CommandFailed {
            command: format!("conntrack {}", args.join(" ")),
            status: "error".into(),
            stderr,
            line: None,
            offending: None,
        }
    }
}

fn family_flag(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

impl Conntrack for KernelConntrack {
    fn entries(&self, family: Family) -> Result<Vec<CtEntry>, DataplaneError> {
        let args = ["-L", "-f", family_flag(family)];
        let (ok, out, err) = self.run(&self.conntrack, &args)?;
        if !ok {
            return Err(self.failed(&args, err));
        }
        Ok(parse_conntrack(&out))
    }

    fn delete(&self, family: Family, e: &CtEntry) -> Result<bool, DataplaneError> {
        let (src, dst) = (e.orig_src.to_string(), e.orig_dst.to_string());
        let (sport, dport) = (e.orig_sport.to_string(), e.orig_dport.to_string());
        let args = [
            "-D",
            "-f",
            family_flag(family),
            "-p",
            e.proto.as_str(),
            "-s",
            &src,
            "-d",
            &dst,
            "--sport",
            &sport,
            "--dport",
            &dport,
        ];
        let (ok, _, err) = self.run(&self.conntrack, &args)?;
        if ok {
            return Ok(true);
        }
        // Exit status 1 with "0 flow entries have been deleted": already gone.
        if err.contains("0 flow entries") {
            return Ok(false);
        }
        Err(self.failed(&args, err))
    }

    fn local_addresses(&self) -> Result<BTreeSet<IpAddr>, DataplaneError> {
        ip_addresses(&self.ip, self.netns.as_deref())
    }
}

/// What one [`revoke_denied`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevokeReport {
    /// Entries read from the table.
    pub entries: usize,
    /// Entries the rules deny (all touch a local pod).
    pub denied: usize,
    /// Of those, the ones deleted (the others were gone already).
    pub deleted: usize,
    pub duration: Duration,
    /// The entries deleted (what [`sweep_resurrected`] looks for afterwards).
    pub revoked: Vec<CtEntry>,
}

/// When [`sweep_resurrected`] looks again, after the revocation: 0.1 s, 0.4 s and 1 s after
/// it (the pauses between the looks).
pub const RESURRECTION_SWEEPS: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(300),
    Duration::from_millis(600),
];

/// Deletes, at each pause of `pauses` (blocking the calling thread), the entries that a flow
/// of `revoked` came back as in the reverse direction (see
/// [`palisade_netpol::revoke::resurrected`]): a UDP answer sent after its request's entry
/// was deleted. Returns how many were deleted. An answer sent after the last pause is not
/// caught (docs/security.md says so).
pub fn sweep_resurrected(
    ct: &dyn Conntrack,
    family: Family,
    revoked: &[CtEntry],
    pauses: &[Duration],
) -> Result<usize, DataplaneError> {
    if revoked.is_empty() {
        return Ok(0);
    }
    let mut deleted = 0;
    for pause in pauses {
        std::thread::sleep(*pause);
        let entries = ct.entries(family)?;
        let back = revoke::resurrected(revoked, &entries);
        if !back.is_empty() {
            deleted += ct
                .delete_all(family, &back)?
                .into_iter()
                .filter(|d| *d)
                .count();
        }
    }
    Ok(deleted)
}

/// Deletes the conntrack entries of `payload`'s family that its rules deny and that touch one
/// of `ctx.local_pods` (`ctx.local_addrs` is filled from the kernel here). Flows the rules
/// allow are never touched. A payload the tracer cannot read is an error and deletes nothing.
pub fn revoke_denied(
    ct: &dyn Conntrack,
    payload: &Payload,
    mut ctx: RevokeContext,
) -> Result<RevokeReport, DataplaneError> {
    let start = Instant::now();
    let tracer = Tracer::new(payload).map_err(|e| DataplaneError::Revoke(e.to_string()))?;
    let family = payload.family;
    ctx.local_pods.retain(|ip| family.contains(*ip));
    if ctx.local_pods.is_empty() {
        return Ok(RevokeReport {
            duration: start.elapsed(),
            ..Default::default()
        });
    }
    ctx.local_addrs = ct.local_addresses()?;
    let entries = ct.entries(family)?;
    let denied = revoke::denied(&tracer, &ctx, &entries)
        .map_err(|e| DataplaneError::Revoke(e.to_string()))?;
    let mut report = RevokeReport {
        entries: entries.len(),
        denied: denied.len(),
        ..Default::default()
    };
    let deleted = ct.delete_all(family, &denied)?;
    for (e, gone) in denied.iter().zip(deleted) {
        if gone {
            report.deleted += 1;
            report.revoked.push((*e).clone());
        }
    }
    report.duration = start.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_conntrack_listing() {
        let text = "\
tcp      6 431999 ESTABLISHED src=10.9.2.20 dst=10.96.0.1 sport=45678 dport=8080 src=10.9.2.10 dst=10.9.2.20 sport=80 dport=45678 [ASSURED] mark=0 use=1
udp      17 29 src=10.9.2.20 dst=10.9.2.10 sport=5000 dport=9000 [UNREPLIED] src=10.9.2.10 dst=10.9.2.20 sport=9000 dport=5000 mark=0 use=1
icmp     1 29 src=10.9.2.20 dst=10.9.2.10 type=8 code=0 id=3 src=10.9.2.10 dst=10.9.2.20 type=0 code=0 id=3 mark=0 use=1
sctp     132 3 ESTABLISHED src=fd00::1 dst=fd00::2 sport=1 dport=2 src=fd00::2 dst=fd00::1 sport=2 dport=1 mark=0 use=1
tcp      6 1 ESTABLISHED src=10.0.0.1 dst=garbage sport=1 dport=2
nonsense
";
        let e = parse_conntrack(text);
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].orig_dst.to_string(), "10.96.0.1");
        assert_eq!(e[0].reply_src.to_string(), "10.9.2.10");
        assert_eq!(e[0].filter_view().2, 80);
        assert_eq!(e[1].proto, Protocol::Udp);
        assert_eq!(e[2].proto, Protocol::Sctp);
        assert_eq!(e[2].orig_src.to_string(), "fd00::1");
    }

    #[test]
    fn parses_addresses() {
        let j = r#"[{"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1"}]},
                    {"ifname":"eth0","addr_info":[{"local":"10.0.0.1"},{"local":"fd00::1"}]}]"#;
        let a = parse_addresses(j);
        assert_eq!(a.len(), 3);
        assert!(parse_addresses("not json").is_empty());
    }
}
