//! One error shape for every failing request: a status and an
//! [`ErrorBody`]. Server-side failures are logged with their details and
//! answered without them.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use deployd_proto::{ErrorBody, ErrorCode};

use crate::auth::AuthError;
use crate::engine::EngineError;

/// A failed request.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody::new(code, message),
        }
    }

    pub fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A failure of the agent itself: the details go to the log only.
    pub fn internal(context: &str, error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "the agent failed to handle this request; its log has the details",
        )
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn body(&self) -> &ErrorBody {
        &self.body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.body.code;
        let mut response = (self.status, axum::Json(self.body)).into_response();
        let headers = response.headers_mut();
        match (self.status, code) {
            // RFC 6750: no error code when no credentials came at all.
            (StatusCode::UNAUTHORIZED, ErrorCode::Unauthenticated) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            (StatusCode::UNAUTHORIZED, _) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            (StatusCode::TOO_MANY_REQUESTS, _) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            }
            _ => {}
        }
        response.extensions_mut().insert(code);
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let (status, code) = match e {
            AuthError::Missing => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthenticated),
            AuthError::Invalid(_) => (StatusCode::UNAUTHORIZED, ErrorCode::InvalidToken),
            AuthError::Replayed => (StatusCode::UNAUTHORIZED, ErrorCode::TokenReplayed),
            AuthError::TooManyFailures => {
                (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyFailures)
            }
            AuthError::Forbidden { .. } => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
        };
        Self::new(status, code, e.to_string())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let (status, code) = match &e {
            EngineError::UnknownApp(_) => (StatusCode::NOT_FOUND, ErrorCode::UnknownApp),
            EngineError::UnknownDeployment(_) => {
                (StatusCode::NOT_FOUND, ErrorCode::UnknownDeployment)
            }
            EngineError::UnknownPlan(_) => (StatusCode::NOT_FOUND, ErrorCode::UnknownPlan),
            EngineError::UnknownRelease { .. } => {
                (StatusCode::NOT_FOUND, ErrorCode::UnknownRelease)
            }
            EngineError::Conflict { running, .. } => {
                let mut error = Self::new(StatusCode::CONFLICT, ErrorCode::Conflict, e.to_string());
                error.body.deployment = Some(running.0.clone());
                return error;
            }
            EngineError::Locked { .. } => (StatusCode::LOCKED, ErrorCode::Locked),
            EngineError::Preparing { .. } | EngineError::Planning { .. } => {
                (StatusCode::CONFLICT, ErrorCode::Preparing)
            }
            EngineError::NoPreviousRelease(_) => {
                (StatusCode::CONFLICT, ErrorCode::NoPreviousRelease)
            }
            EngineError::CanaryNotConfigured(_) => {
                (StatusCode::BAD_REQUEST, ErrorCode::CanaryNotConfigured)
            }
            EngineError::CanaryInFleet(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
            EngineError::NoCanary(_) => (StatusCode::CONFLICT, ErrorCode::NoCanary),
            EngineError::UnknownService(_) => (StatusCode::BAD_REQUEST, ErrorCode::UnknownService),
            EngineError::NothingLive(_) => (StatusCode::CONFLICT, ErrorCode::NothingLive),
            EngineError::CommandRunning { .. } => (StatusCode::CONFLICT, ErrorCode::CommandRunning),
            EngineError::Stopped => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
            EngineError::Store(crate::store::StoreError::Full) => return Self::store_full(),
            EngineError::Config(_)
            | EngineError::Env(_)
            | EngineError::Store(_)
            | EngineError::Docker(_)
            | EngineError::HttpClient(_) => {
                return Self::internal("request failed", &e);
            }
        };
        Self::new(status, code, e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Full => Self::store_full(),
            e => Self::internal("deployment store failed", &e),
        }
    }
}

impl ApiError {
    /// The disk holding the store is full: nothing can be recorded, so
    /// nothing is changed.
    pub fn store_full() -> Self {
        tracing::error!("the disk holding the deployment store is full: changes are refused");
        Self::new(
            StatusCode::INSUFFICIENT_STORAGE,
            ErrorCode::StoreFull,
            "the disk holding the agent's state is full: no change is made until space is freed",
        )
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        let code = match r {
            JsonRejection::MissingJsonContentType(_) => ErrorCode::UnsupportedMediaType,
            JsonRejection::JsonSyntaxError(_) => ErrorCode::MalformedJson,
            JsonRejection::JsonDataError(_) => ErrorCode::InvalidBody,
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            _ => ErrorCode::InvalidBody,
        };
        Self::new(status, code, r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::bad_request(ErrorCode::InvalidQuery, r.body_text())
    }
}

/// Last layer: an error answer that is not yet an [`ErrorBody`] (an
/// unknown route, a wrong method, an oversize body refused by its length,
/// a timeout, load shedding) gets one, with a code from its status.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (code, message) = match status {
        StatusCode::NOT_FOUND => (ErrorCode::NotFound, "no such endpoint"),
        StatusCode::METHOD_NOT_ALLOWED => (
            ErrorCode::MethodNotAllowed,
            "this endpoint does not take that method",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            ErrorCode::PayloadTooLarge,
            "request bodies are limited to 16 KiB",
        ),
        StatusCode::REQUEST_TIMEOUT => (ErrorCode::Timeout, "the request took too long"),
        StatusCode::SERVICE_UNAVAILABLE => (ErrorCode::Unavailable, "the agent is busy; try again"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (ErrorCode::UnsupportedMediaType, "send JSON"),
        s if s.is_server_error() => (
            ErrorCode::Internal,
            "the agent failed to handle this request",
        ),
        _ => (ErrorCode::BadRequest, "the request was refused"),
    };
    let mut answer = ApiError::new(status, code, message).into_response();
    if matches!(
        status,
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
    ) {
        // The body was not read (whole): the connection cannot carry another
        // request, and the client must know before it sends one.
        answer
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    // Keep what the original said about allowed methods, retrying, or the
    // connection closing.
    for name in [header::ALLOW, header::RETRY_AFTER, header::CONNECTION] {
        if let Some(value) = response.headers().get(&name) {
            answer.headers_mut().insert(name, value.clone());
        }
    }
    answer
}
