//! Hand-built SCTP INIT packets, for kernels without SCTP sockets.
//!
//! The lab's kernels may lack `CONFIG_IP_SCTP`, so nothing can `connect()` over SCTP, yet
//! iptables still matches `-p sctp` and conntrack still tracks it. An SCTP probe therefore is:
//!
//! ```text
//!   source pod netns                                 destination pod netns
//!   raw socket (IPPROTO_SCTP) ──INIT(tag T)──► node(s) FORWARD ──► raw socket (IPPROTO_SCTP)
//!                                                                   records (src ip, dst port, T)
//! ```
//!
//! Reachable means the destination saw the INIT with the probe's tag. The INIT is valid enough
//! for conntrack (verification tag 0, non-zero initiate tag, correct CRC32c), so a policy that
//! drops `INVALID` does not drop it. Without an SCTP stack nobody answers INIT-ACK, which the
//! probe does not need; with no protocol handler but a raw socket open the kernel also sends no
//! ICMP "protocol unreachable".

use std::net::Ipv4Addr;

/// IP protocol number of SCTP.
pub const IPPROTO_SCTP: u8 = 132;

const CHUNK_INIT: u8 = 1;
const COMMON_HEADER_LEN: usize = 12;
const INIT_CHUNK_LEN: usize = 20;

/// CRC32c (Castagnoli), as SCTP uses it (RFC 9260 appendix A).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    !crc
}

/// Builds an SCTP packet (common header + one INIT chunk, no IP header).
pub fn build_init(src_port: u16, dst_port: u16, initiate_tag: u32, initial_tsn: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(COMMON_HEADER_LEN + INIT_CHUNK_LEN);
    p.extend_from_slice(&src_port.to_be_bytes());
    p.extend_from_slice(&dst_port.to_be_bytes());
    p.extend_from_slice(&0u32.to_be_bytes()); // verification tag: 0 in an INIT
    p.extend_from_slice(&0u32.to_be_bytes()); // checksum, filled in below
    p.push(CHUNK_INIT);
    p.push(0); // flags
    p.extend_from_slice(&(INIT_CHUNK_LEN as u16).to_be_bytes());
    p.extend_from_slice(&initiate_tag.max(1).to_be_bytes());
    p.extend_from_slice(&65_535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&initial_tsn.to_be_bytes());
    // The CRC32c goes on the wire in little-endian byte order (as Linux' sctp_compute_cksum).
    let crc = crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// An INIT seen by a raw socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceivedInit {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub initiate_tag: u32,
}

/// Parses what an IPv4 raw socket returns (IP header included) as an SCTP INIT.
pub fn parse_init(ip_packet: &[u8]) -> Option<ReceivedInit> {
    let first = *ip_packet.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < 20 || *ip_packet.get(9)? != IPPROTO_SCTP {
        return None;
    }
    let src = Ipv4Addr::new(ip_packet[12], ip_packet[13], ip_packet[14], ip_packet[15]);
    let dst = Ipv4Addr::new(ip_packet[16], ip_packet[17], ip_packet[18], ip_packet[19]);
    let sctp = ip_packet.get(ihl..)?;
    if sctp.len() < COMMON_HEADER_LEN + INIT_CHUNK_LEN || sctp[COMMON_HEADER_LEN] != CHUNK_INIT {
        return None;
    }
    let be16 = |i: usize| u16::from_be_bytes([sctp[i], sctp[i + 1]]);
    let be32 = |i: usize| u32::from_be_bytes([sctp[i], sctp[i + 1], sctp[i + 2], sctp[i + 3]]);
    Some(ReceivedInit {
        src,
        dst,
        src_port: be16(0),
        dst_port: be16(2),
        initiate_tag: be32(COMMON_HEADER_LEN + 4),
    })
}

/// Whether the SCTP packet (no IP header) carries a correct checksum.
pub fn checksum_ok(sctp: &[u8]) -> bool {
    if sctp.len() < COMMON_HEADER_LEN {
        return false;
    }
    let mut copy = sctp.to_vec();
    copy[8..12].copy_from_slice(&[0; 4]);
    crc32c(&copy).to_le_bytes() == sctp[8..12]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn init_round_trips_through_an_ip_header() {
        let sctp = build_init(40000, 80, 0xdead_beef, 7);
        assert_eq!(sctp.len(), 32);
        assert!(checksum_ok(&sctp));
        let mut ip = vec![0x45, 0, 0, 52, 0, 0, 0, 0, 64, IPPROTO_SCTP, 0, 0];
        ip.extend_from_slice(&[10, 244, 1, 2, 10, 244, 2, 3]);
        ip.extend_from_slice(&sctp);
        let init = parse_init(&ip).expect("an INIT");
        assert_eq!(init.src, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(init.dst, Ipv4Addr::new(10, 244, 2, 3));
        assert_eq!(
            (init.src_port, init.dst_port, init.initiate_tag),
            (40000, 80, 0xdead_beef)
        );
    }

    #[test]
    fn corrupted_packet_fails_the_checksum() {
        let mut sctp = build_init(1, 2, 3, 4);
        sctp[20] ^= 1;
        assert!(!checksum_ok(&sctp));
    }
}
