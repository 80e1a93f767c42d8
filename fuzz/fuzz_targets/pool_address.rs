//! Pool address entries and requested-IP annotations: never panic; an accepted entry prints
//! back to text that parses to the same range.
#![no_main]
use libfuzzer_sys::fuzz_target;
use palisade_loadbalancer::allocator::parse_requested_ips;
use palisade_loadbalancer::parse_entry;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(range) = parse_entry(text) {
        let again = parse_entry(&range.to_string())
            .unwrap_or_else(|e| panic!("{range} (from {text:?}) does not parse back: {e}"));
        assert_eq!(again, range, "{text:?}");
    }
    let _ = parse_requested_ips(text);
});
