//! The fast YAML reader never disagrees with serde-saphyr: whatever it reads, serde-saphyr
//! reads to the same values; whatever serde-saphyr refuses, it declines.
#![no_main]
use libfuzzer_sys::fuzz_target;
use palisade_netpol::manifests::yaml_both_ways;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (fast, general) = yaml_both_ways(text);
    if let Some(fast) = fast {
        match general {
            Ok(general) => assert_eq!(fast, general, "the readers differ on {text:?}"),
            Err(e) => panic!("read {text:?}, which serde-saphyr refuses: {e}"),
        }
    }
});
