//! The denied-traffic log's kernel side: packets our chains send to an NFLOG group, read over
//! a netlink socket (`NETLINK_NETFILTER`, pure Rust: `netlink-sys` + `netlink-packet-netfilter`,
//! no libnetfilter_log).
//!
//! ```text
//!  iptables: ... -m hashlimit (per pod) -j NFLOG --nflog-prefix PAL-IN-<profile> --nflog-group G
//!        │ nfnetlink_log (kernel), batched at most 100 ms
//!        ▼
//!  NflogSocket::bind(G) ── recv() ──► [NflogMessage { prefix, payload (first 128 bytes) }]
//! ```
//!
//! Only the first [`COPY_RANGE`] bytes of a packet are copied: the IP and transport headers
//! are all the log needs. Binding needs `CAP_NET_ADMIN` in the network namespace; one socket
//! per group (a second bind of the same group fails with EBUSY).

use std::time::Duration;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{
    config_request, ConfigCmd, ConfigMode, PacketNla, Timeout, ULogMessage,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{constants::NETLINK_NETFILTER, AsyncSocket, AsyncSocketExt, TokioSocket};

/// Bytes of each packet copied to us (IPv6 header, a few extension headers, ports).
pub const COPY_RANGE: u32 = 128;

/// One logged packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NflogMessage {
    /// `--nflog-prefix` of the rule that logged it.
    pub prefix: String,
    /// The packet from its network header on (at most [`COPY_RANGE`] bytes).
    pub payload: Vec<u8>,
}

/// Errors of the NFLOG reader.
#[derive(Debug, thiserror::Error)]
pub enum NflogError {
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("binding NFLOG group {group}: kernel said {code}")]
    Bind { group: u16, code: i32 },
    #[error("binding NFLOG group {group}: no answer from the kernel")]
    NoAnswer { group: u16 },
}

/// A socket bound to one NFLOG group. Needs a tokio runtime.
pub struct NflogSocket {
    socket: TokioSocket,
    group: u16,
}

impl NflogSocket {
    /// Opens a netlink socket and binds it to `group` (copy mode packet, [`COPY_RANGE`]
    /// bytes, flushed every 100 ms).
    pub async fn bind(group: u16) -> Result<NflogSocket, NflogError> {
        let mut socket = TokioSocket::new(NETLINK_NETFILTER)?;
        socket.socket_mut().bind_auto()?;
        // A deep receive buffer: a burst of denials must not overflow it (ENOBUFS).
        let _ = socket.socket_ref().set_rx_buf_sz(1 << 20);
        let timeout: Timeout = Duration::from_millis(100).into();
        let req = config_request(
            NetfilterProtoFamily::Unspec,
            group,
            vec![
                ConfigCmd::Bind.into(),
                ConfigMode::new_packet(COPY_RANGE).into(),
                timeout.into(),
            ],
        );
        let mut buf = vec![0; req.header.length as usize];
        req.serialize(&mut buf[..]);
        socket.send(&buf).await?;
        let answer = tokio::time::timeout(Duration::from_secs(5), socket.recv_from_full())
            .await
            .map_err(|_| NflogError::NoAnswer { group })??;
        let (bytes, _) = answer;
        match NetlinkMessage::<NetfilterMessage>::deserialize(&bytes) {
            Ok(m) => match m.payload {
                NetlinkPayload::Error(e) => match e.code {
                    None => {}
                    Some(code) => {
                        return Err(NflogError::Bind {
                            group,
                            code: code.get(),
                        })
                    }
                },
                _ => return Err(NflogError::NoAnswer { group }),
            },
            Err(_) => return Err(NflogError::NoAnswer { group }),
        }
        Ok(NflogSocket { socket, group })
    }

    /// The group this socket is bound to.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Waits for the next datagram and returns the packets it carries (possibly none).
    /// Messages that do not parse are skipped; an error is only a socket error.
    pub async fn recv(&mut self) -> Result<Vec<NflogMessage>, NflogError> {
        let (bytes, _) = self.socket.recv_from_full().await?;
        Ok(parse_datagram(&bytes))
    }
}

/// The packets of one netlink datagram (several messages, each with its length).
pub fn parse_datagram(bytes: &[u8]) -> Vec<NflogMessage> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset + 16 <= bytes.len() {
        let len = u32::from_ne_bytes([
            bytes[offset],
            bytes[offset + 1],
            bytes[offset + 2],
            bytes[offset + 3],
        ]) as usize;
        if len < 16 || offset + len > bytes.len() {
            break;
        }
        if let Ok(m) = NetlinkMessage::<NetfilterMessage>::deserialize(&bytes[offset..offset + len])
        {
            if let NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
                ..
            }) = m.payload
            {
                let mut prefix = String::new();
                let mut payload = Vec::new();
                for nla in nlas {
                    match nla {
                        PacketNla::Prefix(p) => prefix = p.to_string_lossy().into_owned(),
                        PacketNla::Payload(p) => payload = p,
                        _ => {}
                    }
                }
                out.push(NflogMessage { prefix, payload });
            }
        }
        // Messages are 4-byte aligned.
        offset += (len + 3) & !3;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_datagrams_give_nothing() {
        assert!(parse_datagram(&[]).is_empty());
        assert!(parse_datagram(&[0xff; 15]).is_empty());
        assert!(parse_datagram(&[0xff; 64]).is_empty());
        let mut b = vec![0u8; 64];
        b[0] = 200; // length beyond the buffer
        assert!(parse_datagram(&b).is_empty());
        b[0] = 16;
        assert!(parse_datagram(&b).is_empty());
    }
}
