//! `/v1/apps/{app}/deployments` and `/v1/deployments/{id}`.

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use deployd_proto::{
    Delivery, DeployRequest, Deployment, DeploymentId, DeploymentPage, ErrorBody, ErrorCode, Scope,
};
use serde::Deserialize;

use super::audit::{ClientAddr, Started, begin_fleet_change, started};
use super::fleet::FleetChange;
use super::plans::checked_plan_id;
use super::{ApiError, ApiState, Caller, Json, Path, Query, checked_reason};
use crate::engine;
use crate::store::AuditRecord;

/// Starts a deployment of `sha`; answers once it is recorded, before it runs.
#[utoipa::path(
    post, path = "/v1/apps/{app}/deployments", tag = "deployments",
    params(("app" = String, Path, description = "App name", example = "shop")),
    request_body = DeployRequest,
    responses(
        (status = 202, description = "Recorded and started (or a no-op success when the sha is live)", body = Deployment),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Another deployment of the app runs; `deployment` names it", body = ErrorBody),
        (status = 423, description = "The app is locked", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<ApiState>,
    Caller(who): Caller,
    source: ClientAddr,
    Path(app): Path<String>,
    Json(body): Json<DeployRequest>,
) -> Result<(StatusCode, Extension<Started>, Json<Deployment>), ApiError> {
    who.require(Scope::Deploy, &app)?;
    checked_bound_sha(&who, &body.sha)?;
    let reason = checked_reason(body.reason)?;
    checked_digest(body.digest.as_deref())?;
    checked_fleet(body.fleet.as_ref())?;
    if let Some(plan) = &body.plan {
        checked_plan_id(plan)?;
    }
    state.engine.check_app(&app)?;
    if body.allow_unsafe_migrations {
        // An override of the app's own rule: an admin's, and said why.
        who.require(Scope::Admin, &app)?;
        if reason.is_none() {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidReason,
                "allowing unsafe migrations needs a reason",
            ));
        }
    }
    let mut intent = AuditRecord::new("deploy", "requested");
    intent.app = Some(app.clone());
    intent.sha = Some(body.sha.to_string());
    intent.digest = body.digest.clone();
    let mut detail: Vec<String> = reason.iter().cloned().collect();
    if let Some(f) = &body.fleet {
        detail.push(format!("fleet deployment {} on host {}", f.id, f.host));
    }
    if let Some(plan) = &body.plan {
        detail.push(format!("holds to plan {plan}"));
    }
    if body.allow_unsafe_migrations {
        detail.push("allows migrations that break the running release".into());
    }
    intent.detail = (!detail.is_empty()).then(|| detail.join("; "));
    let fleet = body
        .fleet
        .as_ref()
        .map(|f| (app.as_str(), f.id.as_str(), FleetChange::Deploy(&body.sha)));
    let spent = begin_fleet_change(&state, &who, source, intent, fleet)?;
    let request = engine::DeployRequest {
        app,
        sha: body.sha,
        force: body.force,
        reason,
        requested_by: who.subject,
        digest: body.digest,
        skip_tasks: false,
        fleet: body.fleet,
        plan: body.plan,
        allow_unsafe_migrations: body.allow_unsafe_migrations,
        schema: deployd_proto::SchemaRollback::Check,
        canary: body.canary,
    };
    started(&state, spent, state.engine.deploy(request)).await
}

/// Paging through an app's history.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Deployments per page, 1 to 100. Default: 20.
    limit: Option<usize>,
    /// Only deployments older than this id (a page's `next`).
    before: Option<String>,
}

/// An app's deployments, newest first.
#[utoipa::path(
    get, path = "/v1/apps/{app}/deployments", tag = "deployments",
    params(("app" = String, Path, description = "App name", example = "shop"), PageQuery),
    responses(
        (status = 200, body = DeploymentPage),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<ApiState>,
    Caller(who): Caller,
    Path(app): Path<String>,
    Query(page): Query<PageQuery>,
) -> Result<Json<DeploymentPage>, ApiError> {
    who.require(Scope::Read, &app)?;
    state.engine.check_app(&app)?;
    let limit = page.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidQuery,
            "limit is 1 to 100",
        ));
    }
    let before = page.before.map(DeploymentId);
    let mut deployments = state.engine.history(&app, limit + 1, before.as_ref())?;
    let next = if deployments.len() > limit {
        deployments.truncate(limit);
        deployments.last().map(|d| d.id.0.clone())
    } else {
        None
    };
    Ok(Json(DeploymentPage { deployments, next }))
}

/// One deployment with its steps.
#[utoipa::path(
    get, path = "/v1/deployments/{id}", tag = "deployments",
    params(("id" = String, Path, description = "Deployment id")),
    responses(
        (status = 200, body = Deployment),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<ApiState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<Deployment>, ApiError> {
    let deployment = readable(&state, &who, &DeploymentId(id))?;
    Ok(Json(deployment))
}

/// The webhooks the deployment set off, and how each delivery went.
#[utoipa::path(
    get, path = "/v1/deployments/{id}/notifications", tag = "deployments",
    params(("id" = String, Path, description = "Deployment id")),
    responses(
        (status = 200, body = Vec<Delivery>),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn notifications(
    State(state): State<ApiState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<Delivery>>, ApiError> {
    let id = DeploymentId(id);
    readable(&state, &who, &id)?;
    Ok(Json(state.engine.deliveries(&id)?))
}

/// A deployment the caller may read, or the error to answer.
pub(super) fn readable(
    state: &ApiState,
    who: &crate::auth::Principal,
    id: &DeploymentId,
) -> Result<Deployment, ApiError> {
    let deployment = state.engine.deployment(id)?;
    who.require(Scope::Read, &deployment.app)?;
    Ok(deployment)
}

/// A 403 unless the token may ship `sha` (a token bound to one sha may
/// ship only that one).
pub(super) fn checked_bound_sha(
    who: &crate::auth::Principal,
    sha: &deployd_proto::CommitSha,
) -> Result<(), ApiError> {
    match &who.sha {
        Some(bound) if bound != sha.as_str() => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!("this token may only deploy {bound}"),
        )),
        _ => Ok(()),
    }
}

/// `sha256:` and 64 lowercase hex digits, or a 400.
fn checked_digest(digest: Option<&str>) -> Result<(), ApiError> {
    let Some(digest) = digest else { return Ok(()) };
    let hex = digest.strip_prefix("sha256:").unwrap_or_default();
    if hex.len() == 64
        && hex
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        return Ok(());
    }
    Err(ApiError::bad_request(
        ErrorCode::InvalidDigest,
        "digest must be sha256: and 64 lowercase hex digits",
    ))
}

/// 1 to 64 of a-z, A-Z, 0-9, `-`, `_`, `.`, `:`: a fleet's id, name or
/// host name.
pub(super) fn plain_fleet_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

/// A fleet id and host name: see [`plain_fleet_name`].
pub(super) fn checked_fleet(fleet: Option<&deployd_proto::FleetPart>) -> Result<(), ApiError> {
    let Some(fleet) = fleet else { return Ok(()) };
    if plain_fleet_name(&fleet.id) && plain_fleet_name(&fleet.host) {
        return Ok(());
    }
    Err(ApiError::bad_request(
        ErrorCode::InvalidFleet,
        "fleet id and host are 1 to 64 of a-z, A-Z, 0-9, -, _, . and :",
    ))
}
