//! Shared helpers for the integration tests: locating and driving the real `palisade`
//! binary, plain HTTP probes of its health/metrics endpoints, and polling with deadlines.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` over HTTP/1.0; returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((code, body))
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

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.listen, path).ok()
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        wait_for(timeout, || {
            self.get("/readyz").filter(|(c, _)| *c == 200).map(|_| ())
        })
        .is_some()
    }

    /// The value of one sample line of `/metrics` (exact name including labels).
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        body.lines().find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
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
        wait_for(timeout, || child.try_wait().ok().flatten())
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
    _rt: tokio::runtime::Runtime,
}

impl Api {
    pub fn start() -> Api {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
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
        Api { server, _rt: rt }
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

/// Fast leader-election timings for tests.
pub const FAST_LEASE: &[&str] = &[
    "--lease-duration",
    "2s",
    "--lease-renew-deadline",
    "1500ms",
    "--lease-retry-period",
    "200ms",
];

/// An agent with only the LoadBalancer side on (no root, no firewall changes).
pub fn lb_agent(name: &str, kubeconfig: &str, dir: &TempDir) -> AgentProc {
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
    args.extend_from_slice(FAST_LEASE);
    AgentProc::spawn(name, &args, &[], dir.path())
}
