//! Frames the speaker reads and writes: ARP requests/replies (IPv4) and Neighbor
//! Solicitation/Advertisement (IPv6 NDP), as whole Ethernet frames. Pure: bytes in, bytes out.
//!
//! ```text
//!  parse(frame) ─► Some(Request::Arp { who-has target, tell sender })      ─► arp_reply(..)
//!               ─► Some(Request::Solicit { target, from, reply-to MAC })  ─► neighbor_advert(..)
//!               ─► None  (anything else, or malformed: never panics)
//!  garp_request / garp_reply / unsolicited_advert: announcements after gaining an IP
//! ```
//!
//! pnet's zero-copy views check lengths for the fixed headers (Ethernet, ARP, IPv6). NDP options
//! are walked here by hand: pnet's `get_options()` computes `length * 8` in a `u8`, which
//! overflows (and panics in debug builds) on a hostile option length of 32 or more.

use std::net::{Ipv4Addr, Ipv6Addr};

use pnet::packet::arp::{ArpHardwareTypes, ArpOperations, ArpPacket, MutableArpPacket};
use pnet::packet::ethernet::{EtherTypes, EthernetPacket, MutableEthernetPacket};
use pnet::packet::ip::IpNextHeaderProtocols;
use pnet::packet::ipv6::{Ipv6Packet, MutableIpv6Packet};
use pnet::packet::util::ipv6_checksum;
use pnet::packet::Packet;
use pnet::util::MacAddr;

/// Ethernet header length.
const ETH_LEN: usize = 14;
/// ARP payload length for Ethernet/IPv4.
const ARP_LEN: usize = 28;
/// Fixed IPv6 header length.
const IPV6_LEN: usize = 40;
/// ICMPv6 Neighbor Solicitation/Advertisement without options.
const ND_LEN: usize = 24;
/// A (source or target) link-layer address option for Ethernet.
const LLA_OPT_LEN: usize = 8;
const ICMPV6_NEIGHBOR_SOLICIT: u8 = 135;
const ICMPV6_NEIGHBOR_ADVERT: u8 = 136;
const NDP_OPT_SOURCE_LLA: u8 = 1;
const NDP_OPT_TARGET_LLA: u8 = 2;
/// NA flags (first byte after the checksum).
const NA_FLAG_SOLICITED: u8 = 0b0100_0000;
const NA_FLAG_OVERRIDE: u8 = 0b0010_0000;

/// Length of every ARP frame we build.
pub const ARP_FRAME_LEN: usize = ETH_LEN + ARP_LEN;
/// Length of every Neighbor Advertisement frame we build.
pub const NA_FRAME_LEN: usize = ETH_LEN + IPV6_LEN + ND_LEN + LLA_OPT_LEN;

/// A request the speaker may have to answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// ARP "who-has `target` tell `sender_ip`" (`sender_ip` is 0.0.0.0 for an RFC 5227 probe).
    Arp {
        sender_mac: MacAddr,
        sender_ip: Ipv4Addr,
        target: Ipv4Addr,
    },
    /// ICMPv6 Neighbor Solicitation for `target`, from `source` (`::` during DAD).
    Solicit {
        /// Where to send the advertisement: the source link-layer address option, or the
        /// frame's Ethernet source when the option is absent.
        reply_mac: MacAddr,
        source: Ipv6Addr,
        target: Ipv6Addr,
    },
}

/// Parses a received Ethernet frame into a [`Request`]. Returns `None` for anything that is
/// not a well-formed ARP request or Neighbor Solicitation (including gratuitous ARP, which asks
/// nobody anything), and never panics.
pub fn parse(frame: &[u8]) -> Option<Request> {
    let eth = EthernetPacket::new(frame)?;
    match eth.get_ethertype() {
        EtherTypes::Arp => parse_arp(eth.payload()),
        EtherTypes::Ipv6 => parse_solicit(eth.get_source(), eth.payload()),
        _ => None,
    }
}

fn parse_arp(payload: &[u8]) -> Option<Request> {
    let arp = ArpPacket::new(payload)?;
    if arp.get_hardware_type() != ArpHardwareTypes::Ethernet
        || arp.get_protocol_type() != EtherTypes::Ipv4
        || arp.get_hw_addr_len() != 6
        || arp.get_proto_addr_len() != 4
        || arp.get_operation() != ArpOperations::Request
    {
        return None;
    }
    let sender_ip = arp.get_sender_proto_addr();
    let target = arp.get_target_proto_addr();
    // Gratuitous ARP (sender == target) announces, it does not ask.
    if sender_ip == target {
        return None;
    }
    Some(Request::Arp {
        sender_mac: arp.get_sender_hw_addr(),
        sender_ip,
        target,
    })
}

fn parse_solicit(eth_source: MacAddr, payload: &[u8]) -> Option<Request> {
    let ip = Ipv6Packet::new(payload)?;
    // RFC 4861 §7.1.1: hop limit 255 proves the sender is on-link.
    if ip.get_version() != 6
        || ip.get_next_header() != IpNextHeaderProtocols::Icmpv6
        || ip.get_hop_limit() != 255
    {
        return None;
    }
    let declared = usize::from(ip.get_payload_length());
    let icmp = payload.get(IPV6_LEN..IPV6_LEN.checked_add(declared)?)?;
    if icmp.len() < ND_LEN || icmp[0] != ICMPV6_NEIGHBOR_SOLICIT || icmp[1] != 0 {
        return None;
    }
    let source = ip.get_source();
    if source.is_multicast() {
        return None;
    }
    let destination = ip.get_destination();
    let stored = u16::from_be_bytes([icmp[2], icmp[3]]);
    if ipv6_checksum(
        icmp,
        1,
        &[],
        &source,
        &destination,
        IpNextHeaderProtocols::Icmpv6,
    ) != stored
    {
        return None;
    }
    let target = Ipv6Addr::from(<[u8; 16]>::try_from(&icmp[8..24]).ok()?);
    if target.is_multicast() {
        return None;
    }
    let sllao = source_lla_option(&icmp[ND_LEN..])?;
    // DAD solicitations come from :: and must not carry a source link-layer address.
    if source.is_unspecified() && sllao.is_some() {
        return None;
    }
    Some(Request::Solicit {
        reply_mac: sllao.unwrap_or(eth_source),
        source,
        target,
    })
}

/// Walks NDP options. `None`: malformed (zero or overlong option), the message is discarded;
/// `Some(None)`: no source link-layer address option.
fn source_lla_option(mut opts: &[u8]) -> Option<Option<MacAddr>> {
    let mut found = None;
    while !opts.is_empty() {
        let kind = *opts.first()?;
        let len = usize::from(*opts.get(1)?) * 8;
        if len == 0 || len > opts.len() {
            return None;
        }
        if kind == NDP_OPT_SOURCE_LLA && len >= LLA_OPT_LEN && found.is_none() {
            let m = &opts[2..8];
            found = Some(MacAddr::new(m[0], m[1], m[2], m[3], m[4], m[5]));
        }
        opts = &opts[len..];
    }
    Some(found)
}

fn arp_frame(
    eth_dst: MacAddr,
    op: pnet::packet::arp::ArpOperation,
    sha: MacAddr,
    spa: Ipv4Addr,
    tha: MacAddr,
    tpa: Ipv4Addr,
) -> Vec<u8> {
    let mut buf = vec![0u8; ARP_FRAME_LEN];
    {
        let mut eth = MutableEthernetPacket::new(&mut buf).expect("buffer sized for ethernet");
        eth.set_destination(eth_dst);
        eth.set_source(sha);
        eth.set_ethertype(EtherTypes::Arp);
    }
    let mut arp = MutableArpPacket::new(&mut buf[ETH_LEN..]).expect("buffer sized for ARP");
    arp.set_hardware_type(ArpHardwareTypes::Ethernet);
    arp.set_protocol_type(EtherTypes::Ipv4);
    arp.set_hw_addr_len(6);
    arp.set_proto_addr_len(4);
    arp.set_operation(op);
    arp.set_sender_hw_addr(sha);
    arp.set_sender_proto_addr(spa);
    arp.set_target_hw_addr(tha);
    arp.set_target_proto_addr(tpa);
    buf
}

/// ARP reply "`ip` is at `our_mac`" to the requester.
pub fn arp_reply(our_mac: MacAddr, ip: Ipv4Addr, to_mac: MacAddr, to_ip: Ipv4Addr) -> Vec<u8> {
    arp_frame(to_mac, ArpOperations::Reply, our_mac, ip, to_mac, to_ip)
}

/// Gratuitous ARP request (RFC 5227 announcement): broadcast, sender = target = `ip`, target
/// hardware address zero.
pub fn garp_request(our_mac: MacAddr, ip: Ipv4Addr) -> Vec<u8> {
    arp_frame(
        MacAddr::broadcast(),
        ArpOperations::Request,
        our_mac,
        ip,
        MacAddr::zero(),
        ip,
    )
}

/// Gratuitous ARP reply: broadcast, sender = target = `ip`, target hardware address = ours
/// (Linux only treats a reply as gratuitous when both hardware addresses match).
pub fn garp_reply(our_mac: MacAddr, ip: Ipv4Addr) -> Vec<u8> {
    arp_frame(
        MacAddr::broadcast(),
        ArpOperations::Reply,
        our_mac,
        ip,
        our_mac,
        ip,
    )
}

/// The all-nodes multicast address `ff02::1`.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// The solicited-node multicast group of `ip` (`ff02::1:ffXX:XXXX`, RFC 4291 §2.7.1).
pub fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15],
    ])
}

/// The Ethernet multicast address for an IPv6 multicast group (`33:33` + low 32 bits).
pub fn multicast_mac(group: Ipv6Addr) -> MacAddr {
    let o = group.octets();
    MacAddr::new(0x33, 0x33, o[12], o[13], o[14], o[15])
}

/// Neighbor Advertisement for `target` at `our_mac`, with the target link-layer address option
/// and the override flag, sent from `target` to `dst_ip` at `dst_mac`. `solicited` sets the S
/// flag (never set it for a multicast destination).
pub fn neighbor_advert(
    our_mac: MacAddr,
    target: Ipv6Addr,
    dst_mac: MacAddr,
    dst_ip: Ipv6Addr,
    solicited: bool,
) -> Vec<u8> {
    let mut buf = vec![0u8; NA_FRAME_LEN];
    {
        let mut eth = MutableEthernetPacket::new(&mut buf).expect("buffer sized for ethernet");
        eth.set_destination(dst_mac);
        eth.set_source(our_mac);
        eth.set_ethertype(EtherTypes::Ipv6);
    }
    {
        let mut ip =
            MutableIpv6Packet::new(&mut buf[ETH_LEN..]).expect("buffer sized for an IPv6 header");
        ip.set_version(6);
        ip.set_payload_length((ND_LEN + LLA_OPT_LEN) as u16);
        ip.set_next_header(IpNextHeaderProtocols::Icmpv6);
        ip.set_hop_limit(255);
        ip.set_source(target);
        ip.set_destination(dst_ip);
    }
    let icmp = &mut buf[ETH_LEN + IPV6_LEN..];
    icmp[0] = ICMPV6_NEIGHBOR_ADVERT;
    icmp[4] = NA_FLAG_OVERRIDE | if solicited { NA_FLAG_SOLICITED } else { 0 };
    icmp[8..24].copy_from_slice(&target.octets());
    icmp[24] = NDP_OPT_TARGET_LLA;
    icmp[25] = 1;
    icmp[26..32].copy_from_slice(&our_mac.octets());
    let sum = ipv6_checksum(
        icmp,
        1,
        &[],
        &target,
        &dst_ip,
        IpNextHeaderProtocols::Icmpv6,
    );
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    buf
}

/// The answer to a Neighbor Solicitation: unicast back to the solicitor with S|O, or to
/// all-nodes with O only when the solicitation came from `::` (duplicate address detection).
pub fn advert_for(
    our_mac: MacAddr,
    target: Ipv6Addr,
    reply_mac: MacAddr,
    source: Ipv6Addr,
) -> Vec<u8> {
    if source.is_unspecified() {
        neighbor_advert(our_mac, target, multicast_mac(ALL_NODES), ALL_NODES, false)
    } else {
        neighbor_advert(our_mac, target, reply_mac, source, true)
    }
}

/// Unsolicited Neighbor Advertisement (override, not solicited) to all nodes, sent after
/// gaining `target`.
pub fn unsolicited_advert(our_mac: MacAddr, target: Ipv6Addr) -> Vec<u8> {
    neighbor_advert(our_mac, target, multicast_mac(ALL_NODES), ALL_NODES, false)
}

/// Neighbor Solicitation for `target` from `source` to its solicited-node group, with a source
/// link-layer address option (what a host sends to resolve an address; used by tests and
/// `palisade` debugging tools).
pub fn neighbor_solicit(our_mac: MacAddr, source: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let group = solicited_node(target);
    let mut buf = neighbor_advert(our_mac, target, multicast_mac(group), group, false);
    {
        let mut ip = MutableIpv6Packet::new(&mut buf[ETH_LEN..]).expect("sized");
        ip.set_source(source);
    }
    let icmp = &mut buf[ETH_LEN + IPV6_LEN..];
    icmp[0] = ICMPV6_NEIGHBOR_SOLICIT;
    icmp[2..8].fill(0);
    icmp[24] = NDP_OPT_SOURCE_LLA;
    let sum = ipv6_checksum(icmp, 1, &[], &source, &group, IpNextHeaderProtocols::Icmpv6);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    buf
}

/// ARP request "who-has `target` tell `sender_ip`" (tests and debugging tools).
pub fn arp_request(our_mac: MacAddr, sender_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    arp_frame(
        MacAddr::broadcast(),
        ArpOperations::Request,
        our_mac,
        sender_ip,
        MacAddr::zero(),
        target,
    )
}

/// What an announcement or answer on the wire says, for observers (tests, debugging tools).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// ARP reply `ip` is at `mac`; `gratuitous` when sender and target IP are equal.
    ArpReply {
        ip: Ipv4Addr,
        mac: MacAddr,
        gratuitous: bool,
    },
    /// Gratuitous ARP request: `ip` is at `mac`.
    GarpRequest { ip: Ipv4Addr, mac: MacAddr },
    /// Neighbor Advertisement: `target` is at `mac` (from the target link-layer option, else
    /// the Ethernet source).
    Advert {
        target: Ipv6Addr,
        mac: MacAddr,
        solicited: bool,
        override_flag: bool,
    },
}

/// Decodes ARP replies, gratuitous ARP requests and Neighbor Advertisements. Never panics.
pub fn observe(frame: &[u8]) -> Option<Observed> {
    let eth = EthernetPacket::new(frame)?;
    match eth.get_ethertype() {
        EtherTypes::Arp => {
            let arp = ArpPacket::new(eth.payload())?;
            if arp.get_hardware_type() != ArpHardwareTypes::Ethernet
                || arp.get_protocol_type() != EtherTypes::Ipv4
            {
                return None;
            }
            let (spa, tpa) = (arp.get_sender_proto_addr(), arp.get_target_proto_addr());
            let mac = arp.get_sender_hw_addr();
            match arp.get_operation() {
                ArpOperations::Reply => Some(Observed::ArpReply {
                    ip: spa,
                    mac,
                    gratuitous: spa == tpa,
                }),
                ArpOperations::Request if spa == tpa => {
                    Some(Observed::GarpRequest { ip: spa, mac })
                }
                _ => None,
            }
        }
        EtherTypes::Ipv6 => {
            let payload = eth.payload();
            let ip = Ipv6Packet::new(payload)?;
            if ip.get_next_header() != IpNextHeaderProtocols::Icmpv6 {
                return None;
            }
            let declared = usize::from(ip.get_payload_length());
            let icmp = payload.get(IPV6_LEN..IPV6_LEN.checked_add(declared)?)?;
            if icmp.len() < ND_LEN || icmp[0] != ICMPV6_NEIGHBOR_ADVERT {
                return None;
            }
            let target = Ipv6Addr::from(<[u8; 16]>::try_from(&icmp[8..24]).ok()?);
            let mut mac = eth.get_source();
            let mut opts = &icmp[ND_LEN..];
            while opts.len() >= LLA_OPT_LEN {
                let len = usize::from(opts[1]) * 8;
                if len == 0 || len > opts.len() {
                    return None;
                }
                if opts[0] == NDP_OPT_TARGET_LLA {
                    mac = MacAddr::new(opts[2], opts[3], opts[4], opts[5], opts[6], opts[7]);
                }
                opts = &opts[len..];
            }
            Some(Observed::Advert {
                target,
                mac,
                solicited: icmp[4] & NA_FLAG_SOLICITED != 0,
                override_flag: icmp[4] & NA_FLAG_OVERRIDE != 0,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: MacAddr = MacAddr(0x02, 0, 0, 0, 0, 0x11);
    const THEIRS: MacAddr = MacAddr(0x02, 0, 0, 0, 0, 0x64);

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn arp_request_round_trip_and_reply() {
        let req = arp_request(THEIRS, v4("198.51.100.100"), v4("198.51.100.200"));
        assert_eq!(req.len(), ARP_FRAME_LEN);
        assert_eq!(
            parse(&req),
            Some(Request::Arp {
                sender_mac: THEIRS,
                sender_ip: v4("198.51.100.100"),
                target: v4("198.51.100.200"),
            })
        );
        let reply = arp_reply(OURS, v4("198.51.100.200"), THEIRS, v4("198.51.100.100"));
        let eth = EthernetPacket::new(&reply).unwrap();
        assert_eq!(eth.get_destination(), THEIRS);
        assert_eq!(eth.get_source(), OURS);
        let arp = ArpPacket::new(eth.payload()).unwrap();
        assert_eq!(arp.get_operation(), ArpOperations::Reply);
        assert_eq!(arp.get_target_hw_addr(), THEIRS);
        assert_eq!(arp.get_target_proto_addr(), v4("198.51.100.100"));
        assert_eq!(
            observe(&reply),
            Some(Observed::ArpReply {
                ip: v4("198.51.100.200"),
                mac: OURS,
                gratuitous: false
            })
        );
        // A reply is not a request.
        assert_eq!(parse(&reply), None);
    }

    #[test]
    fn gratuitous_frames() {
        let ip = v4("198.51.100.200");
        let req = garp_request(OURS, ip);
        assert_eq!(parse(&req), None, "GARP asks nothing");
        assert_eq!(observe(&req), Some(Observed::GarpRequest { ip, mac: OURS }));
        let eth = EthernetPacket::new(&req).unwrap();
        assert_eq!(eth.get_destination(), MacAddr::broadcast());
        assert_eq!(
            ArpPacket::new(eth.payload()).unwrap().get_target_hw_addr(),
            MacAddr::zero()
        );

        let rep = garp_reply(OURS, ip);
        assert_eq!(
            observe(&rep),
            Some(Observed::ArpReply {
                ip,
                mac: OURS,
                gratuitous: true
            })
        );
        let eth = EthernetPacket::new(&rep).unwrap();
        assert_eq!(eth.get_destination(), MacAddr::broadcast());
        assert_eq!(
            ArpPacket::new(eth.payload()).unwrap().get_target_hw_addr(),
            OURS
        );
    }

    #[test]
    fn non_ethernet_or_non_ipv4_arp_is_ignored() {
        let mut req = arp_request(THEIRS, v4("10.0.0.1"), v4("10.0.0.2"));
        req[ETH_LEN + 2] = 0x86; // protocol type IPv6
        req[ETH_LEN + 3] = 0xdd;
        assert_eq!(parse(&req), None);
        let mut req = arp_request(THEIRS, v4("10.0.0.1"), v4("10.0.0.2"));
        req[ETH_LEN + 4] = 8; // hardware length
        assert_eq!(parse(&req), None);
        // Probe (RFC 5227) from 0.0.0.0 is a request we answer.
        let probe = arp_request(THEIRS, Ipv4Addr::UNSPECIFIED, v4("10.0.0.2"));
        assert!(matches!(parse(&probe), Some(Request::Arp { .. })));
    }

    #[test]
    fn solicited_node_and_multicast_mac() {
        let ip = v6("fd00:51:100::1:2:3344:5566");
        assert_eq!(solicited_node(ip), v6("ff02::1:ff44:5566"));
        assert_eq!(
            multicast_mac(solicited_node(ip)),
            MacAddr::new(0x33, 0x33, 0xff, 0x44, 0x55, 0x66)
        );
        assert_eq!(
            multicast_mac(ALL_NODES),
            MacAddr::new(0x33, 0x33, 0, 0, 0, 1)
        );
    }

    #[test]
    fn solicitation_round_trip_and_advert_checksum() {
        let client = v6("fd00:51:100::100");
        let vip = v6("fd00:51:100::200");
        let ns = neighbor_solicit(THEIRS, client, vip);
        let eth = EthernetPacket::new(&ns).unwrap();
        assert_eq!(
            eth.get_destination(),
            MacAddr::new(0x33, 0x33, 0xff, 0, 0x02, 0)
        );
        assert_eq!(
            parse(&ns),
            Some(Request::Solicit {
                reply_mac: THEIRS,
                source: client,
                target: vip
            })
        );

        let na = advert_for(OURS, vip, THEIRS, client);
        assert_eq!(na.len(), NA_FRAME_LEN);
        let eth = EthernetPacket::new(&na).unwrap();
        assert_eq!(eth.get_destination(), THEIRS);
        let ip = Ipv6Packet::new(eth.payload()).unwrap();
        assert_eq!(ip.get_hop_limit(), 255);
        assert_eq!(ip.get_destination(), client);
        // The checksum verifies with pnet's own ICMPv6 routine.
        let icmp = pnet::packet::icmpv6::Icmpv6Packet::new(ip.payload()).unwrap();
        assert_eq!(
            pnet::packet::icmpv6::checksum(&icmp, &ip.get_source(), &ip.get_destination()),
            icmp.get_checksum()
        );
        assert_eq!(
            observe(&na),
            Some(Observed::Advert {
                target: vip,
                mac: OURS,
                solicited: true,
                override_flag: true
            })
        );

        // DAD: from ::, answered to all-nodes without S.
        let dad = advert_for(OURS, vip, THEIRS, Ipv6Addr::UNSPECIFIED);
        let eth = EthernetPacket::new(&dad).unwrap();
        assert_eq!(eth.get_destination(), multicast_mac(ALL_NODES));
        assert!(matches!(
            observe(&dad),
            Some(Observed::Advert {
                solicited: false,
                override_flag: true,
                ..
            })
        ));
        let un = unsolicited_advert(OURS, vip);
        assert!(matches!(
            observe(&un),
            Some(Observed::Advert {
                solicited: false,
                override_flag: true,
                mac: OURS,
                ..
            })
        ));
    }

    #[test]
    fn bad_solicitations_are_dropped() {
        let client = v6("fd00:51:100::100");
        let vip = v6("fd00:51:100::200");
        let good = neighbor_solicit(THEIRS, client, vip);
        let icmp_at = ETH_LEN + IPV6_LEN;

        let mut bad_sum = good.clone();
        bad_sum[icmp_at + 2] ^= 0xff;
        assert_eq!(parse(&bad_sum), None, "checksum");

        let mut hop = good.clone();
        hop[ETH_LEN + 7] = 64;
        assert_eq!(parse(&hop), None, "hop limit");

        let mut zero_opt = good.clone();
        zero_opt[icmp_at + 25] = 0;
        let sum = ipv6_checksum(
            &zero_opt[icmp_at..],
            1,
            &[],
            &client,
            &solicited_node(vip),
            IpNextHeaderProtocols::Icmpv6,
        );
        zero_opt[icmp_at + 2..icmp_at + 4].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(parse(&zero_opt), None, "zero-length option");

        let mut huge_opt = good.clone();
        huge_opt[icmp_at + 25] = 200;
        let sum = ipv6_checksum(
            &huge_opt[icmp_at..],
            1,
            &[],
            &client,
            &solicited_node(vip),
            IpNextHeaderProtocols::Icmpv6,
        );
        huge_opt[icmp_at + 2..icmp_at + 4].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(parse(&huge_opt), None, "overlong option");

        // DAD with a source link-layer option is invalid.
        let dad = neighbor_solicit(THEIRS, Ipv6Addr::UNSPECIFIED, vip);
        assert_eq!(parse(&dad), None);

        // A multicast source is never valid.
        let from_group = neighbor_solicit(THEIRS, ALL_NODES, vip);
        assert_eq!(parse(&from_group), None, "multicast source");

        // Truncated: payload length says more than the frame has.
        assert_eq!(parse(&good[..good.len() - 4]), None);
    }

    /// Fuzz-ish: random frames, random mutations of valid frames and every truncation must
    /// neither panic nor produce a request from garbage that fails validation.
    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let valid = [
            arp_request(THEIRS, v4("10.0.0.1"), v4("10.0.0.2")),
            garp_reply(OURS, v4("10.0.0.2")),
            neighbor_solicit(THEIRS, v6("fd00::1"), v6("fd00::2")),
            unsolicited_advert(OURS, v6("fd00::2")),
        ];
        for f in &valid {
            for cut in 0..=f.len() {
                let _ = parse(&f[..cut]);
                let _ = observe(&f[..cut]);
            }
        }
        for i in 0..200_000u32 {
            let mut frame = if i % 2 == 0 {
                let len = (next() % 200) as usize;
                (0..len).map(|_| next() as u8).collect::<Vec<u8>>()
            } else {
                valid[(i as usize / 2) % valid.len()].clone()
            };
            // Keep the EtherType interesting half of the time.
            if frame.len() >= 14 && i % 4 < 2 {
                let t: [u8; 2] = if i % 8 < 4 {
                    [0x08, 0x06]
                } else {
                    [0x86, 0xdd]
                };
                frame[12..14].copy_from_slice(&t);
            }
            let flips = (next() % 6) as usize;
            for _ in 0..flips {
                if !frame.is_empty() {
                    let at = (next() as usize) % frame.len();
                    frame[at] = next() as u8;
                }
            }
            if next() % 3 == 0 {
                frame.extend((0..next() % 64).map(|_| next() as u8));
            }
            let _ = parse(&frame);
            let _ = observe(&frame);
        }
    }
}
