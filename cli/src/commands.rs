//! One module per subcommand: its arguments and what it does.

pub mod canary;
pub mod completions;
pub mod deploy;
pub mod fleet;
pub mod history;
pub mod keygen;
pub mod lock;
pub mod logs;
pub mod plan;
pub mod rollback;
pub mod run;
pub mod status;
pub mod whoami;

use std::io::Write;

use crate::client::Client;
use crate::exit::{CliError, Exit};

/// What every command gets.
#[derive(Debug)]
pub struct Ctx {
    pub client: Client,
    /// `--json`: machine-readable output only.
    pub json: bool,
}

impl Ctx {
    /// A client of the agent the settings name.
    pub fn new(global: &crate::settings::Global, json: bool) -> Result<Self, CliError> {
        Ok(Self {
            client: Client::new(global.resolve()?)?,
            json,
        })
    }

    /// Prints a line on stdout.
    pub fn out(&self, line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
    }

    /// Prints a value as one line of JSON on stdout.
    pub fn out_json<T: serde::Serialize>(&self, value: &T) -> Result<Exit, CliError> {
        let line = serde_json::to_string(value)
            .map_err(|e| CliError::new(Exit::Other, format!("cannot print JSON: {e}")))?;
        self.out(&line);
        Ok(Exit::Success)
    }

    /// Prints progress for humans on stderr (never with `--json`).
    pub fn note(&self, line: &str) {
        if !self.json {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
        }
    }
}

/// Short form of a deployment id (its random tail) for tables.
pub fn short_id(id: &str) -> &str {
    &id[id.len().saturating_sub(12)..]
}
