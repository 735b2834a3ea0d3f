//! `/v1/apps/{app}/...`: status, rollback, lock, prepare, and the orders
//! to a running canary.

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use deployd_proto::{
    AppLock, AppStatus, CanaryOrder, Deployment, ErrorBody, ErrorCode, LockRequest, PrepareRequest,
    PrepareState, Prepared, RollbackRequest, SchemaRollback, Scope,
};
use serde::Deserialize;

use super::audit::{ClientAddr, Started, begin_change, begin_fleet_change, ended, started};
use super::deployments::{checked_bound_sha, checked_fleet};
use super::fleet::{self, FleetChange};
use super::{ApiError, ApiState, Caller, Json, Path, Query, checked_reason};
use crate::engine::EngineError;
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
    // The holder of a fleet deployment reverts its own part of it with the
    // scope and the sha binding that deployed it, as a host's own
    // deployment rolls itself back.
    let reverts_own = match &body.fleet {
        Some(f) => fleet::reverts_own_part(&state, &who, &app, &f.id, body.to.as_ref())?,
        None => false,
    };
    if reverts_own {
        who.require_any(&[Scope::Deploy, Scope::Rollback], &app)?;
    } else {
        who.require(Scope::Rollback, &app)?;
    }
    if let Some(bound) = &who.sha
        && !reverts_own
        && body.to.as_ref().is_none_or(|to| to.as_str() != bound)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!(
                "this token may only deploy {bound}: a rollback with it must name that release (to)"
            ),
        ));
    }
    let reason = checked_reason(body.reason)?;
    checked_fleet(body.fleet.as_ref())?;
    state.engine.check_app(&app)?;
    if body.schema != SchemaRollback::Check && !reverts_own {
        // Past the schema check, or reversing migrations (and the data
        // the newer release wrote to them): an admin's.
        who.require(Scope::Admin, &app)?;
    }
    let mut intent = AuditRecord::new("rollback", "requested");
    intent.app = Some(app.clone());
    intent.sha = body.to.as_ref().map(ToString::to_string);
    let mut detail: Vec<String> = reason.iter().cloned().collect();
    if body.skip_tasks {
        detail.push("release tasks skipped".into());
    }
    if let Some(f) = &body.fleet {
        detail.push(format!("fleet rollback {} on host {}", f.id, f.host));
    }
    match body.schema {
        SchemaRollback::Check => {}
        SchemaRollback::MigrateBack => detail.push("migrations applied since reversed".into()),
        SchemaRollback::Force => detail.push("schema check skipped (force)".into()),
    }
    intent.detail = (!detail.is_empty()).then(|| detail.join("; "));
    let fleet = body.fleet.as_ref().map(|f| {
        let change = FleetChange::Rollback(body.to.as_ref());
        (app.as_str(), f.id.as_str(), change)
    });
    let spent = begin_fleet_change(&state, &who, source, intent, fleet)?;
    let request = RollbackRequest { reason, ..body };
    let rollback = state.engine.rollback(&app, &who.subject, request);
    started(&state, spent, rollback).await
}

/// Locks the app: deployments and rollbacks are refused until unlocked.
/// A fleet deployment's lock lets in the changes that name it.
#[utoipa::path(
    put, path = "/v1/apps/{app}/lock", tag = "apps",
    params(("app" = String, Path, description = "App name", example = "shop")),
    request_body = LockRequest,
    responses(
        (status = 200, body = AppLock),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "A fleet lock: a deployment not of that fleet runs", body = ErrorBody),
        (status = 423, description = "A fleet lock: another lock holds the app", body = ErrorBody),
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
    match &body.fleet {
        Some(fleet) => {
            who.require_any(&[Scope::Deploy, Scope::Rollback], &app)?;
            checked_bound_sha(&who, &fleet.sha)?;
            checked_fleet_lock(fleet)?;
        }
        None => who.require(Scope::Admin, &app)?,
    }
    state.engine.check_app(&app)?;
    let Some(reason) = checked_reason(Some(body.reason))? else {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidReason,
            "a lock needs a reason",
        ));
    };
    let mut intent = AuditRecord::new("lock", "requested");
    intent.app = Some(app.clone());
    intent.sha = body.fleet.as_ref().map(|f| f.sha.to_string());
    intent.detail = Some(match &body.fleet {
        Some(f) => format!("{reason} (fleet {} deployment {})", f.name, f.id),
        None => reason.clone(),
    });
    let Some(fleet) = body.fleet else {
        begin_change(&state, &who, source, intent)?;
        return Ok(Json(state.engine.lock(&app, &reason, &who.subject)?));
    };
    let change = Some((app.as_str(), fleet.id.as_str(), FleetChange::Lock));
    let spent = begin_fleet_change(&state, &who, source, intent, change)?;
    let jti = who.jti.as_deref().unwrap_or_default();
    let locked = state
        .engine
        .lock_for_fleet(&app, &who.subject, &fleet, (&who.issuer, jti));
    Ok(Json(ended(&state, spent, locked)?))
}

/// A fleet lock's id and name: 1 to 64 of a-z, A-Z, 0-9, `-`, `_`, `.`, `:`.
fn checked_fleet_lock(fleet: &deployd_proto::FleetLock) -> Result<(), ApiError> {
    if super::deployments::plain_fleet_name(&fleet.id)
        && super::deployments::plain_fleet_name(&fleet.name)
    {
        return Ok(());
    }
    Err(ApiError::bad_request(
        ErrorCode::InvalidFleet,
        "fleet id and name are 1 to 64 of a-z, A-Z, 0-9, -, _, . and :",
    ))
}

/// `DELETE /lock`'s query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UnlockQuery {
    /// Lift only the lock of this fleet deployment (with the `deploy` or
    /// `rollback` scope); another lock is refused (423) and stays.
    fleet: Option<String>,
}

/// Lifts the app's lock (204 also when there was none).
#[utoipa::path(
    delete, path = "/v1/apps/{app}/lock", tag = "apps",
    params(("app" = String, Path, description = "App name", example = "shop"), UnlockQuery),
    responses(
        (status = 204, description = "Unlocked"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 423, description = "With `fleet`: another lock holds the app", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn unlock(
    State(state): State<ApiState>,
    Caller(who): Caller,
    source: ClientAddr,
    Path(app): Path<String>,
    Query(query): Query<UnlockQuery>,
) -> Result<StatusCode, ApiError> {
    match &query.fleet {
        Some(id) => {
            who.require_any(&[Scope::Deploy, Scope::Rollback], &app)?;
            if !super::deployments::plain_fleet_name(id) {
                return Err(ApiError::bad_request(
                    ErrorCode::InvalidFleet,
                    "fleet is 1 to 64 of a-z, A-Z, 0-9, -, _, . and :",
                ));
            }
        }
        None => who.require(Scope::Admin, &app)?,
    }
    state.engine.check_app(&app)?;
    let mut intent = AuditRecord::new("unlock", "requested");
    intent.app = Some(app.clone());
    intent.detail = query
        .fleet
        .as_ref()
        .map(|id| format!("fleet deployment {id}"));
    let fleet = query
        .fleet
        .as_deref()
        .map(|id| (app.as_str(), id, FleetChange::Unlock));
    let spent = begin_fleet_change(&state, &who, source, intent, fleet)?;
    ended(
        &state,
        spent,
        state.engine.unlock(&app, query.fleet.as_deref()),
    )?;
    Ok(StatusCode::NO_CONTENT)
}

/// Pulls a release and pins its digest, changing nothing that runs (a
/// fleet prepares every host before deploying any). Waits up to 15 s for
/// the pull; ask again with the same body until it is no longer `pulling`.
/// Needs the `deploy` scope; spends no token.
#[utoipa::path(
    post, path = "/v1/apps/{app}/prepare", tag = "apps",
    params(("app" = String, Path, description = "App name", example = "shop")),
    request_body = PrepareRequest,
    responses(
        (status = 200, description = "Ready (with the digest) or failed (with the error)", body = Prepared),
        (status = 202, description = "Pulling: ask again", body = Prepared),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "A prepare of another sha is still pulling", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn prepare(
    State(state): State<ApiState>,
    Caller(who): Caller,
    Path(app): Path<String>,
    Json(body): Json<PrepareRequest>,
) -> Result<(StatusCode, Json<Prepared>), ApiError> {
    who.require(Scope::Deploy, &app)?;
    checked_bound_sha(&who, &body.sha)?;
    let prepared = state
        .engine
        .prepare_waiting(&app, &body.sha)
        .await
        .map_err(|e: EngineError| ApiError::from(e))?;
    let status = if prepared.state == PrepareState::Pulling {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(prepared)))
}

/// Decides the app's running canary by hand. `promote` (the `deploy`
/// scope): the new release takes every client now, and the deployment goes
/// on to its other services. `abort` (`deploy` or `rollback`): every client
/// goes back to the running release at once, the new web containers drain
/// and stop, and the deployment ends `rolled_back`.
#[utoipa::path(
    post, path = "/v1/apps/{app}/canary/{order}", tag = "apps",
    params(
        ("app" = String, Path, description = "App name", example = "shop"),
        ("order" = String, Path, description = "`promote` or `abort`", example = "promote"),
    ),
    request_body = CanaryOrder,
    responses(
        (status = 202, description = "Handed to the running canary", body = Deployment),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "Unknown app, or an order other than promote or abort", body = ErrorBody),
        (status = 409, description = "No canary of the app runs", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn canary(
    State(state): State<ApiState>,
    Caller(who): Caller,
    source: ClientAddr,
    Path((app, order)): Path<(String, String)>,
    Json(body): Json<CanaryOrder>,
) -> Result<(StatusCode, Extension<Started>, Json<Deployment>), ApiError> {
    let promote = match order.as_str() {
        "promote" => true,
        "abort" => false,
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "a canary order is promote or abort",
            ));
        }
    };
    if promote {
        who.require(Scope::Deploy, &app)?;
    } else {
        who.require_any(&[Scope::Deploy, Scope::Rollback], &app)?;
    }
    // A token bound to one release decides only that release's canary.
    let sha = state.engine.canary_sha(&app)?;
    checked_bound_sha(&who, &sha)?;
    let reason = checked_reason(body.reason)?;
    let mut intent = AuditRecord::new(format!("canary_{order}"), "requested");
    intent.app = Some(app.clone());
    intent.sha = Some(sha.to_string());
    intent.detail = reason.clone();
    let spent = begin_change(&state, &who, source, intent)?;
    let order = crate::engine::CanaryOrder {
        promote,
        by: who.subject.clone(),
        reason,
        sha: Some(sha),
    };
    let id = ended(&state, spent, state.engine.canary_order(&app, order))?;
    let deployment = state.engine.deployment(&id)?;
    let started = Started(deployment.id.0.clone());
    Ok((StatusCode::ACCEPTED, Extension(started), Json(deployment)))
}
