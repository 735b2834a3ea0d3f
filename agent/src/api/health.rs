//! `/healthz` and `/readiness`: unauthenticated, and saying nothing beyond
//! whether the agent can work.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;

use super::{ApiState, Json};

/// A health answer: `ok`, or what is not ready.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok` or `unavailable`.
    status: &'static str,
    /// What is not ready: `docker`, `store`. Empty when ready.
    failing: Vec<&'static str>,
}

/// The agent process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        failing: Vec::new(),
    })
}

/// The agent can deploy: the Docker engine answers and the store takes writes.
#[utoipa::path(
    get, path = "/readiness", tag = "health",
    responses((status = 200, body = Health), (status = 503, body = Health))
)]
pub async fn readiness(State(state): State<ApiState>) -> (StatusCode, Json<Health>) {
    let mut failing = Vec::new();
    let docker = tokio::time::timeout(Duration::from_secs(5), state.engine.docker().version());
    match docker.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: Docker engine not reachable");
            failing.push("docker");
        }
        Err(_) => {
            tracing::warn!("readiness: Docker engine did not answer within 5 s");
            failing.push("docker");
        }
    }
    if let Err(e) = state.engine.store().check_writable() {
        tracing::warn!(error = %e, "readiness: store not writable");
        failing.push("store");
    }
    let status = if failing.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = if failing.is_empty() {
        "ok"
    } else {
        "unavailable"
    };
    (
        status,
        Json(Health {
            status: word,
            failing,
        }),
    )
}
