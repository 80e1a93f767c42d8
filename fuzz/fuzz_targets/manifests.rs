//! The manifest parser (YAML and JSON) never panics; whatever it accepts compiles and renders
//! to a payload the tracer accepts.
#![no_main]
use libfuzzer_sys::fuzz_target;
use palisade_netpol::{compile, manifests, render, trace::Tracer, NodeConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(state) = manifests::parse(text) else {
        return;
    };
    let node = state
        .nodes
        .first()
        .and_then(|n| n.metadata.name.clone())
        .unwrap_or_else(|| "n1".into());
    let p = render(&compile(&state, &NodeConfig::new(node)));
    if let Err(e) = Tracer::new(&p) {
        panic!(
            "rendered payload rejected by the tracer: {e}\n{}",
            p.iptables_restore
        );
    }
});
