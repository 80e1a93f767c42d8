//! TCP MD5 signatures (RFC 2385) for BGP sessions: the `TCP_MD5SIG` socket option.
//!
//! This is the crate's one exception to the no-unsafe rule (docs/security.md): no crate we
//! depend on exposes `TCP_MD5SIG`, and `libc` has the constant but not `struct tcp_md5sig`, so
//! the struct is declared here from Linux's `include/uapi/linux/tcp.h` and passed to
//! `setsockopt(2)`. Everything except that single call is safe code: the peer's address is
//! written into the struct's `sockaddr_storage` bytes field by field, and the key length is
//! checked before anything is copied.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

use nix::libc;

/// Longest key Linux accepts (`TCP_MD5SIG_MAXKEYLEN`).
pub const MAX_KEY_LEN: usize = libc::TCP_MD5SIG_MAXKEYLEN;

/// `struct __kernel_sockaddr_storage`: 128 bytes, aligned like a pointer-sized integer.
#[repr(C, align(8))]
struct SockaddrStorage([u8; 128]);

/// `struct tcp_md5sig` (linux/tcp.h; 216 bytes on every Linux architecture).
#[repr(C)]
struct TcpMd5Sig {
    tcpm_addr: SockaddrStorage,
    tcpm_flags: u8,
    tcpm_prefixlen: u8,
    tcpm_keylen: u16,
    tcpm_ifindex: libc::c_int,
    tcpm_key: [u8; MAX_KEY_LEN],
}

const _: () = assert!(std::mem::size_of::<TcpMd5Sig>() == 216);
const _: () = assert!(std::mem::size_of::<SockaddrStorage>() == 128);

impl TcpMd5Sig {
    /// The option value for `peer` and `key` (safe code only). An empty key removes the
    /// peer's key in the kernel; keys longer than [`MAX_KEY_LEN`] are an error.
    fn new(peer: SocketAddr, key: &[u8]) -> io::Result<TcpMd5Sig> {
        if key.len() > MAX_KEY_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "TCP MD5 key is {} bytes, the kernel allows at most {MAX_KEY_LEN}",
                    key.len()
                ),
            ));
        }
        let mut sig = TcpMd5Sig {
            tcpm_addr: SockaddrStorage([0; 128]),
            tcpm_flags: 0,
            tcpm_prefixlen: 0,
            tcpm_keylen: key.len() as u16, // <= 80, checked above
            tcpm_ifindex: 0,
            tcpm_key: [0; MAX_KEY_LEN],
        };
        sig.tcpm_key[..key.len()].copy_from_slice(key);
        let a = &mut sig.tcpm_addr.0;
        // sockaddr_in / sockaddr_in6: family in host order, port and address in network order.
        // The kernel matches on family and address only.
        match peer {
            SocketAddr::V4(p) => {
                a[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
                a[2..4].copy_from_slice(&p.port().to_be_bytes());
                a[4..8].copy_from_slice(&p.ip().octets());
            }
            SocketAddr::V6(p) => {
                a[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
                a[2..4].copy_from_slice(&p.port().to_be_bytes());
                a[4..8].copy_from_slice(&p.flowinfo().to_be_bytes());
                a[8..24].copy_from_slice(&p.ip().octets());
                a[24..28].copy_from_slice(&p.scope_id().to_ne_bytes());
            }
        }
        Ok(sig)
    }
}

/// Sets the RFC 2385 key for `peer` on a TCP socket; call it before `connect` so the SYN is
/// signed. Fails (never panics) on a key longer than 80 bytes, on a socket that is not TCP, or
/// when the kernel lacks `CONFIG_TCP_MD5SIG`.
#[allow(unsafe_code)]
pub fn set_tcp_md5sig(socket: &impl AsFd, peer: SocketAddr, key: &[u8]) -> io::Result<()> {
    let sig = TcpMd5Sig::new(peer, key)?;
    let fd = socket.as_fd();
    // SAFETY: `fd` is a file descriptor borrowed from `socket`, so it stays open for the call.
    // The value pointer refers to `sig`, a live, initialised `#[repr(C)]` value on this stack
    // frame whose layout is Linux's `struct tcp_md5sig` (size asserted at compile time), and
    // the length passed is exactly its size, so the kernel reads only memory we own. The kernel
    // copies the value and keeps no pointer to it; setsockopt does not write to it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            (&sig as *const TcpMd5Sig).cast::<libc::c_void>(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_key_is_an_error_not_a_panic() {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer: SocketAddr = "127.0.0.1:179".parse().unwrap();
        let err = set_tcp_md5sig(&s, peer, &[b'x'; 81]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = set_tcp_md5sig(&s, peer, &vec![0; 100_000]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn struct_layout() {
        let sig = TcpMd5Sig::new("10.1.2.3:179".parse().unwrap(), b"secret").unwrap();
        assert_eq!(
            &sig.tcpm_addr.0[..8],
            &[
                (libc::AF_INET as u16).to_ne_bytes()[0],
                (libc::AF_INET as u16).to_ne_bytes()[1],
                0,
                179,
                10,
                1,
                2,
                3
            ]
        );
        assert!(sig.tcpm_addr.0[8..].iter().all(|b| *b == 0));
        assert_eq!(sig.tcpm_keylen, 6);
        assert_eq!(&sig.tcpm_key[..6], b"secret");
        let sig = TcpMd5Sig::new("[2001:db8::1]:179".parse().unwrap(), &[7; 80]).unwrap();
        assert_eq!(
            &sig.tcpm_addr.0[8..24],
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(sig.tcpm_keylen, 80);
    }

    #[test]
    fn kernel_accepts_the_option() {
        // On a TCP socket of the matching family (80-byte key, the maximum). Kernels without
        // CONFIG_TCP_MD5SIG answer ENOPROTOOPT; say so rather than fail.
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        match set_tcp_md5sig(&s, "127.0.0.1:179".parse().unwrap(), &[1; 80]) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
                println!("skipped: kernel without CONFIG_TCP_MD5SIG")
            }
            Err(e) => panic!("setsockopt(TCP_MD5SIG): {e}"),
        }
        // Removing it again (empty key) works too.
        set_tcp_md5sig(&s, "127.0.0.1:179".parse().unwrap(), b"").ok();
    }
}
