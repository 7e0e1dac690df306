//! The controller's HTTP endpoints: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tracing::Instrument;

use crate::metrics::Metrics;

/// Errors of the HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the endpoints report on.
#[derive(Clone)]
pub struct Health {
    /// True while this replica leads (and while it stops leading: it is
    /// then not ready until it exits).
    pub leading: Arc<AtomicBool>,
    /// True once the leader's watches have synced; false again as soon as
    /// it stops.
    pub synced: Arc<AtomicBool>,
    /// True while a standby's last Lease attempt reached the API server.
    pub standing_by: Arc<AtomicBool>,
    /// The metrics to expose.
    pub metrics: Metrics,
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    match h.metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            text,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            e.to_string(),
        ),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready: a standby that reaches the API server (ready to take over), or
/// the leader once its watches have synced. Not ready: a replica that has
/// not reached the API server yet (or lost it), a leader still loading its
/// caches, a replica stopping. Which replica leads is in the Lease and the
/// metric `tripod_leader`.
async fn readyz(State(h): State<Health>) -> (StatusCode, &'static str) {
    let leading = h.leading.load(Ordering::SeqCst);
    if leading && h.synced.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok: leading\n")
    } else if leading {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: leading, watches not synced (or stopping)\n",
        )
    } else if h.standing_by.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok: standing by\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: standing by, the API server not reached (yet)\n",
        )
    }
}

/// Binds `addr` and serves the endpoints in a background task. Returns the
/// bound address (useful with port 0).
pub async fn serve(addr: SocketAddr, health: Health) -> Result<SocketAddr, HttpError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health);
    tokio::spawn(
        async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }
        .instrument(tracing::info_span!("http", addr = %bound)),
    );
    Ok(bound)
}
