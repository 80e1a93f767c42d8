//! Membership datagrams: the receiver's checks never panic, whatever the bytes. The input is
//! split into datagrams; each is checked once as received and once re-signed with the key
//! (key id patched in, HMAC appended) so the parser behind the MAC check is reached too. An
//! accepted datagram re-encodes to the same bytes.
#![no_main]
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use palisade_membership::memberlist_key::{Key, KeyRing};
use palisade_membership::memberlist_wire::{encode, Context, Guard};
use sha2::Sha256;

const SECRET: &[u8] = b"palisade-memberlist-insecure";

fuzz_target!(|data: &[u8]| {
    let key = Key::insecure();
    let keys = KeyRing::new(Key::insecure());
    let from: IpAddr = [192, 0, 2, 2].into();
    let mut peers = BTreeMap::new();
    for n in ["node2", "n", "a"] {
        peers.insert(n.to_string(), BTreeSet::from([from]));
    }
    let now = tokio::time::Instant::now();
    let wall_ms = 1_800_000_000_000u64;
    let cx = Context {
        tag: "palisade",
        me: "node1",
        keys: &keys,
        peers: &peers,
        wall_ms,
        now,
    };
    let mut guard = Guard::new(Duration::from_secs(30));
    for chunk in data.split(|b| *b == 0xfe).take(16) {
        let _ = guard.check(chunk, from, &cx);
        let mut signed = chunk.to_vec();
        if signed.len() >= 9 {
            signed[5..9].copy_from_slice(&key.id().to_be_bytes());
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).expect("any key length");
        mac.update(&signed);
        signed.extend_from_slice(&mac.finalize().into_bytes());
        if let Ok(d) = guard.check(&signed, from, &cx) {
            assert_eq!(encode("palisade", &d, &key), signed, "{d:?}");
        }
    }
});
