//! End to end, resilience: enforcement stays exactly as it was while agents are SIGKILLed and
//! restarted, and while the API server is unreachable or answering 503 (an agent even
//! restarts during the outage). Denied pairs are hammered throughout (nothing may get
//! through, counted at the destination), allowed pairs probed throughout (nothing may fail).
//!
//! Backend: the lab (default, needs root) or kind (`PALISADE_E2E_BACKEND=kind`). Needs
//! `cargo build -p palisade` first (or `PALISADE_BIN`).

use palisade_e2e::scenarios;

#[test]
fn e2e_agent_restart_keeps_enforcement() {
    scenarios::run(
        "e2e_agent_restart_keeps_enforcement",
        2,
        scenarios::agent_restart_keeps_enforcement,
    );
}

#[test]
fn e2e_api_outage_keeps_enforcement() {
    scenarios::run(
        "e2e_api_outage_keeps_enforcement",
        2,
        scenarios::api_outage_keeps_enforcement,
    );
}
