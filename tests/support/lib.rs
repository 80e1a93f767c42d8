//! Shared helpers for the integration tests: locating and driving the real `palisade`
//! binary, plain HTTP probes of its health/metrics endpoints (palisade-e2e's [`http_get`]),
//! polling with deadlines, and running lab tests.
#![forbid(unsafe_code)]

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use palisade_e2e::lab_cluster::FAST_LEASE_FLAGS;
use palisade_e2e::{http_get, lab_ready, metric_value};
/// The tests' one bounded poll (palisade-poll), sync and async.
pub use palisade_poll::{poll, poll_async};
use palisade_testapi::TestApiServer;
use serde_json::json;

/// The `palisade` binary built by `cargo build` (override with `PALISADE_BIN`).
pub fn palisade_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PALISADE_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-binary> → target/<profile>/palisade
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("palisade");
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo build -p palisade` first (make test does)",
        bin.display()
    );
    bin
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// How often the integration tests poll an agent process (its API objects, metrics, logs)
/// with [`poll`].
pub const POLL_EVERY: Duration = Duration::from_millis(50);

/// Runs a lab test: skips it where the lab cannot run ([`lab_ready`] says why), builds what
/// it runs on (a lab, or a cluster on one) with `build`, runs `body` on that and panics with
/// the whole error chain while it is still up (it is torn down as the panic unwinds), then
/// prints the time taken.
pub fn run_lab_test<T>(
    test: &str,
    build: impl FnOnce() -> anyhow::Result<T>,
    body: impl FnOnce(&mut T) -> anyhow::Result<()>,
) {
    if !lab_ready(test) {
        return;
    }
    let started = Instant::now();
    let mut fixture = build().unwrap_or_else(|e| panic!("{test}: building the lab: {e:#}"));
    if let Err(e) = body(&mut fixture) {
        panic!("{test} failed: {e:#}");
    }
    println!("{test}: passed in {:?}", started.elapsed());
}

/// A running `palisade agent` process; killed on drop. Its stderr (the log) goes to a file.
pub struct AgentProc {
    pub child: Child,
    pub listen: SocketAddr,
    pub log_path: PathBuf,
    pub name: String,
}

impl AgentProc {
    /// Starts `palisade agent` with `args` (plus `--listen-addr` on a free port) and env.
    pub fn spawn(name: &str, args: &[&str], env: &[(&str, &str)], dir: &Path) -> AgentProc {
        let port = free_port();
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).expect("create log file");
        let mut cmd = Command::new(palisade_bin());
        cmd.arg("agent")
            .arg("--listen-addr")
            .arg(listen.to_string())
            .args(args)
            .env_remove("KUBECONFIG")
            .env("PALISADE_LOG_LEVEL", "info,palisade_runtime=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn palisade agent");
        AgentProc {
            child,
            listen,
            log_path,
            name: name.to_string(),
        }
    }

    /// `GET path` (2 s to connect, 5 s per read).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(
            self.listen,
            path,
            Duration::from_secs(2),
            Duration::from_secs(5),
        )
        .ok()
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        poll(timeout, POLL_EVERY, || {
            self.get("/readyz").filter(|(c, _)| *c == 200).map(|_| ())
        })
        .is_some()
    }

    /// The value of one sample line of `/metrics` (exact name including labels).
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        metric_value(&body, sample)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits for exit; `None` if still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = &mut self.child;
        poll(timeout, POLL_EVERY, || child.try_wait().ok().flatten())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, self.logs());
        }
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("palisade-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// True when running as root (network-namespace tests need it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The test API server on its own runtime, so the (blocking) test body can drive processes.
/// Starts with the `palisade-system` namespace.
pub struct Api {
    pub server: TestApiServer,
    rt: tokio::runtime::Runtime,
}

/// A multi-threaded tokio runtime with `workers` threads, for a blocking test to drive
/// async code (API servers, kube clients) on.
pub fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
}

impl Api {
    pub fn start() -> Api {
        let rt = runtime(2);
        let server = rt
            .block_on(TestApiServer::start("127.0.0.1:0".parse().unwrap()))
            .expect("start test API server");
        server
            .store()
            .put_object(json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "palisade-system"}
            }))
            .expect("namespace");
        Api { server, rt }
    }

    /// Runs `fut` to completion on the API server's runtime.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.rt.block_on(fut)
    }

    pub fn kubeconfig(&self, dir: &TempDir) -> String {
        let path = dir.path().join("kubeconfig");
        self.server.write_kubeconfig(&path).expect("kubeconfig");
        path.display().to_string()
    }

    pub fn lease_holder(&self) -> Option<String> {
        self.server
            .store()
            .get_object(
                "coordination.k8s.io/v1",
                "Lease",
                Some("palisade-system"),
                "palisade-allocator",
            )
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    }
}

/// An agent with only the LoadBalancer side on (no root, no firewall changes).
pub fn lb_agent(name: &str, kubeconfig: &str, dir: &TempDir) -> AgentProc {
    lb_agent_with(name, kubeconfig, dir, &[], &[])
}

/// [`lb_agent`] with more flags and environment.
pub fn lb_agent_with(
    name: &str,
    kubeconfig: &str,
    dir: &TempDir,
    flags: &[&str],
    env: &[(&str, &str)],
) -> AgentProc {
    let mut args = vec![
        "--node-name",
        name,
        "--pod-name",
        name,
        "--enable-netpol=false",
        // These agents run in the host's own network namespace: they must never answer ARP
        // there nor open the membership port (L2 is tested inside network namespaces).
        "--enable-l2=false",
        "--kubeconfig",
        kubeconfig,
    ];
    args.extend_from_slice(FAST_LEASE_FLAGS);
    args.extend_from_slice(flags);
    AgentProc::spawn(name, &args, env, dir.path())
}
