//! Exit codes, and the one error type commands return: a sentence, a hint,
//! and the code the process exits with.

use std::fmt;
use std::process::ExitCode;

/// What `deployctl` exits with. Stable: CI scripts branch on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The deployment (or command) succeeded.
    Success = 0,
    /// Anything not listed below (the agent failed, an unknown app, ...).
    Other = 1,
    /// Bad arguments or settings (clap's own code).
    Usage = 2,
    /// The deployment failed before anything running was changed.
    Failed = 3,
    /// The deployment failed and the previous release runs again.
    RolledBack = 4,
    /// The deployment failed and so did restoring the previous release.
    RollbackFailed = 5,
    /// The token was refused (401) or may not do this (403).
    Auth = 6,
    /// Another deployment runs (409), or the app is locked (423).
    Conflict = 7,
    /// The agent could not be reached (connection, TLS, timeout).
    Unreachable = 8,
    /// The agent stopped while the deployment ran; it was reconciled at
    /// its restart.
    Interrupted = 9,
    /// Following was stopped with Ctrl-C; the deployment goes on.
    Stopped = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// The table `--help` prints.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    succeeded
  1    other error (the agent failed, unknown app or deployment, ...)
  2    usage: bad arguments or settings
  3    the deployment failed before anything running was changed (but a
       singleton taken out of the config, removed first: its message says);
       plan: the app would refuse the release's migrations
  4    the deployment failed and was rolled back: the previous release runs
  5    the deployment failed and so did its rollback: see its error
  6    authentication or authorization refused (401, 403)
  7    another deployment runs (409), or the app is locked (423)
  8    the agent could not be reached (connection, TLS, timeout)
  9    the agent stopped during the deployment (interrupted, reconciled)
  130  Ctrl-C stopped following; the deployment goes on";

/// A failed command: one line for humans, maybe a hint, and its exit code.
#[derive(Debug)]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
    pub hint: Option<String>,
    /// For a conflict: the deployment that runs.
    pub running: Option<String>,
}

impl CliError {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self {
            exit,
            message: message.into(),
            hint: None,
            running: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Exit::Usage, message)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}
