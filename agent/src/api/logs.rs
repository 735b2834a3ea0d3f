//! `GET /v1/apps/{app}/logs`: a service's own output, as Server-Sent
//! Events (see `engine::logs`).

use axum::Extension;
use axum::extract::State;
use axum::response::Response;
use deployd_proto::{ErrorBody, ErrorCode, LogEvent, Scope};
use serde::Deserialize;

use super::{ApiError, ApiState, Caller, ClientAddr, Path, Query, StreamCaps};
use crate::docker::LogWindow;

/// Most lines asked for per container.
const MAX_TAIL: usize = 10_000;
/// Lines per container when neither `tail` nor `since` is given.
const DEFAULT_TAIL: usize = 100;

/// Which lines.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// The service. Default: web, else the app's first.
    service: Option<String>,
    /// Keep the stream open: new lines, and the containers a deploy
    /// starts. Default: false.
    follow: Option<bool>,
    /// Only lines of the last this many seconds.
    since_secs: Option<u64>,
    /// Only the last this many lines per container (at most 10000).
    /// Default: 100; with `since_secs`, 10000.
    tail: Option<usize>,
}

/// One event of a log stream as SSE frames it: `event` is its kind, `data`
/// the [`LogEvent`] as JSON.
#[derive(Debug)]
pub struct LogSseEvent;

impl utoipa::PartialSchema for LogSseEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        super::stream::schema(&["joined", "line", "left"], "LogEvent")
    }
}

impl utoipa::ToSchema for LogSseEvent {}

/// A service's container logs, each line tagged with its container. A
/// followed stream ends when the token expires: follow on with a new one
/// and `since_secs`.
#[utoipa::path(
    get, path = "/v1/apps/{app}/logs", tag = "apps",
    params(("app" = String, Path, description = "App name", example = "shop"), LogsQuery),
    responses(
        (status = 200, description = "Server-Sent Events, one per LogEvent", content_type = "text/event-stream", body = LogSseEvent),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 429, description = "Too many streams open for this token or address", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn stream(
    State(state): State<ApiState>,
    Caller(who): Caller,
    ClientAddr(source): ClientAddr,
    Extension(caps): Extension<StreamCaps>,
    Path(app): Path<String>,
    Query(query): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    who.require(Scope::Logs, &app)?;
    if query.tail.is_some_and(|t| t > MAX_TAIL) {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidQuery,
            "tail is at most 10000 lines",
        ));
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let since = match query.since_secs {
        Some(secs) => Some(
            i64::try_from(secs)
                .ok()
                .and_then(|s| now.checked_sub(s))
                .filter(|s| *s > 0)
                .ok_or_else(|| {
                    ApiError::bad_request(ErrorCode::InvalidQuery, "since_secs is too large")
                })?,
        ),
        None => None,
    };
    let window = LogWindow {
        follow: query.follow.unwrap_or(false),
        // Never unbounded: a year of a chatty app's lines is not read into
        // memory for one request.
        tail: Some(query.tail.unwrap_or(if since.is_some() {
            MAX_TAIL
        } else {
            DEFAULT_TAIL
        })),
        since,
    };
    let held = caps.hold(&who, source)?;
    let events = state.engine.logs(&app, query.service.as_deref(), window)?;
    // A followed stream ends when its token would no longer be accepted
    // (an operator's within about a minute): a key removed meanwhile
    // stops it, and deployctl goes on with a fresh token.
    let until = who.expires_at + state.authenticator().leeway();
    let left = (until - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
    let deadline = tokio::time::Instant::now() + left.unsigned_abs();
    Ok(super::stream::sse_until(
        events,
        LogEvent::kind,
        held,
        deadline,
    ))
}
