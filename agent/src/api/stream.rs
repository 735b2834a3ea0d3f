//! What the streamed answers (a command's output, a service's logs) share:
//! their framing as Server-Sent Events, and its OpenAPI description.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// `events` as Server-Sent Events: `event` is each one's kind, `data` its
/// JSON; a comment every 15 s keeps a quiet stream open through proxies.
/// `held` (places under the stream caps) lives as long as the stream.
pub(super) fn sse<T>(
    events: mpsc::Receiver<T>,
    kind: fn(&T) -> &'static str,
    held: impl Send + Sync + 'static,
) -> Response
where
    T: serde::Serialize + Send + 'static,
{
    sse_of(ReceiverStream::new(events), kind, held)
}

/// Like [`sse`], ending at `deadline` (and so dropping `events`).
pub(super) fn sse_until<T>(
    events: mpsc::Receiver<T>,
    kind: fn(&T) -> &'static str,
    held: impl Send + Sync + 'static,
    deadline: tokio::time::Instant,
) -> Response
where
    T: serde::Serialize + Send + 'static,
{
    let events = ReceiverStream::new(events).take_until(tokio::time::sleep_until(deadline));
    sse_of(events, kind, held)
}

fn sse_of<T>(
    events: impl futures_util::Stream<Item = T> + Send + 'static,
    kind: fn(&T) -> &'static str,
    held: impl Send + Sync + 'static,
) -> Response
where
    T: serde::Serialize + Send + 'static,
{
    let stream = events.map(move |event| {
        let _held = &held;
        Ok::<_, Infallible>(
            Event::default()
                .event(kind(&event))
                .json_data(&event)
                .unwrap_or_default(),
        )
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// The schema of one such event: `event` one of `kinds`, `data` the JSON
/// of the schema named `data`.
pub(super) fn schema(
    kinds: &[&str],
    data: &str,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let text = || ObjectBuilder::new().schema_type(Type::String);
    ObjectBuilder::new()
        .property("event", text().enum_values(Some(kinds.to_vec())))
        .property(
            "data",
            text()
                .content_media_type("application/json")
                .content_schema(Some(utoipa::openapi::Ref::from_schema_name(data))),
        )
        .required("event")
        .required("data")
        .into()
}
