//! The lab's control plane: the Kubernetes API that the agents and the lab itself talk to.
//!
//! ```text
//!   lab mode (default)                          real-cluster mode (--kubeconfig)
//!
//!   netns <p>-cp, eth0 198.51.100.2             netns <p>-cp, eth0 198.51.100.2
//!   ┌──────────────────────────────┐            ┌──────────────────────────────┐
//!   │ tokio runtime (every thread  │            │ relay 198.51.100.2:6443      │──► the cluster's
//!   │ setns-ed into <p>-cp)        │            │ (listener made in <p>-cp,    │    API server,
//!   │  TestApiServer :6443         │            │  outbound sockets made in    │    dialled from
//!   │  kube::Client (the lab's own)│            │  the root netns)             │    the root netns
//!   └──────────────────────────────┘            └──────────────────────────────┘
//!        ▲ agents in node netns: http://198.51.100.2:6443 over the LAN
//! ```
//!
//! A socket keeps the network namespace it was created in, whatever thread uses it later. In
//! lab mode every thread of the control plane's runtime (workers and blocking pool) enters
//! the control-plane namespace when it starts, so the test API server's listener and the
//! lab's client connections all live there; the root namespace gets no address, no route and
//! no listening socket. Blocking callers (tests, the demo) hand futures to that runtime with
//! [`ControlPlane::block_on`] and wait for the answer with a deadline.
//!
//! In real-cluster mode the lab's own client talks to the cluster from the root namespace
//! (as `kubectl` would), and the agents, which only see the LAN, reach it through a TCP relay
//! whose listening socket was created inside the control-plane namespace. Their kubeconfig is
//! the user's with the server replaced by `https://198.51.100.2:6443` and `tls-server-name`
//! set to the original host, so certificates still verify.
//!
//! [`Api`] is a small blocking JSON client (get/list/create/apply/merge-patch/delete, status
//! subresource) for whatever kinds the lab and the scenarios use.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use palisade_testapi::{Outage, TestApiServer};
use serde_json::{json, Value};

use crate::netns;

/// Address of the control-plane host on the LAN.
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Port of the API (the test API server's, or the relay's).
pub const API_PORT: u16 = 6443;
/// How long one API call of the lab may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A kind the lab knows how to address: `apiVersion`, `kind`, plural, namespaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kind {
    pub api_version: String,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
}

/// The kinds of the lab and the scenarios; anything else is guessed (lower-case kind + `s`,
/// namespaced).
const KNOWN: &[(&str, &str, &str, bool)] = &[
    ("v1", "Pod", "pods", true),
    ("v1", "Namespace", "namespaces", false),
    ("v1", "Node", "nodes", false),
    ("v1", "Service", "services", true),
    ("v1", "ConfigMap", "configmaps", true),
    ("v1", "Event", "events", true),
    (
        "discovery.k8s.io/v1",
        "EndpointSlice",
        "endpointslices",
        true,
    ),
    (
        "networking.k8s.io/v1",
        "NetworkPolicy",
        "networkpolicies",
        true,
    ),
    ("coordination.k8s.io/v1", "Lease", "leases", true),
    ("events.k8s.io/v1", "Event", "events", true),
    (
        "palisade.dev/v1alpha1",
        "IPAddressPool",
        "ipaddresspools",
        false,
    ),
    (
        "palisade.dev/v1alpha1",
        "L2Advertisement",
        "l2advertisements",
        false,
    ),
    (
        "palisade.dev/v1alpha1",
        "ServiceL2Status",
        "servicel2statuses",
        true,
    ),
    ("apps/v1", "Deployment", "deployments", true),
];

impl Kind {
    /// The kind of `apiVersion`/`kind`.
    pub fn of(api_version: &str, kind: &str) -> Kind {
        let known = KNOWN
            .iter()
            .find(|(v, k, _, _)| *v == api_version && *k == kind);
        match known {
            Some((v, k, plural, namespaced)) => Kind {
                api_version: v.to_string(),
                kind: k.to_string(),
                plural: plural.to_string(),
                namespaced: *namespaced,
            },
            None => Kind {
                api_version: api_version.to_string(),
                kind: kind.to_string(),
                plural: format!("{}s", kind.to_ascii_lowercase()),
                namespaced: true,
            },
        }
    }

    /// The kind of an object (its `apiVersion` and `kind` fields).
    pub fn of_object(object: &Value) -> Result<Kind> {
        let v = object["apiVersion"]
            .as_str()
            .context("object without apiVersion")?;
        let k = object["kind"].as_str().context("object without kind")?;
        Ok(Kind::of(v, k))
    }

    /// URL path of the collection (`ns` ignored for cluster-scoped kinds).
    pub fn collection_path(&self, ns: Option<&str>) -> String {
        let base = if self.api_version.contains('/') {
            format!("/apis/{}", self.api_version)
        } else {
            format!("/api/{}", self.api_version)
        };
        match (self.namespaced, ns) {
            (true, Some(ns)) => format!("{base}/namespaces/{ns}/{}", self.plural),
            _ => format!("{base}/{}", self.plural),
        }
    }

    /// URL path of one object.
    pub fn object_path(&self, ns: Option<&str>, name: &str) -> String {
        let ns = if self.namespaced {
            Some(ns.unwrap_or("default"))
        } else {
            None
        };
        format!("{}/{name}", self.collection_path(ns))
    }
}

/// `metadata.namespace` and `metadata.name` of an object.
pub fn ns_name(object: &Value) -> (Option<&str>, &str) {
    (
        object["metadata"]["namespace"].as_str(),
        object["metadata"]["name"].as_str().unwrap_or(""),
    )
}

enum Backing {
    /// The project's test API server, inside the control-plane namespace.
    Lab(TestApiServer),
    /// A real cluster, relayed into the lab.
    External { relay_stop: Arc<AtomicBool> },
}

/// The control plane of a lab: an API and a client for it. Stops on drop.
pub struct ControlPlane {
    backing: Option<Backing>,
    client: kube::Client,
    /// For agents inside the lab.
    agent_kubeconfig: PathBuf,
    /// The API as agents see it.
    url: String,
    rt: Option<tokio::runtime::Runtime>,
}

fn in_netns_runtime(netns_name: &str) -> Result<tokio::runtime::Runtime> {
    let name = netns_name.to_string();
    let failed = Arc::new(AtomicBool::new(false));
    let flag = failed.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .thread_name("lab-cp")
        .enable_all()
        .on_thread_start(move || {
            if let Err(e) = netns::enter(&name) {
                // Without the namespace this thread must not make sockets; the check below
                // refuses to go on.
                eprintln!("lab: control-plane thread could not enter {name}: {e:#}");
                flag.store(true, Ordering::SeqCst);
            }
        })
        .build()
        .context("building the control-plane runtime")?;
    // Make sure the workers exist (and entered) before anything runs on them.
    let probe = rt.block_on(async {
        tokio::spawn(async { std::fs::read_link("/proc/thread-self/ns/net").ok() }).await
    });
    if failed.load(Ordering::SeqCst) {
        bail!("control-plane threads could not enter netns {netns_name}");
    }
    let inside = probe.ok().flatten();
    let root = std::fs::read_link("/proc/thread-self/ns/net").ok();
    if inside.is_none() || inside == root {
        bail!("control-plane runtime is not inside netns {netns_name}");
    }
    Ok(rt)
}

fn client_config(url: &str) -> Result<kube::Config> {
    let mut config = kube::Config::new(url.parse().context("API URL")?);
    // The lab's calls must fail fast during simulated outages instead of retrying for minutes.
    config.default_retry = false;
    config.connect_timeout = Some(Duration::from_secs(2));
    config.read_timeout = Some(Duration::from_secs(8));
    config.write_timeout = Some(Duration::from_secs(8));
    Ok(config)
}

impl ControlPlane {
    /// Starts the test API server at `198.51.100.2:6443` inside `cp_netns` (which must hold
    /// that address) and writes the agents' kubeconfig into `dir`.
    pub fn start_lab(cp_netns: &str, dir: &Path) -> Result<ControlPlane> {
        let rt = in_netns_runtime(cp_netns)?;
        let bind = SocketAddr::from((CONTROL_PLANE_IP, API_PORT));
        let server = rt
            .block_on(async { tokio::spawn(async move { TestApiServer::start(bind).await }).await })
            .context("control-plane task")?
            .with_context(|| format!("starting the test API server on {bind} in {cp_netns}"))?;
        let url = server.url();
        let agent_kubeconfig = dir.join("kubeconfig");
        server
            .write_kubeconfig(&agent_kubeconfig)
            .context("writing the kubeconfig")?;
        let config = client_config(&url)?;
        let client = rt
            .block_on(async { tokio::spawn(async move { kube::Client::try_from(config) }).await })
            .context("control-plane task")?
            .context("building the lab's API client")?;
        Ok(ControlPlane {
            backing: Some(Backing::Lab(server)),
            client,
            agent_kubeconfig,
            url,
            rt: Some(rt),
        })
    }

    /// Uses the cluster of `kubeconfig` (its current context): the lab talks to it from the
    /// root namespace, and a relay at `198.51.100.2:6443` inside `cp_netns` carries the
    /// agents' connections to it. Writes the agents' kubeconfig into `dir`.
    pub fn start_external(kubeconfig: &Path, cp_netns: &str, dir: &Path) -> Result<ControlPlane> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lab-api")
            .enable_all()
            .build()
            .context("building the API runtime")?;
        let kc = kube::config::Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("reading {}", kubeconfig.display()))?;
        let options = kube::config::KubeConfigOptions::default();
        let config = {
            let kc = kc.clone();
            rt.block_on(kube::Config::from_custom_kubeconfig(kc, &options))
                .with_context(|| format!("loading {}", kubeconfig.display()))?
        };
        let upstream = config.cluster_url.clone();
        let host = upstream
            .host()
            .context("the cluster URL has no host")?
            .to_string();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = upstream.port_u16().unwrap_or(443);

        // The relay's listener is made inside the lab; connections out are made here, in the
        // root namespace, by the runtime's (root-namespace) threads.
        let listener = netns::run_in(cp_netns, || {
            let l = std::net::TcpListener::bind((CONTROL_PLANE_IP, API_PORT))
                .context("binding the relay")?;
            l.set_nonblocking(true).context("relay non-blocking")?;
            Ok(l)
        })?;
        let relay_stop = Arc::new(AtomicBool::new(false));
        {
            let stop = relay_stop.clone();
            let target = format!("{host}:{port}");
            rt.spawn(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    eprintln!("lab: relay listener unusable");
                    return;
                };
                while !stop.load(Ordering::Relaxed) {
                    let accepted =
                        tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
                    let Ok(Ok((mut inbound, _))) = accepted else {
                        continue;
                    };
                    let target = target.clone();
                    tokio::spawn(async move {
                        let out = tokio::time::timeout(
                            Duration::from_secs(5),
                            tokio::net::TcpStream::connect(target.as_str()),
                        )
                        .await;
                        if let Ok(Ok(mut out)) = out {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        }
                    });
                }
            });
        }

        // The agents' kubeconfig: the user's, pointed at the relay, verifying the original name.
        let mut agent_kc = kc;
        let current = agent_kc.current_context.clone().unwrap_or_default();
        let cluster_name = agent_kc
            .contexts
            .iter()
            .find(|c| c.name == current)
            .and_then(|c| c.context.as_ref())
            .map(|c| c.cluster.clone())
            .context("the kubeconfig's current context names no cluster")?;
        let scheme = upstream.scheme_str().unwrap_or("https").to_string();
        let relay_url = format!("{scheme}://{CONTROL_PLANE_IP}:{API_PORT}");
        for named in agent_kc.clusters.iter_mut() {
            if named.name == cluster_name {
                if let Some(cluster) = named.cluster.as_mut() {
                    cluster.server = Some(relay_url.clone());
                    if scheme == "https" && cluster.tls_server_name.is_none() {
                        cluster.tls_server_name = Some(host.clone());
                    }
                }
            }
        }
        let agent_kubeconfig = dir.join("kubeconfig");
        // JSON is YAML: every kubeconfig reader accepts it.
        std::fs::write(
            &agent_kubeconfig,
            serde_json::to_string_pretty(&agent_kc).context("serialising the kubeconfig")?,
        )
        .context("writing the agents' kubeconfig")?;
        let client = rt
            .block_on(async { tokio::spawn(async move { kube::Client::try_from(config) }).await })
            .context("API task")?
            .context("building the API client")?;
        Ok(ControlPlane {
            backing: Some(Backing::External { relay_stop }),
            client,
            agent_kubeconfig,
            url: relay_url,
            rt: Some(rt),
        })
    }

    /// Whether this is the lab's own test API server.
    pub fn is_lab(&self) -> bool {
        matches!(self.backing, Some(Backing::Lab(_)))
    }

    /// The test API server (lab mode only), for fault injection.
    pub fn test_server(&self) -> Option<&TestApiServer> {
        match &self.backing {
            Some(Backing::Lab(server)) => Some(server),
            _ => None,
        }
    }

    /// Simulates an API outage (lab mode only).
    pub fn set_outage(&self, outage: Outage) -> Result<()> {
        let server = self
            .test_server()
            .context("API outages can only be simulated with the lab's own API server")?;
        server.set_outage(outage);
        Ok(())
    }

    /// The kubeconfig for agents inside the lab.
    pub fn agent_kubeconfig(&self) -> &Path {
        &self.agent_kubeconfig
    }

    /// The API URL as the agents see it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs `fut` on the control plane's runtime (so its sockets are made there) and waits at
    /// most [`CALL_TIMEOUT`] for it.
    pub fn block_on<T, F>(&self, fut: F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let rt = self.rt.as_ref().context("the control plane is stopped")?;
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let out = tokio::time::timeout(CALL_TIMEOUT, fut).await;
            let _ = tx.send(out);
        });
        match rx.recv_timeout(CALL_TIMEOUT + Duration::from_secs(2)) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) | Err(_) => bail!("API call timed out after {CALL_TIMEOUT:?}"),
        }
    }

    /// A blocking client for the API.
    pub fn api(&self) -> Api<'_> {
        Api { cp: self }
    }

    /// Stops the API server (or relay) and the runtime.
    pub fn stop(&mut self) {
        match self.backing.take() {
            Some(Backing::Lab(server)) => drop(server),
            Some(Backing::External { relay_stop }) => relay_stop.store(true, Ordering::SeqCst),
            None => {}
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether an API error is a 404.
pub fn is_not_found(e: &anyhow::Error) -> bool {
    api_code(e) == Some(404)
}

/// The HTTP code of an API error, if it is one.
pub fn api_code(e: &anyhow::Error) -> Option<u16> {
    e.chain()
        .find_map(|cause| match cause.downcast_ref::<kube::Error>() {
            Some(kube::Error::Api(status)) => Some(status.code),
            _ => None,
        })
}

/// A blocking JSON client for the control plane's API.
#[derive(Clone, Copy)]
pub struct Api<'a> {
    cp: &'a ControlPlane,
}

impl Api<'_> {
    fn request(
        &self,
        method: &str,
        path: String,
        body: Option<Value>,
        ctype: &str,
    ) -> Result<Value> {
        let client = self.cp.client.clone();
        let method = method.to_string();
        let ctype = ctype.to_string();
        let what = format!("{method} {path}");
        self.cp
            .block_on(async move {
                let bytes = match &body {
                    Some(v) => serde_json::to_vec(v)?,
                    None => Vec::new(),
                };
                let req = http::Request::builder()
                    .method(method.as_str())
                    .uri(path.as_str())
                    .header("content-type", ctype.as_str())
                    .header("accept", "application/json")
                    .body(bytes)?;
                let value: Value = client.request(req).await?;
                anyhow::Ok(value)
            })
            .and_then(|r| r)
            .with_context(|| what)
    }

    /// One object, or `None` if it does not exist.
    pub fn get(&self, kind: &Kind, ns: Option<&str>, name: &str) -> Result<Option<Value>> {
        match self.request("GET", kind.object_path(ns, name), None, "application/json") {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every object of a kind (in `ns`, or everywhere with `None`).
    pub fn list(&self, kind: &Kind, ns: Option<&str>) -> Result<Vec<Value>> {
        let list = self.request("GET", kind.collection_path(ns), None, "application/json")?;
        let mut items: Vec<Value> = list["items"].as_array().cloned().unwrap_or_default();
        for item in &mut items {
            // Lists may leave out the item's apiVersion/kind.
            item["apiVersion"] = json!(kind.api_version);
            item["kind"] = json!(kind.kind);
        }
        Ok(items)
    }

    /// Creates `object`; an existing one is an error.
    pub fn create(&self, object: &Value) -> Result<Value> {
        let kind = Kind::of_object(object)?;
        let (ns, _) = ns_name(object);
        let ns = if kind.namespaced {
            Some(ns.unwrap_or("default"))
        } else {
            None
        };
        self.request(
            "POST",
            kind.collection_path(ns),
            Some(object.clone()),
            "application/json",
        )
    }

    /// Creates `object`, or replaces the existing one's metadata labels/annotations and
    /// everything but `status` (which stays as the API has it), retrying on conflicts.
    pub fn apply(&self, object: &Value) -> Result<Value> {
        let kind = Kind::of_object(object)?;
        let (ns, name) = ns_name(object);
        let mut last_error = None;
        for _ in 0..8 {
            let Some(current) = self.get(&kind, ns, name)? else {
                match self.create(object) {
                    Ok(v) => return Ok(v),
                    Err(e) if api_code(&e) == Some(409) => {
                        last_error = Some(e);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            };
            let mut desired = object.clone();
            desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
            if let Some(status) = current.get("status") {
                desired["status"] = status.clone();
            }
            match self.request(
                "PUT",
                kind.object_path(ns, name),
                Some(desired),
                "application/json",
            ) {
                Ok(v) => return Ok(v),
                Err(e) if api_code(&e) == Some(409) => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("apply gave up")))
    }

    /// A JSON merge patch of the object (or, with `status`, of its status subresource).
    pub fn merge_patch(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        name: &str,
        patch: &Value,
        status: bool,
    ) -> Result<Value> {
        let mut path = kind.object_path(ns, name);
        if status {
            path.push_str("/status");
        }
        self.request(
            "PATCH",
            path,
            Some(patch.clone()),
            "application/merge-patch+json",
        )
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, kind: &Kind, ns: Option<&str>, name: &str) -> Result<bool> {
        match self.request(
            "DELETE",
            kind.object_path(ns, name),
            None,
            "application/json",
        ) {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let pod = Kind::of("v1", "Pod");
        assert_eq!(
            pod.object_path(Some("x"), "a"),
            "/api/v1/namespaces/x/pods/a"
        );
        assert_eq!(pod.collection_path(None), "/api/v1/pods");
        let pool = Kind::of("palisade.dev/v1alpha1", "IPAddressPool");
        assert_eq!(
            pool.object_path(Some("ignored"), "lan"),
            "/apis/palisade.dev/v1alpha1/ipaddresspools/lan"
        );
        let np = Kind::of("networking.k8s.io/v1", "NetworkPolicy");
        assert_eq!(
            np.collection_path(Some("x")),
            "/apis/networking.k8s.io/v1/namespaces/x/networkpolicies"
        );
        let other = Kind::of("example.com/v1", "Widget");
        assert_eq!(other.plural, "widgets");
    }
}
