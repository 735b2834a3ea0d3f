//! `/v1/apps/{app}/...`: status, rollback, lock.

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use deployd_proto::{
    AppLock, AppStatus, Deployment, ErrorBody, LockRequest, RollbackRequest, Scope,
};

use super::audit::{ClientAddr, Started, begin_change, started};
use super::{ApiError, ApiState, Caller, Json, Path, checked_reason};
use crate::store::AuditRecord;

/// What the app runs: release per service, containers, lock.
#[utoipa::path(
    get, path = "/v1/apps/{app}/status", tag = "apps",
    params(("app" = String, Path, description = "App name", example = "shop")),
    responses(
        (status = 200, body = AppStatus),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn status(
    State(state): State<ApiState>,
    Caller(who): Caller,
    Path(app): Path<String>,
) -> Result<Json<AppStatus>, ApiError> {
    who.require(Scope::Read, &app)?;
    Ok(Json(state.engine.status(&app).await?))
}

/// Rolls back to the release before the live one, or to a named kept one.
#[utoipa::path(
    post, path = "/v1/apps/{app}/rollback", tag = "apps",
    params(("app" = String, Path, description = "App name", example = "shop")),
    request_body = RollbackRequest,
    responses(
        (status = 202, description = "Recorded and started", body = Deployment),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "Unknown app, or a release not kept", body = ErrorBody),
        (status = 409, description = "A deployment runs, or no earlier release exists", body = ErrorBody),
        (status = 423, description = "The app is locked", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn rollback(
    State(state): State<ApiState>,
    Caller(who): Caller,
    source: ClientAddr,
    Path(app): Path<String>,
    Json(body): Json<RollbackRequest>,
) -> Result<(StatusCode, Extension<Started>, Json<Deployment>), ApiError> {
    who.require(Scope::Rollback, &app)?;
    if let Some(bound) = &who.sha
        && body.to.as_ref().is_none_or(|to| to.as_str() != bound)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this token may only deploy {bound}: a rollback with it must name that release (to)"
            ),
        ));
    }
    let reason = checked_reason(body.reason)?;
    state.engine.check_app(&app)?;
    let mut intent = AuditRecord::new("rollback", "requested");
    intent.app = Some(app.clone());
    intent.sha = body.to.as_ref().map(ToString::to_string);
    intent.detail = match (&reason, body.skip_tasks) {
        (Some(reason), true) => Some(format!("{reason} (release tasks skipped)")),
        (None, true) => Some("release tasks skipped".into()),
        (reason, false) => reason.clone(),
    };
    let spent = begin_change(&state, &who, source, intent)?;
    let rollback = state
        .engine
        .rollback(&app, body.to, &who.subject, reason, body.skip_tasks);
    started(&state, spent, rollback).await
}

/// Locks the app: deployments and rollbacks are refused until unlocked.
#[utoipa::path(
    put, path = "/v1/apps/{app}/lock", tag = "apps",
    params(("app" = String, Path, description = "App name", example = "shop")),
    request_body = LockRequest,
    responses(
        (status = 200, body = AppLock),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn lock(
    State(state): State<ApiState>,
    Caller(who): Caller,
    source: ClientAddr,
    Path(app): Path<String>,
    Json(body): Json<LockRequest>,
) -> Result<Json<AppLock>, ApiError> {
    who.require(Scope::Admin, &app)?;
    state.engine.check_app(&app)?;
    let Some(reason) = checked_reason(Some(body.reason))? else {
        return Err(ApiError::bad_request(
            "invalid_reason",
            "a lock needs a reason",
        ));
    };
    let mut intent = AuditRecord::new("lock", "requested");
    intent.app = Some(app.clone());
    intent.detail = Some(reason.clone());
    begin_change(&state, &who, source, intent)?;
    let store = state.engine.store();
    store.lock(&app, &reason, &who.subject)?;
    let lock = store.lock_of(&app)?.ok_or_else(|| {
        ApiError::internal("lock not recorded", &"the lock vanished after writing it")
    })?;
    Ok(Json(AppLock {
        reason: lock.reason,
        locked_by: lock.locked_by,
        locked_at: lock.locked_at,
    }))
}

/// Lifts the app's lock (204 also when there was none).
#[utoipa::path(
    delete, path = "/v1/apps/{app}/lock", tag = "apps",
    params(("app" = String, Path, description = "App name", example = "shop")),
    responses(
        (status = 204, description = "Unlocked"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn unlock(
    State(state): State<ApiState>,
    Caller(who): Caller,
    source: ClientAddr,
    Path(app): Path<String>,
) -> Result<StatusCode, ApiError> {
    who.require(Scope::Admin, &app)?;
    state.engine.check_app(&app)?;
    let mut intent = AuditRecord::new("unlock", "requested");
    intent.app = Some(app.clone());
    begin_change(&state, &who, source, intent)?;
    state.engine.store().unlock(&app)?;
    Ok(StatusCode::NO_CONTENT)
}
