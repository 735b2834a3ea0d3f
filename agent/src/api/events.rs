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
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::deployments::readable;
use super::{ApiError, ApiState, Caller, ClientAddr, Path, Query, StreamCaps};
use crate::engine::EngineHandle;

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
            .property(
                "event",
                text().enum_values(Some(["step_started", "step_finished", "output", "state"])),
            )
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
    let deployment = readable(&state, &who, &id)?;
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
    // Subscribed before the store is read: nothing falls between the two.
    let live = state.engine.subscribe();
    if deployment.state.is_terminal() && state.engine.store().events(&id, after)?.is_empty() {
        // Over and fully seen: 204 tells an EventSource not to reconnect.
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let (tx, rx) = mpsc::channel(64);
    let engine = state.engine.clone();
    tokio::spawn(async move {
        if resume.follow == Some(false) {
            recorded(engine, id, after, tx).await;
        } else {
            pump(engine, id, after, live, tx).await;
        }
        drop(held);
    });
    let stream = ReceiverStream::new(rx);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

type Sink = mpsc::Sender<Result<Event, Infallible>>;

/// Sends events after `last` until the terminal one, or until the client
/// has gone (the send fails).
async fn pump(
    engine: EngineHandle,
    id: DeploymentId,
    mut last: u64,
    mut live: broadcast::Receiver<(DeploymentId, DeploymentEvent)>,
    tx: Sink,
) {
    loop {
        // Catch up from the store.
        let recorded = match engine.store().events(&id, last) {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(deployment.id = %id, error = %e, "cannot read events");
                return;
            }
        };
        for event in recorded {
            last = event.seq;
            if !send(&tx, &event).await || is_terminal(&event) {
                return;
            }
        }
        match engine.store().state(&id) {
            Ok(Some(state)) if !state.is_terminal() => {}
            // Over: its final event is recorded a moment after its state.
            // Wait for it briefly; one whose record failed still ends.
            _ => {
                finish(&engine, &id, last, &tx).await;
                return;
            }
        }
        // Then follow live, until a gap or a lag sends us back to the store.
        loop {
            let received = tokio::select! {
                received = live.recv() => received,
                () = tx.closed() => return,
                // deployd stops: the client reconnects to the next one.
                () = engine.stopping() => return,
            };
            match received {
                Ok((of, event)) if of == id && Some(event.seq) == last.checked_add(1) => {
                    last = event.seq;
                    if !send(&tx, &event).await || is_terminal(&event) {
                        return;
                    }
                }
                Ok((of, event)) if of == id && event.seq > last => break,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// Sends the events recorded after `after`, then ends.
async fn recorded(engine: EngineHandle, id: DeploymentId, after: u64, tx: Sink) {
    match engine.store().events(&id, after) {
        Ok(events) => {
            for event in events {
                if !send(&tx, &event).await {
                    return;
                }
            }
        }
        Err(e) => tracing::error!(deployment.id = %id, error = %e, "cannot read events"),
    }
}

/// Sends what is left after `last` of a deployment that is over, waiting
/// up to 2 s for its final event.
async fn finish(engine: &EngineHandle, id: &DeploymentId, mut last: u64, tx: &Sink) {
    for _ in 0..20 {
        let Ok(events) = engine.store().events(id, last) else {
            return;
        };
        for event in events {
            last = event.seq;
            if !send(tx, &event).await || is_terminal(&event) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn send(tx: &Sink, event: &DeploymentEvent) -> bool {
    let name = match &event.kind {
        EventKind::StepStarted { .. } => "step_started",
        EventKind::StepFinished { .. } => "step_finished",
        EventKind::Output { .. } => "output",
        EventKind::OnceTasksDone => "once_tasks_done",
        EventKind::Canary { .. } => "canary",
        EventKind::State { .. } => "state",
    };
    let sse = match Event::default()
        .id(event.seq.to_string())
        .event(name)
        .json_data(event)
    {
        Ok(sse) => sse,
        Err(e) => {
            tracing::error!(error = %e, "event does not serialize");
            return false;
        }
    };
    tx.send(Ok(sse)).await.is_ok()
}

fn is_terminal(event: &DeploymentEvent) -> bool {
    matches!(&event.kind, EventKind::State { state, .. } if state.is_terminal())
}
