//! End to end, LoadBalancer: an IPAddressPool and a Service get an IP into the Service's
//! status; a client on the LAN connects to it (ARP answered by the elected agent), and again
//! after that agent is killed (failover time printed); a rolling update behind the IP under a
//! policy loses no client connection and lets no denied packet through.
//!
//! Backend: the lab (default, needs root) or kind (`PALISADE_E2E_BACKEND=kind`). The client
//! parts skip with a message when the agent has no L2 announcer. Needs `cargo build -p
//! palisade` first (or `PALISADE_BIN`).

use palisade_e2e::scenarios;

#[test]
fn e2e_lb_allocation_and_failover() {
    scenarios::run(
        "e2e_lb_allocation_and_failover",
        2,
        scenarios::lb_allocation_and_failover,
    );
}

#[test]
fn e2e_rolling_update_behind_lb() {
    scenarios::run(
        "e2e_rolling_update_behind_lb",
        2,
        scenarios::rolling_update_behind_lb,
    );
}
