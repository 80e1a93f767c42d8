//! A packet tracer over the *rendered* payloads (after kube-proxy's `iptablestest`).
//!
//! It parses the `iptables-restore` and `ipset restore` text we render, checks that every
//! jump target and every referenced set exists, and walks a packet through the chains to a
//! verdict, emulating the matches we use (addresses, protocol and ports, `multiport`, `set`
//! with hash:ip / hash:net + nomatch / hash:ip,port, `conntrack`, `mark`, `addrtype`, the input
//! interface `-i` and the bridge port `physdev --physdev-in`, negations `!`) and the
//! targets (`ACCEPT`, `DROP`, `RETURN`, `MARK`, `-j`, `-g`). Unknown syntax is an error, so
//! the tests notice when the renderer emits something the tracer cannot vouch for.
//!
//! ```text
//! FORWARD (hook: -j PALISADE-FORWARD, policy ACCEPT) ─► rules … ─► Verdict + path
//! ```

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::str::FromStr;

use ipnetwork::IpNetwork;

use crate::ir::{Protocol, SetKind, SetMember};
use crate::{NetpolError, Payload};

/// Connection-tracking state of a traced packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtState {
    New,
    Established,
    Related,
    Invalid,
    /// Not tracked: what conntrack makes of neighbour discovery and MLD (ICMPv6 types
    /// 130–136 and 143 never create a connection).
    Untracked,
}

impl CtState {
    fn as_str(self) -> &'static str {
        match self {
            CtState::New => "NEW",
            CtState::Established => "ESTABLISHED",
            CtState::Related => "RELATED",
            CtState::Invalid => "INVALID",
            CtState::Untracked => "UNTRACKED",
        }
    }
}

/// A packet to trace.
#[derive(Clone, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Protocol,
    pub dport: u16,
    pub state: CtState,
    /// The source address is one of this host's (`addrtype --src-type LOCAL`).
    pub src_local: bool,
    /// An ICMPv6 message of this type (then `proto` and `dport` are ignored).
    pub icmp6_type: Option<u8>,
    /// The interface the packet entered the node from (`-i`); `None` matches no `-i IF`.
    pub in_iface: Option<String>,
    /// The bridge port the packet entered from (`--physdev-in`, br_netfilter).
    pub physdev_in: Option<String>,
    /// The bridge port the bridge forwards the packet out of (`--physdev-out`, FORWARD).
    pub physdev_out: Option<String>,
    /// The connection a [`CtState::Related`] packet belongs to, as (origin's source, answering
    /// side's source) (`--ctorigsrc`, `--ctreplsrc`); `None`: the packet's own flow, so its
    /// source and its destination.
    pub related_to: Option<(IpAddr, IpAddr)>,
    /// A TCP packet other than a connection-opening SYN (`! --syn`): with
    /// [`CtState::New`], a flow picked up mid-stream (after its conntrack entry went away).
    pub mid_stream: bool,
}

impl Packet {
    /// A NEW TCP packet. Addresses that do not parse become `0.0.0.0` (tests pass literals).
    pub fn tcp(src: &str, dst: &str, dport: u16) -> Packet {
        Packet::new(src, dst, Protocol::Tcp, dport)
    }

    pub fn new(src: &str, dst: &str, proto: Protocol, dport: u16) -> Packet {
        let parse = |s: &str| IpAddr::from_str(s).unwrap_or(IpAddr::from([0u8, 0, 0, 0]));
        Packet {
            src: parse(src),
            dst: parse(dst),
            proto,
            dport,
            state: CtState::New,
            src_local: false,
            icmp6_type: None,
            in_iface: None,
            physdev_in: None,
            physdev_out: None,
            related_to: None,
            mid_stream: false,
        }
    }

    /// An ICMPv6 message of type `t` (e.g. 135, a Neighbor Solicitation). Neighbour
    /// discovery is not tracked by conntrack: give it [`CtState::Untracked`] to trace it as
    /// the kernel sees it.
    pub fn icmp6(src: &str, dst: &str, t: u8) -> Packet {
        let mut p = Packet::new(src, dst, Protocol::Tcp, 0);
        p.icmp6_type = Some(t);
        p
    }

    pub fn with_state(mut self, state: CtState) -> Packet {
        self.state = state;
        self
    }

    pub fn from_local(mut self) -> Packet {
        self.src_local = true;
        self
    }

    /// A packet related to the connection from `orig_src` answered by `repl_src` (e.g. an ICMP
    /// error about it): state [`CtState::Related`].
    pub fn related_to(mut self, orig_src: &str, repl_src: &str) -> Packet {
        let parse = |s: &str| IpAddr::from_str(s).unwrap_or(IpAddr::from([0u8, 0, 0, 0]));
        self.state = CtState::Related;
        self.related_to = Some((parse(orig_src), parse(repl_src)));
        self
    }

    /// Forwarded by the bridge out of its port `port` (to the pod behind it).
    pub fn bridged_out(mut self, port: &str) -> Packet {
        self.physdev_out = Some(port.to_string());
        self
    }

    /// A TCP segment that is not a SYN (an ACK, data) in state NEW: what the kernel sees
    /// when a flow continues after its conntrack entry was deleted.
    pub fn mid_stream(mut self) -> Packet {
        self.mid_stream = true;
        self
    }

    /// Entered the node from interface `dev` (a routed pod's veth).
    pub fn entering(mut self, dev: &str) -> Packet {
        self.in_iface = Some(dev.to_string());
        self
    }

    /// Entered bridge `bridge` from its port `port` (bridged CNI with br_netfilter): the
    /// input interface is the bridge, the physdev-in the port.
    pub fn bridged(mut self, bridge: &str, port: &str) -> Packet {
        self.in_iface = Some(bridge.to_string());
        self.physdev_in = Some(port.to_string());
        self
    }
}

/// Final verdict of a traced packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
}

/// The verdict and the rules that matched on the way (`CHAIN#index -> target`).
#[derive(Clone, Debug)]
pub struct Trace {
    pub verdict: Verdict,
    pub path: Vec<String>,
    /// The same rules, structured: where they are, what they did, their comments and what
    /// they matched on (the provenance `explain` reads).
    pub steps: Vec<Step>,
}

/// One rule that matched on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Chain of the rule.
    pub chain: String,
    /// Index of the rule in its chain (0-based).
    pub index: usize,
    /// The chains that led here, outermost first (the hook chain at index 0).
    pub via: Vec<String>,
    pub action: Action,
    /// `-m comment --comment` of the rule.
    pub comment: Option<String>,
    /// What the rule matched the packet's peer on: a set's identity (`pods ns:… pod:…`,
    /// `block … except …`), `cidr 10.0.0.0/8`, or `any`.
    pub peer: String,
    /// What it matched the port on: `TCP 80`, `UDP 81-90`, `TCP 80,443`, `named-port
    /// tcp/http`, `TCP (all ports)` or `any`.
    pub port: String,
    /// The rule as rendered (`-A CHAIN ...`).
    pub rule: String,
}

/// What a matched rule did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Accept,
    Drop,
    Return,
    /// `-j MARK`: `true` when it set bits.
    Mark(bool),
    Jump(String),
    Goto(String),
    /// `-j NFLOG`: sent to the denied-traffic log with this prefix (not terminating).
    Log(String),
}

impl Trace {
    /// Whether the packet passed through `chain`.
    pub fn visited(&self, chain: &str) -> bool {
        self.path
            .iter()
            .any(|p| p.starts_with(&format!("{chain}#")))
    }
}

#[derive(Clone, Debug)]
enum M {
    Src(IpNetwork, bool),
    Dst(IpNetwork, bool),
    /// `-i IF` (negated when the bool is set).
    InIface(String, bool),
    /// `--physdev-in IF`.
    PhysdevIn(String, bool),
    /// `--physdev-out IF`.
    PhysdevOut(String, bool),
    /// `--physdev-is-bridged`.
    PhysdevBridged(bool),
    /// `--ctorigsrc NET` / `--ctreplsrc NET` (`true`: the original direction's).
    CtSrc(IpNetwork, bool, bool),
    Proto(Protocol),
    DPorts(Vec<(u16, u16)>),
    Set {
        name: String,
        negate: bool,
        dirs: Vec<bool>, // true = src
    },
    Ct(Vec<String>),
    Mark {
        value: u32,
        mask: u32,
        negate: bool,
    },
    SrcLocal,
    /// `-p ipv6-icmp`.
    Icmp6,
    /// `--icmpv6-type N`.
    Icmp6Type(u8),
    /// `--syn` / `--tcp-flags FIN,SYN,RST,ACK SYN` (negated when the bool is set).
    TcpSyn(bool),
}

#[derive(Clone, Debug)]
enum T {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
    Mark { value: u32, mask: u32 },
    Nflog { prefix: String },
}

#[derive(Clone, Debug)]
struct TRule {
    line: usize,
    matches: Vec<M>,
    target: T,
    comment: Option<String>,
    text: String,
}

#[derive(Clone, Debug)]
struct TSet {
    kind: SetKind,
    members: BTreeSet<SetMember>,
    /// From the `# NAME identity` line the renderer writes before a set.
    identity: Option<String>,
}

/// Parsed payloads, ready to trace packets.
#[derive(Clone, Debug)]
pub struct Tracer {
    chains: HashMap<String, Vec<TRule>>,
    sets: HashMap<String, TSet>,
    hooks: Vec<(String, String)>,
}

fn err(line: usize, message: impl Into<String>) -> NetpolError {
    NetpolError::Trace {
        line,
        message: message.into(),
    }
}

impl Tracer {
    /// Parses a payload and checks its references.
    pub fn new(p: &Payload) -> Result<Tracer, NetpolError> {
        let hooks = p
            .hooks
            .iter()
            .map(|h| (h.builtin.to_string(), h.chain.to_string()))
            .collect();
        let t = Tracer {
            chains: parse_iptables(&p.iptables_restore)?,
            sets: parse_ipset(&p.ipset_restore)?,
            hooks,
        };
        t.check()?;
        Ok(t)
    }

    /// Every `-j`/`-g` target is a chain of the payload, every `--match-set` a set of it,
    /// and every hook target exists.
    pub fn check(&self) -> Result<(), NetpolError> {
        for (_, chain) in &self.hooks {
            if !self.chains.contains_key(chain) {
                return Err(err(0, format!("hook target {chain} does not exist")));
            }
        }
        for rules in self.chains.values() {
            for r in rules {
                if let T::Jump(c) | T::Goto(c) = &r.target {
                    if !self.chains.contains_key(c) {
                        return Err(err(r.line, format!("jump to unknown chain {c}")));
                    }
                }
                for m in &r.matches {
                    if let M::Set { name, dirs, .. } = m {
                        let Some(set) = self.sets.get(name) else {
                            return Err(err(r.line, format!("unknown set {name}")));
                        };
                        let want = if set.kind == SetKind::HashIpPort {
                            2
                        } else {
                            1
                        };
                        if dirs.len() != want {
                            return Err(err(r.line, format!("set {name}: wrong dimension")));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Names of all chains.
    pub fn chain_names(&self) -> BTreeSet<String> {
        self.chains.keys().cloned().collect()
    }

    /// Traces `pkt` entering the built-in chain `builtin` (`FORWARD` or `INPUT`), whose only
    /// rule is our hook and whose policy is ACCEPT.
    pub fn trace(&self, builtin: &str, pkt: &Packet) -> Result<Trace, NetpolError> {
        let mut w = Walk {
            mark: 0,
            path: Vec::new(),
            steps: Vec::new(),
            via: vec![builtin.to_string()],
        };
        let mut verdict = Verdict::Accept;
        for (b, chain) in &self.hooks {
            if b != builtin {
                continue;
            }
            w.path.push(format!("{builtin}#0 -> {chain}"));
            match self.run(chain, pkt, &mut w, 0)? {
                Outcome::Accept => break,
                Outcome::Drop => {
                    verdict = Verdict::Drop;
                    break;
                }
                Outcome::Return => {}
            }
        }
        Ok(Trace {
            verdict,
            path: w.path,
            steps: w.steps,
        })
    }

    fn run(
        &self,
        chain: &str,
        pkt: &Packet,
        w: &mut Walk,
        depth: usize,
    ) -> Result<Outcome, NetpolError> {
        if depth > 32 {
            return Err(err(0, format!("jump depth exceeded at {chain}")));
        }
        let rules = self
            .chains
            .get(chain)
            .ok_or_else(|| err(0, format!("unknown chain {chain}")))?;
        for (i, r) in rules.iter().enumerate() {
            if !self.matches(r, pkt, w.mark) {
                continue;
            }
            let (label, action) = match &r.target {
                T::Accept => ("ACCEPT".to_string(), Action::Accept),
                T::Drop => ("DROP".to_string(), Action::Drop),
                T::Return => ("RETURN".to_string(), Action::Return),
                T::Mark { value, .. } => ("MARK".to_string(), Action::Mark(*value != 0)),
                T::Jump(c) => (c.clone(), Action::Jump(c.clone())),
                T::Goto(c) => (format!("goto {c}"), Action::Goto(c.clone())),
                T::Nflog { prefix } => ("NFLOG".to_string(), Action::Log(prefix.clone())),
            };
            w.path.push(format!("{chain}#{i} -> {label}"));
            let (peer, port) = self.describe(r);
            w.steps.push(Step {
                chain: chain.to_string(),
                index: i,
                via: w.via.clone(),
                action,
                comment: r.comment.clone(),
                peer,
                port,
                rule: r.text.clone(),
            });
            match &r.target {
                T::Accept => return Ok(Outcome::Accept),
                T::Drop => return Ok(Outcome::Drop),
                T::Return => return Ok(Outcome::Return),
                T::Mark { value, mask } => {
                    w.mark = (w.mark & !mask) ^ value;
                }
                T::Nflog { .. } => {}
                T::Jump(c) => {
                    w.via.push(chain.to_string());
                    let out = self.run(c, pkt, w, depth + 1);
                    w.via.pop();
                    match out? {
                        Outcome::Return => {}
                        other => return Ok(other),
                    }
                }
                T::Goto(c) => {
                    // A goto replaces the chain: a RETURN in `c` goes back to our caller.
                    w.via.push(chain.to_string());
                    let out = self.run(c, pkt, w, depth + 1);
                    w.via.pop();
                    return out;
                }
            }
        }
        Ok(Outcome::Return)
    }

    /// The peer and port parts of a rule, for people (see [`Step::peer`], [`Step::port`]).
    fn describe(&self, r: &TRule) -> (String, String) {
        let mut peers = Vec::new();
        let mut proto = None;
        let mut ports = Vec::new();
        for m in &r.matches {
            match m {
                M::Src(n, neg) | M::Dst(n, neg) => {
                    peers.push(format!("{}cidr {n}", if *neg { "not " } else { "" }))
                }
                M::Proto(p) => proto = Some(p.as_str().to_uppercase()),
                M::DPorts(ranges) => ports.push(
                    ranges
                        .iter()
                        .map(|(lo, hi)| {
                            if lo == hi {
                                lo.to_string()
                            } else {
                                format!("{lo}-{hi}")
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                M::Set { name, negate, .. } => {
                    let set = self.sets.get(name);
                    let what = set
                        .and_then(|s| s.identity.clone())
                        .unwrap_or_else(|| name.clone());
                    let what = if *negate { format!("not {what}") } else { what };
                    if set.is_some_and(|s| s.kind == SetKind::HashIpPort) {
                        ports.push(what);
                    } else {
                        peers.push(what);
                    }
                }
                _ => {}
            }
        }
        let peer = if peers.is_empty() {
            "any".to_string()
        } else {
            peers.join(" and ")
        };
        let port = match (proto, ports.is_empty()) {
            (None, true) => "any".to_string(),
            (Some(p), true) => format!("{p} (all ports)"),
            (None, false) => ports.join(" "),
            (Some(p), false) => {
                if ports.iter().all(|x| x.starts_with("named-port")) {
                    ports.join(" ")
                } else {
                    format!("{p} {}", ports.join(" "))
                }
            }
        };
        (peer, port)
    }

    fn matches(&self, r: &TRule, pkt: &Packet, mark: u32) -> bool {
        r.matches.iter().all(|m| match m {
            M::Src(n, neg) => n.contains(pkt.src) != *neg,
            M::Dst(n, neg) => n.contains(pkt.dst) != *neg,
            M::InIface(i, neg) => (pkt.in_iface.as_deref() == Some(i.as_str())) != *neg,
            M::PhysdevIn(i, neg) => (pkt.physdev_in.as_deref() == Some(i.as_str())) != *neg,
            M::PhysdevOut(i, neg) => (pkt.physdev_out.as_deref() == Some(i.as_str())) != *neg,
            M::PhysdevBridged(neg) => pkt.physdev_out.is_some() != *neg,
            M::CtSrc(n, orig, neg) => {
                let (o, r) = pkt.related_to.unwrap_or((pkt.src, pkt.dst));
                n.contains(if *orig { o } else { r }) != *neg
            }
            M::Proto(p) => pkt.icmp6_type.is_none() && *p == pkt.proto,
            M::Icmp6 => pkt.icmp6_type.is_some(),
            M::Icmp6Type(t) => pkt.icmp6_type == Some(*t),
            M::DPorts(ranges) => ranges
                .iter()
                .any(|(lo, hi)| (*lo..=*hi).contains(&pkt.dport)),
            M::Ct(states) => states.iter().any(|s| s == pkt.state.as_str()),
            M::Mark {
                value,
                mask,
                negate,
            } => ((mark & mask) == *value) != *negate,
            M::SrcLocal => pkt.src_local,
            M::TcpSyn(neg) => {
                pkt.icmp6_type.is_none() && pkt.proto == Protocol::Tcp && (pkt.mid_stream == *neg)
            }
            M::Set { name, negate, dirs } => {
                let hit = self
                    .sets
                    .get(name)
                    .is_some_and(|s| set_matches(s, dirs, pkt));
                hit != *negate
            }
        })
    }
}

enum Outcome {
    Accept,
    Drop,
    Return,
}

/// State of one trace.
struct Walk {
    mark: u32,
    path: Vec<String>,
    steps: Vec<Step>,
    via: Vec<String>,
}

fn set_matches(s: &TSet, dirs: &[bool], pkt: &Packet) -> bool {
    let addr = if dirs.first().copied().unwrap_or(true) {
        pkt.src
    } else {
        pkt.dst
    };
    match s.kind {
        SetKind::HashIp => s.members.contains(&SetMember::Ip(addr)),
        SetKind::HashNet => {
            // The most specific entry decides; a `nomatch` entry means "not in the set".
            let best = s
                .members
                .iter()
                .filter_map(|m| match m {
                    SetMember::Net { net, nomatch } if net.contains(addr) => {
                        Some((net.prefix(), *nomatch))
                    }
                    _ => None,
                })
                .max_by_key(|(p, _)| *p);
            matches!(best, Some((_, false)))
        }
        SetKind::HashIpPort => s.members.contains(&SetMember::IpPort {
            ip: addr,
            proto: pkt.proto,
            port: pkt.dport,
        }),
    }
}

/// Splits a line into words, honouring double quotes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut has = false;
    for c in line.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has {
                    out.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            c => {
                cur.push(c);
                has = true;
            }
        }
    }
    if has {
        out.push(cur);
    }
    out
}

fn parse_net(line: usize, s: &str) -> Result<IpNetwork, NetpolError> {
    IpNetwork::from_str(s).map_err(|e| err(line, format!("address {s:?}: {e}")))
}

fn parse_ports(line: usize, s: &str) -> Result<Vec<(u16, u16)>, NetpolError> {
    s.split(',')
        .map(|p| {
            let (lo, hi) = p.split_once(':').unwrap_or((p, p));
            match (lo.parse(), hi.parse()) {
                (Ok(lo), Ok(hi)) => Ok((lo, hi)),
                _ => Err(err(line, format!("port {p:?}"))),
            }
        })
        .collect()
}

fn parse_mark(line: usize, s: &str) -> Result<(u32, u32), NetpolError> {
    let hex = |x: &str| u32::from_str_radix(x.trim_start_matches("0x"), 16);
    let (v, m) = s.split_once('/').unwrap_or((s, "0xffffffff"));
    match (hex(v), hex(m)) {
        (Ok(v), Ok(m)) => Ok((v, m)),
        _ => Err(err(line, format!("mark {s:?}"))),
    }
}

fn parse_iptables(text: &str) -> Result<HashMap<String, Vec<TRule>>, NetpolError> {
    let mut chains: HashMap<String, Vec<TRule>> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') || l == "*filter" || l == "COMMIT" {
            continue;
        }
        if let Some(decl) = l.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            chains.entry(name.to_string()).or_default();
            continue;
        }
        let w = words(l);
        if w.first().map(String::as_str) != Some("-A") || w.len() < 2 {
            return Err(err(line, format!("unsupported line {l:?}")));
        }
        let chain = w[1].clone();
        let mut matches = Vec::new();
        let mut target = None;
        let mut comment = None;
        let mut k = 2;
        let mut negate = false;
        let arg = |k: usize| {
            w.get(k)
                .cloned()
                .ok_or_else(|| err(line, "missing argument"))
        };
        while k < w.len() {
            match w[k].as_str() {
                "!" => {
                    negate = true;
                    k += 1;
                    continue;
                }
                "-s" => matches.push(M::Src(parse_net(line, &arg(k + 1)?)?, negate)),
                "-d" => matches.push(M::Dst(parse_net(line, &arg(k + 1)?)?, negate)),
                "-i" => matches.push(M::InIface(arg(k + 1)?, negate)),
                "--physdev-in" => matches.push(M::PhysdevIn(arg(k + 1)?, negate)),
                "--physdev-out" => matches.push(M::PhysdevOut(arg(k + 1)?, negate)),
                "--physdev-is-bridged" => {
                    matches.push(M::PhysdevBridged(negate));
                    negate = false;
                    k += 1;
                    continue;
                }
                "--ctorigsrc" | "--ctreplsrc" => matches.push(M::CtSrc(
                    parse_net(line, &arg(k + 1)?)?,
                    w[k] == "--ctorigsrc",
                    negate,
                )),
                "-p" => {
                    let p = arg(k + 1)?;
                    if p == "ipv6-icmp" {
                        matches.push(M::Icmp6);
                    } else {
                        let proto = Protocol::from_kernel(&p)
                            .ok_or_else(|| err(line, format!("proto {p}")))?;
                        matches.push(M::Proto(proto));
                    }
                }
                "-m" => {
                    // Modules only introduce options; `-m tcp` etc. need no state.
                    let module = arg(k + 1)?;
                    if !matches!(
                        module.as_str(),
                        "tcp"
                            | "udp"
                            | "sctp"
                            | "multiport"
                            | "set"
                            | "conntrack"
                            | "mark"
                            | "addrtype"
                            | "comment"
                            | "icmp6"
                            | "physdev"
                            | "hashlimit"
                    ) {
                        return Err(err(line, format!("unsupported module {module}")));
                    }
                }
                "--dport" | "--dports" => matches.push(M::DPorts(parse_ports(line, &arg(k + 1)?)?)),
                "--match-set" => {
                    let name = arg(k + 1)?;
                    let dirs = arg(k + 2)?
                        .split(',')
                        .map(|d| match d {
                            "src" => Ok(true),
                            "dst" => Ok(false),
                            other => Err(err(line, format!("set direction {other}"))),
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    matches.push(M::Set { name, negate, dirs });
                    negate = false;
                    k += 3;
                    continue;
                }
                "--ctstate" => {
                    matches.push(M::Ct(arg(k + 1)?.split(',').map(str::to_string).collect()))
                }
                "--mark" => {
                    let (value, mask) = parse_mark(line, &arg(k + 1)?)?;
                    matches.push(M::Mark {
                        value,
                        mask,
                        negate,
                    });
                }
                "--src-type" => {
                    if arg(k + 1)? != "LOCAL" {
                        return Err(err(line, "only --src-type LOCAL is supported"));
                    }
                    matches.push(M::SrcLocal);
                }
                "--comment" => comment = Some(arg(k + 1)?),
                // Rate limits only thin out what reaches the log: a traced packet is the
                // first of its flow, so it always matches.
                "--hashlimit-upto" | "--hashlimit-burst" | "--hashlimit-mode"
                | "--hashlimit-name" => {}
                "--syn" => {
                    matches.push(M::TcpSyn(negate));
                    negate = false;
                    k += 1;
                    continue;
                }
                "--tcp-flags" => {
                    // Only the `--syn` spelling iptables-save prints.
                    if arg(k + 1)? != "FIN,SYN,RST,ACK" || arg(k + 2)? != "SYN" {
                        return Err(err(
                            line,
                            "only --tcp-flags FIN,SYN,RST,ACK SYN is supported",
                        ));
                    }
                    matches.push(M::TcpSyn(negate));
                    negate = false;
                    k += 3;
                    continue;
                }
                "--icmpv6-type" => {
                    let t = arg(k + 1)?;
                    let t = t
                        .parse()
                        .map_err(|_| err(line, format!("icmpv6 type {t}")))?;
                    matches.push(M::Icmp6Type(t));
                }
                "-j" | "-g" => {
                    let t = arg(k + 1)?;
                    target = Some(match (w[k].as_str(), t.as_str()) {
                        (_, "ACCEPT") => T::Accept,
                        (_, "DROP") => T::Drop,
                        (_, "RETURN") => T::Return,
                        ("-j", "MARK") => {
                            if arg(k + 2)? != "--set-xmark" {
                                return Err(err(line, "MARK needs --set-xmark"));
                            }
                            let (value, mask) = parse_mark(line, &arg(k + 3)?)?;
                            k += 4;
                            target = Some(T::Mark { value, mask });
                            continue;
                        }
                        ("-j", "NFLOG") => {
                            let mut prefix = String::new();
                            let mut j = k + 2;
                            while j + 1 < w.len() {
                                match w[j].as_str() {
                                    "--nflog-prefix" => prefix = w[j + 1].clone(),
                                    "--nflog-group" => {}
                                    other => {
                                        return Err(err(line, format!("NFLOG option {other}")))
                                    }
                                }
                                j += 2;
                            }
                            k = j;
                            target = Some(T::Nflog { prefix });
                            continue;
                        }
                        ("-j", c) => T::Jump(c.to_string()),
                        (_, c) => T::Goto(c.to_string()),
                    });
                }
                other => return Err(err(line, format!("unsupported option {other}"))),
            }
            negate = false;
            k += 2;
        }
        let target = target.ok_or_else(|| err(line, "rule without target"))?;
        chains.entry(chain).or_default().push(TRule {
            line,
            matches,
            target,
            comment,
            text: l.to_string(),
        });
    }
    Ok(chains)
}

fn parse_ipset(text: &str) -> Result<HashMap<String, TSet>, NetpolError> {
    let mut sets: HashMap<String, TSet> = HashMap::new();
    let mut identities: HashMap<&str, &str> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if let Some(c) = l.strip_prefix("# ") {
            if let Some((name, identity)) = c.split_once(' ') {
                identities.insert(name, identity);
            }
            continue;
        }
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let w: Vec<&str> = l.split_whitespace().collect();
        let name = |j: usize| {
            w.get(j)
                .map(|s| s.to_string())
                .ok_or_else(|| err(line, "missing set name"))
        };
        match w.first().copied() {
            Some("create") => {
                let n = name(1)?;
                let kind = w
                    .get(2)
                    .and_then(|k| SetKind::from_kernel(k))
                    .ok_or_else(|| err(line, "unsupported set type"))?;
                let identity = identities.get(n.as_str()).map(|s| s.to_string());
                sets.entry(n).or_insert(TSet {
                    kind,
                    members: BTreeSet::new(),
                    identity,
                });
            }
            Some("add") => {
                let n = name(1)?;
                let set = sets
                    .get_mut(&n)
                    .ok_or_else(|| err(line, format!("add to unknown set {n}")))?;
                let text = w.get(2..).map(|r| r.join(" ")).unwrap_or_default();
                let m = SetMember::parse(set.kind, &text)
                    .ok_or_else(|| err(line, format!("member {text:?}")))?;
                set.members.insert(m);
            }
            Some("flush") => {
                if let Some(s) = sets.get_mut(&name(1)?) {
                    s.members.clear();
                }
            }
            Some("swap") => {
                let (a, b) = (name(1)?, name(2)?);
                let sa = sets
                    .remove(&a)
                    .ok_or_else(|| err(line, "swap: unknown set"))?;
                let mut sb = sets
                    .remove(&b)
                    .ok_or_else(|| err(line, "swap: unknown set"))?;
                // Members move, names (and what they stand for) stay.
                let mut sa = sa;
                std::mem::swap(&mut sa.identity, &mut sb.identity);
                sets.insert(a, sb);
                sets.insert(b, sa);
            }
            Some("destroy") => {
                sets.remove(&name(1)?);
            }
            _ => return Err(err(line, format!("unsupported ipset line {l:?}"))),
        }
    }
    Ok(sets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_honour_quotes() {
        assert_eq!(
            words(r#"-A X -m comment --comment "a b/c" -j DROP"#),
            vec![
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "a b/c",
                "-j",
                "DROP"
            ]
        );
    }

    #[test]
    fn hash_net_nomatch_is_most_specific_wins() {
        let mut members = BTreeSet::new();
        for (n, nm) in [("10.0.0.0/8", false), ("10.1.0.0/16", true)] {
            members.insert(SetMember::Net {
                net: n.parse().unwrap(),
                nomatch: nm,
            });
        }
        let s = TSet {
            kind: SetKind::HashNet,
            members,
            identity: None,
        };
        let p = |ip: &str| Packet::tcp(ip, "1.1.1.1", 80);
        assert!(set_matches(&s, &[true], &p("10.2.3.4")));
        assert!(!set_matches(&s, &[true], &p("10.1.3.4")));
        assert!(!set_matches(&s, &[true], &p("11.0.0.1")));
    }
}
