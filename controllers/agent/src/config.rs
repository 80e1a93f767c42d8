//! Plain configuration of the agent. The CLI (clap, env vars) lives in the binary and fills
//! this in; tests build it directly.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use palisade_runtime::config::{LeaseSettings, SyncSettings};

/// Everything `palisade agent` needs to run.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The Kubernetes Node this agent runs on.
    pub node_name: String,
    /// This agent's identity in the leader Lease (the pod name in a cluster).
    pub identity: String,
    /// Explicit kubeconfig; `None` means in-cluster config or `$KUBECONFIG`/`~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    pub enable_netpol: bool,
    /// Watch and enforce ClusterNetworkPolicies too (needs their CRD).
    pub enable_cluster_network_policy: bool,
    pub enable_loadbalancer: bool,
    /// Address of the `/healthz`, `/readyz` and `/metrics` endpoints.
    pub listen_addr: SocketAddr,
    pub lease: LeaseSettings,
    /// `spec.loadBalancerClass` value Palisade owns.
    pub load_balancer_class: String,
    /// Also handle LoadBalancer Services that set no class.
    pub handle_classless_services: bool,
    /// `auto`, `nft` or `legacy`.
    pub iptables_backend: String,
    /// Drop traffic to pods in this node's pod CIDR that the agent has not programmed yet.
    pub block_unknown_pods: bool,
    /// Drop packets from a local pod's interface whose source is not the pod's address.
    pub anti_spoofing: bool,
    /// Denied-traffic log (NFLOG group, per-pod rate); `None`: off.
    pub deny_log: Option<palisade_netpol::DenyLog>,
    /// After a policy change, delete conntrack entries of local pods' flows the new rules
    /// deny, and drop TCP picked up mid-stream to/from pods a policy can deny.
    pub revoke_denied_connections: bool,
    pub sync: SyncSettings,
    /// Watcher retry backoff ceiling after API errors.
    pub watch_backoff_max: Duration,
    /// Answer ARP/NDP for the LoadBalancer IPs this node is elected for.
    pub enable_l2: bool,
    /// Period of the gratuitous refresh of announced IPs (zero: off).
    pub l2_refresh_interval: Duration,
    /// Drop the kernel's ARP replies for LoadBalancer IPs this node does not own when they sit
    /// on a local interface with lax ARP sysctls (kube-proxy IPVS).
    pub l2_arp_filter: bool,
    /// Cordoned Nodes hand their LoadBalancer IPs over to other nodes.
    pub l2_exclude_cordoned: bool,
    /// Announce LoadBalancer IPs over BGP to the routers of matching BGPPeers.
    pub enable_bgp: bool,
    /// How long the graceful BGP withdrawal on shutdown may take.
    pub bgp_shutdown_limit: Duration,
    /// UDP port of the agents' liveness heartbeats (every agent the same).
    pub memberlist_port: u16,
    /// Heartbeat interval and the silence after which a peer counts as dead.
    pub memberlist_interval: Duration,
    pub memberlist_timeout: Duration,
    /// The membership's cluster key: a file (from a Secret) or, explicitly, none
    /// (`memberlist_insecure`). Neither: L2 announcement refuses to start.
    pub memberlist_key_file: Option<PathBuf>,
    pub memberlist_insecure: bool,
    /// How long the previous key is still accepted after the key file changed.
    pub memberlist_key_rotation_window: Duration,
}

impl AgentConfig {
    /// A configuration with the documented defaults for `node_name`.
    pub fn new(node_name: impl Into<String>) -> Self {
        let node_name = node_name.into();
        AgentConfig {
            identity: node_name.clone(),
            node_name,
            kubeconfig: None,
            enable_netpol: true,
            enable_cluster_network_policy: false,
            enable_loadbalancer: true,
            listen_addr: SocketAddr::from(([0, 0, 0, 0], 9476)),
            lease: LeaseSettings::default(),
            load_balancer_class: "palisade.dev/palisade".into(),
            handle_classless_services: true,
            iptables_backend: "auto".into(),
            block_unknown_pods: true,
            anti_spoofing: true,
            deny_log: Some(palisade_netpol::DenyLog::default()),
            revoke_denied_connections: true,
            sync: SyncSettings::default(),
            watch_backoff_max: Duration::from_secs(10),
            enable_l2: true,
            l2_refresh_interval: palisade_speaker::DEFAULT_REFRESH_INTERVAL,
            l2_arp_filter: true,
            l2_exclude_cordoned: false,
            enable_bgp: false,
            bgp_shutdown_limit: Duration::from_secs(5),
            memberlist_port: 7946,
            memberlist_interval: Duration::from_millis(200),
            memberlist_timeout: Duration::from_secs(1),
            memberlist_key_file: None,
            memberlist_insecure: false,
            memberlist_key_rotation_window: Duration::from_secs(120),
        }
    }
}
