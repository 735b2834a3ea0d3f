//! Changes that name a fleet deployment, while its lock holds the app.
//!
//! deployctl locks every host of a fleet for one fleet deployment, with one
//! token per host. That lock is the fleet deployment's own: its other
//! changes on the host (the deploy, the revert of a host it changed, the
//! unlock) carry the token that took it and are not spent again, so one
//! token makes one fleet deployment on each host. They are bounded to it:
//! a deploy of the lock's release, a rollback to the lock's release or to
//! the release the host ran before the fleet deployment. Naming the fleet
//! deployment is not enough to act in it: only its holder (the same issuer
//! and subject, a job token fetched again included) or an admin may.

use axum::http::StatusCode;
use deployd_proto::{CommitSha, DeploymentKind, ErrorCode, Scope};

use super::{ApiError, ApiState};
use crate::auth::Principal;
use crate::store::Lock;

/// What a change naming a fleet deployment does.
#[derive(Debug, Clone, Copy)]
pub(super) enum FleetChange<'a> {
    /// Take (or take again) the lock.
    Lock,
    Unlock,
    Deploy(&'a CommitSha),
    Rollback(Option<&'a CommitSha>),
}

/// How the caller stands to the fleet deployment's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Standing {
    /// The app is not locked for it: the change is an ordinary one.
    Outside,
    /// Its token took the lock: the change is not spent again.
    Holder,
    /// The holder with a newer token (a CI job token fetched again), or an
    /// admin: the token is spent, and the lock passes to it.
    Successor,
}

/// The app's lock, if it is held for fleet deployment `id`.
fn held_for(state: &ApiState, app: &str, id: &str) -> Result<Option<Lock>, ApiError> {
    Ok(state
        .engine
        .held_lock(app)?
        .filter(|lock| lock.fleet.as_ref().is_some_and(|f| f.id == id)))
}

/// Whether `who` is the lock's holder: the same issuer and subject,
/// whichever of its tokens.
fn held_by(lock: &Lock, who: &Principal) -> bool {
    lock.holder
        .as_ref()
        .is_some_and(|(issuer, _)| *issuer == who.issuer)
        && lock.locked_by == who.subject
}

/// The release this host ran before fleet deployment `id`.
fn ran_before(state: &ApiState, app: &str, id: &str) -> Result<Option<CommitSha>, ApiError> {
    Ok(state
        .engine
        .fleet_part(app, id, DeploymentKind::Deploy)?
        .and_then(|d| d.previous_sha))
}

/// Whether `who` may make `change` in fleet deployment `id` of `app`, and
/// how; a 423 for a caller who is neither its holder nor an admin, a 409
/// for a change outside what the fleet deployment ships.
pub(super) fn admit(
    state: &ApiState,
    who: &Principal,
    app: &str,
    id: &str,
    change: FleetChange<'_>,
) -> Result<Standing, ApiError> {
    let Some(lock) = held_for(state, app, id)? else {
        return Ok(Standing::Outside);
    };
    let Some(held) = lock.fleet.as_ref() else {
        return Ok(Standing::Outside);
    };
    if !held_by(&lock, who) && !who.may(Scope::Admin, app) {
        return Err(ApiError::new(
            StatusCode::LOCKED,
            ErrorCode::Locked,
            format!(
                "{app} is locked for fleet deployment {id} by {}: only its own deployctl, or an \
                 admin, may act in it",
                lock.locked_by
            ),
        ));
    }
    let mismatch = |what: String| {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::FleetMismatch,
            format!("fleet deployment {id} ships {}: {what}", held.sha),
        ))
    };
    match change {
        FleetChange::Deploy(sha) if held.rollback || *sha != held.sha => {
            return mismatch(format!("a deploy of {sha} is not part of it"));
        }
        FleetChange::Rollback(to) => {
            let before = ran_before(state, app, id)?;
            let fits = to.is_some_and(|to| *to == held.sha || Some(to) == before.as_ref());
            if !fits {
                return mismatch(format!(
                    "a rollback of it goes to {} (or to the release this host ran before it{})",
                    held.sha,
                    before.map(|b| format!(", {b}")).unwrap_or_default()
                ));
            }
        }
        _ => {}
    }
    let token = lock.holder.as_ref().is_some_and(|(issuer, jti)| {
        *issuer == who.issuer && Some(jti.as_str()) == who.jti.as_deref()
    });
    Ok(if token {
        Standing::Holder
    } else {
        Standing::Successor
    })
}

/// Whether a rollback naming fleet deployment `id` reverts this host's part
/// of it (back to the release it ran before), which its holder may do
/// with the scope and the sha binding that deployed it.
pub(super) fn reverts_own_part(
    state: &ApiState,
    who: &Principal,
    app: &str,
    id: &str,
    to: Option<&CommitSha>,
) -> Result<bool, ApiError> {
    let Some(lock) = held_for(state, app, id)? else {
        return Ok(false);
    };
    let bound = who.sha.as_deref().is_none_or(|bound| {
        lock.fleet
            .as_ref()
            .is_some_and(|held| bound == held.sha.as_str())
    });
    Ok(held_by(&lock, who) && bound && to.is_some() && to == ran_before(state, app, id)?.as_ref())
}
