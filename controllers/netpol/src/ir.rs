//! The rule IR the compiler produces and the renderer, tracer and executors read: chains of
//! rules, ipsets with members, hooks. A leaf of the crate: the model and the compiler both
//! depend on it, it depends on neither (so `compile` and `model` no longer form a cycle).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnetwork::IpNetwork;

use crate::names;
use crate::selector::Selector;
use crate::{Diagnostic, Family};

/// Transport protocols NetworkPolicy supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// API spelling (`None` = the default, TCP). Unknown values give `None`.
    pub fn parse(s: Option<&str>) -> Option<Protocol> {
        match s {
            None | Some("TCP") => Some(Protocol::Tcp),
            Some("UDP") => Some(Protocol::Udp),
            Some("SCTP") => Some(Protocol::Sctp),
            Some(_) => None,
        }
    }

    /// iptables / ipset spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// Inverse of [`Protocol::as_str`].
    pub fn from_kernel(s: &str) -> Option<Protocol> {
        match s {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "sctp" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// Which packet fields a set match looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SetDir {
    Src,
    Dst,
    /// hash:ip,port: destination address and destination port.
    DstDst,
}

impl SetDir {
    pub fn as_str(self) -> &'static str {
        match self {
            SetDir::Src => "src",
            SetDir::Dst => "dst",
            SetDir::DstDst => "dst,dst",
        }
    }
}

/// ICMPv6 types of neighbour discovery (RFC 4861) let through the INPUT chain.
pub const ICMP6_ROUTER_SOLICITATION: u8 = 133;
pub const ICMP6_NEIGHBOR_SOLICITATION: u8 = 135;
pub const ICMP6_NEIGHBOR_ADVERTISEMENT: u8 = 136;
/// MLDv2 listener report (RFC 3810), sent from `::` during duplicate address detection.
pub const ICMP6_MLD2_REPORT: u8 = 143;
/// MLD query (RFC 2710), from a querier (the node or a LAN router, never a pod).
pub const ICMP6_MLD_QUERY: u8 = 130;
/// MLDv1 listener report and done (RFC 2710).
pub const ICMP6_MLD1_REPORT: u8 = 131;
pub const ICMP6_MLD1_DONE: u8 = 132;
/// Router Advertisement (RFC 4861): from routers only, never let in from a pod.
pub const ICMP6_ROUTER_ADVERTISEMENT: u8 = 134;

/// One match of a rule. The renderer prints addresses first, then the protocol, then the
/// other matches in order, which is the order `iptables-save` prints them back.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Match {
    Src(IpNetwork),
    /// `! -s NET`.
    NotSrc(IpNetwork),
    Dst(IpNetwork),
    /// `! -d NET`.
    NotDst(IpNetwork),
    /// `-i IF`: the packet entered from this interface.
    InIface(String),
    /// `-m physdev --physdev-in IF`: the packet entered a bridge from this port.
    PhysdevIn(String),
    /// `-m physdev --physdev-out IF --physdev-is-bridged`: the bridge forwards the packet out
    /// of this port (FORWARD only).
    PhysdevOut(String),
    Proto(Protocol),
    /// `-m <proto> --dport lo[:hi]` (needs a preceding [`Match::Proto`]).
    DPort(Protocol, u16, u16),
    /// `-m multiport --dports a,b,c:d` (at most 15 ports, a range counting two).
    MultiPort(Vec<(u16, u16)>),
    Set {
        name: String,
        dir: SetDir,
    },
    /// `-m conntrack --ctstate <states>`.
    CtState(&'static str),
    /// `-m conntrack --ctstate RELATED ! --ctorigsrc IP ! --ctreplsrc IP`: a packet related to
    /// a connection `IP` is not an endpoint of (as origin, or as the answering side).
    RelatedNotOf(IpAddr),
    /// `-m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN` (`! --syn`): not a connection-opening SYN
    /// (needs a preceding [`Match::Proto`] TCP).
    TcpNotSyn,
    /// `-m mark [!] --mark bit/bit`.
    Mark {
        bit: u32,
        negate: bool,
    },
    /// `-m addrtype --src-type LOCAL`: the source is one of this host's addresses.
    SrcLocal,
    /// `-p ipv6-icmp -m icmp6 --icmpv6-type N` (IPv6 payloads only).
    Icmp6Type(u8),
    /// `-p ipv6-icmp`: any ICMPv6 message.
    Icmp6Any,
    Comment(String),
    /// `-m hashlimit --hashlimit-upto RATE --hashlimit-burst N --hashlimit-mode srcip|dstip
    /// --hashlimit-name NAME`: at most RATE per source / destination address.
    HashLimit {
        rate: String,
        burst: u32,
        /// `true`: per source address (egress), else per destination (ingress).
        by_src: bool,
        name: &'static str,
    },
}

/// What a matching rule does.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
    /// `-j MARK --set-xmark bit/bit`.
    SetMark(u32),
    /// `-j MARK --set-xmark 0x0/bit`.
    ClearMark(u32),
    /// `-j NFLOG --nflog-prefix PREFIX --nflog-group N` (not terminating).
    Nflog {
        prefix: String,
        group: u16,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub target: Target,
}

impl Rule {
    pub(crate) fn new(matches: Vec<Match>, target: Target) -> Self {
        Rule { matches, target }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub rules: Vec<Rule>,
}

/// A jump from a built-in chain into ours, kept at position 1.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hook {
    pub table: &'static str,
    pub builtin: &'static str,
    pub chain: &'static str,
}

/// ipset types we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// Pod IPs matched by a selector peer.
    HashIp,
    /// An ipBlock with `except` entries (`nomatch`).
    HashNet,
    /// (pod IP, protocol, port) of a named port.
    HashIpPort,
}

impl SetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SetKind::HashIp => "hash:ip",
            SetKind::HashNet => "hash:net",
            SetKind::HashIpPort => "hash:ip,port",
        }
    }

    pub fn from_kernel(s: &str) -> Option<SetKind> {
        match s {
            "hash:ip" => Some(SetKind::HashIp),
            "hash:net" => Some(SetKind::HashNet),
            "hash:ip,port" => Some(SetKind::HashIpPort),
            _ => None,
        }
    }

    pub(crate) fn prefix(self, family: Family) -> String {
        let letter = match self {
            SetKind::HashIp => 'P',
            SetKind::HashNet => 'B',
            SetKind::HashIpPort => 'N',
        };
        format!("{}{letter}{}-", names::SET_PREFIX, family.tag())
    }
}

/// One set member. `Display` is the form `ipset save` prints, [`SetMember::parse`] reads it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetMember {
    Ip(IpAddr),
    Net {
        net: IpNetwork,
        nomatch: bool,
    },
    IpPort {
        ip: IpAddr,
        proto: Protocol,
        port: u16,
    },
}

impl fmt::Display for SetMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetMember::Ip(ip) => write!(f, "{ip}"),
            SetMember::Net { net, nomatch } => {
                let host = match net {
                    IpNetwork::V4(_) => 32,
                    IpNetwork::V6(_) => 128,
                };
                if net.prefix() == host {
                    write!(f, "{}", net.ip())?;
                } else {
                    write!(f, "{}/{}", net.network(), net.prefix())?;
                }
                if *nomatch {
                    f.write_str(" nomatch")?;
                }
                Ok(())
            }
            SetMember::IpPort { ip, proto, port } => write!(f, "{ip},{}:{port}", proto.as_str()),
        }
    }
}

impl SetMember {
    /// Parses the text after `add NAME ` in `ipset save` output.
    pub fn parse(kind: SetKind, text: &str) -> Option<SetMember> {
        let mut words = text.split_whitespace();
        let first = words.next()?;
        match kind {
            SetKind::HashIp => IpAddr::from_str(first).ok().map(SetMember::Ip),
            SetKind::HashNet => {
                let nomatch = words.any(|w| w == "nomatch");
                let net = IpNetwork::from_str(first).ok()?;
                Some(SetMember::Net {
                    net: normalize(net),
                    nomatch,
                })
            }
            SetKind::HashIpPort => {
                let (ip, rest) = first.split_once(',')?;
                let (proto, port) = rest.split_once(':')?;
                Some(SetMember::IpPort {
                    ip: IpAddr::from_str(ip).ok()?,
                    proto: Protocol::from_kernel(proto)?,
                    port: port.parse().ok()?,
                })
            }
        }
    }
}

/// One ipset with its desired members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpSet {
    pub name: String,
    pub kind: SetKind,
    pub family: Family,
    /// What the set stands for, e.g. `pods ns:team in (a) pod:app in (web)`.
    pub identity: String,
    pub members: BTreeSet<SetMember>,
}

/// What a set's members are computed from (for incremental updates).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SetSource {
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
    NamedPort {
        proto: Protocol,
        name: String,
    },
    /// Not derived from pods (ipBlocks, `networks`, `nodes`): only a full compile changes it.
    Block,
}

/// The compiled rule IR for one node and family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    pub family: Family,
    /// Fixed chains first (FORWARD, INPUT, EGRESS, INGRESS), then generated ones by name.
    pub chains: Vec<Chain>,
    pub sets: BTreeMap<String, IpSet>,
    pub hooks: Vec<Hook>,
    /// Sorted, de-duplicated.
    pub diagnostics: Vec<Diagnostic>,
    /// Set name → what its members come from.
    pub(crate) sources: BTreeMap<String, SetSource>,
}

impl Compiled {
    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }
}

/// The network address with the same prefix (`10.1.2.3/8` → `10.0.0.0/8`).
pub(crate) fn normalize(n: IpNetwork) -> IpNetwork {
    IpNetwork::new(n.network(), n.prefix()).unwrap_or(n)
}
