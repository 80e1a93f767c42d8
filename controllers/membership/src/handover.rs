//! The L2 hand-over protocol's decisions (pure: reports and instants passed in; the
//! membership carries the reports, the announcer applies the decisions).
//!
//! Every agent still elects alone; this only decides *when* an agent starts or stops
//! answering an IP it gained or lost, from the peers' authenticated "owned" reports
//! ([`crate::memberlist_wire::OwnedReport`]: what each peer's speaker answers right now).
//!
//! - **Hand-back (break-before-make)**: an agent that gained an IP answers it only when no
//!   live peer may still answer it — every live peer that sends reports has reported, *after
//!   counting this agent alive* (the report names our incarnation), a set without the IP or
//!   with the IP marked releasing. A peer that dies or leaves stops counting (normal
//!   failover). A peer that never confirms delays the start by at most `bound` (then the
//!   agent answers anyway: such a peer is treated per membership liveness only), so a silent
//!   or hostile key holder cannot block a hand-back for longer.
//! - **Hand-over (make-before-break)**: an agent that loses IPs because it is going away
//!   (SIGTERM, its Node drained / out-of-service / cordoned with exclusion on) keeps
//!   answering them, reported as releasing, until a live peer reports answering them, or
//!   for at most `bound`. Releasing IPs never block the successor, so for a moment both
//!   answer (make-before-break: clients never ask into silence; the successor's gratuitous
//!   ARP/NA at 0/100/300 ms moves caches to it).
//! - A peer that never sent any report (an agent of an earlier version during a rolling
//!   upgrade) blocks nothing: the fixed hold of the membership applies as before.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::memberlist_wire::OwnedReport;

/// Why a peer holds back the start of answering an IP (see [`blocker`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// Its last report was made before it counted us alive (it may be taking the IP).
    NotCounted,
    /// It answers the IP and is not releasing it.
    Answers,
    /// Its report was cut at the bound without the IP (unknown).
    Truncated,
}

/// The first live peer (other than `me`) that may still answer `ip`, and why.
/// `reports` holds the live peers' latest reports (of their current incarnation).
pub fn blocker<'a>(
    ip: IpAddr,
    me: &str,
    my_incarnation: u64,
    live: &BTreeSet<String>,
    reports: &'a BTreeMap<String, OwnedReport>,
) -> Option<(&'a str, Block)> {
    live.iter()
        .filter(|n| n.as_str() != me)
        .filter_map(|n| reports.get_key_value(n))
        .find_map(|(n, r)| {
            let why = if r.counted != my_incarnation {
                Block::NotCounted
            } else {
                match r.ips.get(&ip) {
                    Some(false) => Block::Answers,
                    Some(true) => return None,
                    None if r.truncated => Block::Truncated,
                    None => return None,
                }
            };
            Some((n.as_str(), why))
        })
}

/// Whether some live peer other than `me` reports answering `ip` (not releasing it): the
/// successor has taken it over.
pub fn taken_over(
    ip: IpAddr,
    me: &str,
    live: &BTreeSet<String>,
    reports: &BTreeMap<String, OwnedReport>,
) -> bool {
    live.iter()
        .filter(|n| n.as_str() != me)
        .filter_map(|n| reports.get(n))
        .any(|r| r.ips.get(&ip) == Some(&false))
}

/// What a gate decided for this pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Not answered yet (waiting for a confirmation).
    pub held: BTreeSet<IpAddr>,
    /// Waited the whole bound without a confirmation; answered now.
    pub expired: Vec<IpAddr>,
    /// When a pass is due even without news (the first bound to expire).
    pub recheck: Option<Instant>,
}

/// Per-IP waits with a bound (one for gained IPs, one for released ones).
#[derive(Debug, Default)]
pub struct Waits {
    since: BTreeMap<IpAddr, Instant>,
}

impl Waits {
    /// For every IP of `ips`, whether it must still wait: `wait(ip)` says it would, and it
    /// has waited less than `bound` since it first did (IPs not in `ips` are forgotten, so a
    /// later wait starts over).
    pub fn hold(
        &mut self,
        ips: &BTreeSet<IpAddr>,
        wait: impl Fn(IpAddr) -> bool,
        now: Instant,
        bound: Duration,
    ) -> Held {
        self.since.retain(|ip, _| ips.contains(ip));
        let mut out = Held::default();
        for ip in ips {
            if !wait(*ip) {
                self.since.remove(ip);
                continue;
            }
            let since = *self.since.entry(*ip).or_insert(now);
            let until = since + bound;
            if now < until {
                out.held.insert(*ip);
                out.recheck = Some(out.recheck.map_or(until, |r| r.min(until)));
            } else {
                out.expired.push(*ip);
            }
        }
        out
    }

    /// Whether an IP is being waited for (held or expired but still listed).
    pub fn waiting(&self, ip: &IpAddr) -> bool {
        self.since.contains_key(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn report(counted: u64, ips: &[(&str, bool)]) -> OwnedReport {
        OwnedReport {
            counted,
            truncated: false,
            ips: ips.iter().map(|(a, r)| (ip(a), *r)).collect(),
        }
    }

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    const ME: u64 = 42;

    #[test]
    fn a_hand_back_waits_for_every_live_peer_that_may_answer() {
        let vip = ip("198.51.100.200");
        let live = names(&["a", "b", "c"]);
        let mut reports = BTreeMap::new();
        // No reports at all (earlier versions): nothing blocks.
        assert_eq!(blocker(vip, "a", ME, &live, &reports), None);
        // b answers it, having counted us: blocks.
        reports.insert("b".to_string(), report(ME, &[("198.51.100.200", false)]));
        assert_eq!(
            blocker(vip, "a", ME, &live, &reports),
            Some(("b", Block::Answers))
        );
        // b released it (reported without it): free ...
        reports.insert("b".to_string(), report(ME, &[("198.51.100.201", false)]));
        assert_eq!(blocker(vip, "a", ME, &live, &reports), None);
        // ... unless that report was made before b counted us (or counted an older us).
        reports.insert("b".to_string(), report(ME - 1, &[]));
        assert_eq!(
            blocker(vip, "a", ME, &live, &reports),
            Some(("b", Block::NotCounted))
        );
        reports.insert("b".to_string(), report(ME, &[]));
        // c's report was cut without the IP: unknown, blocks.
        let mut cut = report(ME, &[("198.51.100.9", false)]);
        cut.truncated = true;
        reports.insert("c".to_string(), cut);
        assert_eq!(
            blocker(vip, "a", ME, &live, &reports),
            Some(("c", Block::Truncated))
        );
        // c hands it over make-before-break (releasing): does not block.
        reports.insert("c".to_string(), report(ME, &[("198.51.100.200", true)]));
        assert_eq!(blocker(vip, "a", ME, &live, &reports), None);
        // A dead peer's report (not live any more) blocks nothing: normal failover.
        reports.insert("d".to_string(), report(ME, &[("198.51.100.200", false)]));
        assert_eq!(blocker(vip, "a", ME, &live, &reports), None);
        // Our own entry never blocks us.
        reports.insert("a".to_string(), report(ME, &[("198.51.100.200", false)]));
        assert_eq!(blocker(vip, "a", ME, &live, &reports), None);
    }

    #[test]
    fn a_successor_takes_over_only_when_it_reports_answering() {
        let vip = ip("198.51.100.200");
        let live = names(&["a", "b"]);
        let mut reports = BTreeMap::new();
        assert!(!taken_over(vip, "a", &live, &reports));
        reports.insert("b".to_string(), report(0, &[("198.51.100.200", true)]));
        assert!(
            !taken_over(vip, "a", &live, &reports),
            "releasing is not taking"
        );
        reports.insert("b".to_string(), report(0, &[("198.51.100.200", false)]));
        assert!(taken_over(vip, "a", &live, &reports));
        assert!(!taken_over(vip, "a", &names(&["a"]), &reports), "b is dead");
        reports.insert("a".to_string(), report(0, &[("198.51.100.201", false)]));
        assert!(!taken_over(ip("198.51.100.201"), "a", &live, &reports));
    }

    #[tokio::test(start_paused = true)]
    async fn waits_are_bounded_and_start_over() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let bound = Duration::from_secs(1);
        let (x, y) = (ip("198.51.100.1"), ip("198.51.100.2"));
        let both: BTreeSet<IpAddr> = [x, y].into();
        let mut w = Waits::default();
        // x waits, y does not.
        let h = w.hold(&both, |i| i == x, t0, bound);
        assert_eq!(h.held, [x].into());
        assert_eq!(h.recheck, Some(ms(1000)));
        assert!(h.expired.is_empty());
        // Still within the bound: held, same deadline.
        let h = w.hold(&both, |i| i == x, ms(999), bound);
        assert_eq!((h.held.len(), h.recheck), (1, Some(ms(1000))));
        // The bound is over: answered although never confirmed (a silent or hostile peer).
        let h = w.hold(&both, |i| i == x, ms(1000), bound);
        assert_eq!(h.held, BTreeSet::new());
        assert_eq!(h.expired, vec![x]);
        assert_eq!(h.recheck, None);
        // Confirmed, later lost and gained again: a fresh wait.
        let h = w.hold(&both, |_| false, ms(1100), bound);
        assert_eq!(h, Held::default());
        assert!(!w.waiting(&x));
        let h = w.hold(&[y].into(), |_| true, ms(1200), bound);
        assert_eq!(h.recheck, Some(ms(2200)));
        // An IP no longer in question is forgotten.
        w.hold(&BTreeSet::new(), |_| true, ms(1300), bound);
        assert!(!w.waiting(&y));
    }
}
