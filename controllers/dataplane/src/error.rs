//! The crate's one error type.

/// Errors of the dataplane executors.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// A required program is not installed.
    #[error("{tool} not found (searched PATH, /usr/sbin, /sbin, /usr/local/sbin); install the iptables and ipset packages")]
    BinaryNotFound { tool: String },
    /// `PALISADE_IPTABLES_BACKEND` / the configured backend is not one we know.
    #[error("unknown iptables backend {0:?} (expected auto, nft or legacy)")]
    InvalidBackend(String),
    /// A program could not be started.
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// A program exited with an error. For restores, `line` is the failing input line
    /// (1-based) and `offending` its text.
    #[error("{command} failed ({status}){}: {stderr}", at_line(*.line, .offending.as_deref()))]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
        line: Option<usize>,
        offending: Option<String>,
    },
    /// A set of ours exists with another type than the payload wants.
    #[error("ipset {name} exists with type {found}, the payload wants {want}; destroy it by hand")]
    SetConflict {
        name: String,
        found: String,
        want: String,
    },
    /// A payload of the other address family (a wiring bug; nothing was applied).
    #[error("an {executor:?} executor was given an {payload:?} payload")]
    WrongFamily {
        executor: palisade_netpol::Family,
        payload: palisade_netpol::Family,
    },
    /// Revocation could not judge the conntrack entries (the tracer rejected the payload).
    #[error("revocation: {0}")]
    Revoke(String),
    /// A ctnetlink request failed (socket, or the kernel's answer).
    #[error("ctnetlink: {0}")]
    Netlink(String),
    /// Failure injected into a [`crate::RecordingExecutor`].
    #[error("simulated failure: {0}")]
    Simulated(String),
}

fn at_line(line: Option<usize>, text: Option<&str>) -> String {
    match (line, text) {
        (Some(n), Some(t)) => format!(" at input line {n} `{t}`"),
        (Some(n), None) => format!(" at input line {n}"),
        _ => String::new(),
    }
}

impl DataplaneError {
    /// A short constant label (for metrics).
    pub fn label(&self) -> &'static str {
        match self {
            DataplaneError::BinaryNotFound { .. } => "binary_not_found",
            DataplaneError::InvalidBackend(_) => "invalid_backend",
            DataplaneError::Spawn { .. } => "spawn",
            DataplaneError::CommandFailed { .. } => "command_failed",
            DataplaneError::SetConflict { .. } => "set_conflict",
            DataplaneError::WrongFamily { .. } => "wrong_family",
            DataplaneError::Revoke(_) => "revoke",
            DataplaneError::Netlink(_) => "netlink",
            DataplaneError::Simulated(_) => "simulated",
        }
    }
}
