//! BGP message decoding never panics; a decoded message that encodes again decodes to the
//! same message and length.
#![no_main]
use libfuzzer_sys::fuzz_target;
use palisade_bgp::wire::Codec;

fuzz_target!(|data: &[u8]| {
    let Some((&flag, buf)) = data.split_first() else {
        return;
    };
    let codec = Codec {
        four_octet_asn: flag & 1 == 1,
    };
    let mut rest = buf;
    for _ in 0..8 {
        match codec.decode(rest) {
            Ok(Some((msg, used))) => {
                assert!(
                    used > 0 && used <= rest.len(),
                    "used {used} of {}",
                    rest.len()
                );
                if let Ok(bytes) = codec.encode(&msg) {
                    match codec.decode(&bytes) {
                        Ok(Some((again, n))) => {
                            assert_eq!(again, msg);
                            assert_eq!(n, bytes.len());
                        }
                        other => panic!("re-encoded {msg:?} does not decode: {other:?}"),
                    }
                }
                rest = &rest[used..];
            }
            _ => return,
        }
    }
});
