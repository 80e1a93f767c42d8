//! The runtime's error type. Each variant has a short, stable label for metrics.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot build a Kubernetes client configuration: {0}")]
    ClientConfig(String),
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("Kubernetes API request failed: {0}")]
    Api(#[from] kube::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("signal handling: {0}")]
    Signal(#[source] std::io::Error),
}

impl Error {
    /// A short constant label, used as a metric label value.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kubeconfig { .. } => "kubeconfig",
            Error::ClientConfig(_) => "client_config",
            Error::Client(_) => "client",
            Error::Api(_) => "api",
            Error::Listen { .. } => "listen",
            Error::Signal(_) => "signal",
        }
    }
}
