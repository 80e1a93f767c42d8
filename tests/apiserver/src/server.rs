//! The server handle: start, address, kubeconfig, test controls, shutdown.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::{Extension, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::resources::ResourceDef;
use crate::routes;
use crate::store::{Store, DEFAULT_HISTORY_LIMIT};

/// Tunables of a [`TestApiServer`].
#[derive(Clone, Debug)]
pub struct Options {
    /// How often open watches that asked for bookmarks (`allowWatchBookmarks=true`) get a
    /// BOOKMARK event. Default 1 s (the real server: about once a minute).
    pub bookmark_interval: Duration,
    /// How many events the history ring keeps; a watch resuming from an older
    /// resourceVersion gets `410 Expired`. Default 10 000.
    pub history_limit: usize,
    /// How long a watch without `timeoutSeconds` stays open. Default 30 min.
    pub default_watch_timeout: Duration,
    /// Largest accepted request body. Default 16 MiB.
    pub max_body_bytes: usize,
    /// How many requests the request log keeps (oldest dropped first). Default 100 000.
    pub request_log_limit: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(1),
            history_limit: DEFAULT_HISTORY_LIMIT,
            default_watch_timeout: Duration::from_secs(30 * 60),
            max_body_bytes: 16 * 1024 * 1024,
            request_log_limit: 100_000,
        }
    }
}

/// One HTTP request as the server saw it, for assertions such as "only the leader writes".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method (`GET`, `PUT`, ...).
    pub method: String,
    /// URL path.
    pub path: String,
    /// Raw query string (empty if none).
    pub query: String,
    /// Kubernetes verb: `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`; `discovery` for discovery/version/health paths; `unknown` for paths
    /// the server does not serve.
    pub verb: String,
    /// API group of the resource (`""` for core and for non-resource paths).
    pub group: String,
    /// API version of the resource (`""` for non-resource paths).
    pub version: String,
    /// Plural resource name, e.g. `leases` (`""` for non-resource paths).
    pub resource: String,
    /// `status` for the status subresource, `""` otherwise.
    pub subresource: String,
    /// Namespace from the path.
    pub namespace: Option<String>,
    /// Object name from the path.
    pub name: Option<String>,
    /// HTTP status code of the response (200 for watches that were started).
    pub code: u16,
    /// The client's address.
    pub peer: SocketAddr,
    /// The client's `User-Agent` header.
    pub user_agent: Option<String>,
}

impl RequestRecord {
    /// Whether this request could change objects (create, update, patch, delete,
    /// deletecollection).
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }
}

/// A simulated API server outage (see [`TestApiServer::set_outage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outage {
    /// Serving normally.
    #[default]
    Off,
    /// Every request is answered `503 ServiceUnavailable` (a `kind: Status`); open watch
    /// streams are ended. Note that kube's default client (`Config::default_retry`) retries
    /// 503 with backoff for a while before it reports an error.
    ServiceUnavailable,
    /// Every connection, open or new, is closed without an answer, like a crashed API server:
    /// clients get connection errors at once (kube does not retry those).
    Disconnect,
}

impl Outage {
    fn to_u8(self) -> u8 {
        match self {
            Self::Off => 0,
            Self::ServiceUnavailable => 1,
            Self::Disconnect => 2,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::ServiceUnavailable,
            2 => Self::Disconnect,
            _ => Self::Off,
        }
    }
}

/// State shared between the handle and the HTTP layer.
#[derive(Debug)]
pub(crate) struct Controls {
    outage: AtomicU8,
    /// Bumped to end every open watch.
    pub(crate) cut_tx: watch::Sender<u64>,
    /// Bumped to close every open connection.
    kill_tx: watch::Sender<u64>,
    pub(crate) open_watches: Arc<AtomicUsize>,
    log: Mutex<VecDeque<RequestRecord>>,
    pub(crate) options: Options,
    pub(crate) addr: SocketAddr,
}

impl Controls {
    fn log(&self) -> MutexGuard<'_, VecDeque<RequestRecord>> {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn record(&self, record: RequestRecord) {
        let limit = self.options.request_log_limit.max(1);
        let mut log = self.log();
        while log.len() >= limit {
            log.pop_front();
        }
        log.push_back(record);
    }

    pub(crate) fn cut_watches(&self) {
        self.cut_tx.send_modify(|epoch| *epoch += 1);
    }

    fn kill_connections(&self) {
        self.kill_tx.send_modify(|epoch| *epoch += 1);
    }

    pub(crate) fn outage(&self) -> Outage {
        Outage::from_u8(self.outage.load(Ordering::SeqCst))
    }
}

/// The shared state handed to every request.
#[derive(Debug)]
pub(crate) struct App {
    pub(crate) store: Store,
    pub(crate) controls: Arc<Controls>,
}

/// An in-process Kubernetes-like API server on a TCP address.
///
/// Dropping the handle stops the server too (without waiting); [`TestApiServer::shutdown`]
/// stops it and waits.
#[derive(Debug)]
pub struct TestApiServer {
    addr: SocketAddr,
    store: Store,
    controls: Arc<Controls>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestApiServer {
    /// Binds `bind` (port 0 picks a free port) and serves with default [`Options`].
    /// Must be called inside a tokio runtime.
    pub async fn start(bind: SocketAddr) -> std::io::Result<Self> {
        Self::start_with(bind, Options::default()).await
    }

    /// Binds `bind` and serves with `options`. Must be called inside a tokio runtime.
    pub async fn start_with(bind: SocketAddr, options: Options) -> std::io::Result<Self> {
        Self::start_with_store(bind, options.clone(), Store::new(options.history_limit)).await
    }

    /// Binds `bind` and serves `store` (e.g. one filled before the server starts, or one that
    /// outlives a previous server to simulate an API server restart with persistent data).
    /// The store keeps its own history limit; `options.history_limit` is not applied to it.
    pub async fn start_with_store(
        bind: SocketAddr,
        options: Options,
        store: Store,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let (cut_tx, _) = watch::channel(0);
        let (kill_tx, _) = watch::channel(0);
        let controls = Arc::new(Controls {
            outage: AtomicU8::new(Outage::Off.to_u8()),
            cut_tx,
            kill_tx,
            open_watches: Arc::new(AtomicUsize::new(0)),
            log: Mutex::new(VecDeque::new()),
            options,
            addr,
        });
        let app = Arc::new(App {
            store: store.clone(),
            controls: Arc::clone(&controls),
        });
        let router = routes::router(app);
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(accept_loop(
            listener,
            router,
            Arc::clone(&controls),
            shutdown_rx,
        ));
        tracing::debug!(%addr, "test API server listening");
        Ok(Self {
            addr,
            store,
            controls,
            shutdown: Some(shutdown_tx),
            task: Some(task),
        })
    }

    /// The bound address (with the real port if `bind` had port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` for clients. An unspecified bind address (`0.0.0.0`, `::`) is reported as
    /// the loopback address of the same family.
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// A kubeconfig (cluster, context and an empty user, all named `palisade-test`, default
    /// namespace `default`) pointing at [`TestApiServer::url`].
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: palisade-test\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: palisade-test\n  context:\n    cluster: palisade-test\n    user: palisade-test\n    namespace: default\n\
             current-context: palisade-test\n\
             preferences: {{}}\n\
             users:\n\
             - name: palisade-test\n  user: {{}}\n",
            url = self.url()
        )
    }

    /// Writes [`TestApiServer::kubeconfig_yaml`] to `path`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    /// Direct access to the objects, without HTTP.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Adds a kind to serve (see [`Store::register`]).
    pub fn register(&self, def: ResourceDef) {
        self.store.register(def);
    }

    /// Simulates an API outage: while `true`, every request gets `503 ServiceUnavailable`;
    /// turning it on also ends every open watch stream. Same as
    /// `set_outage(Outage::ServiceUnavailable)` / `set_outage(Outage::Off)`.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.set_outage(if unavailable {
            Outage::ServiceUnavailable
        } else {
            Outage::Off
        });
    }

    /// Whether any simulated outage is on.
    pub fn is_unavailable(&self) -> bool {
        self.controls.outage() != Outage::Off
    }

    /// Starts or ends a simulated outage (see [`Outage`]). Starting one ends open watch
    /// streams; [`Outage::Disconnect`] also closes every open connection.
    pub fn set_outage(&self, outage: Outage) {
        self.controls.outage.store(outage.to_u8(), Ordering::SeqCst);
        match outage {
            Outage::Off => {}
            Outage::ServiceUnavailable => self.controls.cut_watches(),
            Outage::Disconnect => {
                self.controls.cut_watches();
                self.controls.kill_connections();
            }
        }
    }

    /// The current simulated outage.
    pub fn outage(&self) -> Outage {
        self.controls.outage()
    }

    /// Ends every open watch stream (like a server-side watch timeout or an API server
    /// restart behind a load balancer); clients resume from their last resourceVersion.
    pub fn close_watches(&self) {
        self.controls.cut_watches();
    }

    /// How many watch streams are open right now.
    pub fn open_watches(&self) -> usize {
        self.controls.open_watches.load(Ordering::SeqCst)
    }

    /// Drops the event history (see [`Store::compact`]): resuming from an older
    /// resourceVersion gives `410 Expired`.
    pub fn compact(&self) {
        self.store.compact();
    }

    /// Every request served so far, oldest first.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.controls.log().iter().cloned().collect()
    }

    /// Forgets the requests logged so far.
    pub fn clear_request_log(&self) {
        self.controls.log().clear();
    }

    /// How many logged requests had this verb and resource (plural, e.g. `leases`).
    pub fn count_requests(&self, verb: &str, resource: &str) -> usize {
        self.controls
            .log()
            .iter()
            .filter(|r| r.verb == verb && r.resource == resource)
            .count()
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Stops accepting connections, closes every open one (watches included) and waits for
    /// the server task to end (at most 5 s).
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts connections until shutdown; serves each on its own task, which ends when the
/// connection does or when connections are killed (outage, shutdown).
async fn accept_loop(
    listener: TcpListener,
    router: Router,
    controls: Arc<Controls>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Subscribe before checking the outage flag: set_outage stores the flag
                    // before it bumps the kill epoch, so a connection cannot slip through.
                    let kill = controls.kill_tx.subscribe();
                    if controls.outage() == Outage::Disconnect {
                        drop(stream);
                        continue;
                    }
                    connections.spawn(serve_connection(stream, peer, router.clone(), kill));
                }
                Err(err) => {
                    tracing::warn!(%err, "test API server: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    controls.cut_watches();
    controls.kill_connections();
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(2), drain)
        .await
        .is_err()
    {
        connections.abort_all();
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    mut kill: watch::Receiver<u64>,
) {
    let service = TowerToHyperService::new(router.layer(Extension(ConnectInfo(peer))));
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = conn => {
            if let Err(err) = result {
                tracing::debug!(%err, %peer, "test API server: connection ended with an error");
            }
        }
        // Dropping the connection closes the socket without an answer.
        _ = kill.changed() => {}
    }
}
