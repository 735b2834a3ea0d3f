//! Auditing `/v1` requests.
//!
//! A change is recorded before it is made (`requested`); if that record
//! cannot be written the change is refused. After the answer, every change
//! and every refused request (401, 403, 429) is recorded with its outcome.
//! The token's `jti` is spent by the change, so a replayed token cannot make
//! another; a change refused for a conflict or a lock gives it back.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::Extension;
use axum::extract::{ConnectInfo, FromRequestParts, OriginalUri, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use deployd_proto::Deployment;

use super::{ApiError, ApiState, Json};
use crate::auth::{AuthError, Principal};
use crate::engine::EngineError;
use crate::store::AuditRecord;

/// Filled by the `Caller` extractor, read by the middleware afterwards.
#[derive(Debug, Clone, Default)]
pub(super) struct Slot(Arc<Mutex<Option<Principal>>>);

impl Slot {
    pub fn fill(&self, who: &Principal) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(who.clone());
    }

    fn take(&self) -> Option<Principal> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The error code of an answer, for the audit record.
#[derive(Debug, Clone)]
pub(super) struct ErrorCode(pub String);

/// The deployment a change started, for the audit record.
#[derive(Debug, Clone)]
pub(super) struct Started(pub String);

/// The client's address, when the connection has one.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(client_addr(parts)))
    }
}

pub(super) fn client_addr(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// A record about `who`.
pub(super) fn record(
    who: Option<&Principal>,
    source: Option<IpAddr>,
    action: &str,
    outcome: &str,
) -> AuditRecord {
    let mut record = AuditRecord::new(action, outcome);
    attribute(&mut record, who, source);
    record
}

/// Says who asked, and from where.
fn attribute(record: &mut AuditRecord, who: Option<&Principal>, source: Option<IpAddr>) {
    if let Some(who) = who {
        record.subject = Some(who.subject.clone());
        record.issuer = Some(who.issuer.clone());
        record.claims = who.audit_claims.clone();
    }
    record.source = source.map(|ip| ip.to_string());
}

/// A token id spent on a change, to give back if the change is refused.
#[derive(Debug)]
pub(super) struct Spent {
    issuer: String,
    jti: String,
}

/// Before a change: records it (or refuses it, 503, when the audit log
/// cannot be written), then spends the token's `jti` (refusing a replay).
pub(super) fn begin_change(
    state: &ApiState,
    who: &Principal,
    source: ClientAddr,
    mut intent: AuditRecord,
) -> Result<Spent, ApiError> {
    attribute(&mut intent, Some(who), source.0);
    intent.outcome = "requested".into();
    let store = state.engine.store();
    if let Err(e) = store.append_audit(&intent) {
        tracing::error!(error = %e, "audit log not writable: change refused");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            "the audit log cannot be written, so no change is made",
        ));
    }
    let jti = who.jti.clone().ok_or_else(|| {
        AuthError::Invalid("a token without an id (jti) cannot make changes".into())
    })?;
    // Remembered as long as the token still passes verification.
    let leeway = i64::try_from(state.authenticator().leeway().as_secs()).unwrap_or(i64::MAX);
    let expires = who.expires_at.unix_timestamp().saturating_add(leeway);
    if !store.spend_token(&who.issuer, &jti, expires)? {
        return Err(AuthError::Replayed.into());
    }
    Ok(Spent {
        issuer: who.issuer.clone(),
        jti,
    })
}

/// After a refused change: the token may try again.
pub(super) fn give_back(state: &ApiState, spent: Spent) {
    if let Err(e) = state
        .engine
        .store()
        .unspend_token(&spent.issuer, &spent.jti)
    {
        tracing::warn!(error = %e, "token id not given back");
    }
}

/// The end of a change that starts a deployment: 202 with it (and its id
/// for the outcome record), or the refusal, giving the token id back when
/// nothing was changed.
pub(super) async fn started(
    state: &ApiState,
    spent: Spent,
    start: impl Future<Output = Result<Deployment, EngineError>>,
) -> Result<(StatusCode, Extension<Started>, Json<Deployment>), ApiError> {
    match start.await {
        Ok(deployment) => {
            let started = Started(deployment.id.0.clone());
            Ok((StatusCode::ACCEPTED, Extension(started), Json(deployment)))
        }
        Err(e) => {
            if e.changed_nothing() {
                give_back(state, spent);
            }
            Err(e.into())
        }
    }
}

/// Whether an answer refused the caller: 401, 403 or 429.
pub(super) fn refuses_caller(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
    )
}

/// The middleware: records changes and refusals with their outcome.
pub(super) async fn outcomes(
    State(state): State<ApiState>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    // Inside the nested /v1 router the URI lost its prefix; the original has it.
    let path = request.extensions().get::<OriginalUri>().map_or_else(
        || request.uri().path().to_owned(),
        |u| u.0.path().to_owned(),
    );
    let source = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let slot = Slot::default();
    request.extensions_mut().insert(slot.clone());
    let response = next.run(request).await;
    let status = response.status();
    let change = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    let refused = refuses_caller(status);
    if !(change || refused) {
        return response;
    }
    let code = response
        .extensions()
        .get::<ErrorCode>()
        .map(|c| c.0.clone());
    let flooding = code.as_deref() == Some("too_many_failures")
        && source.is_some_and(|ip| !state.gate.first_refusal(ip));
    if flooding {
        // Recorded once per address and window, not once per request.
        return response;
    }
    let outcome = if status.is_success() {
        "accepted"
    } else {
        "refused"
    };
    let who = slot.take();
    let mut entry = record(who.as_ref(), source, &format!("{method} {path}"), outcome);
    let segments: Vec<&str> = path.split('/').collect();
    if let ["", "v1", "apps", app, ..] = segments.as_slice() {
        entry.app = Some((*app).to_owned());
    }
    entry.deployment = response.extensions().get::<Started>().map(|s| s.0.clone());
    entry.detail = Some(match code.as_deref() {
        Some("too_many_failures") => format!(
            "{} too_many_failures (further refusals of this address within a minute are not recorded)",
            status.as_u16()
        ),
        Some(code) => format!("{} {code}", status.as_u16()),
        None => status.as_u16().to_string(),
    });
    if let Err(e) = state.engine.store().append_audit(&entry) {
        tracing::error!(error = %e, "audit record not written");
    }
    response
}
