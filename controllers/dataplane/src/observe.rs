//! Reading the kernel's state back (`iptables-save -t filter`, `ipset save`) and planning the
//! iptables transaction. Pure functions over text, unit-tested without a kernel.

use std::collections::{BTreeMap, BTreeSet};

use palisade_netpol::compile::{Hook, SetKind, SetMember};
use palisade_netpol::names::{is_ours_chain, is_ours_set};
use palisade_netpol::Payload;

/// Built-in chains of the filter table.
const BUILTINS: [&str; 3] = ["FORWARD", "INPUT", "OUTPUT"];

/// The filter table as `iptables-save` printed it.
#[derive(Debug, Default)]
pub(crate) struct ObservedFilter {
    /// Our chains (declared ones included, even if empty) → rule lines.
    pub ours: BTreeMap<String, Vec<String>>,
    /// Built-in chains → rule lines.
    pub builtin: BTreeMap<String, Vec<String>>,
    /// Our chains referenced from someone else's (non built-in) chain.
    pub foreign_refs: BTreeSet<String>,
}

impl ObservedFilter {
    /// What the kernel holds if nobody touched it since `last` was applied: its chains and
    /// our hooks in place. Used between resyncs to avoid reading the whole table back.
    pub fn assumed(last: &Payload) -> Self {
        let mut builtin: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for h in &last.hooks {
            builtin
                .entry(h.builtin.to_string())
                .or_default()
                .push(Payload::hook_rule(h));
        }
        ObservedFilter {
            ours: last.chain_rules(),
            builtin,
            foreign_refs: BTreeSet::new(),
        }
    }
}

/// The jump (`-j`/`-g`) target of a rule line, if it is not a built-in target.
pub(crate) fn jump_target(line: &str) -> Option<&str> {
    let mut words = line.split_whitespace();
    let mut target = None;
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" {
            target = words.next();
        }
    }
    target
}

pub(crate) fn parse_iptables_save(text: &str) -> ObservedFilter {
    let mut out = ObservedFilter::default();
    let mut in_filter = false;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(table) = line.strip_prefix('*') {
            in_filter = table == "filter";
            continue;
        }
        if !in_filter {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if is_ours_chain(name) {
                out.ours.entry(name.to_string()).or_default();
            }
            continue;
        }
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let chain = rest.split_whitespace().next().unwrap_or_default();
        if is_ours_chain(chain) {
            out.ours
                .entry(chain.to_string())
                .or_default()
                .push(line.to_string());
        } else if BUILTINS.contains(&chain) {
            out.builtin
                .entry(chain.to_string())
                .or_default()
                .push(line.to_string());
        } else if let Some(t) = jump_target(line).filter(|t| is_ours_chain(t)) {
            out.foreign_refs.insert(t.to_string());
        }
    }
    out
}

/// One of our sets as `ipset save` printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ObservedSet {
    pub kind: Option<SetKind>,
    pub kind_text: String,
    pub members: BTreeSet<SetMember>,
    /// Some member line did not parse (the set is then rewritten).
    pub unparsed: bool,
}

/// Our sets from `ipset save` output.
pub(crate) fn parse_ipset_save(text: &str) -> BTreeMap<String, ObservedSet> {
    let mut out: BTreeMap<String, ObservedSet> = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next()) {
            (Some("create"), Some(name)) if is_ours_set(name) => {
                let kind_text = w.next().unwrap_or_default().to_string();
                out.insert(
                    name.to_string(),
                    ObservedSet {
                        kind: SetKind::from_kernel(&kind_text),
                        kind_text,
                        members: BTreeSet::new(),
                        unparsed: false,
                    },
                );
            }
            (Some("add"), Some(name)) if is_ours_set(name) => {
                let Some(set) = out.get_mut(name) else {
                    continue;
                };
                let rest: Vec<&str> = w.collect();
                match set.kind.and_then(|k| SetMember::parse(k, &rest.join(" "))) {
                    Some(m) => {
                        set.members.insert(m);
                    }
                    None => set.unparsed = true,
                }
            }
            _ => {}
        }
    }
    out
}

/// The iptables transaction that takes the kernel from `observed` to the payload.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct IptablesPlan {
    /// Our chains whose rules differ (or that do not exist yet): rewritten.
    pub changed_chains: Vec<String>,
    /// Hook fix-ups and stale-chain deletions, after the rules.
    pub extra: Vec<String>,
    /// Kernel already matches the payload: no restore needed.
    pub up_to_date: bool,
    pub stale_chains: Vec<String>,
    pub hooks_fixed: usize,
    pub warnings: Vec<String>,
}

impl IptablesPlan {
    /// The `iptables-restore --noflush` input: only changed chains are declared (which
    /// flushes them) and refilled; unchanged chains are not touched at all.
    pub fn restore_text(&self, desired: &BTreeMap<String, Vec<String>>) -> String {
        let mut out = String::from("*filter\n");
        for c in &self.changed_chains {
            out.push(':');
            out.push_str(c);
            out.push_str(" - [0:0]\n");
        }
        for c in &self.changed_chains {
            for r in desired.get(c).into_iter().flatten() {
                out.push_str(r);
                out.push('\n');
            }
        }
        for l in &self.extra {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
        out
    }
}

pub(crate) fn plan_iptables(
    desired: &BTreeMap<String, Vec<String>>,
    hooks: &[Hook],
    observed: &ObservedFilter,
) -> IptablesPlan {
    let mut plan = IptablesPlan {
        changed_chains: desired
            .iter()
            .filter(|(chain, rules)| observed.ours.get(*chain) != Some(*rules))
            .map(|(chain, _)| chain.clone())
            .collect(),
        ..Default::default()
    };
    let mut up_to_date = plan.changed_chains.is_empty();

    // Hooks: exactly one jump to our chain, at position 1; no other jump into our chains
    // from a built-in chain.
    let mut deletes = Vec::new();
    let mut inserts = Vec::new();
    for builtin in BUILTINS {
        let lines = observed
            .builtin
            .get(builtin)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let hook = hooks.iter().find(|h| h.builtin == builtin);
        let ours: Vec<(usize, &String)> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| jump_target(l).is_some_and(is_ours_chain))
            .collect();
        let ok = match hook {
            Some(h) => ours.len() == 1 && ours[0].0 == 0 && *ours[0].1 == Payload::hook_rule(h),
            None => ours.is_empty(),
        };
        if ok {
            continue;
        }
        for (_, l) in &ours {
            deletes.push(l.replacen("-A ", "-D ", 1));
        }
        if let Some(h) = hook {
            inserts.push(format!("-I {} 1 -j {}", h.builtin, h.chain));
            plan.hooks_fixed += 1;
        }
    }
    if !deletes.is_empty() || !inserts.is_empty() {
        up_to_date = false;
    }
    plan.extra.extend(deletes);
    plan.extra.extend(inserts);

    // Stale chains of ours: flush and delete, unless someone else still jumps to them.
    let mut decls = Vec::new();
    let mut deletions = Vec::new();
    for chain in observed.ours.keys() {
        if desired.contains_key(chain) {
            continue;
        }
        if observed.foreign_refs.contains(chain) {
            plan.warnings.push(format!(
                "stale chain {chain} is still referenced by another component's rule; left in place"
            ));
            continue;
        }
        decls.push(format!(":{chain} - [0:0]"));
        deletions.push(format!("-X {chain}"));
        plan.stale_chains.push(chain.clone());
    }
    if !deletions.is_empty() {
        up_to_date = false;
    }
    plan.extra.extend(decls);
    plan.extra.extend(deletions);
    plan.up_to_date = up_to_date;
    plan
}

/// The 1-based input line an `iptables-restore` / `ipset restore` error points at
/// ("Error occurred at line: 4", "Error in line 3", "line 7 failed").
pub(crate) fn error_line(stderr: &str) -> Option<usize> {
    let lower = stderr.to_ascii_lowercase();
    let mut search = lower.as_str();
    while let Some(i) = search.find("line") {
        let after = &search[i + 4..];
        let digits: String = after
            .trim_start_matches([':', ' '])
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(n) = digits.parse() {
            return Some(n);
        }
        search = after;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_netpol::builders::*;
    use palisade_netpol::{compile, render, NodeConfig};

    fn payload() -> Payload {
        let st = cluster(
            vec![mk_node("n1", "10.244.1.0/24")],
            vec![],
            vec![mk_pod("a", "p", &[("app", "x")], "10.244.1.5", "n1")],
            vec![mk_policy(
                "a",
                "deny",
                serde_json::json!({"podSelector": {}}),
            )],
        );
        render(&compile(&st, &NodeConfig::new("n1")))
    }

    /// What `iptables-save` prints after the payload was applied, plus foreign content.
    fn saved(p: &Payload, forward_first: &str) -> String {
        let mut s = String::from("# Generated by iptables-save\n*nat\n:X - [0:0]\n-A X -j PAL-NOT-FILTER\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:FOREIGN - [0:0]\n");
        for c in &p.chains {
            s.push_str(&format!(":{c} - [0:0]\n"));
        }
        s.push_str(forward_first);
        s.push_str("-A FORWARD -j FOREIGN\n-A INPUT -j PALISADE-INPUT\n-A FOREIGN -j ACCEPT\n");
        for rules in p.chain_rules().values() {
            for r in rules {
                s.push_str(r);
                s.push('\n');
            }
        }
        s.push_str("COMMIT\n");
        s
    }

    #[test]
    fn applied_state_is_up_to_date() {
        let p = payload();
        let obs = parse_iptables_save(&saved(&p, "-A FORWARD -j PALISADE-FORWARD\n"));
        assert!(obs.builtin.contains_key("FORWARD"));
        let plan = plan_iptables(&p.chain_rules(), &p.hooks, &obs);
        assert!(plan.up_to_date, "{plan:?}");
        // What we assume between resyncs is the same.
        let assumed = plan_iptables(&p.chain_rules(), &p.hooks, &ObservedFilter::assumed(&p));
        assert!(assumed.up_to_date, "{assumed:?}");
        assert!(plan.extra.is_empty());
    }

    #[test]
    fn misplaced_and_duplicate_hooks_are_fixed() {
        let p = payload();
        let text = saved(
            &p,
            "-A FORWARD -j ACCEPT\n-A FORWARD -j PALISADE-FORWARD\n-A FORWARD -j PALISADE-FORWARD\n",
        );
        let plan = plan_iptables(&p.chain_rules(), &p.hooks, &parse_iptables_save(&text));
        assert!(!plan.up_to_date);
        assert!(plan.changed_chains.is_empty());
        assert_eq!(
            plan.extra,
            vec![
                "-D FORWARD -j PALISADE-FORWARD",
                "-D FORWARD -j PALISADE-FORWARD",
                "-I FORWARD 1 -j PALISADE-FORWARD"
            ]
        );
        assert_eq!(plan.hooks_fixed, 1);
    }

    #[test]
    fn missing_hooks_are_inserted() {
        let p = payload();
        let plan = plan_iptables(&p.chain_rules(), &p.hooks, &parse_iptables_save(""));
        assert_eq!(plan.changed_chains.len(), p.chains.len());
        let text = plan.restore_text(&p.chain_rules());
        assert!(
            text.starts_with("*filter\n:PAL-")
                && text.ends_with("-I INPUT 1 -j PALISADE-INPUT\nCOMMIT\n")
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("-A ")).count(),
            p.stats.rules
        );
        assert_eq!(
            plan.extra,
            vec![
                "-I FORWARD 1 -j PALISADE-FORWARD",
                "-I INPUT 1 -j PALISADE-INPUT"
            ]
        );
    }

    #[test]
    fn stale_chains_are_deleted_unless_referenced_by_others() {
        let p = payload();
        let text = saved(&p, "-A FORWARD -j PALISADE-FORWARD\n");
        let text = text.replacen(
            ":FOREIGN - [0:0]\n",
            ":FOREIGN - [0:0]\n:PAL-PI-OLD - [0:0]\n:PAL-PI-USED - [0:0]\n-A FOREIGN -j PAL-PI-USED\n",
            1,
        );
        let obs = parse_iptables_save(&text);
        let plan = plan_iptables(&p.chain_rules(), &p.hooks, &obs);
        assert_eq!(plan.stale_chains, vec!["PAL-PI-OLD"]);
        assert_eq!(plan.extra, vec![":PAL-PI-OLD - [0:0]", "-X PAL-PI-OLD"]);
        assert_eq!(plan.warnings.len(), 1);
        assert!(!plan.up_to_date);
    }

    #[test]
    fn ipset_save_is_read_for_our_sets_only() {
        let text = "create PAL-P4-A hash:ip family inet hashsize 1024 maxelem 262144 bucketsize 12 initval 0x1\n\
                    add PAL-P4-A 10.0.0.1\n\
                    create KUBE-X hash:ip family inet\nadd KUBE-X 1.1.1.1\n\
                    create PAL-B4-B hash:net family inet\nadd PAL-B4-B 10.0.0.0/8\nadd PAL-B4-B 10.1.0.0/16 nomatch\n\
                    create PAL-Z list:set size 8\nadd PAL-Z PAL-P4-A\n";
        let sets = parse_ipset_save(text);
        assert_eq!(
            sets.keys().collect::<Vec<_>>(),
            vec!["PAL-B4-B", "PAL-P4-A", "PAL-Z"]
        );
        assert_eq!(sets["PAL-B4-B"].members.len(), 2);
        assert!(sets["PAL-Z"].kind.is_none() && sets["PAL-Z"].unparsed);
    }

    #[test]
    fn error_lines_are_found() {
        assert_eq!(
            error_line("iptables-restore v1.8.9 (nf_tables): Set NOPE doesn't exist.\n\nError occurred at line: 4\nTry"),
            Some(4)
        );
        assert_eq!(error_line("ipset v7.17: Error in line 3: The set"), Some(3));
        assert_eq!(error_line("iptables-restore: line 12 failed"), Some(12));
        assert_eq!(error_line("no number here, line x"), None);
    }
}

#[cfg(test)]
mod partial_tests {
    use super::*;
    use palisade_netpol::builders::*;
    use palisade_netpol::{compile, render, NodeConfig};

    #[test]
    fn only_changed_chains_are_rewritten() {
        let mk = |port: u16| {
            let st = cluster(
                vec![mk_node("n1", "10.244.1.0/24")],
                vec![],
                vec![mk_pod("a", "p", &[("app", "x")], "10.244.1.5", "n1")],
                vec![
                    mk_policy(
                        "a",
                        "one",
                        serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}),
                    ),
                    mk_policy(
                        "a",
                        "two",
                        serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"port": port}]}]}),
                    ),
                ],
            );
            render(&compile(&st, &NodeConfig::new("n1")))
        };
        let (old, new) = (mk(443), mk(8443));
        let plan = plan_iptables(
            &new.chain_rules(),
            &new.hooks,
            &ObservedFilter::assumed(&old),
        );
        assert_eq!(plan.changed_chains.len(), 1, "{plan:?}");
        assert!(plan.changed_chains[0].starts_with("PAL-PI-"));
        assert!(plan.extra.is_empty() && !plan.up_to_date);
        let text = plan.restore_text(&new.chain_rules());
        assert_eq!(text.lines().filter(|l| l.starts_with('-')).count(), 2);
    }
}
