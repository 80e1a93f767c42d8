//! `palisade agent`: wires the shared runtime (`palisade-runtime`) and the enabled
//! reconcilers (enforcement, allocation, announcement, membership) together.
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

use palisade_announcement::AnnouncerReconciler;
use palisade_runtime::client::make_client;
pub mod config;

pub use config::AgentConfig;
use palisade_allocation::LoadBalancerReconciler;
use palisade_announcement::status::StatusWriter;
use palisade_enforcement::{ExecutorFactory, NetpolReconciler};
use palisade_membership::MembershipSettings;
use palisade_runtime::events::EventSink;
use palisade_runtime::leader::LeaderElector;
use palisade_runtime::metrics::Metrics;
use palisade_runtime::stores::{Stores, Subscribers, Wanted};
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

    // Kernel executor first: a missing iptables binary is reported at once, loudly. The
    // IPv6 executor is made when the node turns out to need it, on the IPv4 one's backend.
    let executor: Option<ExecutorFactory> = if cfg.enable_netpol {
        match KernelExecutor::detect_with(&cfg.iptables_backend) {
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
    } else {
        None
    };

    let netpol_trigger = Trigger::new();
    let lb_trigger = Trigger::new();
    let ann_trigger = Trigger::new();
    let status_trigger = Trigger::new();
    let mut wanted = Wanted::default();
    let mut subs = Subscribers::default();
    if cfg.enable_netpol {
        wanted = wanted.union(Wanted::netpol());
        subs.pods.push(netpol_trigger.clone());
        subs.namespaces.push(netpol_trigger.clone());
        subs.network_policies.push(netpol_trigger.clone());
        subs.nodes.push(netpol_trigger.clone());
    }
    if cfg.enable_loadbalancer {
        wanted = wanted.union(Wanted::loadbalancer());
        subs.ip_address_pools.push(lb_trigger.clone());
        subs.l2_advertisements.push(lb_trigger.clone());
        subs.services.push(lb_trigger.clone());
        subs.namespaces.push(lb_trigger.clone());
        subs.nodes.push(lb_trigger.clone());
        subs.endpoint_slices.push(lb_trigger.clone());
        for t in [
            &mut subs.services,
            &mut subs.nodes,
            &mut subs.ip_address_pools,
            &mut subs.l2_advertisements,
            &mut subs.endpoint_slices,
        ] {
            t.push(ann_trigger.clone());
        }
        if cfg.enable_l2 {
            wanted = wanted.union(Wanted::l2_status());
            subs.service_l2_statuses.push(status_trigger.clone());
        }
    }
    let stores = Stores::start(
        &client,
        wanted,
        subs,
        metrics.clone(),
        cfg.watch_backoff_max,
        shutdown.clone(),
    );
    let (bound, http_task) = palisade_runtime::http::serve(
        cfg.listen_addr,
        stores.readiness.clone(),
        metrics.clone(),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(addr = %bound, "serving /healthz, /readyz and /metrics");

    let events = EventSink::new(client.clone(), cfg.identity.clone(), metrics.clone());
    let mut tasks = JoinSet::new();

    if let Some(executor) = executor {
        let mut node = NodeConfig::new(cfg.node_name.clone());
        node.block_unknown_pods = cfg.block_unknown_pods;
        node.anti_spoofing = cfg.anti_spoofing;
        node.revoke_denied_connections = cfg.revoke_denied_connections;
        let conntrack = if cfg.revoke_denied_connections {
            match palisade_dataplane::KernelConntrack::detect() {
                Ok(c) => Some(Arc::new(c) as Arc<dyn palisade_dataplane::Conntrack>),
                Err(e) => {
                    tracing::error!(error = %e, "revocation of denied connections cannot run (install conntrack)");
                    None
                }
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
            stores: stores.clone(),
            node,
            executors: executor,
            links,
            conntrack,
            metrics: metrics.clone(),
            events: events.clone(),
            settings: cfg.sync,
        };
        tasks.spawn(reconciler.run(netpol_trigger, shutdown.clone()));
    }

    if cfg.enable_loadbalancer {
        let (elector, is_leader) = LeaderElector::new(
            client.clone(),
            cfg.lease.clone(),
            cfg.identity.clone(),
            metrics.clone(),
        );
        tasks.spawn(elector.run(shutdown.clone()));
        let reconciler = LoadBalancerReconciler {
            client: client.clone(),
            stores: stores.clone(),
            metrics: metrics.clone(),
            events: events.clone(),
            settings: cfg.sync,
            is_leader,
            class: cfg.load_balancer_class.clone(),
            claim_unclassed: cfg.handle_classless_services,
        };
        tasks.spawn(reconciler.run(lb_trigger, shutdown.clone()));

        if cfg.enable_l2 {
            let (status_tx, status_rx) = tokio::sync::watch::channel(None);
            match start_announcer(
                &cfg,
                &stores,
                &metrics,
                &events,
                &shutdown,
                ann_trigger,
                status_tx,
            )
            .await
            {
                Ok(fut) => {
                    tasks.spawn(fut);
                    let writer = StatusWriter {
                        client: client.clone(),
                        node_name: cfg.node_name.clone(),
                        stores: stores.clone(),
                        metrics: metrics.clone(),
                        settings: cfg.sync,
                        snapshot: status_rx,
                    };
                    tasks.spawn(writer.run(status_trigger, shutdown.clone()));
                }
                Err(e) => {
                    tracing::error!(error = %e, "L2 announcement cannot start; LoadBalancer IPs are allocated but not announced")
                }
            }
        }
    }

    // Log readiness once reached.
    {
        let readiness = stores.readiness.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            while !readiness.is_ready() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            tracing::info!("all caches synced; agent ready");
        });
    }

    shutdown.cancelled().await;
    stores.readiness.set_shutting_down();
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
    stores: &Stores,
    metrics: &Arc<Metrics>,
    events: &EventSink,
    shutdown: &CancellationToken,
    trigger: Trigger,
    status: tokio::sync::watch::Sender<Option<palisade_loadbalancer::l2status::Snapshot>>,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, String> {
    let speaker = palisade_speaker::Speaker::new().map_err(|e| e.to_string())?;
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
        stores: stores.clone(),
        metrics: metrics.clone(),
        events: events.clone(),
        settings: cfg.sync,
        speaker: Arc::new(speaker),
        live,
        peers: peers_tx,
        class: cfg.load_balancer_class.clone(),
        claim_unclassed: cfg.handle_classless_services,
        status,
    };
    Ok(reconciler.run(trigger, shutdown.clone()))
}
