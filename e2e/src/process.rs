//! Processes the lab starts inside its namespaces (the `palisade` CLI, agents and the like).
//! A [`LabProcess`] is killed when dropped; its output goes to a log file so
//! a long-running daemon never blocks on a full pipe and a failing test can print what it said.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// A child process running in a lab namespace; killed (SIGKILL) and reaped on drop.
pub struct LabProcess {
    name: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl LabProcess {
    /// Starts `ip netns exec NETNS ARGV...` with stdout and stderr appended to `log`.
    /// `ip netns exec` execs the program in place, so [`LabProcess::pid`] is the program's.
    pub fn spawn(name: &str, netns: &str, argv: &[&str], log: &Path) -> Result<LabProcess> {
        let (program, args) = argv.split_first().context("spawn needs a program")?;
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file")?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {} in netns {netns}", argv.join(" ")))?;
        Ok(LabProcess {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            status: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file that receives its output.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status if it has exited.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Waits at most `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILLs it (if still running) and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_status()? {
            return Ok(status);
        }
        // ESRCH-style errors mean it exited meanwhile; wait() below tells.
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .with_context(|| format!("reaping {}", self.name))?;
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("lab: could not stop {}: {e:#}", self.name);
        }
    }
}
