//! Render the IR into the two restore payloads.
//!
//! Rules are printed exactly the way `iptables-save` prints them back (both the nft and the
//! legacy backend): addresses, then `-p`, then the other matches in order, explicit `-m tcp`,
//! comments quoted only when needed. An executor can therefore tell "kernel already has this"
//! by comparing text, and re-applying an unchanged payload can be skipped entirely.
//!
//! The ipset payload fills each set through a temporary twin and `swap`s it in, so a set's
//! membership changes atomically (never empty in between):
//!
//! ```text
//! create PAL-P4-X hash:ip family inet hashsize 1024 maxelem 262144
//! create PAL-P4-X-T hash:ip family inet hashsize 1024 maxelem 262144
//! flush PAL-P4-X-T
//! add PAL-P4-X-T 10.244.1.5
//! swap PAL-P4-X-T PAL-P4-X
//! destroy PAL-P4-X-T
//! ```
//! It is meant for `ipset -exist restore`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::ir::{Compiled, Hook, IpSet, Match, Rule, Target};
use crate::names;
use crate::Family;

/// Creation options of every set (constant so `create -exist` never conflicts).
pub const SET_OPTIONS: &str = "hashsize 1024 maxelem 262144";

/// Statistics of a payload (for logs and metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PayloadStats {
    /// `-A` lines (rules) in the iptables payload.
    pub rules: usize,
    /// Chains we own (fixed ones included).
    pub chains: usize,
    pub sets: usize,
    /// Members over all sets.
    pub members: usize,
    /// Bytes of both payloads.
    pub bytes: usize,
}

/// Everything an executor applies, plus the names it owns (for stale cleanup).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    pub family: Family,
    /// Input for `ipset -exist restore` (see the module docs).
    pub ipset_restore: String,
    /// Input for `iptables-restore --noflush`: `*filter`, our chains (`:CHAIN - [0:0]`
    /// flushes only those), our rules, `COMMIT`. The hooks are added by the executor, which
    /// knows what the built-in chains currently hold (and which only rewrites the chains
    /// that differ from what the kernel has, see [`Payload::chain_rules`]).
    pub iptables_restore: String,
    /// Chains we own in this payload.
    pub chains: BTreeSet<String>,
    /// Sets we own in this payload.
    pub sets: BTreeSet<String>,
    /// The sets with their members, sorted by name.
    pub set_specs: Vec<IpSet>,
    /// Jumps from built-in chains to keep at position 1.
    pub hooks: Vec<Hook>,
    pub stats: PayloadStats,
}

impl Payload {
    /// The rule lines of each of our chains, in order, as `iptables-save` prints them
    /// (`-A CHAIN ...`).
    pub fn chain_rules(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = self
            .chains
            .iter()
            .map(|c| (c.clone(), Vec::new()))
            .collect();
        for line in self.iptables_restore.lines() {
            if let Some(rest) = line.strip_prefix("-A ") {
                let chain = rest.split(' ').next().unwrap_or_default();
                if let Some(v) = out.get_mut(chain) {
                    v.push(line.to_string());
                }
            }
        }
        out
    }

    /// The canonical jump line of a hook (`-A FORWARD -j PALISADE-FORWARD`).
    pub fn hook_rule(hook: &Hook) -> String {
        format!("-A {} -j {}", hook.builtin, hook.chain)
    }
}

/// Renders the IR. Deterministic: the same input always gives byte-identical payloads.
pub fn render(c: &Compiled) -> Payload {
    render_parts(c, None)
}

/// [`render`], optionally handing out each set's ipset text (for incremental updates).
pub(crate) fn render_parts(
    c: &Compiled,
    mut set_text: Option<&mut BTreeMap<String, String>>,
) -> Payload {
    let mut ipt = String::with_capacity(64 * 1024);
    let fam = match c.family {
        Family::V4 => "IPv4 (iptables)",
        Family::V6 => "IPv6 (ip6tables)",
    };
    let _ = writeln!(ipt, "# Palisade NetworkPolicy rules, filter table, {fam}.");
    for h in &c.hooks {
        let _ = writeln!(
            ipt,
            "# hook: {} -j {} (kept at position 1 by the executor)",
            h.builtin, h.chain
        );
    }
    ipt.push_str("*filter\n");
    for ch in &c.chains {
        let _ = writeln!(ipt, ":{} - [0:0]", ch.name);
    }
    let mut rules = 0;
    for ch in &c.chains {
        for r in &ch.rules {
            rule_line(&mut ipt, &ch.name, r);
            rules += 1;
        }
    }
    ipt.push_str("COMMIT\n");

    let mut ips = String::with_capacity(64 * 1024);
    let mut members = 0;
    for s in c.sets.values() {
        let start = ips.len();
        ipset_swap_script(&mut ips, s);
        if let Some(out) = set_text.as_deref_mut() {
            out.insert(s.name.clone(), ips[start..].to_string());
        }
        members += s.members.len();
    }

    let stats = PayloadStats {
        rules,
        chains: c.chains.len(),
        sets: c.sets.len(),
        members,
        bytes: ipt.len() + ips.len(),
    };
    Payload {
        family: c.family,
        ipset_restore: ips,
        iptables_restore: ipt,
        chains: c.chains.iter().map(|ch| ch.name.clone()).collect(),
        sets: c.sets.keys().cloned().collect(),
        set_specs: c.sets.values().cloned().collect(),
        hooks: c.hooks.clone(),
        stats,
    }
}

/// `create NAME TYPE family F OPTIONS`.
pub fn ipset_create_line(out: &mut String, set: &IpSet, name: &str) {
    let _ = writeln!(
        out,
        "create {name} {} family {} {SET_OPTIONS}",
        set.kind.as_str(),
        set.family.ipset_family()
    );
}

/// Fills `set` through its temporary twin and swaps it in (atomic membership change).
/// Creates the set if missing (with `-exist`).
pub fn ipset_swap_script(out: &mut String, set: &IpSet) {
    let temp = names::temp_set_name(&set.name);
    let _ = writeln!(out, "# {} {}", set.name, sanitize(&set.identity, 200));
    ipset_create_line(out, set, &set.name);
    ipset_create_line(out, set, &temp);
    let _ = writeln!(out, "flush {temp}");
    for m in &set.members {
        let _ = writeln!(out, "add {temp} {m}");
    }
    let _ = writeln!(out, "swap {temp} {}", set.name);
    let _ = writeln!(out, "destroy {temp}");
}

/// Creates `set` and adds its members directly (for a set that does not exist yet).
pub fn ipset_create_script(out: &mut String, set: &IpSet) {
    let _ = writeln!(out, "# {} {}", set.name, sanitize(&set.identity, 200));
    ipset_create_line(out, set, &set.name);
    for m in &set.members {
        let _ = writeln!(out, "add {} {m}", set.name);
    }
}

/// Replaces anything that is not printable ASCII, and quotes/backslashes, so text from API
/// objects can never break a restore line; truncates to `max` bytes.
pub fn sanitize(s: &str, max: usize) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect()
}

/// A comment argument as `iptables-save` prints it: bare when made of `[A-Za-z0-9_-]` only,
/// otherwise in double quotes.
fn quoted(s: &str) -> String {
    let clean = sanitize(s, 250);
    if !clean.is_empty()
        && clean
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        clean
    } else {
        format!("\"{clean}\"")
    }
}

fn rule_line(out: &mut String, chain: &str, r: &Rule) {
    let _ = write!(out, "-A {chain}");
    // A /0 address match matches everything and `iptables-save` leaves it out: print it the
    // same way, or every read-back would find the chain changed.
    for m in &r.matches {
        match m {
            Match::Src(n) if n.prefix() == 0 => {}
            Match::Src(n) => {
                let _ = write!(out, " -s {}/{}", n.network(), n.prefix());
            }
            Match::NotSrc(n) => {
                let _ = write!(out, " ! -s {}/{}", n.network(), n.prefix());
            }
            _ => {}
        }
    }
    for m in &r.matches {
        match m {
            Match::Dst(n) if n.prefix() == 0 => {}
            Match::Dst(n) => {
                let _ = write!(out, " -d {}/{}", n.network(), n.prefix());
            }
            Match::NotDst(n) => {
                let _ = write!(out, " ! -d {}/{}", n.network(), n.prefix());
            }
            _ => {}
        }
    }
    for m in &r.matches {
        if let Match::InIface(i) = m {
            let _ = write!(out, " -i {}", sanitize(i, 15));
        }
    }
    for m in &r.matches {
        match m {
            Match::Proto(p) => {
                let _ = write!(out, " -p {}", p.as_str());
            }
            Match::Icmp6Type(_) | Match::Icmp6Any => out.push_str(" -p ipv6-icmp"),
            _ => {}
        }
    }
    for m in &r.matches {
        match m {
            Match::Src(_)
            | Match::NotSrc(_)
            | Match::Dst(_)
            | Match::NotDst(_)
            | Match::InIface(_)
            | Match::Proto(_)
            | Match::Icmp6Any => {}
            Match::PhysdevIn(i) => {
                let _ = write!(out, " -m physdev --physdev-in {}", sanitize(i, 15));
            }
            Match::PhysdevOut(i) => {
                let _ = write!(
                    out,
                    " -m physdev --physdev-out {} --physdev-is-bridged",
                    sanitize(i, 15)
                );
            }
            Match::DPort(p, lo, hi) => {
                let _ = write!(out, " -m {} --dport {}", p.as_str(), port_range(*lo, *hi));
            }
            Match::MultiPort(ranges) => {
                let list: Vec<String> = ranges.iter().map(|(l, h)| port_range(*l, *h)).collect();
                let _ = write!(out, " -m multiport --dports {}", list.join(","));
            }
            Match::Set { name, dir } => {
                let _ = write!(out, " -m set --match-set {name} {}", dir.as_str());
            }
            Match::CtState(s) => {
                let _ = write!(out, " -m conntrack --ctstate {s}");
            }
            // iptables-save prints a host address without its prefix here.
            Match::RelatedNotOf(ip) => {
                let _ = write!(
                    out,
                    " -m conntrack --ctstate RELATED ! --ctorigsrc {ip} ! --ctreplsrc {ip}"
                );
            }
            Match::TcpNotSyn => out.push_str(" -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN"),
            Match::Mark { bit, negate } => {
                let neg = if *negate { "! " } else { "" };
                let _ = write!(out, " -m mark {neg}--mark {bit:#x}/{bit:#x}");
            }
            Match::SrcLocal => out.push_str(" -m addrtype --src-type LOCAL"),
            Match::Icmp6Type(t) => {
                let _ = write!(out, " -m icmp6 --icmpv6-type {t}");
            }
            Match::Comment(c) => {
                let _ = write!(out, " -m comment --comment {}", quoted(c));
            }
            Match::HashLimit {
                rate,
                burst,
                by_src,
                name,
            } => {
                let mode = if *by_src { "srcip" } else { "dstip" };
                let _ = write!(
                    out,
                    " -m hashlimit --hashlimit-upto {} --hashlimit-burst {burst} \
                     --hashlimit-mode {mode} --hashlimit-name {}",
                    sanitize(rate, 20).replace(' ', "_"),
                    sanitize(name, 15).replace(' ', "_")
                );
            }
        }
    }
    let _ = match &r.target {
        Target::Accept => write!(out, " -j ACCEPT"),
        Target::Drop => write!(out, " -j DROP"),
        Target::Return => write!(out, " -j RETURN"),
        Target::Jump(c) => write!(out, " -j {c}"),
        Target::Goto(c) => write!(out, " -g {c}"),
        Target::SetMark(bit) => write!(out, " -j MARK --set-xmark {bit:#x}/{bit:#x}"),
        Target::ClearMark(bit) => write!(out, " -j MARK --set-xmark 0x0/{bit:#x}"),
        Target::Nflog { prefix, group } => write!(
            out,
            " -j NFLOG --nflog-prefix {} --nflog-group {group}",
            quoted(&sanitize(prefix, 63))
        ),
    };
    out.push('\n');
}

fn port_range(lo: u16, hi: u16) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}:{hi}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_are_quoted_like_iptables_save() {
        assert_eq!(quoted("simple_name-1"), "simple_name-1");
        assert_eq!(quoted("ns/pod"), "\"ns/pod\"");
        assert_eq!(quoted("a \"b\"\nc"), "\"a _b__c\"");
        assert_eq!(quoted(""), "\"\"");
    }
}
