//! `/healthz` and `/readiness`: unauthenticated, and saying nothing beyond
//! whether the agent can work.

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

/// The agent can deploy: the Docker engine answers and the store takes
/// writes (checked at most every 2 s, however often it is asked).
#[utoipa::path(
    get, path = "/readiness", tag = "health",
    responses((status = 200, body = Health), (status = 503, body = Health))
)]
pub async fn readiness(State(state): State<ApiState>) -> (StatusCode, Json<Health>) {
    let failing = state.engine.readiness_recent().await;
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
