//! `deployctl run`: a one-off command in a container of the live release,
//! its output streamed back as it comes.

use serde::{Deserialize, Serialize};

/// Longest a command may be given to run.
pub const MAX_RUN_SECS: u64 = 24 * 3600;
/// How long a command runs when no timeout is given.
pub const DEFAULT_RUN_SECS: u64 = 3600;
/// Longest command line accepted, all arguments together, in bytes.
pub const MAX_COMMAND_BYTES: usize = 8 * 1024;

/// `POST /v1/apps/{app}/runs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The command and its arguments, as exec takes them (no shell).
    pub command: Vec<String>,
    /// The service whose environment the container gets. Default: `web`,
    /// else the first service.
    #[serde(default)]
    pub service: Option<String>,
    /// Stopped (and counted a failure) after this long. Default: an hour.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Run even while another command of the app runs.
    #[serde(default)]
    pub concurrent: bool,
}

/// What a run says, one Server-Sent Event each, `started` first and
/// `exited` or `failed` last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RunEvent {
    /// The container was created from the live release.
    Started {
        container: String,
        service: String,
        sha: crate::CommitSha,
    },
    /// A line of its output (stdout and stderr together).
    Output { line: String },
    /// It ended with this exit code.
    Exited { code: i64 },
    /// It could not run to its end (timed out, the engine failed); the
    /// container was removed.
    Failed { error: String },
}

impl RunEvent {
    /// Its `kind` on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Started { .. } => "started",
            Self::Output { .. } => "output",
            Self::Exited { .. } => "exited",
            Self::Failed { .. } => "failed",
        }
    }
}
