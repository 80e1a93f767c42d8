//! End to end, NetworkPolicy: real `palisade agent`s (one per node, inside the lab's node
//! namespaces) watch the lab's API server; scenarios change policies, pod labels and namespace
//! labels through the API and probe every pod from every pod with real packets.
//!
//! Backend: the lab (default, needs root) or kind (`PALISADE_E2E_BACKEND=kind`, see
//! docs/testing.md). Scenarios live in `palisade_e2e::scenarios`. Needs `cargo build -p
//! palisade` first (or `PALISADE_BIN`).

use palisade_e2e::scenarios;

#[test]
fn e2e_netpol_policy_lifecycle() {
    scenarios::run(
        "e2e_netpol_policy_lifecycle",
        2,
        scenarios::netpol_policy_lifecycle,
    );
}

#[test]
fn e2e_netpol_relabel() {
    scenarios::run("e2e_netpol_relabel", 2, scenarios::netpol_relabel);
}

#[test]
fn e2e_netpol_ip_reuse() {
    scenarios::run("e2e_netpol_ip_reuse", 2, scenarios::netpol_ip_reuse);
}
