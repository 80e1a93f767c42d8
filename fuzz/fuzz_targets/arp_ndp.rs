//! ARP / NDP frame decoding (requests we answer, and what we observe) never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use palisade_speaker::packet::{observe, parse};

fuzz_target!(|data: &[u8]| {
    let _ = parse(data);
    let _ = observe(data);
});
