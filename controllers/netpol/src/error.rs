//! The crate's one error type. Compilation itself never fails (problems in the input become
//! [`crate::Diagnostic`]s); only parsing text can.

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum NetpolError {
    /// The YAML or JSON text does not parse. `document` counts from 0, `line` from 1.
    #[error("document {document} (line {line}): invalid {format}: {message}")]
    Syntax {
        format: &'static str,
        document: usize,
        line: usize,
        message: String,
    },
    /// A document of a kind we read (Pod, Namespace, Node, NetworkPolicy) does not match its
    /// schema. `item` is the position in a `kind: List`'s `items`.
    #[error("document {index} (line {line}){}: invalid {kind} {name:?}: {message}",
            item.map(|i| format!(", item {i}")).unwrap_or_default())]
    Object {
        index: usize,
        line: usize,
        item: Option<usize>,
        kind: String,
        name: String,
        message: String,
    },
    /// Text given to the packet tracer is not in the restore format we render.
    #[error("trace: line {line}: {message}")]
    Trace { line: usize, message: String },
    /// A flow given to `explain` cannot be resolved (unknown pod, pod without IP, unknown
    /// named port, mixed address families).
    #[error("explain: {0}")]
    Explain(String),
}

impl NetpolError {
    /// A short constant label (for metrics and logs).
    pub fn label(&self) -> &'static str {
        match self {
            NetpolError::Syntax { .. } => "syntax",
            NetpolError::Object { .. } => "object",
            NetpolError::Trace { .. } => "trace",
            NetpolError::Explain(_) => "explain",
        }
    }
}

/// The error of [`crate::manifests::parse`].
pub type ManifestError = NetpolError;
