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
/// every running container of that service (on a Swarm: every running
/// task, on any node), each line after its container's (or task's and
/// node's) name. With --follow it goes on across deploys: a deploy's
/// new containers join, the old ones leave (on a Swarm, a replaced task's
/// lines stop without a word that it left). Needs the `logs` scope.
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
        tokio::select! {
            read = self.read_service_logs(ctx) => read.map(|()| Exit::Success),
            _ = tokio::signal::ctrl_c() => Ok(Exit::Success),
        }
    }

    /// Reads the service's lines; followed, goes on in a new stream (with
    /// a new token) each time the agent ends one at its token's expiry,
    /// from the last line seen, dropping the lines seen already.
    async fn read_service_logs(&self, ctx: &Ctx) -> Result<(), CliError> {
        let app = ctx.client.settings().app()?.to_owned();
        let mut seen = Seen::default();
        let mut first = true;
        loop {
            let mut query = vec![format!("follow={}", self.follow)];
            if let Some(service) = &self.service {
                query.push(format!("service={service}"));
            }
            if first {
                if let Some(since) = self.since {
                    query.push(format!("since_secs={}", since.as_secs().max(1)));
                }
                if let Some(tail) = self.tail {
                    query.push(format!("tail={tail}"));
                }
            } else {
                query.push(format!("since_secs={}", seen.since_secs()));
            }
            seen.opened();
            let path = format!("/v1/apps/{app}/logs?{}", query.join("&"));
            let response = ctx.client.get_stream(&path).await?;
            let mut events = response.bytes_stream().eventsource();
            while let Some(item) = events.next().await {
                let item = match item {
                    Ok(item) => item,
                    // Followed: a new stream picks up where this one broke.
                    Err(_) if self.follow => break,
                    Err(e) => {
                        return Err(CliError::new(
                            Exit::Unreachable,
                            format!("the log stream broke: {e}"),
                        ));
                    }
                };
                let Ok(event) = serde_json::from_str::<LogEvent>(&item.data) else {
                    continue;
                };
                if !seen.is_new(&event) {
                    continue;
                }
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
            if !self.follow {
                return Ok(());
            }
            first = false;
            // Not a tight loop against an agent that ends streams at once.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// What a followed log showed, so that the next stream (which starts a
/// little before the last line, whole seconds being all `since_secs`
/// takes) repeats nothing.
#[derive(Debug, Default)]
struct Seen {
    /// Containers joined and not left.
    containers: std::collections::HashSet<String>,
    /// The time of the last line, or of the last stream's opening.
    last: Option<time::OffsetDateTime>,
    /// The lines at `last` or within two seconds before it.
    recent: Vec<(String, time::OffsetDateTime, String)>,
}

impl Seen {
    fn opened(&mut self) {
        if self.last.is_none() {
            self.last = Some(time::OffsetDateTime::now_utc());
        }
    }

    /// Seconds back to a little before the last line.
    fn since_secs(&self) -> i64 {
        let last = self.last.unwrap_or_else(time::OffsetDateTime::now_utc);
        (time::OffsetDateTime::now_utc() - last)
            .whole_seconds()
            .max(0)
            + 2
    }

    /// Whether `event` was not shown yet; remembers it.
    fn is_new(&mut self, event: &LogEvent) -> bool {
        match event {
            LogEvent::Joined { container, .. } => self.containers.insert(container.clone()),
            LogEvent::Left { container } => self.containers.remove(container),
            LogEvent::Line {
                container,
                at,
                line,
            } => {
                let key = (container.clone(), *at, line.clone());
                if self.recent.contains(&key) {
                    return false;
                }
                let last = self.last.map_or(*at, |l| l.max(*at));
                self.last = Some(last);
                let window = time::Duration::seconds(3);
                self.recent.retain(|(_, t, _)| last - *t <= window);
                self.recent.push(key);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_new_stream_repeats_no_line_nor_join() {
        let at = time::OffsetDateTime::now_utc();
        let line = |n: i64, text: &str| LogEvent::Line {
            container: "web-0".into(),
            at: at + time::Duration::milliseconds(n),
            line: text.into(),
        };
        let joined = LogEvent::Joined {
            container: "web-0".into(),
            sha: None,
        };
        let mut seen = Seen::default();
        seen.opened();
        assert!(seen.is_new(&joined));
        assert!(seen.is_new(&line(0, "a")) && seen.is_new(&line(500, "b")));
        // The next stream, from a little before: the same again, then more.
        assert!(seen.since_secs() >= 2);
        assert!(!seen.is_new(&joined));
        assert!(!seen.is_new(&line(0, "a")) && !seen.is_new(&line(500, "b")));
        assert!(seen.is_new(&line(500, "b twice at the same instant")));
        assert!(seen.is_new(&line(900, "c")));
    }
}
