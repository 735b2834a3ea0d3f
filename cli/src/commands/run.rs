//! `deployctl run -- <command...>`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use deployd_proto::{RunEvent, RunRequest};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;

use super::Ctx;
use crate::exit::{CliError, Exit};

/// Run a one-off command (`python manage.py ...`) in a new container of
/// the live release: a service's environment, network and volumes, no
/// traffic. Its output comes back as it is printed; deployctl exits with
/// its exit code. Ctrl-C stops it (the container is removed). Needs the
/// `run` scope.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  deployctl run -- python manage.py clearsessions\n  \
    deployctl run --service worker --timeout 2h -- python manage.py rebuild_index\n  \
    deployctl run -- python manage.py createsuperuser --noinput --username ops --email ops@example.com\n\n\
    Exit codes: the command's own once it ran (deployctl's codes when it could not: 1 when it\n\
    timed out or the engine failed, 6 refused, 7 another command runs, ...).\n\
    Not interactive: no terminal is attached (manage.py shell reads its input from\n\
    nowhere); use -c or a management command."
)]
pub struct Run {
    /// The service whose environment and settings the container gets.
    /// Default: web.
    #[arg(long)]
    service: Option<String>,
    /// Stop the command after this long (counted a failure). At most 24h.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    timeout: Duration,
    /// Run even while another command of the app runs (at most 4 at once).
    #[arg(long)]
    concurrent: bool,
    /// The command and its arguments, after `--` (no shell: wrap it in
    /// `sh -c '...'` for one).
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

impl Run {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode, CliError> {
        let app = ctx.client.settings().app()?.to_owned();
        let request = RunRequest {
            command: self.command,
            service: self.service,
            timeout_secs: Some(self.timeout.as_secs().max(1)),
            concurrent: self.concurrent,
        };
        let response = ctx
            .client
            .post_stream(&format!("/v1/apps/{app}/runs"), &request)
            .await?;
        let mut events = response.bytes_stream().eventsource();
        while let Some(item) = events.next().await {
            let item = item.map_err(|e| {
                CliError::new(
                    Exit::Unreachable,
                    format!("the command's output stream broke: {e}"),
                )
                .hint("the command was stopped when the stream broke; check the audit log")
            })?;
            let Ok(event) = serde_json::from_str::<RunEvent>(&item.data) else {
                continue;
            };
            if ctx.json {
                ctx.out_json(&event)?;
            }
            match event {
                RunEvent::Started {
                    container,
                    service,
                    sha,
                } => ctx.note(&format!(
                    "running in {container} (release {}, {service}'s environment)",
                    deployd_proto::short_sha(sha.as_str())
                )),
                RunEvent::Output { line } => {
                    if !ctx.json {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "{line}");
                    }
                }
                RunEvent::Exited { code } => {
                    if code != 0 {
                        ctx.note(&format!("exited with {code}"));
                    }
                    // Codes past 255 wrap as a shell would see them.
                    return Ok(ExitCode::from((code & 0xff) as u8));
                }
                RunEvent::Failed { error } => {
                    return Err(CliError::new(Exit::Other, error));
                }
            }
        }
        Err(CliError::new(
            Exit::Unreachable,
            "the command's output stream ended before its exit code",
        )
        .hint("the command was stopped when the stream broke; check the audit log"))
    }
}
