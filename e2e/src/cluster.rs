//! The small cluster interface the e2e scenarios are written against, once, for every backend.
//!
//! ```text
//!   scenarios (e2e/src/scenarios.rs) ──► dyn Cluster ──┬─ LabCluster  network namespaces, test
//!                                                      │              API server, real agents
//!                                                      └─ KindCluster kubectl/docker against a
//!                                                                     kind cluster (CI elsewhere)
//! ```
//!
//! Objects are plain JSON (`serde_json::Value`) as `kubectl apply` would take them. Probes
//! name their source as a [`Peer`] (a pod `ns/name`, or the LAN client) and their target by
//! address, so the same call probes a pod, a node or a LoadBalancer IP. Long-running probes
//! ([`Cluster::start_prober`]) record every attempt with its time, for "never succeeded",
//! "never failed" and failover-time questions.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use crate::k8s::Labels;
use crate::matrix::Matrix;
use crate::server::Protocol;

/// Where a probe comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A pod, `namespace/name`.
    Pod(String),
    /// The host on the LAN outside the cluster (the lab's client namespace; a container on
    /// kind's docker network).
    Client,
}

impl Peer {
    /// The pod `ns/name`.
    pub fn pod(id: &str) -> Peer {
        Peer::Pod(id.to_string())
    }

    /// A label for matrices and messages.
    pub fn label(&self) -> String {
        match self {
            Peer::Pod(id) => id.clone(),
            Peer::Client => "client".into(),
        }
    }
}

/// A simulated API server outage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiOutage {
    Off,
    /// Connections are dropped without an answer (a crashed or unreachable API server).
    Disconnect,
    /// Every request gets 503.
    Unavailable,
}

/// One attempt of a [`Prober`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// When the attempt started, from the prober's start.
    pub at: Duration,
    pub ok: bool,
    pub detail: String,
}

/// What a prober saw.
#[derive(Clone, Debug, Default)]
pub struct ProbeLog {
    pub attempts: Vec<Attempt>,
}

impl ProbeLog {
    pub fn successes(&self) -> usize {
        self.attempts.iter().filter(|a| a.ok).count()
    }

    pub fn failures(&self) -> usize {
        self.attempts.iter().filter(|a| !a.ok).count()
    }

    /// The first failed attempts (for messages).
    pub fn first_failures(&self, n: usize) -> Vec<&Attempt> {
        self.attempts.iter().filter(|a| !a.ok).take(n).collect()
    }

    /// The longest run of consecutive failures, from the first failed attempt's start to the
    /// next success's start (or the last attempt's, if none followed).
    pub fn longest_outage(&self) -> Duration {
        let mut longest = Duration::ZERO;
        let mut since: Option<Duration> = None;
        for a in &self.attempts {
            match (a.ok, since) {
                (false, None) => since = Some(a.at),
                (true, Some(s)) => {
                    longest = longest.max(a.at.saturating_sub(s));
                    since = None;
                }
                _ => {}
            }
        }
        if let (Some(s), Some(last)) = (since, self.attempts.last()) {
            longest = longest.max(last.at.saturating_sub(s));
        }
        longest
    }

    /// The first successful attempt at or after `t`.
    pub fn first_success_after(&self, t: Duration) -> Option<Duration> {
        self.attempts
            .iter()
            .find(|a| a.ok && a.at >= t)
            .map(|a| a.at)
    }

    /// A one-line summary.
    pub fn summary(&self) -> String {
        format!(
            "{} attempts, {} ok, {} failed, longest failing run {:?}",
            self.attempts.len(),
            self.successes(),
            self.failures(),
            self.longest_outage()
        )
    }
}

/// A probe repeated in the background until stopped.
pub trait Prober: Send {
    /// When it started.
    fn started(&self) -> Instant;
    /// Stops it and returns every attempt.
    fn stop(self: Box<Self>) -> Result<ProbeLog>;
}

/// A cluster the scenarios can drive.
pub trait Cluster {
    /// `lab` or `kind`.
    fn backend(&self) -> &'static str;

    /// Node names, in a stable order (pods are placed by index into this list).
    fn node_names(&self) -> Vec<String>;

    /// A Pod object for this backend: `ns/name` with `labels` on `node`, serving TCP and UDP on
    /// 80 and 81 with the named ports `serve-<port>-<tcp|udp>`.
    fn pod_manifest(&self, ns: &str, name: &str, labels: &Labels, node: &str) -> Value;

    /// Creates the object, or updates it (everything but its status).
    fn apply(&mut self, object: &Value) -> Result<()>;

    /// Deletes an object (missing is fine).
    fn delete(&mut self, api_version: &str, kind: &str, ns: Option<&str>, name: &str)
        -> Result<()>;

    /// Reads an object.
    fn get(
        &mut self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>>;

    /// Sets (`Some`) or removes (`None`) one label of an object, keeping everything else.
    fn set_label(
        &mut self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<()> {
        let mut object = self
            .get(api_version, kind, ns, name)?
            .ok_or_else(|| anyhow::anyhow!("{kind} {name} does not exist"))?;
        if !object["metadata"]["labels"].is_object() {
            object["metadata"]["labels"] = serde_json::json!({});
        }
        if let Some(labels) = object["metadata"]["labels"].as_object_mut() {
            match value {
                Some(v) => {
                    labels.insert(key.into(), serde_json::json!(v));
                }
                None => {
                    labels.remove(key);
                }
            }
        }
        if let Some(m) = object["metadata"].as_object_mut() {
            m.remove("resourceVersion");
            m.remove("managedFields");
        }
        if let Some(o) = object.as_object_mut() {
            o.remove("status");
        }
        self.apply(&object)
    }

    /// Waits until every pod `ns/name` is Running and Ready with an IP.
    fn wait_pods_ready(&mut self, ids: &[String], timeout: Duration) -> Result<()>;

    /// Deletes a pod the way Kubernetes does: it stops being a ready endpoint first, keeps
    /// serving for a short grace period, then goes. Returns once it is gone.
    fn delete_pod_gracefully(&mut self, id: &str) -> Result<()>;

    /// The pod's IP.
    fn pod_ip(&mut self, id: &str) -> Result<Ipv4Addr>;

    /// Probes every (from, to) pair once (`to` = label and address); `true` = reachable.
    fn probe_matrix(
        &mut self,
        froms: &[Peer],
        tos: &[(String, Ipv4Addr)],
        port: u16,
        protocol: Protocol,
    ) -> Result<Matrix>;

    /// Probes `to:port` from `from` every `interval` (each attempt a new flow, waiting at most
    /// `timeout`) until stopped.
    fn start_prober(
        &mut self,
        from: &Peer,
        to: Ipv4Addr,
        port: u16,
        protocol: Protocol,
        interval: Duration,
        timeout: Duration,
    ) -> Result<Box<dyn Prober>>;

    /// How many packets/connections from `from` reached any pod's server on `port` so far,
    /// counted at the destination (also pods that are gone). `None` where the backend cannot
    /// count at the destination (the probers' own success counts are then the evidence).
    fn arrivals(&mut self, from: &Peer, port: u16, protocol: Protocol) -> Result<Option<u64>>;

    /// Runs a command on a node (its network namespace or its container).
    fn exec_on_node(&mut self, node: &str, argv: &[&str]) -> Result<String>;

    /// SIGKILLs the node's agent (the whole container/namespace's processes).
    fn kill_agent(&mut self, node: &str) -> Result<()>;

    /// Starts the node's agent again after [`Cluster::kill_agent`].
    fn start_agent(&mut self, node: &str) -> Result<()>;

    /// Waits until the node's agent is ready.
    fn wait_agent_ready(&mut self, node: &str, timeout: Duration) -> Result<()>;

    /// Cuts the node off the LAN (`true`) or plugs it back (`false`): a node failure as the
    /// rest of the LAN sees it (lab: its LAN link goes down; kind: the node container is
    /// paused).
    fn isolate_node(&mut self, node: &str, isolated: bool) -> Result<()>;

    /// Starts or ends a simulated API outage. Backends that cannot simulate one say so with
    /// an error; scenarios that need it check [`Cluster::supports_api_outage`] first.
    fn set_api_outage(&mut self, outage: ApiOutage) -> Result<()>;

    /// Whether [`Cluster::set_api_outage`] works here.
    fn supports_api_outage(&self) -> bool;

    /// The LAN the nodes and the client share (for ipBlock peers), as a CIDR.
    fn lan_cidr(&self) -> String;

    /// Addresses for an IPAddressPool on this backend's LAN.
    fn lb_pool_addresses(&self) -> Vec<String>;

    /// Whether the agents announce LoadBalancer IPs at layer 2 (ARP) in this build.
    fn announcer_available(&mut self) -> Result<bool>;

    /// Which node the client's neighbour table says answers for `vip` (by MAC), if any.
    fn announcing_node(&mut self, vip: Ipv4Addr) -> Result<Option<String>>;

    /// Whatever helps to understand a failure (agent logs, rules); best effort.
    fn diagnostics(&mut self) -> String;

    /// Runs `palisade netpol explain --kubeconfig <the agents' kubeconfig> --probes FILE`
    /// (live mode: it lists the cluster's objects) with `probes` as the file, where the API
    /// server is reachable; returns its standard output. `None` where the backend cannot.
    fn explain_probes(&mut self, _probes: &str) -> Result<Option<String>> {
        Ok(None)
    }
}

/// The tests' one bounded poll (palisade-poll), re-exported where the lab's users look for it.
pub use palisade_poll::poll;

#[cfg(test)]
mod tests {
    use super::*;

    fn a(ms: u64, ok: bool) -> Attempt {
        Attempt {
            at: Duration::from_millis(ms),
            ok,
            detail: String::new(),
        }
    }

    #[test]
    fn probe_log_outages() {
        let log = ProbeLog {
            attempts: vec![
                a(0, true),
                a(100, false),
                a(200, false),
                a(450, true),
                a(500, false),
                a(600, false),
            ],
        };
        assert_eq!(log.successes(), 2);
        assert_eq!(log.failures(), 4);
        assert_eq!(log.longest_outage(), Duration::from_millis(350));
        assert_eq!(
            log.first_success_after(Duration::from_millis(150)),
            Some(Duration::from_millis(450))
        );
        assert_eq!(log.first_success_after(Duration::from_millis(460)), None);
        assert!(log.summary().contains("6 attempts"));
    }
}
