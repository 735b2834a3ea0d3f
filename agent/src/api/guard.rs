//! The door of the API: every `/v1` and `/metrics` request is
//! authenticated here, before any route is looked at, and audited here
//! after its answer.
//!
//! Authenticating first means an unauthenticated caller learns nothing
//! (every path and method gets the same 401) and costs little: no handler,
//! no extractor, no store read. Its refusal counts against its address
//! (past `auth.max_failures_per_minute`: 429 for a minute) and is counted
//! and summarised, never recorded one by one: a flood cannot fill the disk.
//! A token whose signature verified is never refused by that block, so a
//! CI runner behind the same NAT as an attacker keeps deploying.
//!
//! Request heads longer than `api.max_header_line`/`max_header_size` are
//! refused here too (414, 431), and counted like failed authentications.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use deployd_proto::ErrorCode;

use super::audit::{self, Started, refuses_caller};
use super::{ApiError, ApiState};
use crate::auth::{AuthError, Principal};
use crate::switch::{HeadLimits, check_head};

/// The verified caller, put in the request by [`admit`] for handlers.
#[derive(Debug, Clone)]
pub(super) struct Authenticated(pub Principal);

/// What a request was, as its audit record says: method and (cut) path.
/// Made only for a request that gets a record.
fn action(method: &Method, path: &str) -> String {
    format!("{method} {}", audit::cut_path(path))
}

/// Whether a path is behind a token.
fn guarded(path: &str) -> bool {
    path == "/metrics" || path == "/v1" || path.starts_with("/v1/")
}

/// The middleware: head limits, then authentication and the failure
/// block, then the request, then its audit record.
pub(super) async fn admit(
    State((state, head)): State<(ApiState, HeadLimits)>,
    mut request: Request,
    next: Next,
) -> Response {
    let source = audit::client_addr_in(request.extensions());
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    if let Err(too_large) = check_head(&method, request.uri(), request.headers(), head) {
        let refusal = ApiError::new(
            too_large.status(),
            ErrorCode::HeaderTooLarge,
            too_large.message(),
        );
        return refuse(&state, source, &action(&method, &path), refusal);
    }
    if !guarded(&path) {
        return next.run(request).await;
    }
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or_default());
    let principal = match state.authenticator().verify_header(header).await {
        Ok(principal) => principal,
        Err(e) => {
            tracing::info!(reason = %e, source = ?source, "authentication failed");
            return refuse(&state, source, &action(&method, &path), e.into());
        }
    };
    request
        .extensions_mut()
        .insert(Authenticated(principal.clone()));
    let response = next.run(request).await;
    record(&state, &principal, source, &method, &path, &response);
    response
}

/// Refuses a request that did not authenticate: 429 while its address is
/// blocked, else `refusal`, counted against the address. The audit log
/// gets the first refusal of each address per minute and a summary of
/// the rest.
fn refuse(state: &ApiState, source: Option<IpAddr>, action: &str, refusal: ApiError) -> Response {
    let refusal = match source {
        Some(ip) if state.gate.is_blocked(ip) => AuthError::TooManyFailures.into(),
        Some(ip) => {
            state.gate.failed(ip);
            refusal
        }
        None => refusal,
    };
    let detail = format!("{} {}", refusal.status().as_u16(), refusal.body().code);
    for record in state.refusals.note(source, action, &detail) {
        if let Err(e) = state.engine.audit(&record) {
            tracing::error!(error = %e, "audit record not written");
        }
    }
    refusal.into_response()
}

/// The audit record of an authenticated request: every change, and every
/// refusal of the caller, with its outcome.
fn record(
    state: &ApiState,
    who: &Principal,
    source: Option<IpAddr>,
    method: &Method,
    path: &str,
    response: &Response,
) {
    let status = response.status();
    let change = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !(change || refuses_caller(status)) {
        return;
    }
    let code = response.extensions().get::<ErrorCode>();
    let outcome = if status.is_success() {
        "accepted"
    } else {
        "refused"
    };
    let mut entry = audit::record(Some(who), source, &action(method, path), outcome);
    let segments: Vec<&str> = path.split('/').collect();
    if let ["", "v1", "apps", app, ..] = segments.as_slice() {
        entry.app = Some(audit::cut_path(app));
    }
    entry.deployment = response.extensions().get::<Started>().map(|s| s.0.clone());
    entry.detail = Some(match code {
        Some(code) => format!("{} {code}", status.as_u16()),
        None => status.as_u16().to_string(),
    });
    if let Err(e) = state.engine.audit(&entry) {
        tracing::error!(error = %e, "audit record not written");
    }
}
