//! `POST /v1/apps/{app}/runs`: a one-off command in the live release, its
//! output streamed back as Server-Sent Events (see `engine::command`).

use axum::extract::State;
use axum::response::Response;
use deployd_proto::{ErrorBody, ErrorCode, RunEvent, RunRequest, Scope};

use super::audit::{ClientAddr, begin_change, ended};
use super::{ApiError, ApiState, Caller, Json, Path};
use crate::engine::command::shell_words;
use crate::store::AuditRecord;

/// One event of a run as SSE frames it: `event` is its kind, `data` the
/// [`RunEvent`] as JSON.
#[derive(Debug)]
pub struct RunSseEvent;

impl utoipa::PartialSchema for RunSseEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        super::stream::schema(&["started", "output", "exited", "failed"], "RunEvent")
    }
}

impl utoipa::ToSchema for RunSseEvent {}

fn invalid(message: &str) -> ApiError {
    ApiError::bad_request(ErrorCode::InvalidCommand, message)
}

/// What a command may be: at least a program, no NUL, not too long.
fn checked(body: &RunRequest) -> Result<(), ApiError> {
    if body.command.first().is_none_or(|p| p.trim().is_empty()) {
        return Err(invalid("command names no program"));
    }
    if body.command.iter().any(|a| a.contains('\0')) {
        return Err(invalid("a command argument holds a NUL character"));
    }
    let bytes: usize = body.command.iter().map(|a| a.len() + 1).sum();
    if bytes > deployd_proto::MAX_COMMAND_BYTES {
        return Err(invalid("the command is longer than 8 KiB"));
    }
    match body.timeout_secs {
        Some(0) => Err(invalid("timeout_secs is at least 1")),
        Some(t) if t > deployd_proto::MAX_RUN_SECS => {
            Err(invalid("timeout_secs is at most 86400 (a day)"))
        }
        _ => Ok(()),
    }
}

/// Runs a command in a new container of the live release (a service's
/// environment, network and volumes; no traffic) and streams its output,
/// then its exit code. Closing the stream stops the command.
#[utoipa::path(
    post, path = "/v1/apps/{app}/runs", tag = "apps",
    params(("app" = String, Path, description = "App name", example = "shop")),
    request_body = RunRequest,
    responses(
        (status = 200, description = "Server-Sent Events, one per RunEvent", content_type = "text/event-stream", body = RunSseEvent),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Nothing deployed yet, or another command runs", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<ApiState>,
    Caller(who): Caller,
    source: ClientAddr,
    Path(app): Path<String>,
    Json(body): Json<RunRequest>,
) -> Result<Response, ApiError> {
    who.require(Scope::Run, &app)?;
    checked(&body)?;
    state.engine.check_app(&app)?;
    let mut intent = AuditRecord::new("run", "requested");
    intent.app = Some(app.clone());
    let service = body.service.as_deref().unwrap_or("the default service");
    intent.detail = Some(format!("{} (as {service})", shell_words(&body.command)));
    let spent = begin_change(&state, &who, source, intent)?;
    let run = ended(
        &state,
        spent,
        state.engine.run_command(&app, body, &who.subject),
    )?;
    Ok(super::stream::sse(run.events, RunEvent::kind, ()))
}
