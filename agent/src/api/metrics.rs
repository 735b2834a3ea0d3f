//! `GET /metrics`: Prometheus text format, for a token that may read every
//! app; and the count of refused requests, for every route.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use deployd_proto::{ErrorCode, Scope};

use super::audit::refuses_caller;
use super::{ApiState, Caller};
use crate::metrics::Metrics;

/// The metrics as an HTTP answer.
pub fn exposition(metrics: &Metrics) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        metrics.render(),
    )
        .into_response()
}

/// Every metric; the token needs `read` on every app (`apps = ["*"]`):
/// the metrics name every app and its live release.
pub async fn scrape(
    State(state): State<ApiState>,
    Caller(caller): Caller,
) -> Result<Response, super::ApiError> {
    caller.require(Scope::Read, "*")?;
    Ok(exposition(state.engine.metrics()))
}

/// Counts answers that refused the caller: 401, 403, 429.
pub(super) async fn count_refusals(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    if refuses_caller(response.status()) {
        let code = response
            .extensions()
            .get::<ErrorCode>()
            .map_or("refused", |c| c.as_str());
        state.engine.metrics().auth_failure(code);
    }
    response
}
