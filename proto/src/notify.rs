//! What became of the webhooks a deployment set off (`[[apps.NAME.notify]]`).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// One event told (or being told) to one hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Delivery {
    /// The hook: `notify[0] hooks.example.com` (its place in the config and
    /// its host; never its URL, which may hold a secret).
    pub hook: String,
    /// started, succeeded, failed, rolled_back, rollback_failed,
    /// interrupted.
    pub event: String,
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    /// The last attempt's result: `HTTP 200`, `HTTP 500`, `no answer within
    /// 10 s`, ...
    pub detail: String,
    /// When that attempt ended.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub at: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not delivered yet; retried with backoff.
    Retrying,
    Delivered,
    /// Given up: refused (a 4xx), or no success within the retry time.
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retrying => "retrying",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }
}
