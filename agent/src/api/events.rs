//! `/v1/deployments/{id}/events`: a deployment's events as Server-Sent
//! Events.
//!
//! Each event's SSE id is its sequence number. Recorded events are replayed
//! from the store, then live ones follow; a client that reconnects with
//! `Last-Event-ID` (or `?after=`) gets exactly what came after. The stream
//! ends after the deployment's terminal state.

use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use deployd_proto::{DeploymentEvent, DeploymentId, ErrorBody, ErrorCode, EventKind};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::deployments::readable;
use super::{ApiError, ApiState, Caller, ClientAddr, Path, Query, StreamCaps};

/// One event of the stream as SSE frames it: `id` is the event's seq,
/// `event` its type, `data` the [`DeploymentEvent`] as JSON.
#[derive(Debug)]
pub struct SseEvent;

impl utoipa::PartialSchema for SseEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        let text = || ObjectBuilder::new().schema_type(Type::String);
        ObjectBuilder::new()
            .property("id", text().pattern(Some("^[0-9]+$")))
            .property("event", text().enum_values(Some(EventKind::KINDS)))
            .property(
                "data",
                text()
                    .content_media_type("application/json")
                    .content_schema(Some(utoipa::openapi::Ref::from_schema_name(
                        "DeploymentEvent",
                    ))),
            )
            .required("id")
            .required("event")
            .required("data")
            .into()
    }
}

impl utoipa::ToSchema for SseEvent {}

/// Where to resume.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ResumeQuery {
    /// Only events after this sequence number (like `Last-Event-ID`).
    after: Option<u64>,
    /// `false`: the recorded events only, then the stream ends, even if
    /// the deployment goes on. Default: `true`.
    follow: Option<bool>,
}

/// The deployment's events, replayed then live, as `text/event-stream`.
#[utoipa::path(
    get, path = "/v1/deployments/{id}/events", tag = "deployments",
    params(
        ("id" = String, Path, description = "Deployment id"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event"),
        ResumeQuery,
    ),
    responses(
        (status = 200, description = "Server-Sent Events, one per DeploymentEvent", content_type = "text/event-stream", body = SseEvent),
        (status = 204, description = "The deployment is over and every event was seen"),
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
    Path(id): Path<String>,
    Query(resume): Query<ResumeQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = DeploymentId(id);
    readable(&state, &who, &id)?;
    let held = caps.hold(&who, source)?;
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        ErrorCode::InvalidLastEventId,
                        "Last-Event-ID is an event seq",
                    )
                })?,
        ),
    };
    let after = last_event_id.or(resume.after).unwrap_or(0);
    if i64::try_from(after).is_err() {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidLastEventId,
            "no event has a seq that large",
        ));
    }
    let follow = resume.follow != Some(false);
    let Some(mut events) = state.engine.follow(&id, after, follow)? else {
        // Over and fully seen: 204 tells an EventSource not to reconnect.
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            // A client that left frees its stream slot at once, even while
            // the deployment says nothing.
            let event = tokio::select! {
                event = events.recv() => event,
                () = tx.closed() => break,
            };
            let Some(sse) = event.as_ref().and_then(frame) else {
                break;
            };
            if tx.send(Ok::<_, Infallible>(sse)).await.is_err() {
                break;
            }
        }
        drop(held);
    });
    let stream = ReceiverStream::new(rx);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// An event as SSE frames it: its seq as the id, its kind as the name.
fn frame(event: &DeploymentEvent) -> Option<Event> {
    let framed = Event::default()
        .id(event.seq.to_string())
        .event(event.kind.kind())
        .json_data(event);
    match framed {
        Ok(sse) => Some(sse),
        Err(e) => {
            tracing::error!(error = %e, "event does not serialize");
            None
        }
    }
}
