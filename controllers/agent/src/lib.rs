//! `palisade agent`: wires the shared runtime (`palisade-runtime`) and the enabled
//! reconcilers (enforcement, allocation, announcement, membership, BGP announcement) together.
//!
//! Start-up order: client → metrics/health listener → caches → reconcilers (netpol waits
//! for its caches; the allocator waits for the Lease). Shutdown (SIGTERM/SIGINT): readiness
//! drops first, the Lease is released, tasks stop; kernel rules are left in force.
use std::sync::Arc;
use std::time::Duration;

use palisade_dataplane::{Executor, KernelExecutor};
use palisade_netpol::{Family, NodeConfig};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use palisade_announcement::{AnnouncerCaches, AnnouncerReconciler};
use palisade_bgp_announcement::status::{BgpStatusCaches, BgpStatusWriter};
use palisade_bgp_announcement::{BgpCaches, BgpReconciler};
use palisade_runtime::client::make_client;
pub mod config;

pub use config::AgentConfig;
use palisade_allocation::{LbCaches, LoadBalancerReconciler};
use palisade_announcement::status::{StatusCaches, StatusWriter};
use palisade_enforcement::{ExecutorFactory, NetpolCaches, NetpolReconciler};
use palisade_membership::MembershipSettings;
use palisade_runtime::events::EventSink;
use palisade_runtime::leader::LeaderElector;
use palisade_runtime::metrics::Metrics;
use palisade_runtime::stores::Caches;
use palisade_runtime::sync::Trigger;
use palisade_runtime::Error;

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run_agent(cfg: AgentConfig) -> Result<(), Error> {
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    run_agent_until(cfg, shutdown).await
}

fn spawn_signal_handler(shutdown: CancellationToken) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
        }
        shutdown.cancel();
    });
    Ok(())
}

/// Runs the agent until `shutdown` is cancelled (tests cancel it directly).
pub async fn run_agent_until(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), Error> {
    let (client, kube_config) = make_client(cfg.kubeconfig.as_deref()).await?;
    tracing::info!(
        node = %cfg.node_name,
        api = %kube_config.cluster_url,
        netpol = cfg.enable_netpol,
        loadbalancer = cfg.enable_loadbalancer,
        "palisade agent starting"
    );
    if !cfg.enable_netpol && !cfg.enable_loadbalancer {
        tracing::warn!("both reconcilers are disabled; the agent only serves health and metrics");
    }
    let metrics = Arc::new(Metrics::new());
    // Kernel executor detection (a missing iptables binary is reported at once, loudly) runs
    // on a blocking thread while the watches list: it spawns `iptables-*-save` to pick the
    // backend, and the first lists are what the cold start waits for.
    let detect = cfg.enable_netpol.then(|| {
        let backend = cfg.iptables_backend.clone();
        tokio::task::spawn_blocking(move || netpol_executors_with(&backend))
    });
    let mut caches = Caches::new(
        client.clone(),
        metrics.clone(),
        cfg.watch_backoff_max,
        shutdown.clone(),
    );
    let wiring = Wiring::register(&cfg, &mut caches, &client);
    let readiness = caches.readiness();
    tracing::debug!(caches = ?caches.names(), "caches registered");
    let (bound, http_task) = palisade_runtime::http::serve(
        cfg.listen_addr,
        readiness.clone(),
        metrics.clone(),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(addr = %bound, "serving /healthz, /readyz and /metrics");

    let shared = Shared {
        events: EventSink::new(client.clone(), cfg.identity.clone(), metrics.clone()),
        client,
        metrics,
        shutdown: shutdown.clone(),
    };
    let executors = match detect {
        Some(task) => task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "NetworkPolicy enforcement cannot start: detecting the iptables/ipset tools failed; rules already in the kernel stay in force");
            None
        }),
        None => None,
    };
    let mut tasks = JoinSet::new();
    if let (Some(executors), Some((trigger, stores))) = (executors, wiring.netpol) {
        start_enforcement(&cfg, &shared, stores, executors, trigger, &mut tasks);
    }
    if let Some((trigger, stores)) = wiring.allocation {
        start_allocation(&cfg, &shared, stores, trigger, &mut tasks);
    }
    if let Some(l2) = wiring.l2 {
        if let Err(e) = start_l2(&cfg, &shared, l2, &mut tasks).await {
            tracing::error!(error = %e, "L2 announcement cannot start; LoadBalancer IPs are allocated but not announced")
        }
    }
    if let Some(bgp) = wiring.bgp {
        start_bgp(&cfg, &shared, bgp, &mut tasks);
    }
    tasks.spawn(log_when_ready(readiness.clone(), shutdown.clone()));

    shutdown.cancelled().await;
    readiness.set_shutting_down();
    tracing::info!("shutting down: waiting for tasks to finish");
    let drain = async {
        while tasks.join_next().await.is_some() {}
        let _ = http_task.await;
    };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tracing::warn!("tasks did not stop within 10s; exiting anyway");
    }
    tracing::info!("palisade agent stopped");
    Ok(())
}

/// What every reconciler is handed.
struct Shared {
    client: kube::Client,
    metrics: Arc<Metrics>,
    events: EventSink,
    shutdown: CancellationToken,
}

type Tasks = JoinSet<()>;

/// The enabled reconcilers' caches, each with the trigger its caches poke.
struct Wiring {
    netpol: Option<(Trigger, NetpolCaches)>,
    allocation: Option<(Trigger, LbCaches)>,
    l2: Option<L2Wiring>,
    bgp: Option<BgpWiring>,
}

struct BgpWiring {
    announcer: (Trigger, BgpCaches),
    status: (Trigger, BgpStatusCaches),
}

struct L2Wiring {
    announcer: (Trigger, AnnouncerCaches),
    status: (Trigger, StatusCaches),
}

impl Wiring {
    /// Each reconciler registers the caches it reads (one watch per kind, whoever reads it).
    fn register(cfg: &AgentConfig, caches: &mut Caches, client: &kube::Client) -> Wiring {
        fn with<C>(caches: &mut Caches, reg: fn(&mut Caches, &Trigger) -> C) -> (Trigger, C) {
            let t = Trigger::new();
            let c = reg(caches, &t);
            (t, c)
        }
        Wiring {
            netpol: cfg.enable_netpol.then(|| {
                // ClusterNetworkPolicy status is written by enforcement itself.
                let cnp_client = cfg.enable_cluster_network_policy.then(|| client.clone());
                let t = Trigger::new();
                let c = NetpolCaches::register_with(caches, &t, cnp_client);
                (t, c)
            }),
            allocation: cfg
                .enable_loadbalancer
                .then(|| with(caches, LbCaches::register)),
            l2: (cfg.enable_loadbalancer && cfg.enable_l2).then(|| L2Wiring {
                announcer: with(caches, AnnouncerCaches::register),
                status: with(caches, StatusCaches::register),
            }),
            bgp: (cfg.enable_loadbalancer && cfg.enable_bgp).then(|| BgpWiring {
                announcer: with(caches, BgpCaches::register),
                status: with(caches, BgpStatusCaches::register),
            }),
        }
    }
}

/// The kernel executors of NetworkPolicy enforcement; `None` (logged) when the iptables/ipset
/// tools are unusable. The IPv6 executor is made when the node turns out to need it, on the
/// IPv4 one's backend.
fn netpol_executors_with(backend_flag: &str) -> Option<ExecutorFactory> {
    match KernelExecutor::detect_with(backend_flag) {
        Ok(x) => {
            let backend = x.backend().as_flag();
            let v4: Arc<dyn Executor> = Arc::new(x);
            let factory: ExecutorFactory = Arc::new(move |family| match family {
                Family::V4 => Ok(v4.clone()),
                Family::V6 => KernelExecutor::for_family(Family::V6, backend, None)
                    .map(|x| Arc::new(x) as Arc<dyn Executor>)
                    .map_err(|e| e.to_string()),
            });
            Some(factory)
        }
        Err(e) => {
            tracing::error!(error = %e, "NetworkPolicy enforcement cannot start: the iptables/ipset tools are missing or unusable; rules already in the kernel stay in force");
            None
        }
    }
}

fn start_enforcement(
    cfg: &AgentConfig,
    shared: &Shared,
    stores: NetpolCaches,
    executors: ExecutorFactory,
    trigger: Trigger,
    tasks: &mut Tasks,
) {
    let mut node = NodeConfig::new(cfg.node_name.clone());
    node.block_unknown_pods = cfg.block_unknown_pods;
    node.anti_spoofing = cfg.anti_spoofing;
    node.deny_log = cfg.deny_log.clone();
    let deny_index = node.deny_log.as_ref().map(|log| {
        let index: palisade_enforcement::denied_log::SharedIndex = Default::default();
        let logger = palisade_enforcement::denied_log::DeniedLogger {
            group: log.group,
            index: index.clone(),
            metrics: shared.metrics.clone(),
            events: shared.events.clone(),
        };
        tasks.spawn(logger.run(shared.shutdown.clone()));
        index
    });
    node.revoke_denied_connections = cfg.revoke_denied_connections;
    let conntrack = if cfg.revoke_denied_connections {
        // ctnetlink first (one dump, O(1) deletes batched per write); the conntrack tool
        // (one process and one table walk per deleted entry) only when the socket fails.
        match palisade_dataplane::NetlinkConntrack::open() {
            Ok(c) => {
                tracing::info!("revocation of denied connections: ctnetlink");
                Some(Arc::new(c) as Arc<dyn palisade_dataplane::Conntrack>)
            }
            Err(nl) => match palisade_dataplane::KernelConntrack::detect() {
                Ok(c) => {
                    tracing::warn!(error = %nl, "ctnetlink socket cannot be opened; revocation of denied connections falls back to the conntrack tool");
                    Some(Arc::new(c) as Arc<dyn palisade_dataplane::Conntrack>)
                }
                Err(e) => {
                    tracing::error!(netlink = %nl, error = %e, "revocation of denied connections cannot run (no ctnetlink socket, conntrack not installed)");
                    None
                }
            },
        }
    } else {
        None
    };
    let links = match palisade_dataplane::KernelLinks::detect() {
        Ok(l) => Some(Arc::new(l) as Arc<dyn palisade_dataplane::LinkSource>),
        Err(e) => {
            tracing::error!(error = %e, "anti-spoofing cannot read pod interfaces");
            None
        }
    };
    let reconciler = NetpolReconciler {
        stores,
        node,
        executors,
        links,
        conntrack,
        metrics: shared.metrics.clone(),
        events: shared.events.clone(),
        settings: cfg.sync,
        deny_index,
    };
    tasks.spawn(reconciler.run(trigger, shared.shutdown.clone()));
}

/// The Lease elector and the allocator (which writes only while it leads).
fn start_allocation(
    cfg: &AgentConfig,
    shared: &Shared,
    stores: LbCaches,
    trigger: Trigger,
    tasks: &mut Tasks,
) {
    let (elector, is_leader) = LeaderElector::new(
        shared.client.clone(),
        cfg.lease.clone(),
        cfg.identity.clone(),
        shared.metrics.clone(),
    );
    tasks.spawn(elector.run(shared.shutdown.clone()));
    let reconciler = LoadBalancerReconciler {
        client: shared.client.clone(),
        stores,
        metrics: shared.metrics.clone(),
        events: shared.events.clone(),
        settings: cfg.sync,
        is_leader,
        class: cfg.load_balancer_class.clone(),
        claim_unclassed: cfg.handle_classless_services,
    };
    tasks.spawn(reconciler.run(trigger, shared.shutdown.clone()));
}

/// The membership, the speaker, the announcer and its `ServiceL2Status` writer.
async fn start_l2(
    cfg: &AgentConfig,
    shared: &Shared,
    l2: L2Wiring,
    tasks: &mut Tasks,
) -> Result<(), String> {
    let (status_tx, status_rx) = tokio::sync::watch::channel(None);
    let (ann_trigger, ann_caches) = l2.announcer;
    let fut = start_announcer(
        cfg,
        ann_caches,
        &shared.metrics,
        &shared.events,
        &shared.shutdown,
        ann_trigger,
        status_tx,
    )
    .await?;
    tasks.spawn(fut);
    let (status_trigger, status_caches) = l2.status;
    let writer = StatusWriter {
        client: shared.client.clone(),
        node_name: cfg.node_name.clone(),
        stores: status_caches,
        metrics: shared.metrics.clone(),
        settings: cfg.sync,
        snapshot: status_rx,
    };
    tasks.spawn(writer.run(status_trigger, shared.shutdown.clone()));
    Ok(())
}

/// The BGP speaker, its reconciler and the BGP status writer.
fn start_bgp(cfg: &AgentConfig, shared: &Shared, bgp: BgpWiring, tasks: &mut Tasks) {
    let (plan_tx, plan_rx) = tokio::sync::watch::channel(None);
    // Sessions and BFD on a thread of their own: reconcile passes never delay their timers.
    let (speaker, speaker_thread) = match palisade_bgp::Speaker::spawn_thread("bgp-speaker") {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "BGP cannot start: no thread for the speaker");
            return;
        }
    };
    let (status_trigger, status_stores) = bgp.status;
    let writer = BgpStatusWriter {
        client: shared.client.clone(),
        node_name: cfg.node_name.clone(),
        stores: status_stores,
        metrics: shared.metrics.clone(),
        settings: cfg.sync,
        speaker: speaker.clone(),
        plan: plan_rx,
    };
    tasks.spawn(writer.run(status_trigger, shared.shutdown.clone()));
    let (trigger, stores) = bgp.announcer;
    let reconciler = BgpReconciler {
        node_name: cfg.node_name.clone(),
        stores,
        metrics: shared.metrics.clone(),
        events: shared.events.clone(),
        settings: cfg.sync,
        speaker,
        class: cfg.load_balancer_class.clone(),
        claim_unclassed: cfg.handle_classless_services,
        shutdown_limit: cfg.bgp_shutdown_limit,
        plan: plan_tx,
        passwords: palisade_bgp_announcement::password::PasswordSecrets::new(
            shared.client.clone(),
            &cfg.lease.namespace,
        ),
        uses_passwords: Default::default(),
    };
    let shutdown = shared.shutdown.clone();
    tasks.spawn(async move {
        // run() ends after the graceful withdrawal; only then does the thread go.
        reconciler.run(trigger, shutdown).await;
        let _ = tokio::task::spawn_blocking(move || drop(speaker_thread)).await;
    });
}

/// Logs readiness once reached.
async fn log_when_ready(
    readiness: palisade_runtime::stores::Readiness,
    shutdown: CancellationToken,
) {
    while !readiness.is_ready() {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    tracing::info!("all caches synced; agent ready");
}

/// Where the membership key comes from; an error when none was configured.
fn membership_key_source(
    cfg: &AgentConfig,
) -> Result<palisade_membership::memberlist_keyfile::KeySource, String> {
    use palisade_membership::memberlist_keyfile::KeySource;
    match (&cfg.memberlist_key_file, cfg.memberlist_insecure) {
        (Some(path), _) => Ok(KeySource::File(path.clone())),
        (None, true) => {
            tracing::warn!(
                "--memberlist-insecure: membership datagrams are not authenticated; anyone \
                 who reaches the membership port can move LoadBalancer IPs"
            );
            Ok(KeySource::Insecure)
        }
        (None, false) => Err(
            "no membership key: pass --memberlist-key-file PATH (a file \
             from a Secret holding a random key of at least 16 bytes; the Helm chart creates \
             one) or, to run unauthenticated, --memberlist-insecure"
                .into(),
        ),
    }
}

/// Starts the membership and the speaker, and returns the announcer's task.
async fn start_announcer(
    cfg: &AgentConfig,
    stores: AnnouncerCaches,
    metrics: &Arc<Metrics>,
    events: &EventSink,
    shutdown: &CancellationToken,
    trigger: Trigger,
    status: tokio::sync::watch::Sender<Option<palisade_loadbalancer::l2status::Snapshot>>,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, String> {
    let speaker = palisade_speaker::Speaker::with_config(palisade_speaker::SpeakerConfig {
        refresh_interval: cfg.l2_refresh_interval,
        ..palisade_speaker::SpeakerConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let keys = palisade_membership::memberlist_keyfile::start(
        &membership_key_source(cfg)?,
        cfg.memberlist_key_rotation_window,
        shutdown.clone(),
    )?;
    let (peers_tx, peers_rx) = tokio::sync::watch::channel(None);
    let mut settings = MembershipSettings::new(cfg.node_name.clone(), cfg.memberlist_port, keys);
    settings.rejected = metrics.memberlist_rejected.clone();
    settings.interval = cfg.memberlist_interval;
    settings.timeout = cfg.memberlist_timeout;
    let (reach_tx, reach_rx) = tokio::sync::watch::channel(Vec::new());
    settings.reach = reach_rx;
    let (answering_tx, answering_rx) = tokio::sync::watch::channel(Default::default());
    settings.owned = answering_rx;
    let live = palisade_membership::start(settings, peers_rx, shutdown.clone())
        .await
        .map_err(|e| {
            format!(
                "cannot bind the membership port {}: {e}",
                cfg.memberlist_port
            )
        })?;
    {
        let mut live = live.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                metrics
                    .members_alive
                    .set(live.borrow_and_update().nodes.len() as i64);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = live.changed() => if r.is_err() { return },
                }
            }
        });
    }
    let reconciler = AnnouncerReconciler {
        node_name: cfg.node_name.clone(),
        stores,
        metrics: metrics.clone(),
        events: events.clone(),
        settings: cfg.sync,
        speaker: Arc::new(speaker),
        live,
        peers: peers_tx,
        reach: reach_tx,
        answering: answering_tx,
        arp_filter: cfg.l2_arp_filter,
        exclude_unschedulable: cfg.l2_exclude_cordoned,
        class: cfg.load_balancer_class.clone(),
        claim_unclassed: cfg.handle_classless_services,
        status,
    };
    Ok(reconciler.run(trigger, shutdown.clone()))
}
