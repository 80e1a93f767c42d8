//! The LoadBalancer IP allocator: a plain, deterministic struct with no I/O.
//!
//! It owns *who holds which IP*. The runtime feeds it pools (from `IPAddressPool`s) and
//! Services (as [`ServiceRequest`]s built from the Service object), and writes the result
//! to `status.loadBalancer.ingress`.
//!
//! ```text
//!  start-up:  set_pools(pools) ─► restore(svc, status IPs) for every Service (oldest first)
//!  steady:    set_pools(pools) on pool change  ─► PoolsReport {problems, invalidated}
//!             assign(req) on Service change    ─► Ok(ips) | Err(Error) (reason = Event reason)
//!             unassign(key) on delete / type or class change
//!  status:    counters(pool) ─► IPAddressPool.status
//! ```
//!
//! Rules, in order:
//! 1. Families: `SingleStack` gets `ipFamilies[0]`; `RequireDualStack` gets both or fails;
//!    `PreferDualStack` gets both when one pool can give both, else one (first family first).
//!    Families the cluster does not serve ([`Allocator::with_families`]) are never given.
//!    A dual-stack Service takes both addresses from one pool.
//! 2. Pools: `palisade.dev/address-pool` names exactly one pool (autoAssign not required;
//!    unknown name → `UnknownPool`); otherwise every autoAssign pool whose
//!    `serviceAllocation` admits the Service, by priority (lower first, unset last), then
//!    name. A pool's `serviceAllocation` is honoured on every path.
//! 3. Requested IPs (`palisade.dev/loadBalancerIPs` / `spec.loadBalancerIP`): at most one
//!    per family; each must be in a pool that admits the Service (autoAssign not required)
//!    and be free or shareable.
//! 4. Otherwise, per pool and family: the Service's own current IP if still valid, then an IP
//!    already used under the same sharing key (lowest first), then the lowest free address.
//! 5. Sharing: both Services carry the same `palisade.dev/allow-shared-ip` key, no
//!    (protocol, port) is used by both, and traffic policies match: both `Cluster`, or both
//!    `Local` with identical pod selectors (a `Local` Service's traffic goes to nodes with its
//!    endpoints, so only Services with the same endpoints can share the announcing node).
//! 6. An assignment that still fits the request is kept as is (no churn). `assign` is
//!    atomic: on error the previous assignment is unchanged.
//!
//! Speed: each pool keeps a per-family cursor below which every address is in use, so the
//! lowest free address is found in amortised O(1); releasing an address lowers the cursor.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::str::FromStr;

use crate::crd::IPAddressPoolStatus;
use crate::error::{Error, SharingProblem};
use crate::pool::{find_overlaps, ip_to_num, is_buggy, num_to_ip, Pool};
pub use crate::types::{Family, Port, Protocol, ServiceKey};

/// `Service.spec.ipFamilyPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IpFamilyPolicy {
    /// One address, of `ipFamilies[0]` (the Kubernetes default).
    #[default]
    SingleStack,
    /// Both families when possible, else one.
    PreferDualStack,
    /// Both families or nothing.
    RequireDualStack,
}

impl FromStr for IpFamilyPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "SingleStack" => Ok(IpFamilyPolicy::SingleStack),
            "PreferDualStack" => Ok(IpFamilyPolicy::PreferDualStack),
            "RequireDualStack" => Ok(IpFamilyPolicy::RequireDualStack),
            other => Err(format!("unknown ipFamilyPolicy {other:?}")),
        }
    }
}

/// What the allocator needs to know about one LoadBalancer Service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceRequest {
    /// Namespace and name.
    pub key: ServiceKey,
    /// `metadata.labels` (for `serviceSelectors`).
    pub labels: BTreeMap<String, String>,
    /// Labels of the Service's Namespace (for `namespaceSelectors`).
    pub namespace_labels: BTreeMap<String, String>,
    /// Requested IPs (annotation, else `spec.loadBalancerIP`); empty: allocate.
    pub requested_ips: Vec<IpAddr>,
    /// `palisade.dev/address-pool`.
    pub requested_pool: Option<String>,
    /// `spec.ipFamilies` (empty: the cluster's families, primary first).
    pub ip_families: Vec<Family>,
    /// `spec.ipFamilyPolicy`.
    pub ip_family_policy: IpFamilyPolicy,
    /// `palisade.dev/allow-shared-ip`.
    pub sharing_key: Option<String>,
    /// `spec.ports` (protocol, port).
    pub ports: Vec<Port>,
    /// `spec.externalTrafficPolicy == Local`.
    pub external_traffic_policy_local: bool,
    /// `spec.selector` (compared when two `Local` Services want to share an IP).
    pub selector: BTreeMap<String, String>,
}

impl ServiceRequest {
    /// A single-stack request with no constraints.
    pub fn new(namespace: &str, name: &str) -> ServiceRequest {
        ServiceRequest {
            key: ServiceKey::new(namespace, name),
            ..Default::default()
        }
    }
}

/// Parses the `palisade.dev/loadBalancerIPs` annotation: comma-separated IPs, whitespace
/// tolerated, empty items ignored.
pub fn parse_requested_ips(value: &str) -> Result<Vec<IpAddr>, Error> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            IpAddr::from_str(s).map_err(|_| Error::InvalidRequestedIp {
                value: s.to_string(),
            })
        })
        .collect()
}

/// Addresses assigned and available in one pool, per family (exact).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolCounters {
    /// IPv4 addresses of the pool in use by Services.
    pub assigned_v4: u128,
    /// IPv4 addresses of the pool still free.
    pub available_v4: u128,
    /// IPv6 addresses of the pool in use by Services.
    pub assigned_v6: u128,
    /// IPv6 addresses of the pool still free.
    pub available_v6: u128,
}

impl PoolCounters {
    /// Writes the counters into a status, saturating at `i64::MAX`.
    pub fn write_status(&self, status: &mut IPAddressPoolStatus) {
        let sat = |n: u128| i64::try_from(n).unwrap_or(i64::MAX);
        status.assigned_ipv4 = sat(self.assigned_v4);
        status.available_ipv4 = sat(self.available_v4);
        status.assigned_ipv6 = sat(self.assigned_v6);
        status.available_ipv6 = sat(self.available_v6);
    }
}

/// An assignment that stopped fitting the pools after [`Allocator::set_pools`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalidated {
    /// The Service.
    pub service: ServiceKey,
    /// Its IPs that are in no pool any more. The assignment is kept until the caller calls
    /// `assign` (which moves the Service) or `unassign`.
    pub ips: Vec<IpAddr>,
}

/// Outcome of [`Allocator::set_pools`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolsReport {
    /// Problems per pool name (overlaps, unsupported families, duplicates). Pools with
    /// problems are still used, minus what the problem says is ignored.
    pub problems: BTreeMap<String, Vec<Error>>,
    /// Assignments whose IPs left every pool, sorted by Service.
    pub invalidated: Vec<Invalidated>,
}

/// How one Service uses its IPs, as far as sharing is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Share {
    key: Option<String>,
    ports: Vec<Port>,
    /// `Some(selector)` for `externalTrafficPolicy: Local`, `None` for `Cluster`.
    backend: Option<BTreeMap<String, String>>,
}

impl Share {
    fn of(req: &ServiceRequest) -> Share {
        Share {
            key: req.sharing_key.clone().filter(|k| !k.is_empty()),
            ports: req.ports.clone(),
            backend: req
                .external_traffic_policy_local
                .then(|| req.selector.clone()),
        }
    }
}

#[derive(Clone, Debug)]
struct Record {
    ips: Vec<IpAddr>,
    share: Share,
}

#[derive(Clone, Debug)]
struct PoolState {
    pool: Pool,
    /// Per family: every allocatable address of the pool below the cursor is in use.
    cursor: [u128; 2],
    /// Per family: the scan reached the end; nothing free until a release.
    exhausted: [bool; 2],
    /// Per family: distinct addresses of the pool in use.
    assigned: [u128; 2],
}

impl PoolState {
    fn new(pool: Pool) -> PoolState {
        PoolState {
            pool,
            cursor: [0; 2],
            exhausted: [false; 2],
            assigned: [0; 2],
        }
    }
}

/// Families the Service should get: all of `families`, or at least `min` of them.
struct FamilyPlan {
    families: Vec<Family>,
    min: usize,
}

/// The LoadBalancer IP allocator. See the module docs for the rules.
#[derive(Clone, Debug)]
pub struct Allocator {
    /// Families the cluster serves, primary first.
    families: Vec<Family>,
    /// Pools in allocation order (priority, then name).
    pools: Vec<PoolState>,
    by_name: HashMap<String, usize>,
    services: HashMap<ServiceKey, Record>,
    /// IP → Services holding it (more than one only when shared).
    in_use: HashMap<IpAddr, Vec<ServiceKey>>,
    /// Sharing key → IPs held under that key.
    by_sharing_key: HashMap<String, BTreeSet<IpAddr>>,
}

impl Default for Allocator {
    fn default() -> Self {
        Allocator::new()
    }
}

impl Allocator {
    /// An allocator with no pools serving IPv4 and IPv6 (IPv4 primary).
    pub fn new() -> Allocator {
        Allocator::with_families(&Family::ALL)
    }

    /// An allocator serving only `families` (first = primary, used when a Service lists no
    /// `ipFamilies`). An empty list means IPv4 only.
    pub fn with_families(families: &[Family]) -> Allocator {
        let mut fams: Vec<Family> = Vec::new();
        for f in families {
            if !fams.contains(f) {
                fams.push(*f);
            }
        }
        if fams.is_empty() {
            fams.push(Family::V4);
        }
        Allocator {
            families: fams,
            pools: Vec::new(),
            by_name: HashMap::new(),
            services: HashMap::new(),
            in_use: HashMap::new(),
            by_sharing_key: HashMap::new(),
        }
    }

    /// Families served, primary first.
    pub fn families(&self) -> &[Family] {
        &self.families
    }

    /// Replaces the pools. Reports per-pool problems and the assignments whose IPs are no
    /// longer in any pool (those stay recorded until `assign`/`unassign`, so nothing else can
    /// take the IP meanwhile). Assignments still inside a pool are untouched.
    pub fn set_pools(&mut self, pools: Vec<Pool>) -> PoolsReport {
        let mut report = PoolsReport::default();
        let mut seen = HashSet::new();
        let mut kept = Vec::with_capacity(pools.len());
        for mut pool in pools {
            if !seen.insert(pool.name.clone()) {
                report
                    .problems
                    .entry(pool.name.clone())
                    .or_default()
                    .push(Error::DuplicatePool {
                        pool: pool.name.clone(),
                    });
                continue;
            }
            for family in Family::ALL {
                if !self.families.contains(&family) && pool.has_family(family) {
                    report.problems.entry(pool.name.clone()).or_default().push(
                        Error::FamilyNotSupported {
                            family,
                            detail: format!(
                                "IPAddressPool {:?} lists {family} addresses but the cluster \
                                 serves only {}; they are ignored",
                                pool.name,
                                family_names(&self.families)
                            ),
                        },
                    );
                    pool.strip_family(family);
                }
            }
            kept.push(pool);
        }
        for o in find_overlaps(&kept) {
            for name in [&o.pool, &o.other] {
                report
                    .problems
                    .entry(name.clone())
                    .or_default()
                    .push(o.error_for(name));
            }
        }
        kept.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        self.by_name = kept
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        self.pools = kept.into_iter().map(PoolState::new).collect();
        for ip in self.in_use.keys() {
            let (family, n) = ip_to_num(*ip);
            for st in &mut self.pools {
                if st.pool.contains_num(family, n) {
                    st.assigned[family.index()] += 1;
                }
            }
        }
        for (key, rec) in &self.services {
            let ips: Vec<IpAddr> = rec
                .ips
                .iter()
                .copied()
                .filter(|ip| !self.pools.iter().any(|st| st.pool.contains(*ip)))
                .collect();
            if !ips.is_empty() {
                report.invalidated.push(Invalidated {
                    service: key.clone(),
                    ips,
                });
            }
        }
        report.invalidated.sort_by(|a, b| a.service.cmp(&b.service));
        report
    }

    /// The pools in allocation order.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.iter().map(|st| &st.pool)
    }

    /// Assigns IPs to a Service (or confirms its current ones) following the module rules.
    /// Returns the IPs in the Service's family order. On error nothing changes.
    pub fn assign(&mut self, req: &ServiceRequest) -> Result<Vec<IpAddr>, Error> {
        let plan = self.family_plan(req)?;
        let share = Share::of(req);
        let ips = if req.requested_ips.is_empty() {
            self.plan_auto(req, &plan, &share)?
        } else {
            self.plan_requested(req, &plan, &share)?
        };
        self.commit(&req.key, ips.clone(), share);
        Ok(ips)
    }

    /// Records IPs a Service already has (from `status.loadBalancer.ingress`) at start-up.
    ///
    /// Never double-assigns: an IP held by another Service is accepted only if sharing is
    /// compatible, else `IpInUse`/`SharingConflict` and nothing is recorded (restore Services
    /// oldest first so the older one keeps the IP). Each IP must be in some pool
    /// (`IpNotInPool` otherwise). Pool selection constraints are *not* checked here: a later
    /// `assign` moves the Service if they no longer admit it.
    /// An empty `ips` changes nothing.
    pub fn restore(&mut self, req: &ServiceRequest, ips: &[IpAddr]) -> Result<(), Error> {
        if ips.is_empty() {
            return Ok(());
        }
        let share = Share::of(req);
        let mut by_family: [Option<IpAddr>; 2] = [None, None];
        for &ip in ips {
            let family = Family::of(&ip);
            if let Some(first) = by_family[family.index()] {
                if first != ip {
                    return Err(Error::DuplicateFamilyRequest {
                        family,
                        first,
                        second: ip,
                    });
                }
            }
            by_family[family.index()] = Some(ip);
            if !self.pools.iter().any(|st| st.pool.contains(ip)) {
                return Err(self.not_in_pool(ip, None));
            }
            self.check_share(ip, &req.key, &share)?;
        }
        let ips: Vec<IpAddr> = by_family.into_iter().flatten().collect();
        self.commit(&req.key, ips, share);
        Ok(())
    }

    /// Releases a Service's IPs; returns them (empty if it had none).
    pub fn unassign(&mut self, svc: &ServiceKey) -> Vec<IpAddr> {
        let Some(rec) = self.services.remove(svc) else {
            return Vec::new();
        };
        for ip in &rec.ips {
            self.release(*ip, svc, rec.share.key.as_deref());
        }
        rec.ips
    }

    /// The IPs currently held by a Service.
    pub fn assigned(&self, svc: &ServiceKey) -> Option<&[IpAddr]> {
        self.services.get(svc).map(|r| r.ips.as_slice())
    }

    /// Services holding `ip` (more than one when shared).
    pub fn holders(&self, ip: IpAddr) -> &[ServiceKey] {
        self.in_use.get(&ip).map_or(&[], Vec::as_slice)
    }

    /// The first pool (in allocation order) that contains `ip`.
    pub fn pool_for_ip(&self, ip: IpAddr) -> Option<&str> {
        self.pools
            .iter()
            .find(|st| st.pool.contains(ip))
            .map(|st| st.pool.name.as_str())
    }

    /// Services holding IPs, in no particular order.
    pub fn service_keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }

    /// Number of Services holding IPs.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Assigned/available counts of a pool. An IP in two overlapping pools counts in both.
    pub fn counters(&self, pool: &str) -> Option<PoolCounters> {
        let st = &self.pools[*self.by_name.get(pool)?];
        let v4 = st.assigned[Family::V4.index()];
        let v6 = st.assigned[Family::V6.index()];
        Some(PoolCounters {
            assigned_v4: v4,
            available_v4: st.pool.size(Family::V4).saturating_sub(v4),
            assigned_v6: v6,
            available_v6: st.pool.size(Family::V6).saturating_sub(v6),
        })
    }

    // ---- planning -------------------------------------------------------------------

    fn family_plan(&self, req: &ServiceRequest) -> Result<FamilyPlan, Error> {
        let mut fams: Vec<Family> = Vec::new();
        for f in &req.ip_families {
            if !fams.contains(f) {
                fams.push(*f);
            }
        }
        let served = family_names(&self.families);
        match req.ip_family_policy {
            IpFamilyPolicy::SingleStack => {
                let family = fams.first().copied().unwrap_or(self.families[0]);
                if !self.families.contains(&family) {
                    return Err(Error::FamilyNotSupported {
                        family,
                        detail: format!(
                            "Service {} wants an {family} address but the cluster serves only \
                             {served} LoadBalancer addresses",
                            req.key
                        ),
                    });
                }
                Ok(FamilyPlan {
                    families: vec![family],
                    min: 1,
                })
            }
            IpFamilyPolicy::RequireDualStack => {
                if fams.is_empty() {
                    fams = self.families.clone();
                }
                for family in Family::ALL {
                    if !fams.contains(&family) {
                        return Err(Error::FamilyNotSupported {
                            family,
                            detail: format!(
                                "Service {} requires dual-stack but spec.ipFamilies lists only {}",
                                req.key,
                                family_names(&fams)
                            ),
                        });
                    }
                    if !self.families.contains(&family) {
                        return Err(Error::FamilyNotSupported {
                            family,
                            detail: format!(
                                "Service {} requires dual-stack but the cluster serves only \
                                 {served} LoadBalancer addresses",
                                req.key
                            ),
                        });
                    }
                }
                Ok(FamilyPlan {
                    families: fams,
                    min: 2,
                })
            }
            IpFamilyPolicy::PreferDualStack => {
                if fams.is_empty() {
                    fams = self.families.clone();
                }
                let wanted: Vec<Family> = fams
                    .iter()
                    .copied()
                    .filter(|f| self.families.contains(f))
                    .collect();
                if wanted.is_empty() {
                    return Err(Error::FamilyNotSupported {
                        family: fams[0],
                        detail: format!(
                            "Service {} lists only {} in spec.ipFamilies but the cluster serves \
                             only {served} LoadBalancer addresses",
                            req.key,
                            family_names(&fams)
                        ),
                    });
                }
                Ok(FamilyPlan {
                    families: wanted,
                    min: 1,
                })
            }
        }
    }

    fn pool_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.pools.iter().map(|st| st.pool.name.clone()).collect();
        names.sort();
        names
    }

    fn not_in_pool(&self, ip: IpAddr, named_pool: Option<String>) -> Error {
        let (family, n) = ip_to_num(ip);
        let note = self
            .pools
            .iter()
            .find(|st| {
                st.pool.avoid_buggy_ips && is_buggy(family, n) && st.pool.covers(ip)
            })
            .map(|st| {
                format!(
                    "IPAddressPool {:?} has avoidBuggyIPs and skips addresses ending in .0 and .255",
                    st.pool.name
                )
            });
        Error::IpNotInPool {
            ip,
            pools: named_pool
                .clone()
                .map_or_else(|| self.pool_names(), |p| vec![p]),
            named_pool,
            note,
        }
    }

    /// The pool named by the annotation, checked against its `serviceAllocation`.
    fn named_pool(&self, req: &ServiceRequest, name: &str) -> Result<usize, Error> {
        let idx = *self.by_name.get(name).ok_or_else(|| Error::UnknownPool {
            pool: name.to_string(),
            known: self.pool_names(),
        })?;
        self.admits(idx, req).map_err(|why| Error::PoolNotAllowed {
            pool: name.to_string(),
            service: req.key.clone(),
            why,
        })?;
        Ok(idx)
    }

    fn admits(&self, idx: usize, req: &ServiceRequest) -> Result<(), String> {
        self.pools[idx]
            .pool
            .selects(&req.key.namespace, &req.namespace_labels, &req.labels)
    }

    fn plan_requested(
        &self,
        req: &ServiceRequest,
        plan: &FamilyPlan,
        share: &Share,
    ) -> Result<Vec<IpAddr>, Error> {
        let mut by_family: [Option<IpAddr>; 2] = [None, None];
        for &ip in &req.requested_ips {
            let family = Family::of(&ip);
            if let Some(first) = by_family[family.index()] {
                if first != ip {
                    return Err(Error::DuplicateFamilyRequest {
                        family,
                        first,
                        second: ip,
                    });
                }
            }
            if !plan.families.contains(&family) {
                return Err(Error::FamilyNotSupported {
                    family,
                    detail: format!(
                        "requested IP {ip} is {family}, but Service {} gets only {} addresses \
                         (spec.ipFamilies, ipFamilyPolicy and the cluster's families)",
                        req.key,
                        family_names(&plan.families)
                    ),
                });
            }
            by_family[family.index()] = Some(ip);
        }
        let count = by_family.iter().flatten().count();
        if count < plan.min {
            let missing = plan
                .families
                .iter()
                .copied()
                .find(|f| by_family[f.index()].is_none())
                .unwrap_or(Family::V6);
            return Err(Error::FamilyNotSupported {
                family: missing,
                detail: format!(
                    "Service {} requires dual-stack; request one IP of each family",
                    req.key
                ),
            });
        }
        let named = match &req.requested_pool {
            Some(name) => Some(self.named_pool(req, name)?),
            None => None,
        };
        let mut out = Vec::with_capacity(count);
        for family in &plan.families {
            let Some(ip) = by_family[family.index()] else {
                continue;
            };
            match named {
                Some(idx) => {
                    if !self.pools[idx].pool.contains(ip) {
                        return Err(self.not_in_pool(ip, Some(self.pools[idx].pool.name.clone())));
                    }
                }
                None => {
                    let containing: Vec<usize> = (0..self.pools.len())
                        .filter(|&i| self.pools[i].pool.contains(ip))
                        .collect();
                    let Some(&first) = containing.first() else {
                        return Err(self.not_in_pool(ip, None));
                    };
                    if !containing.iter().any(|&i| self.admits(i, req).is_ok()) {
                        let why = self.admits(first, req).err().unwrap_or_default();
                        return Err(Error::PoolNotAllowed {
                            pool: self.pools[first].pool.name.clone(),
                            service: req.key.clone(),
                            why,
                        });
                    }
                }
            }
            self.check_share(ip, &req.key, share)?;
            out.push(ip);
        }
        Ok(out)
    }

    fn plan_auto(
        &mut self,
        req: &ServiceRequest,
        plan: &FamilyPlan,
        share: &Share,
    ) -> Result<Vec<IpAddr>, Error> {
        let candidates: Vec<usize> = match &req.requested_pool {
            Some(name) => vec![self.named_pool(req, name)?],
            None => (0..self.pools.len())
                .filter(|&i| self.pools[i].pool.auto_assign && self.admits(i, req).is_ok())
                .collect(),
        };
        if candidates.is_empty() {
            return Err(Error::NoMatchingPool {
                service: req.key.clone(),
                pools: self.pool_names(),
            });
        }
        let own: Vec<IpAddr> = self
            .services
            .get(&req.key)
            .map(|r| r.ips.clone())
            .unwrap_or_default();

        // Keep the current assignment when it still fits.
        if !own.is_empty() {
            if let Some(idx) = self.current_pool(&own, &candidates, plan, &req.key, share) {
                let mut ips = own.clone();
                for &family in &plan.families {
                    if !ips.iter().any(|ip| Family::of(ip) == family) {
                        // PreferDualStack partial: complete from the same pool if possible.
                        if let Some(ip) = self.pick(idx, family, &req.key, share, &own) {
                            ips.push(ip);
                        }
                    }
                }
                sort_by_family(&mut ips, &plan.families);
                return Ok(ips);
            }
        }

        let mut tried: Vec<usize> = Vec::new();
        fn note_tried(idx: usize, tried: &mut Vec<usize>) {
            if !tried.contains(&idx) {
                tried.push(idx);
            }
        }
        // Every wanted family from one pool.
        for &idx in &candidates {
            if !plan
                .families
                .iter()
                .all(|&f| self.pools[idx].pool.has_family(f))
            {
                continue;
            }
            note_tried(idx, &mut tried);
            let mut ips = Vec::with_capacity(plan.families.len());
            for &family in &plan.families {
                match self.pick(idx, family, &req.key, share, &own) {
                    Some(ip) => ips.push(ip),
                    None => break,
                }
            }
            if ips.len() == plan.families.len() {
                return Ok(ips);
            }
        }
        // PreferDualStack fallback: one family, first family first.
        if plan.min < plan.families.len() {
            for &family in &plan.families {
                for &idx in &candidates {
                    if !self.pools[idx].pool.has_family(family) {
                        continue;
                    }
                    note_tried(idx, &mut tried);
                    if let Some(ip) = self.pick(idx, family, &req.key, share, &own) {
                        return Ok(vec![ip]);
                    }
                }
            }
        }
        if tried.is_empty() {
            let names = candidates
                .iter()
                .map(|&i| format!("{:?}", self.pools[i].pool.name))
                .collect::<Vec<_>>()
                .join(", ");
            let missing = plan
                .families
                .iter()
                .copied()
                .find(|&f| !candidates.iter().any(|&i| self.pools[i].pool.has_family(f)));
            return Err(match missing {
                Some(family) => Error::FamilyNotSupported {
                    family,
                    detail: format!(
                        "no IPAddressPool that serves Service {} has {family} addresses \
                         (candidates: {names})",
                        req.key
                    ),
                },
                None => Error::FamilyNotSupported {
                    family: plan.families.last().copied().unwrap_or(Family::V6),
                    detail: format!(
                        "no single IPAddressPool that serves Service {} has both IPv4 and IPv6 \
                         addresses; a dual-stack Service takes both from one pool \
                         (candidates: {names})",
                        req.key
                    ),
                },
            });
        }
        let families: Vec<Family> = plan
            .families
            .iter()
            .copied()
            .filter(|&f| tried.iter().any(|&i| self.pools[i].pool.has_family(f)))
            .collect();
        Err(Error::PoolExhausted {
            pools: tried
                .iter()
                .map(|&i| self.pools[i].pool.name.clone())
                .collect(),
            families,
        })
    }

    /// The candidate pool holding all of `own` if the current assignment still fits:
    /// families wanted, complete (or partial under PreferDualStack), sharing still allowed.
    fn current_pool(
        &self,
        own: &[IpAddr],
        candidates: &[usize],
        plan: &FamilyPlan,
        key: &ServiceKey,
        share: &Share,
    ) -> Option<usize> {
        let mut families = Vec::new();
        for ip in own {
            let family = Family::of(ip);
            if !plan.families.contains(&family) || families.contains(&family) {
                return None;
            }
            families.push(family);
            self.check_share(*ip, key, share).ok()?;
        }
        if families.len() < plan.min {
            return None;
        }
        candidates
            .iter()
            .copied()
            .find(|&i| own.iter().all(|ip| self.pools[i].pool.contains(*ip)))
    }

    /// One address of `family` from pool `idx` for the Service, or `None` if full.
    fn pick(
        &mut self,
        idx: usize,
        family: Family,
        key: &ServiceKey,
        share: &Share,
        own: &[IpAddr],
    ) -> Option<IpAddr> {
        let pool = &self.pools[idx].pool;
        if let Some(ip) = own.iter().copied().find(|ip| {
            Family::of(ip) == family
                && pool.contains(*ip)
                && self.check_share(*ip, key, share).is_ok()
        }) {
            return Some(ip);
        }
        if let Some(skey) = &share.key {
            if let Some(ips) = self.by_sharing_key.get(skey) {
                if let Some(ip) = ips.iter().copied().find(|ip| {
                    Family::of(ip) == family
                        && pool.contains(*ip)
                        && self.check_share(*ip, key, share).is_ok()
                }) {
                    return Some(ip);
                }
            }
        }
        self.lowest_free(idx, family)
    }

    /// Lowest free address of `family` in pool `idx`, advancing the pool's cursor.
    fn lowest_free(&mut self, idx: usize, family: Family) -> Option<IpAddr> {
        let fi = family.index();
        let st = &mut self.pools[idx];
        if st.exhausted[fi] {
            return None;
        }
        let ranges = st.pool.raw_ranges(family);
        let cursor = st.cursor[fi];
        let mut i = ranges.partition_point(|&(_, b)| b < cursor);
        while let Some(&(a, b)) = ranges.get(i) {
            let mut n = a.max(cursor);
            loop {
                let ip = num_to_ip(family, n);
                let skip = st.pool.avoid_buggy_ips && is_buggy(family, n);
                if !skip && !self.in_use.contains_key(&ip) {
                    st.cursor[fi] = n;
                    return Some(ip);
                }
                if n == b {
                    break;
                }
                n += 1;
            }
            i += 1;
        }
        st.exhausted[fi] = true;
        None
    }

    /// Whether `key` may use `ip` given the other Services on it.
    fn check_share(&self, ip: IpAddr, key: &ServiceKey, share: &Share) -> Result<(), Error> {
        let Some(holders) = self.in_use.get(&ip) else {
            return Ok(());
        };
        let others: Vec<&ServiceKey> = holders.iter().filter(|h| *h != key).collect();
        if others.is_empty() {
            return Ok(());
        }
        let records: Vec<(&ServiceKey, &Record)> = others
            .iter()
            .filter_map(|h| self.services.get(*h).map(|r| (*h, r)))
            .collect();
        let Some(ours) = &share.key else {
            return Err(Error::IpInUse {
                ip,
                holders: others.into_iter().cloned().collect(),
            });
        };
        if records.iter().any(|(_, r)| r.share.key.is_none()) {
            return Err(Error::IpInUse {
                ip,
                holders: others.into_iter().cloned().collect(),
            });
        }
        for (other, rec) in records {
            let conflict = |problem| Error::SharingConflict {
                ip,
                other: other.clone(),
                problem,
            };
            let theirs = rec.share.key.as_deref().unwrap_or_default();
            if theirs != ours {
                return Err(conflict(SharingProblem::KeyMismatch {
                    ours: ours.clone(),
                    theirs: theirs.to_string(),
                }));
            }
            if rec.share.backend != share.backend {
                return Err(conflict(SharingProblem::TrafficPolicy));
            }
            if let Some(port) = share.ports.iter().find(|p| rec.share.ports.contains(p)) {
                return Err(conflict(SharingProblem::PortClash { port: *port }));
            }
        }
        Ok(())
    }

    // ---- bookkeeping ----------------------------------------------------------------

    fn commit(&mut self, key: &ServiceKey, ips: Vec<IpAddr>, share: Share) {
        if let Some(old) = self.services.remove(key) {
            for ip in &old.ips {
                if !ips.contains(ip) || old.share.key != share.key {
                    self.release(*ip, key, old.share.key.as_deref());
                }
            }
        }
        for ip in &ips {
            self.occupy(*ip, key, share.key.as_deref());
        }
        self.services.insert(key.clone(), Record { ips, share });
    }

    fn occupy(&mut self, ip: IpAddr, key: &ServiceKey, sharing_key: Option<&str>) {
        let holders = self.in_use.entry(ip).or_default();
        if holders.contains(key) {
            return;
        }
        let first = holders.is_empty();
        holders.push(key.clone());
        if first {
            let (family, n) = ip_to_num(ip);
            for st in &mut self.pools {
                if st.pool.contains_num(family, n) {
                    st.assigned[family.index()] += 1;
                }
            }
        }
        if let Some(k) = sharing_key {
            self.by_sharing_key
                .entry(k.to_string())
                .or_default()
                .insert(ip);
        }
    }

    fn release(&mut self, ip: IpAddr, key: &ServiceKey, sharing_key: Option<&str>) {
        let Some(holders) = self.in_use.get_mut(&ip) else {
            return;
        };
        holders.retain(|h| h != key);
        let now_free = holders.is_empty();
        let key_still_used = sharing_key.is_some_and(|k| {
            holders.iter().any(|h| {
                self.services
                    .get(h)
                    .is_some_and(|r| r.share.key.as_deref() == Some(k))
            })
        });
        if now_free {
            self.in_use.remove(&ip);
            let (family, n) = ip_to_num(ip);
            for st in &mut self.pools {
                if st.pool.contains_num(family, n) {
                    let fi = family.index();
                    st.assigned[fi] = st.assigned[fi].saturating_sub(1);
                    st.cursor[fi] = st.cursor[fi].min(n);
                    st.exhausted[fi] = false;
                }
            }
        }
        if let Some(k) = sharing_key {
            if !key_still_used {
                if let Some(set) = self.by_sharing_key.get_mut(k) {
                    set.remove(&ip);
                    if set.is_empty() {
                        self.by_sharing_key.remove(k);
                    }
                }
            }
        }
    }
}

fn family_names(families: &[Family]) -> String {
    families
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" and ")
}

fn sort_by_family(ips: &mut [IpAddr], order: &[Family]) {
    ips.sort_by_key(|ip| {
        let f = Family::of(ip);
        order.iter().position(|o| *o == f).unwrap_or(order.len())
    });
}
