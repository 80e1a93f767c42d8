//! The crate's one error type. Compilation itself never fails (problems in the input become
//! [`crate::Diagnostic`]s); only parsing text can.

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum NetpolError {
    /// The YAML stream does not parse.
    #[error("invalid YAML: {0}")]
    Yaml(String),
    /// A document of a kind we read (Pod, Namespace, Node, NetworkPolicy) does not match its schema.
    #[error("document {index}: invalid {kind} {name:?}: {message}")]
    Object {
        index: usize,
        kind: String,
        name: String,
        message: String,
    },
    /// Text given to the packet tracer is not in the restore format we render.
    #[error("trace: line {line}: {message}")]
    Trace { line: usize, message: String },
}

impl NetpolError {
    /// A short constant label (for metrics and logs).
    pub fn label(&self) -> &'static str {
        match self {
            NetpolError::Yaml(_) => "yaml",
            NetpolError::Object { .. } => "object",
            NetpolError::Trace { .. } => "trace",
        }
    }
}

/// The error of [`crate::manifests::parse_yaml`].
pub type ManifestError = NetpolError;
