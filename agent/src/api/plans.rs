//! `/v1/apps/{app}/plans` and `/v1/plans/{id}`: migration plans, made
//! ahead of a deployment to be reviewed and held to.

use axum::extract::State;
use axum::http::StatusCode;
use deployd_proto::{ErrorBody, ErrorCode, Plan, PlanRequest, Scope};

use super::{ApiError, ApiState, Caller, Json, Path};

/// Plans a deployment of `sha`: pulls it, pins its digest and inspects its
/// migrations against the live database, read-only. Answers at once with
/// the plan `planning`; read it by id until it is `ready` or `failed`.
#[utoipa::path(
    post, path = "/v1/apps/{app}/plans", tag = "plans",
    params(("app" = String, Path, description = "App name", example = "shop")),
    request_body = PlanRequest,
    responses(
        (status = 202, description = "Recorded; being made", body = Plan),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Another plan of the app is being made", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<ApiState>,
    Caller(who): Caller,
    Path(app): Path<String>,
    Json(body): Json<PlanRequest>,
) -> Result<(StatusCode, Json<Plan>), ApiError> {
    // Pulls like a deployment does, so it takes what one takes.
    who.require(Scope::Deploy, &app)?;
    let plan = state.engine.plan(&app, body.sha, &who.subject)?;
    Ok((StatusCode::ACCEPTED, Json(plan)))
}

/// One plan.
#[utoipa::path(
    get, path = "/v1/plans/{id}", tag = "plans",
    params(("id" = String, Path, description = "Plan id")),
    responses(
        (status = 200, body = Plan),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<ApiState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<Plan>, ApiError> {
    checked_plan_id(&id)?;
    let plan = state.engine.plan_by_id(&id)?;
    who.require(Scope::Read, &plan.app)?;
    Ok(Json(plan))
}

/// A plan id as deployd makes them: a UUID.
pub(super) fn checked_plan_id(id: &str) -> Result<(), ApiError> {
    if id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Ok(());
    }
    Err(ApiError::bad_request(
        ErrorCode::InvalidBody,
        "a plan id is a UUID, as `deployctl plan` prints it",
    ))
}
