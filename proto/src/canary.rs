//! Canary deployments: what the switch measured of the new release and of
//! the running one, side by side, and what was decided from it.

use serde::{Deserialize, Serialize};

use crate::CommitSha;

/// A turn in a canary deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CanaryDecision {
    /// The new release gets a step's share of clients.
    Step,
    /// A step goes on: its figures so far (every 10 s), and whether they
    /// would pass now. Nothing is decided.
    Progress,
    /// A step's figures met the bar: on to the next.
    Passed,
    /// The new release gets every client: by its figures, or by hand
    /// (`deployctl promote`).
    Promoted,
    /// The new release's share went to 0 at once and its containers
    /// drain and stop: by its figures, or by hand (`deployctl abort`).
    Aborted,
}

impl CanaryDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Step => "step",
            Self::Progress => "progress",
            Self::Passed => "passed",
            Self::Promoted => "promoted",
            Self::Aborted => "aborted",
        }
    }
}

/// One release's traffic through the switch in a window of a canary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReleaseWindow {
    pub sha: CommitSha,
    /// Requests answered.
    pub requests: u64,
    /// Answers with a 5xx status, the switch's own 502 and 504 included.
    pub errors: u64,
    /// Requests whose client left before the answer.
    pub abandoned: u64,
    /// Latency at the switch, from the request being whole to the answer's
    /// head, when there were answers.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
}

impl ReleaseWindow {
    /// The share of answers that were errors; `None` with no answers.
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }
}

/// Both releases' traffic over the same window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CanaryWindow {
    /// How long the window lasted.
    pub seconds: f64,
    /// The release being deployed.
    pub canary: ReleaseWindow,
    /// The release that ran before.
    pub stable: ReleaseWindow,
}

/// `POST /v1/apps/{app}/canary/promote` and `/canary/abort`: decide a
/// running canary by hand.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CanaryOrder {
    /// Why, for the deployment's record and the audit log (at most 500
    /// characters).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 500))]
    pub reason: Option<String>,
}
