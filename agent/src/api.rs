//! The HTTPS API: versioned routes over the engine, behind bearer tokens.
//!
//! `router` is the whole API as a tower service (tests call it directly);
//! `serve` puts it behind TLS with the configured limits.

mod apps;
mod audit;
mod deployments;
mod error;
mod events;
mod fleet;
mod guard;
mod health;
mod logs;
pub mod metrics;
mod openapi;
mod plans;
mod runs;
mod server;
mod stream;
mod tls;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::routing::{get, post, put};
use axum::{BoxError, Router};
use deployd_proto::{ErrorCode, WhoAmI};
use tower::ServiceBuilder;

pub use audit::{ClientAddr, RefusalLog};
pub use error::ApiError;
pub use openapi::ApiDoc;
pub use server::{ServeError, Server};
pub use tls::{TlsError, server_config};

use crate::auth::{AuthError, Authenticator, FailureGate, Principal};
use crate::engine::EngineHandle;
use crate::limit::Tally;
use crate::switch::HeadLimits;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// What every handler reaches.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub engine: EngineHandle,
    /// Replaced whole when SIGHUP reloads the `[auth]` section.
    auth: Arc<RwLock<Arc<Authenticator>>>,
    pub(crate) gate: Arc<FailureGate>,
    /// Refusals of unauthenticated requests, summarised for the audit log.
    pub(crate) refusals: Arc<RefusalLog>,
}

impl ApiState {
    /// `max_failures` failed authentications per address and minute are
    /// allowed (`auth.max_failures_per_minute`).
    pub fn new(engine: EngineHandle, auth: Authenticator, max_failures: usize) -> Self {
        Self {
            engine,
            auth: Arc::new(RwLock::new(Arc::new(auth))),
            gate: Arc::new(FailureGate::new(max_failures)),
            refusals: Arc::default(),
        }
    }

    /// Writes the summaries of refused unauthenticated requests whose
    /// minute is over (`all`: every one counted so far, at shutdown).
    pub fn write_refusal_summaries(&self, all: bool) {
        let summaries = if all {
            self.refusals.flush_all()
        } else {
            self.refusals.flush()
        };
        for summary in summaries {
            if let Err(e) = self.engine.audit(&summary) {
                tracing::error!(error = %e, "audit summary not written");
            }
        }
    }

    /// The token checks in force now.
    pub fn authenticator(&self) -> Arc<Authenticator> {
        crate::sync::read(&self.auth).clone()
    }

    /// New token checks, for requests from now on (spent token ids are in
    /// the store: a reload does not make a used token usable again).
    pub fn replace_authenticator(&self, auth: Authenticator) {
        *crate::sync::write(&self.auth) = Arc::new(auth);
    }
}

/// Limits applied to every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    /// Request line and header sizes.
    pub head: HeadLimits,
    /// Event streams open at once per token and per address.
    pub streams_per_token: usize,
    pub streams_per_address: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 512,
            head: HeadLimits::default(),
            streams_per_token: 8,
            streams_per_address: 64,
        }
    }
}

/// Event streams open at once, per token and per address.
#[derive(Debug, Clone)]
pub(crate) struct StreamCaps {
    pub per_token: Arc<Tally<String>>,
    pub per_address: Arc<Tally<std::net::IpAddr>>,
}

/// A stream's places under its caps, given back when dropped.
pub(crate) type HeldStream = (
    crate::limit::Counted<String>,
    Option<crate::limit::Counted<std::net::IpAddr>>,
);

impl StreamCaps {
    /// Streams hold a task and a connection for as long as the client
    /// likes: capped per token and per address, freed when they end (the
    /// places are dropped). 429 when either cap is reached.
    pub(crate) fn hold(
        &self,
        who: &Principal,
        source: Option<std::net::IpAddr>,
    ) -> Result<HeldStream, ApiError> {
        // An operator signs a token per request: theirs count together.
        let id = match who.jti.as_deref() {
            Some(jti) if who.issuer != deployd_proto::OPERATOR_ISSUER => jti,
            _ => &who.subject,
        };
        let token = format!("{}\n{id}", who.issuer);
        let held = (
            self.per_token.take(token),
            source.map(|ip| self.per_address.take(crate::limit::bucket(ip))),
        );
        match held {
            (Some(token), None) => Ok((token, None)),
            (Some(token), Some(Some(address))) => Ok((token, Some(address))),
            _ => Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyStreams,
                "too many event streams are open for this token or address; close one",
            )),
        }
    }
}

/// The whole API.
pub fn router(state: ApiState, limits: Limits) -> Router {
    let v1 = Router::new()
        .route(
            "/apps/{app}/deployments",
            post(deployments::create).get(deployments::list),
        )
        .route("/apps/{app}/rollback", post(apps::rollback))
        .route("/apps/{app}/status", get(apps::status))
        .route("/apps/{app}/lock", put(apps::lock).delete(apps::unlock))
        .route("/apps/{app}/prepare", post(apps::prepare))
        .route("/apps/{app}/canary/{order}", post(apps::canary))
        .route("/apps/{app}/plans", post(plans::create))
        .route("/apps/{app}/runs", post(runs::create))
        .route("/apps/{app}/logs", get(logs::stream))
        .route("/plans/{id}", get(plans::get))
        .route("/deployments/{id}", get(deployments::get))
        .route("/deployments/{id}/events", get(events::stream))
        .route(
            "/deployments/{id}/notifications",
            get(deployments::notifications),
        )
        .route("/whoami", get(whoami));
    let streams = StreamCaps {
        per_token: Tally::new(limits.streams_per_token),
        per_address: Tally::new(limits.streams_per_address),
    };
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(health::healthz))
        .route("/readiness", get(health::readiness))
        .route("/openapi.json", get(openapi::document))
        .route("/metrics", get(metrics::scrape))
        .fallback(not_found)
        .layer(axum::Extension(streams))
        // Before any route: unknown paths and methods are behind a token too.
        .layer(axum::middleware::from_fn_with_state(
            (state.clone(), limits.head),
            guard::admit,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::count_refusals,
        ))
        .with_state(state)
        .layer(axum::middleware::from_fn(read_body))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            MAX_BODY_BYTES,
        ))
        .layer(
            ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(overloaded))
                .load_shed()
                .concurrency_limit(limits.max_concurrent_requests)
                .timeout(limits.request_timeout),
        )
        // A panic is a 500, not a reset connection.
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        // Outside every layer that may answer on its own.
        .layer(axum::middleware::map_response(error::json_errors))
        .layer(tower_http::trace::TraceLayer::new_for_http())
}

/// Reads every request body to its end before any handler answers. An
/// answer sent before the body was read (a 405, a 401) would leave hyper to
/// close the connection after it, unannounced, and a keep-alive client
/// could send its next request into that close. A body that cannot be read
/// whole gets an answer that says the connection closes.
async fn read_body(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = request.into_parts();
    match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(bytes) => {
            next.run(axum::extract::Request::from_parts(
                parts,
                axum::body::Body::from(bytes),
            ))
            .await
        }
        Err(e) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            let mut response = if too_large {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::PayloadTooLarge,
                    "request bodies are limited to 16 KiB",
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::InvalidBody,
                    "the request body could not be read",
                )
            }
            .into_response();
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            response
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such endpoint",
    )
}

/// Load shedding and timeouts, as JSON errors.
async fn overloaded(error: BoxError) -> ApiError {
    if error.is::<tower::timeout::error::Elapsed>() {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Timeout,
            "the agent took too long to answer",
        )
    } else if error.is::<tower::load_shed::error::Overloaded>() {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Overloaded,
            "the agent is handling too many requests; try again",
        )
    } else {
        ApiError::internal("request failed", &error)
    }
}

/// The verified caller of a `/v1` request (the guard authenticated it).
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<guard::Authenticated>()
            .map(|a| Self(a.0.clone()))
            .ok_or_else(|| AuthError::Missing.into())
    }
}

/// `axum::Json`, with its rejections in the API's error shape.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path`, with its rejections in the API's error shape.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// `axum::extract::Query`, with its rejections in the API's error shape.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// The caller as the agent sees their token.
#[utoipa::path(
    get, path = "/v1/whoami", tag = "auth",
    responses(
        (status = 200, body = WhoAmI),
        (status = 401, body = deployd_proto::ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn whoami(Caller(who): Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        subject: who.subject,
        issuer: who.issuer,
        grants: who.grants,
        expires_at: who.expires_at,
    })
}

/// A reason as given, or a 400 when it is too long.
fn checked_reason(reason: Option<String>) -> Result<Option<String>, ApiError> {
    match reason {
        Some(r) if r.chars().count() > deployd_proto::MAX_REASON_CHARS => {
            Err(ApiError::bad_request(
                ErrorCode::InvalidReason,
                "a reason is at most 500 characters",
            ))
        }
        Some(r) if r.trim().is_empty() => Ok(None),
        other => Ok(other),
    }
}
