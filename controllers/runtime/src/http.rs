//! `/healthz`, `/readyz` and `/metrics` on one listener.
//!
//! - `/healthz`: 200 while the process runs its event loop (liveness).
//! - `/readyz`: 200 once every watch has listed once, 503 before that and during shutdown,
//!   with the pending watches named in the body.
//! - `/metrics`: OpenMetrics text.
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::stores::Readiness;
use crate::Error;

#[derive(Clone)]
struct AppState {
    readiness: Readiness,
    metrics: Arc<Metrics>,
}

/// Binds the listener now (so a bad address fails start-up) and serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    readiness: Readiness,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Listen { addr, source })?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { readiness, metrics });
    let handle = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "health/metrics server stopped");
        }
    });
    Ok((bound, handle))
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let ready = s.readiness.is_ready();
    s.metrics.ready.set(ready as i64);
    if ready {
        (StatusCode::OK, "ready\n".to_string())
    } else if s.readiness.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "waiting for the first list of: {}\n",
                s.readiness.pending().join(", ")
            ),
        )
    }
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    s.metrics.ready.set(s.readiness.is_ready() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}
