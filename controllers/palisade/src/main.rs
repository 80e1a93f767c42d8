//! `palisade`: the command line. Everything real lives in the library crates; this file only
//! parses arguments, sets up logging and calls them.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod crdgen;
mod netpol_cmd;

/// NetworkPolicy enforcement and LoadBalancer IPs for bare-metal Kubernetes.
///
/// Run `palisade agent` on every node (the Helm chart does this as a DaemonSet). The other
/// subcommands work offline and never contact a cluster.
#[derive(Parser, Debug)]
#[command(name = "palisade", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    #[command(flatten)]
    log: LogArgs,
}

#[derive(Args, Debug)]
struct LogArgs {
    /// Log format.
    #[arg(long, global = true, env = "PALISADE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Log filter, e.g. `info` or `info,palisade_runtime=debug`.
    #[arg(
        long,
        global = true,
        env = "PALISADE_LOG_LEVEL",
        default_value = "info"
    )]
    log_level: String,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent: enforce NetworkPolicies on this node and allocate/announce
    /// LoadBalancer IPs.
    Agent(Box<AgentArgs>),
    /// NetworkPolicy tools that work from YAML manifests, without a cluster.
    #[command(subcommand)]
    Netpol(netpol_cmd::NetpolCmd),
    /// Print the CustomResourceDefinitions (the source of `crds/`).
    Crdgen(crdgen::CrdgenArgs),
    /// Print the version.
    Version,
}

/// Flags of `palisade agent`. Every flag can also be set by the environment variable shown.
#[derive(Args, Debug)]
struct AgentArgs {
    /// Name of the Kubernetes Node this agent runs on (from the downward API in the chart).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,

    /// This agent's identity for leader election; defaults to the node name.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,

    /// Namespace holding the leader-election Lease (the chart's release namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "palisade-system")]
    pod_namespace: String,

    /// Path to a kubeconfig. Without it: in-cluster service account, then the usual
    /// kubeconfig locations.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,

    /// Enforce NetworkPolicies on this node (turn off if your CNI already does).
    #[arg(long, env = "PALISADE_ENABLE_NETPOL", default_value_t = true, action = clap::ArgAction::Set)]
    enable_netpol: bool,

    /// Also enforce ClusterNetworkPolicies (policy.networking.k8s.io/v1alpha2; the CRD must
    /// be installed: enforcement waits until every watch it reads has listed once).
    #[arg(long, env = "PALISADE_ENABLE_CLUSTER_NETWORK_POLICY", default_value_t = false, action = clap::ArgAction::Set)]
    enable_cluster_network_policy: bool,

    /// Allocate and announce LoadBalancer IPs (turn off if you use another load balancer).
    #[arg(long, env = "PALISADE_ENABLE_LOADBALANCER", default_value_t = true, action = clap::ArgAction::Set)]
    enable_loadbalancer: bool,

    /// Address serving /healthz, /readyz and /metrics.
    #[arg(long, env = "PALISADE_LISTEN_ADDR", default_value = "0.0.0.0:9476")]
    listen_addr: SocketAddr,

    /// Name of the Lease used to elect the one agent that allocates IPs.
    #[arg(
        long,
        env = "PALISADE_LEASE_NAME",
        default_value = "palisade-allocator"
    )]
    lease_name: String,

    /// How long a Lease is valid without renewal.
    #[arg(long, env = "PALISADE_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,

    /// How long the leader keeps trying to renew before stepping down (< lease duration).
    #[arg(long, env = "PALISADE_LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    lease_renew_deadline: Duration,

    /// How often candidates and the leader look at the Lease.
    #[arg(long, env = "PALISADE_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    lease_retry_period: Duration,

    /// The `spec.loadBalancerClass` Palisade handles.
    #[arg(
        long,
        env = "PALISADE_LOAD_BALANCER_CLASS",
        default_value = "palisade.dev/palisade"
    )]
    load_balancer_class: String,

    /// Also handle LoadBalancer Services that set no loadBalancerClass.
    #[arg(long, env = "PALISADE_HANDLE_CLASSLESS_SERVICES", default_value_t = true, action = clap::ArgAction::Set)]
    handle_classless_services: bool,

    /// iptables backend: auto-detect, or force nft / legacy.
    #[arg(long, env = "PALISADE_IPTABLES_BACKEND", value_enum, default_value_t = Backend::Auto)]
    iptables_backend: Backend,

    /// Drop traffic to pods in this node's pod CIDR that the agent has not programmed yet.
    #[arg(long, env = "PALISADE_BLOCK_UNKNOWN_PODS", default_value_t = true, action = clap::ArgAction::Set)]
    block_unknown_pods: bool,

    /// Drop packets entering from a local pod's interface with a source address that is not
    /// the pod's (IPv4 and IPv6; host-network pods exempt).
    #[arg(long, env = "PALISADE_ANTI_SPOOFING", default_value_t = true, action = clap::ArgAction::Set)]
    anti_spoofing: bool,

    /// Denied-traffic log: packets NetworkPolicy drops go to NFLOG first (rate-limited per
    /// pod in the kernel); the agent logs one line per denied flow, counts them in
    /// palisade_netpol_denied_packets_total and publishes an Event on the pod.
    #[arg(long, env = "PALISADE_DENIED_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    denied_log: bool,

    /// Per pod and direction: N/sec, or N/min with N below 60.
    #[arg(long, env = "PALISADE_DENIED_LOG_RATE", default_value = "10/min", value_parser = parse_deny_rate)]
    denied_log_rate: String,

    /// Packets of a pod logged at once before the rate applies.
    #[arg(long, env = "PALISADE_DENIED_LOG_BURST", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=10000))]
    denied_log_burst: u32,

    /// NFLOG group of the denied-traffic log.
    #[arg(long, env = "PALISADE_DENIED_LOG_GROUP", default_value_t = palisade_netpol::DEFAULT_NFLOG_GROUP)]
    denied_log_group: u16,
    /// After a policy change, cut this node's pods' established connections that the new
    /// rules deny (conntrack entries deleted; TCP picked up mid-stream to/from pods a policy
    /// can deny dropped).
    #[arg(long, env = "PALISADE_REVOKE_DENIED_CONNECTIONS", default_value_t = true, action = clap::ArgAction::Set)]
    revoke_denied_connections: bool,

    /// Minimum time between two NetworkPolicy syncs (events in between are coalesced).
    #[arg(long, env = "PALISADE_SYNC_MIN_INTERVAL", default_value = "100ms", value_parser = parse_duration)]
    sync_min_interval: Duration,

    /// Answer ARP/NDP for the LoadBalancer IPs this node is elected for (L2 announcement).
    #[arg(long, env = "PALISADE_ENABLE_L2", default_value_t = true, action = clap::ArgAction::Set)]
    enable_l2: bool,

    /// Announce LoadBalancer IPs over BGP to the routers of the BGPPeers matching this node
    /// (TCP 179 out, BFD on UDP 3784 in / 49152-65535 out).
    #[arg(long, env = "PALISADE_ENABLE_BGP", default_value_t = false, action = clap::ArgAction::Set)]
    enable_bgp: bool,

    /// How long the graceful BGP withdrawal on SIGTERM may take.
    #[arg(long, env = "PALISADE_BGP_SHUTDOWN_LIMIT", default_value = "5s", value_parser = parse_duration)]
    bgp_shutdown_limit: Duration,

    /// UDP port of the agents' liveness heartbeats (the same on every node).
    #[arg(long, env = "PALISADE_MEMBERLIST_PORT", default_value_t = 7946)]
    memberlist_port: u16,

    /// Interval of the liveness heartbeats.
    #[arg(long, env = "PALISADE_MEMBERLIST_INTERVAL", default_value = "200ms", value_parser = parse_duration)]
    memberlist_interval: Duration,

    /// Silence after which a peer agent counts as dead and its IPs move.
    #[arg(long, env = "PALISADE_MEMBERLIST_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    memberlist_timeout: Duration,

    /// Period of the gratuitous ARP / unsolicited NA refresh for every announced IP, so that
    /// switch FDBs and client neighbour caches that age out relearn the owner; 0 = off.
    #[arg(long, env = "PALISADE_L2_REFRESH_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    l2_refresh_interval: Duration,

    /// When LoadBalancer IPs sit on a local interface while arp_ignore/arp_announce are not
    /// strict (kube-proxy IPVS without strictARP), drop this node's kernel ARP replies for the
    /// ones it does not own (nft table `arp palisade_l2`). Detection and the warning happen
    /// either way.
    #[arg(long, env = "PALISADE_L2_ARP_FILTER", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    l2_arp_filter: bool,

    /// Cordoned Nodes (`kubectl cordon`/`drain`) hand their LoadBalancer IPs over to other
    /// nodes before maintenance. Nodes tainted node.kubernetes.io/out-of-service always do.
    #[arg(long, env = "PALISADE_L2_EXCLUDE_CORDONED", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    l2_exclude_cordoned: bool,

    /// File holding the cluster key that authenticates membership datagrams (mounted from a
    /// Secret; re-read when it changes). Required for L2 announcement unless
    /// --memberlist-insecure.
    #[arg(long, env = "PALISADE_MEMBERLIST_KEY_FILE")]
    memberlist_key_file: Option<std::path::PathBuf>,

    /// Run the membership without a key: anyone who reaches the membership port can move
    /// LoadBalancer IPs. For labs only.
    #[arg(long, env = "PALISADE_MEMBERLIST_INSECURE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    memberlist_insecure: bool,

    /// How long the previous key is still accepted after the key file changed.
    #[arg(long, env = "PALISADE_MEMBERLIST_KEY_ROTATION_WINDOW", default_value = "2m", value_parser = parse_duration)]
    memberlist_key_rotation_window: Duration,

    /// Full re-apply at least this often, even with no change.
    #[arg(long, env = "PALISADE_RESYNC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    resync_interval: Duration,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum Backend {
    Auto,
    Nft,
    Legacy,
}

/// Parses `250ms`, `2s`, `5m`, `1h` (or a bare number of seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 500ms, 2s, 5m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` in `{s}` (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{s}` is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn init_logging(args: &LogArgs) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&args.log_level).unwrap_or_else(|e| {
        eprintln!(
            "invalid --log-level `{}` ({e}); using `info`",
            args.log_level
        );
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn agent_config(a: AgentArgs) -> Result<palisade_agent::AgentConfig, String> {
    if a.lease_renew_deadline >= a.lease_duration {
        return Err(format!(
            "--lease-renew-deadline ({:?}) must be shorter than --lease-duration ({:?})",
            a.lease_renew_deadline, a.lease_duration
        ));
    }
    let mut cfg = palisade_agent::AgentConfig::new(a.node_name.clone());
    cfg.identity = a.pod_name.unwrap_or(a.node_name);
    cfg.kubeconfig = a.kubeconfig.filter(|p| !p.as_os_str().is_empty());
    cfg.enable_netpol = a.enable_netpol;
    cfg.enable_cluster_network_policy = a.enable_cluster_network_policy;
    cfg.enable_loadbalancer = a.enable_loadbalancer;
    cfg.listen_addr = a.listen_addr;
    cfg.lease.name = a.lease_name;
    cfg.lease.namespace = a.pod_namespace;
    cfg.lease.lease_duration = a.lease_duration;
    cfg.lease.renew_deadline = a.lease_renew_deadline;
    cfg.lease.retry_period = a.lease_retry_period;
    cfg.load_balancer_class = a.load_balancer_class;
    cfg.handle_classless_services = a.handle_classless_services;
    cfg.iptables_backend = match a.iptables_backend {
        Backend::Auto => "auto",
        Backend::Nft => "nft",
        Backend::Legacy => "legacy",
    }
    .into();
    cfg.block_unknown_pods = a.block_unknown_pods;
    cfg.anti_spoofing = a.anti_spoofing;
    cfg.deny_log = a.denied_log.then(|| palisade_netpol::DenyLog {
        group: a.denied_log_group,
        rate: a.denied_log_rate.clone(),
        burst: a.denied_log_burst,
    });
    cfg.revoke_denied_connections = a.revoke_denied_connections;
    cfg.sync.min_interval = a.sync_min_interval;
    cfg.sync.resync_interval = a.resync_interval;
    if a.memberlist_interval >= a.memberlist_timeout {
        return Err(format!(
            "--memberlist-interval ({:?}) must be shorter than --memberlist-timeout ({:?})",
            a.memberlist_interval, a.memberlist_timeout
        ));
    }
    cfg.enable_l2 = a.enable_l2;
    cfg.l2_refresh_interval = a.l2_refresh_interval;
    cfg.l2_arp_filter = a.l2_arp_filter;
    cfg.l2_exclude_cordoned = a.l2_exclude_cordoned;
    cfg.enable_bgp = a.enable_bgp;
    cfg.bgp_shutdown_limit = a.bgp_shutdown_limit;
    cfg.memberlist_port = a.memberlist_port;
    cfg.memberlist_interval = a.memberlist_interval;
    cfg.memberlist_timeout = a.memberlist_timeout;
    cfg.memberlist_key_file = a.memberlist_key_file.filter(|p| !p.as_os_str().is_empty());
    cfg.memberlist_insecure = a.memberlist_insecure;
    cfg.memberlist_key_rotation_window = a.memberlist_key_rotation_window;
    Ok(cfg)
}

fn parse_deny_rate(s: &str) -> Result<String, String> {
    if palisade_netpol::DenyLog::valid_rate(s) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?}: expected N/sec (1-10000) or N/min (1-59)"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    match cli.command {
        Command::Version => {
            println!("palisade {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Crdgen(args) => report(crdgen::run(args)),
        Command::Netpol(cmd) => report(netpol_cmd::run(cmd)),
        Command::Agent(args) => {
            let cfg = match agent_config(*args) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::from(2);
                }
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the async runtime");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(palisade_agent::run_agent(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "agent failed");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn agent_flags_map_to_config() {
        let cli = Cli::try_parse_from([
            "palisade",
            "agent",
            "--node-name",
            "n1",
            "--enable-netpol",
            "false",
            "--lease-duration",
            "3s",
            "--lease-renew-deadline",
            "2s",
        ])
        .unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("not agent")
        };
        let cfg = agent_config(*a).unwrap();
        assert!(!cfg.enable_netpol);
        assert!(cfg.enable_loadbalancer);
        assert_eq!(cfg.identity, "n1");
        assert_eq!(cfg.lease.lease_duration, Duration::from_secs(3));
    }

    #[test]
    fn renew_deadline_must_be_shorter_than_lease() {
        let cli = Cli::try_parse_from([
            "palisade",
            "agent",
            "--node-name",
            "n1",
            "--lease-duration",
            "2s",
            "--lease-renew-deadline",
            "2s",
        ])
        .unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("not agent")
        };
        assert!(agent_config(*a).is_err());
    }

    #[test]
    fn memberlist_key_flags_map_to_config() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["palisade", "agent", "--node-name", "n1"];
            argv.extend_from_slice(extra);
            let Command::Agent(a) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not agent")
            };
            agent_config(*a).unwrap()
        };
        let cfg = parse(&[]);
        assert_eq!(cfg.memberlist_key_file, None);
        assert!(!cfg.memberlist_insecure);
        assert_eq!(cfg.memberlist_key_rotation_window, Duration::from_secs(120));
        let cfg = parse(&[
            "--memberlist-key-file",
            "/etc/palisade/memberlist/key",
            "--memberlist-key-rotation-window",
            "30s",
        ]);
        assert_eq!(
            cfg.memberlist_key_file.as_deref(),
            Some(std::path::Path::new("/etc/palisade/memberlist/key"))
        );
        assert_eq!(cfg.memberlist_key_rotation_window, Duration::from_secs(30));
        assert!(parse(&["--memberlist-insecure"]).memberlist_insecure);
        assert!(parse(&["--memberlist-insecure=true"]).memberlist_insecure);
    }
}
