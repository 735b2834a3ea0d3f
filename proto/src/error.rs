//! The one error shape every failing API call answers with.

use serde::{Deserialize, Serialize};

/// Body of every non-2xx API response.
///
/// `code` is a stable, machine-readable `snake_case` identifier that clients
/// may match on; `message` is a sentence for humans and may change wording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// Stable identifier of the error kind, e.g. `invalid_sha`.
    pub code: String,
    /// Human-readable explanation; never contains secrets.
    pub message: String,
    /// The deployment the error is about: for `conflict`, the one running.
    /// Older agents never send it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
}

impl ErrorBody {
    /// Builds an error body from a code and a message.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            deployment: None,
        }
    }
}
