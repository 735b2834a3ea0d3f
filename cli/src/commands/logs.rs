//! `deployctl logs <deployment-id> [--follow]` and
//! `deployctl logs --service web [--follow] [--since 10m] [--tail N]`.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use deployd_proto::{Delivery, Deployment, LogEvent};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;

use super::Ctx;
use crate::exit::{CliError, Exit};
use crate::follow::{Style, follow};

/// A deployment's log: every step with its timing, task output, the
/// outcome. With --follow, until it ends, exiting with its outcome's code.
///
/// With --service instead of a deployment: the app's own output, from
/// every running container of that service, each line after its
/// container's name. With --follow it goes on across deploys: a deploy's
/// new containers join, the old ones leave. Needs the `logs` scope.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  deployctl logs 019abc...def\n  \
    deployctl logs 019abc...def --follow --json\n  \
    deployctl logs --service web --since 10m\n  \
    deployctl logs --service worker --follow --tail 20")]
pub struct Logs {
    /// The deployment id (`deployctl history` lists them).
    #[arg(required_unless_present = "service", conflicts_with = "service")]
    pub id: Option<String>,
    /// Keep following: until the deployment ends; or, for a service, until
    /// Ctrl-C.
    #[arg(long, short)]
    pub follow: bool,
    /// The app's own logs, from this service's containers (web, worker,
    /// beat, ...).
    #[arg(long)]
    pub service: Option<String>,
    /// With --service: only lines of the last this long (10m, 2h).
    #[arg(long, value_parser = humantime::parse_duration, requires = "service")]
    pub since: Option<Duration>,
    /// With --service: only the last N lines of each container (default
    /// 100 without --since).
    #[arg(long, requires = "service")]
    pub tail: Option<usize>,
}

/// How each webhook the deployment set off went, after its log.
async fn show_deliveries(ctx: &Ctx, id: &str) {
    let path = format!("/v1/deployments/{id}/notifications");
    let Ok(deliveries) = ctx.client.get::<Vec<Delivery>>(&path).await else {
        return;
    };
    for d in deliveries {
        let attempts = match d.attempts {
            1 => String::new(),
            n => format!(", {n} attempts"),
        };
        ctx.out(&format!(
            "notify | {}: {} {} ({}{attempts})",
            d.hook,
            d.event,
            d.state.as_str(),
            d.detail
        ));
    }
}

impl Logs {
    pub async fn run(self, ctx: &Ctx) -> Result<Exit, CliError> {
        let Some(id) = self.id.clone() else {
            return self.service_logs(ctx).await;
        };
        let style = Style::pick(ctx.json);
        let current: Deployment = ctx.client.get(&format!("/v1/deployments/{id}")).await?;
        let exit = if !self.follow && !current.state.is_terminal() {
            // What is recorded so far, then return.
            crate::follow::replay(&ctx.client, &id, style).await?;
            Exit::Success
        } else if self.follow {
            super::deploy::follow_until_interrupted(ctx, &id, style).await?
        } else {
            follow(&ctx.client, &id, style).await?;
            Exit::Success
        };
        if !ctx.json {
            show_deliveries(ctx, &id).await;
        }
        Ok(exit)
    }

    async fn service_logs(self, ctx: &Ctx) -> Result<Exit, CliError> {
        let app = ctx.client.settings().app()?.to_owned();
        let mut query = vec![format!("follow={}", self.follow)];
        if let Some(service) = &self.service {
            query.push(format!("service={service}"));
        }
        if let Some(since) = self.since {
            query.push(format!("since_secs={}", since.as_secs().max(1)));
        }
        if let Some(tail) = self.tail {
            query.push(format!("tail={tail}"));
        }
        let path = format!("/v1/apps/{app}/logs?{}", query.join("&"));
        let response = ctx.client.get_stream(&path).await?;
        let mut events = response.bytes_stream().eventsource();
        let reading = async {
            while let Some(item) = events.next().await {
                let item = item.map_err(|e| {
                    CliError::new(Exit::Unreachable, format!("the log stream broke: {e}"))
                })?;
                let Ok(event) = serde_json::from_str::<LogEvent>(&item.data) else {
                    continue;
                };
                if ctx.json {
                    ctx.out_json(&event)?;
                    continue;
                }
                match event {
                    LogEvent::Joined { container, sha } => {
                        let release = sha.map_or_else(String::new, |s| {
                            format!(" (release {})", deployd_proto::short_sha(s.as_str()))
                        });
                        ctx.note(&format!("-- {container} joined{release}"));
                    }
                    LogEvent::Line {
                        container, line, ..
                    } => {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "{container} | {line}");
                    }
                    LogEvent::Left { container } => ctx.note(&format!("-- {container} left")),
                }
            }
            Ok::<_, CliError>(())
        };
        tokio::select! {
            read = reading => read.map(|()| Exit::Success),
            _ = tokio::signal::ctrl_c() => Ok(Exit::Success),
        }
    }
}
