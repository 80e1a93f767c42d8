//! Network namespaces and the `ip` tool, with the root namespace kept out of reach.
//!
//! Every helper that changes links, addresses, routes or sysctls takes the name of a network
//! namespace and runs there (`ip -n NAME ...`, or a thread that `setns`-ed into it). There is
//! deliberately no helper that runs `ip` in the caller's namespace: the lab must never add an
//! address or a route to the host's own (root) namespace, where a stray route to a
//! documentation range can cut the machine off.
//!
//! Named namespaces are the files `ip netns add` bind-mounts under [`NETNS_DIR`]; the kernel
//! frees a namespace (and the veths in it) once its file is removed and nothing runs in it.
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread, so code that must create sockets
//! inside a namespace runs on a thread of its own ([`run_in`], [`enter`] on a dedicated
//! thread). A socket keeps the namespace it was created in for its whole life, whatever thread
//! uses it later.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Where `ip netns add` keeps its namespace files.
pub const NETNS_DIR: &str = "/run/netns";

/// The file that names the namespace `name`.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Whether a namespace called `name` exists.
pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Names of all named network namespaces on this machine.
pub fn list() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(format!("listing {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in dir {
        let entry = entry.with_context(|| format!("listing {NETNS_DIR}"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Creates the named namespace `name` (`ip netns add`) with its loopback up.
pub fn add(name: &str) -> Result<()> {
    run_checked(Command::new("ip").args(["netns", "add", name]))
        .with_context(|| format!("creating network namespace {name}"))?;
    ip_in(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Removes the named namespace `name` (`ip netns del`); a missing one is not an error.
pub fn delete(name: &str) -> Result<()> {
    if !exists(name) {
        return Ok(());
    }
    match run_checked(Command::new("ip").args(["netns", "del", name])) {
        Ok(_) => Ok(()),
        // Someone else (a parallel cleanup) removed it meanwhile: that is what we wanted.
        Err(_) if !exists(name) => Ok(()),
        Err(e) => Err(e.context(format!("deleting network namespace {name}"))),
    }
}

/// Moves the calling thread into the namespace `name`. Only call this on a thread that is
/// dedicated to that namespace (see [`run_in`]); the test's own threads must stay where they are.
pub fn enter(name: &str) -> Result<()> {
    let file = File::open(path(name)).with_context(|| format!("opening netns {name}"))?;
    setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into netns {name}"))?;
    Ok(())
}

/// Runs `f` on a fresh thread inside the namespace `name` and returns its result.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter(name)?;
                f()
            })
            .join()
            .unwrap_or_else(|_| bail!("thread inside netns {name} panicked"))
    })
}

/// Per-thread cache of namespace files, for threads that hop between namespaces (probers).
#[derive(Default)]
pub struct Hopper {
    files: HashMap<String, File>,
    current: Option<String>,
}

impl Hopper {
    /// Moves the calling thread into `name` unless it is there already.
    pub fn enter(&mut self, name: &str) -> Result<()> {
        if self.current.as_deref() == Some(name) {
            return Ok(());
        }
        if !self.files.contains_key(name) {
            let file = File::open(path(name)).with_context(|| format!("opening netns {name}"))?;
            self.files.insert(name.to_string(), file);
        }
        let file = &self.files[name];
        setns(file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {name}"))?;
        self.current = Some(name.to_string());
        Ok(())
    }
}

/// Process ids whose (main thread's) network namespace is `name` (`ip netns pids`).
pub fn pids(name: &str) -> Result<Vec<u32>> {
    let out = run_checked(Command::new("ip").args(["netns", "pids", name]))
        .with_context(|| format!("listing processes in netns {name}"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Runs `ip -n NETNS ARGS...` and returns its standard output.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let out = run_checked(Command::new("ip").arg("-n").arg(netns).args(args))
        .with_context(|| format!("in netns {netns}: ip {}", args.join(" ")))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits (at most `timeout`) until every link in `names` of namespace `netns` is
/// operationally UP. Until the kernel's link watcher has run for a new veth, its queue drops
/// every packet, so a probe sent right after creation could be lost; `ip link` reads the state
/// under the same lock the link watcher holds while it activates the device.
pub fn wait_links_up(netns: &str, names: &[&str], timeout: std::time::Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let out = ip_in(netns, &["-o", "link", "show"])?;
        let down: Vec<&str> = names
            .iter()
            .copied()
            .filter(|name| {
                !out.lines().any(|line| {
                    let mut fields = line.split_whitespace();
                    let ifname = fields.nth(1).unwrap_or("");
                    let ifname = ifname.trim_end_matches(':').split('@').next().unwrap_or("");
                    ifname == *name && line.contains(" state UP ")
                })
            })
            .collect();
        if down.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("in netns {netns}: links {down:?} not up after {timeout:?}:\n{out}");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Runs several `ip` commands in one `ip -n NETNS -batch -` process (one line each, without
/// the leading `ip`). Stops at the first failing line, which the error names.
pub fn ip_batch(netns: &str, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning ip -batch")?;
    {
        let mut stdin = child.stdin.take().context("ip -batch has no stdin")?;
        let script = lines.join("\n") + "\n";
        stdin
            .write_all(script.as_bytes())
            .context("writing to ip -batch")?;
    }
    let out = child.wait_with_output().context("waiting for ip -batch")?;
    if !out.status.success() {
        bail!(
            "in netns {netns}: ip -batch failed ({}): {}\nscript:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            lines.join("\n")
        );
    }
    Ok(())
}

/// Writes a sysctl of the namespace `netns` (`key` like `net/ipv4/ip_forward`), from a thread
/// inside it: `/proc/sys/net` shows the namespace of the thread that opens it.
pub fn write_sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    let file = Path::new("/proc/sys").join(key);
    run_in(netns, || {
        std::fs::write(&file, value)
            .with_context(|| format!("writing {} in netns {netns}", file.display()))
    })
}

/// Runs `ip netns exec NETNS ARGV...`, waits, and returns its output whatever the exit status.
pub fn exec(netns: &str, argv: &[&str]) -> Result<Output> {
    let (program, args) = argv.split_first().context("exec needs a program")?;
    Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} in netns {netns}", argv.join(" ")))
}

/// Like [`exec`], but a non-zero exit is an error that carries standard error; returns stdout.
pub fn exec_ok(netns: &str, argv: &[&str]) -> Result<String> {
    let out = exec(netns, argv)?;
    if !out.status.success() {
        bail!(
            "in netns {netns}: `{}` failed ({}): {}{}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}
