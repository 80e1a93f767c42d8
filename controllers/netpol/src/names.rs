//! Names of everything we create in the kernel, and the ownership rule.
//!
//! Every chain and set Palisade creates starts with [`CHAIN_PREFIX`]/[`SET_PREFIX`] (or is one
//! of the fixed `PALISADE-*` chains); executors only ever modify or delete names for which
//! [`is_ours_chain`] / [`is_ours_set`] hold. Generated names follow kube-proxy:
//! `prefix + base32(sha256(identity))[..16]`, so they are stable across restarts and agents,
//! and short enough for the kernel (chains ≤ 28 characters, ipsets ≤ 31).
//!
//! | name                | what                                            |
//! |---------------------|-------------------------------------------------|
//! | `PALISADE-FORWARD`  | hooked at position 1 of `FORWARD`               |
//! | `PALISADE-INPUT`    | hooked at position 1 of `INPUT` (pod → node)    |
//! | `PALISADE-INGRESS`  | dispatch on destination local pod               |
//! | `PALISADE-EGRESS`   | dispatch on source local pod                    |
//! | `PAL-IN-…`/`PAL-EG-…` | profile: the set of policies isolating a pod |
//! | `PAL-PI-…`/`PAL-PE-…` | one policy's ingress / egress rules          |
//! | `PAL-XI-…`/`PAL-XE-…` | tiered profile (ClusterNetworkPolicy subjects) |
//! | `PAL-CI-…`/`PAL-CE-…` | one ClusterNetworkPolicy's ingress / egress rules |
//! | `PAL-TI-…`/`PAL-TE-…` | one tier's ordered list of ClusterNetworkPolicies |
//! | `PALISADE-CNP-*`    | fixed ClusterNetworkPolicy verdict chains       |
//! | `PAL-P4-…`          | hash:ip, pods matched by a peer selector        |
//! | `PAL-B4-…`          | hash:net, an ipBlock with `except` (nomatch)    |
//! | `PAL-N4-…`          | hash:ip,port, pods declaring a named port       |
//! | `PAL-P6-…` etc.     | the same for IPv6 (`family inet6`)              |
//! | `…-T`               | temporary set used for an atomic swap           |

use sha2::{Digest, Sha256};

/// Prefix of generated chains.
pub const CHAIN_PREFIX: &str = "PAL-";
/// Prefix of the fixed chains.
pub const BASE_CHAIN_PREFIX: &str = "PALISADE-";
/// Prefix of every ipset.
pub const SET_PREFIX: &str = "PAL-";
/// Suffix of the temporary set used to swap in new members atomically.
pub const TEMP_SET_SUFFIX: &str = "-T";

pub const FORWARD_CHAIN: &str = "PALISADE-FORWARD";
pub const INPUT_CHAIN: &str = "PALISADE-INPUT";
pub const INGRESS_CHAIN: &str = "PALISADE-INGRESS";
pub const EGRESS_CHAIN: &str = "PALISADE-EGRESS";
/// Anti-spoofing: jumped first from FORWARD and INPUT chains of ours.
pub const ANTISPOOF_CHAIN: &str = "PALISADE-ANTISPOOF";
/// TCP packets picked up mid-stream (state NEW without SYN) of isolated local pods.
pub const MIDSTREAM_CHAIN: &str = "PALISADE-MIDSTREAM";
/// Bridged pods: packets the bridge forwards to a pod's port that are not addressed to the
/// pod's IP (broadcast, multicast, link-local) go through the pod's ingress profile too.
pub const BRIDGED_IN_CHAIN: &str = "PALISADE-BRIDGED-IN";

/// Kernel limit for iptables chain names.
pub const MAX_CHAIN_NAME: usize = 28;
/// Kernel limit for ipset names (IPSET_MAXNAMELEN - 1).
pub const MAX_SET_NAME: usize = 31;

/// Chain kinds (prefixes of generated chains).
pub const INGRESS_PROFILE_PREFIX: &str = "PAL-IN-";
pub const EGRESS_PROFILE_PREFIX: &str = "PAL-EG-";
pub const INGRESS_POLICY_PREFIX: &str = "PAL-PI-";
pub const EGRESS_POLICY_PREFIX: &str = "PAL-PE-";
/// The port groups of one large NetworkPolicy rule, jumped to from each of its peers (so the
/// rule costs peers + ports iptables rules, not peers × ports).
pub const RULE_PORTS_PREFIX: &str = "PAL-PP-";

/// ClusterNetworkPolicy chains: the tiered profile of a pod (Admin → NetworkPolicy →
/// Baseline) and one chain per ClusterNetworkPolicy and direction.
pub const INGRESS_TIERED_PREFIX: &str = "PAL-XI-";
pub const EGRESS_TIERED_PREFIX: &str = "PAL-XE-";
pub const INGRESS_CNP_PREFIX: &str = "PAL-CI-";
pub const EGRESS_CNP_PREFIX: &str = "PAL-CE-";
/// One chain per distinct ordered list of one tier's ClusterNetworkPolicies.
pub const INGRESS_TIER_PREFIX: &str = "PAL-TI-";
pub const EGRESS_TIER_PREFIX: &str = "PAL-TE-";
/// Fixed ClusterNetworkPolicy chains (present when some local pod is a subject): set the
/// accept bit, set the pass bit, and leave the direction allowed (clear both bits).
pub const CNP_ACCEPT_CHAIN: &str = "PALISADE-CNP-ACCEPT";
pub const CNP_PASS_CHAIN: &str = "PALISADE-CNP-PASS";
pub const CNP_ALLOW_CHAIN: &str = "PALISADE-CNP-ALLOW";

/// Whether an iptables chain name is Palisade's.
pub fn is_ours_chain(name: &str) -> bool {
    name.starts_with(CHAIN_PREFIX) || name.starts_with(BASE_CHAIN_PREFIX)
}

/// Whether an ipset name is Palisade's.
pub fn is_ours_set(name: &str) -> bool {
    name.starts_with(SET_PREFIX)
}

/// The address family of one of our sets, from its name (`PAL-<kind><4|6>-…`): the sets of
/// both families share the kernel's one ipset namespace, and each family's executor may only
/// touch its own.
pub fn set_family(name: &str) -> Option<crate::Family> {
    let rest = name.strip_prefix(SET_PREFIX)?;
    let mut chars = rest.chars();
    let kind = chars.next()?;
    let family = chars.next()?;
    if !matches!(kind, 'P' | 'B' | 'N') || chars.next() != Some('-') {
        return None;
    }
    match family {
        '4' => Some(crate::Family::V4),
        '6' => Some(crate::Family::V6),
        _ => None,
    }
}

/// The temporary twin of a set, used for `swap`.
pub fn temp_set_name(set: &str) -> String {
    format!("{set}{TEMP_SET_SUFFIX}")
}

/// `prefix` + the first 16 characters of base32(sha256(identity)).
pub fn hashed(prefix: &str, identity: &str) -> String {
    let digest = Sha256::digest(identity.as_bytes());
    let mut out = String::with_capacity(prefix.len() + 16);
    out.push_str(prefix);
    out.push_str(&base32(&digest)[..16]);
    out
}

/// RFC 4648 base32 (upper case, no padding).
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let mut buffer: u32 = 0;
    let mut bits = 0u32;
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc4648_vectors() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(base32(b"fo"), "MZXQ");
        assert_eq!(base32(b"foo"), "MZXW6");
        assert_eq!(base32(b"foob"), "MZXW6YQ");
        assert_eq!(base32(b"fooba"), "MZXW6YTB");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
    }

    #[test]
    fn hashed_names_fit_kernel_limits() {
        for p in [
            INGRESS_PROFILE_PREFIX,
            EGRESS_PROFILE_PREFIX,
            INGRESS_POLICY_PREFIX,
            EGRESS_POLICY_PREFIX,
        ] {
            let n = hashed(p, "some/identity");
            assert!(n.len() <= MAX_CHAIN_NAME, "{n}");
            assert!(is_ours_chain(&n));
        }
        let s = hashed("PAL-P4-", "x");
        assert!(temp_set_name(&s).len() <= MAX_SET_NAME);
        assert!(is_ours_set(&temp_set_name(&s)));
        assert_eq!(hashed("PAL-P4-", "x"), hashed("PAL-P4-", "x"));
        assert_ne!(hashed("PAL-P4-", "x"), hashed("PAL-P4-", "y"));
        assert_eq!(set_family(&s), Some(crate::Family::V4));
        assert_eq!(set_family(&temp_set_name(&s)), Some(crate::Family::V4));
        assert_eq!(set_family(&hashed("PAL-B6-", "x")), Some(crate::Family::V6));
        assert_eq!(set_family("PAL-X6-AAAA"), None);
        assert_eq!(set_family("KUBE-6-AAAA"), None);
        assert!(!is_ours_chain("KUBE-FORWARD"));
        assert!(!is_ours_set("KUBE-CLUSTER-IP"));
    }
}
