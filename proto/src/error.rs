//! The one error shape every failing API call answers with.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Body of every non-2xx API response.
///
/// `code` is a stable, machine-readable identifier that clients may match
/// on; `message` is a sentence for humans and may change wording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// Stable identifier of the error kind, e.g. `invalid_body`.
    pub code: ErrorCode,
    /// Human-readable explanation; never contains secrets.
    pub message: String,
    /// The deployment the error is about: for `conflict`, the one running.
    /// Older agents never send it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
}

impl ErrorBody {
    /// Builds an error body from a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            deployment: None,
        }
    }
}

/// What went wrong, as both sides name it: `snake_case` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    // The request itself.
    BadRequest,
    InvalidBody,
    MalformedJson,
    UnsupportedMediaType,
    PayloadTooLarge,
    HeaderTooLarge,
    InvalidQuery,
    InvalidReason,
    InvalidFleet,
    InvalidDigest,
    InvalidLastEventId,
    InvalidCommand,
    // Who asks.
    /// No credentials came.
    Unauthenticated,
    InvalidToken,
    /// The token's id made a change before: a token makes one.
    TokenReplayed,
    TooManyFailures,
    Forbidden,
    // What it names.
    NotFound,
    MethodNotAllowed,
    UnknownApp,
    UnknownDeployment,
    UnknownRelease,
    UnknownPlan,
    /// A service the app's configuration does not have.
    UnknownService,
    // The app's state.
    /// A deployment is running (`deployment` names it).
    Conflict,
    Locked,
    /// Another release is being prepared, or another plan made.
    Preparing,
    /// Outside the fleet deployment that holds the app.
    FleetMismatch,
    NoPreviousRelease,
    /// A canary was asked of an app without `[apps.NAME.canary]`.
    CanaryNotConfigured,
    /// A canary order (promote, abort) with no canary running.
    NoCanary,
    /// `run` before any release was deployed.
    NothingLive,
    /// `run` while another command of the app runs (without `concurrent`).
    CommandRunning,
    // The agent.
    TooManyStreams,
    StoreFull,
    AuditUnavailable,
    Internal,
    Unavailable,
    Timeout,
    Overloaded,
    /// A code this version does not know (a newer agent's).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Its wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::InvalidBody => "invalid_body",
            Self::MalformedJson => "malformed_json",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge => "payload_too_large",
            Self::HeaderTooLarge => "header_too_large",
            Self::InvalidQuery => "invalid_query",
            Self::InvalidReason => "invalid_reason",
            Self::InvalidFleet => "invalid_fleet",
            Self::InvalidDigest => "invalid_digest",
            Self::InvalidLastEventId => "invalid_last_event_id",
            Self::InvalidCommand => "invalid_command",
            Self::Unauthenticated => "unauthenticated",
            Self::InvalidToken => "invalid_token",
            Self::TokenReplayed => "token_replayed",
            Self::TooManyFailures => "too_many_failures",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::UnknownApp => "unknown_app",
            Self::UnknownDeployment => "unknown_deployment",
            Self::UnknownRelease => "unknown_release",
            Self::UnknownPlan => "unknown_plan",
            Self::UnknownService => "unknown_service",
            Self::Conflict => "conflict",
            Self::Locked => "locked",
            Self::Preparing => "preparing",
            Self::FleetMismatch => "fleet_mismatch",
            Self::NoPreviousRelease => "no_previous_release",
            Self::CanaryNotConfigured => "canary_not_configured",
            Self::NoCanary => "no_canary",
            Self::NothingLive => "nothing_live",
            Self::CommandRunning => "command_running",
            Self::TooManyStreams => "too_many_streams",
            Self::StoreFull => "store_full",
            Self::AuditUnavailable => "audit_unavailable",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::Overloaded => "overloaded",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_their_wire_names_and_unknown_ones_are_kept_apart() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::InvalidBody,
            ErrorCode::MalformedJson,
            ErrorCode::UnsupportedMediaType,
            ErrorCode::PayloadTooLarge,
            ErrorCode::HeaderTooLarge,
            ErrorCode::InvalidQuery,
            ErrorCode::InvalidReason,
            ErrorCode::InvalidFleet,
            ErrorCode::InvalidDigest,
            ErrorCode::InvalidLastEventId,
            ErrorCode::InvalidCommand,
            ErrorCode::Unauthenticated,
            ErrorCode::InvalidToken,
            ErrorCode::TokenReplayed,
            ErrorCode::TooManyFailures,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::MethodNotAllowed,
            ErrorCode::UnknownApp,
            ErrorCode::UnknownDeployment,
            ErrorCode::UnknownRelease,
            ErrorCode::UnknownPlan,
            ErrorCode::UnknownService,
            ErrorCode::Conflict,
            ErrorCode::Locked,
            ErrorCode::Preparing,
            ErrorCode::FleetMismatch,
            ErrorCode::NoPreviousRelease,
            ErrorCode::CanaryNotConfigured,
            ErrorCode::NoCanary,
            ErrorCode::NothingLive,
            ErrorCode::CommandRunning,
            ErrorCode::TooManyStreams,
            ErrorCode::StoreFull,
            ErrorCode::AuditUnavailable,
            ErrorCode::Internal,
            ErrorCode::Unavailable,
            ErrorCode::Timeout,
            ErrorCode::Overloaded,
        ] {
            let wire = serde_json::to_string(&code).unwrap();
            assert_eq!(wire, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&wire).unwrap(), code);
        }
        let newer: ErrorBody =
            serde_json::from_str(r#"{"code":"quota_exceeded","message":"m"}"#).unwrap();
        assert_eq!(newer.code, ErrorCode::Unknown);
    }
}
