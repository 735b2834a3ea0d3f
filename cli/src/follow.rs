//! Following a deployment's events until it ends, in one of three styles;
//! a dropped stream is resumed where it stopped (`Last-Event-ID`), so no
//! event is lost or shown twice.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::time::{Duration, Instant};

use deployd_proto::{
    CanaryDecision, Deployment, DeploymentEvent, DeploymentKind, DeploymentState, EventKind,
    StepState,
};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::client::Client;
use crate::exit::{CliError, Exit};

/// How events are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A terminal: a line per step with a spinner and elapsed time.
    Live,
    /// CI logs: one timestamped line per event.
    Plain,
    /// One JSON event per line (the API's `DeploymentEvent`).
    Json,
}

impl Style {
    /// Live on a terminal (the view draws on stderr, so both must be
    /// one), plain otherwise, JSON when asked.
    pub fn pick(json: bool) -> Self {
        use std::io::IsTerminal;
        if json {
            Self::Json
        } else if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            Self::Live
        } else {
            Self::Plain
        }
    }
}

/// Longest the agent may stay unreachable while following.
const RECONNECT_FOR: Duration = Duration::from_secs(120);
/// Streams that may end in a row without a new event before giving up.
const EMPTY_STREAMS: u32 = 20;
/// Lines of a failed task shown at the end.
const TAIL_LINES: usize = 10;

/// Follows deployment `id` until its final state, and returns it.
pub async fn follow(client: &Client, id: &str, style: Style) -> Result<DeploymentState, CliError> {
    follow_host(client, id, style, None).await
}

/// One host's deployment in a fleet: plain lines start with the host's
/// name, JSON events carry a `host` field, and on a terminal the host is a
/// row of the fleet's table (its step and state) instead of a log.
#[derive(Debug, Clone)]
pub struct HostView {
    pub host: String,
    /// The host's row of the live table (live style only).
    pub row: Option<ProgressBar>,
    /// Shown in the row before the step (`wave 2`).
    pub wave: String,
    /// Told when the part has run the fleet's `once` release tasks (or,
    /// from an agent that does not say so, when it starts rolling).
    pub once_done: Option<std::sync::Arc<tokio::sync::Notify>>,
}

/// Like [`follow`], for one host of a fleet.
pub async fn follow_host(
    client: &Client,
    id: &str,
    style: Style,
    host: Option<HostView>,
) -> Result<DeploymentState, CliError> {
    let mut view = View::new(style);
    view.host = host;
    let mut last = 0;
    let mut end: Option<(DeploymentState, Option<String>)> = None;
    let mut down_since: Option<Instant> = None;
    let mut empty_streams = 0;
    let mut delay = Duration::from_millis(250);
    'streams: loop {
        match client.events(id, last, true).await {
            Ok(None) => break,
            Ok(Some(response)) => {
                down_since = None;
                let before = last;
                let mut events = response.bytes_stream().eventsource();
                while let Some(item) = events.next().await {
                    let Ok(item) = item else { break };
                    let Ok(event) = serde_json::from_str::<DeploymentEvent>(&item.data) else {
                        continue;
                    };
                    if event.seq <= last {
                        continue;
                    }
                    last = event.seq;
                    view.show(&event);
                    if let EventKind::State { state, error } = &event.kind
                        && state.is_terminal()
                    {
                        end = Some((*state, error.clone()));
                        break 'streams;
                    }
                }
                if last > before {
                    empty_streams = 0;
                    delay = Duration::from_millis(250);
                } else {
                    empty_streams += 1;
                    if empty_streams >= EMPTY_STREAMS {
                        return Err(CliError::new(
                            Exit::Other,
                            "the agent keeps ending the event stream without news",
                        )
                        .hint(format!(
                            "its log may say why; deployctl logs {id} shows what is recorded"
                        )));
                    }
                }
            }
            Err(e) if e.exit == Exit::Unreachable => {
                let since = *down_since.get_or_insert_with(Instant::now);
                if since.elapsed() > RECONNECT_FOR {
                    return Err(e.hint(format!(
                        "the deployment goes on without us; follow it again: deployctl logs {id} --follow"
                    )));
                }
                view.note(&format!("{}; reconnecting", e.message));
            }
            Err(e) => return Err(e),
        }
        // The stream ended early (the agent restarted, a proxy cut it).
        view.note(&format!(
            "event stream interrupted; resuming after event {last}"
        ));
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    view.done();
    // The record adds the migrations and the steps; the outcome is known
    // from the final event even if the record cannot be read (an expired
    // job token, say).
    let deployment: Option<Deployment> = client.get(&format!("/v1/deployments/{id}")).await.ok();
    let (state, error) = match (&end, &deployment) {
        (Some(end), _) => end.clone(),
        (None, Some(d)) => (d.state, d.error.clone()),
        (None, None) => {
            return Err(CliError::new(
                Exit::Other,
                format!("deployment {id} ended, but its outcome could not be read"),
            )
            .hint(format!("deployctl logs {id}")));
        }
    };
    view.summary(id, state, error.as_deref(), deployment.as_ref());
    Ok(state)
}

/// Prints the events recorded so far, without waiting for more.
pub async fn replay(client: &Client, id: &str, style: Style) -> Result<(), CliError> {
    let mut view = View::new(style);
    if let Some(response) = client.events(id, 0, false).await? {
        let mut events = response.bytes_stream().eventsource();
        while let Some(Ok(item)) = events.next().await {
            if let Ok(event) = serde_json::from_str::<DeploymentEvent>(&item.data) {
                view.show(&event);
            }
        }
    }
    view.done();
    Ok(())
}

/// The exit code a deployment's final state stands for.
pub fn exit_of(state: DeploymentState) -> Exit {
    match state {
        DeploymentState::Succeeded => Exit::Success,
        DeploymentState::Failed => Exit::Failed,
        DeploymentState::RolledBack => Exit::RolledBack,
        DeploymentState::RollbackFailed => Exit::RollbackFailed,
        DeploymentState::Interrupted => Exit::Interrupted,
        DeploymentState::Queued | DeploymentState::Running => Exit::Other,
    }
}

struct View {
    style: Style,
    host: Option<HostView>,
    bars: MultiProgress,
    steps: HashMap<String, ProgressBar>,
    /// The last lines each task printed, for a failure's account.
    tails: HashMap<String, VecDeque<String>>,
    failed_step: Option<String>,
}

impl View {
    fn new(style: Style) -> Self {
        Self {
            style,
            host: None,
            bars: MultiProgress::new(),
            steps: HashMap::new(),
            tails: HashMap::new(),
            failed_step: None,
        }
    }

    fn print(&self, line: &str) {
        match (self.style, &self.host) {
            (Style::Live, Some(host)) => {
                if let Some(row) = &host.row {
                    row.println(format!("{}  {line}", host.host));
                }
            }
            (Style::Live, None) => {
                let _ = self.bars.println(line);
            }
            (Style::Plain, Some(host)) => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}  {line}", host.host);
            }
            _ => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
            }
        }
    }

    /// A host's row of the fleet's live table: its step or state.
    fn set_row(&self, what: &str) {
        if let Some(HostView {
            host,
            row: Some(row),
            wave,
            ..
        }) = &self.host
        {
            row.set_message(format!("{host:<20} {wave:<8} {what}"));
        }
    }

    /// Progress about the stream itself, on stderr (stdout stays the log).
    fn note(&self, text: &str) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{text}");
    }

    fn show(&mut self, event: &DeploymentEvent) {
        if let EventKind::Output { step, line } = &event.kind {
            let tail = self.tails.entry(step.clone()).or_default();
            tail.push_back(line.clone());
            if tail.len() > TAIL_LINES {
                tail.pop_front();
            }
        }
        if let EventKind::StepFinished {
            step,
            state: StepState::Failed,
            ..
        } = &event.kind
        {
            self.failed_step.get_or_insert_with(|| step.clone());
        }
        let once_done = match &event.kind {
            EventKind::OnceTasksDone => true,
            EventKind::StepStarted { step } => step.starts_with("roll:"),
            _ => false,
        };
        if once_done && let Some(notify) = self.host.as_ref().and_then(|h| h.once_done.as_ref()) {
            notify.notify_one();
        }
        match self.style {
            Style::Json => {
                let mut value = serde_json::to_value(event).unwrap_or_default();
                if let (Some(host), Some(fields)) = (&self.host, value.as_object_mut()) {
                    fields.insert("host".into(), host.host.clone().into());
                }
                self.print(&value.to_string());
            }
            Style::Plain => {
                let at = event
                    .at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                self.print(&format!("{at}  {}", describe(&event.kind)));
            }
            Style::Live if self.host.is_some() => match &event.kind {
                EventKind::StepStarted { step } => self.set_row(step),
                EventKind::State { state, .. } => self.set_row(state.as_str()),
                EventKind::StepFinished { .. }
                | EventKind::Output { .. }
                | EventKind::Canary { .. }
                | EventKind::OnceTasksDone => {}
            },
            Style::Live => self.show_live(&event.kind),
        }
    }

    fn show_live(&mut self, kind: &EventKind) {
        match kind {
            EventKind::StepStarted { step } => {
                let bar = self.bars.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {msg} {elapsed:.dim}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_message(step.clone());
                bar.enable_steady_tick(Duration::from_millis(120));
                self.steps.insert(step.clone(), bar);
            }
            EventKind::StepFinished { step, .. } => {
                let line = describe(kind);
                match self.steps.remove(step) {
                    Some(bar) => {
                        bar.set_style(
                            ProgressStyle::with_template("{msg}")
                                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                        );
                        bar.finish_with_message(line);
                    }
                    None => self.print(&line),
                }
            }
            EventKind::Output { step, line } => self.print(&format!("    {step} | {line}")),
            EventKind::Canary { .. } => self.print(&format!("    {}", describe(kind))),
            EventKind::OnceTasksDone | EventKind::State { .. } => self.print(&describe(kind)),
        }
    }

    fn done(&mut self) {
        for (_, bar) in self.steps.drain() {
            bar.finish_and_clear();
        }
    }

    /// After the end: why it failed, with the failing task's last lines;
    /// the migrations it applied; for a rollback, those that stay applied.
    fn summary(
        &self,
        id: &str,
        state: DeploymentState,
        error: Option<&str>,
        d: Option<&Deployment>,
    ) {
        if self.style == Style::Json {
            return;
        }
        let mut lines = summary_lines(id, state, error, d);
        if state != DeploymentState::Succeeded
            && let Some(step) = &self.failed_step
            && let Some(tail) = self.tails.get(step)
        {
            lines.push(format!("last lines of {step}:"));
            lines.extend(tail.iter().map(|line| format!("  {line}")));
        }
        let prefix = self
            .host
            .as_ref()
            .map(|h| format!("{}  ", h.host))
            .unwrap_or_default();
        let row = self.host.as_ref().and_then(|h| h.row.as_ref());
        let mut err = std::io::stderr().lock();
        for line in lines {
            match row {
                Some(row) => row.println(format!("{prefix}{line}")),
                None => {
                    let _ = writeln!(err, "{prefix}{line}");
                }
            }
        }
    }
}

/// The closing lines of a deployment's log, from its outcome and record.
fn summary_lines(
    id: &str,
    state: DeploymentState,
    error: Option<&str>,
    d: Option<&Deployment>,
) -> Vec<String> {
    let mut lines = Vec::new();
    if state != DeploymentState::Succeeded {
        lines.push(format!(
            "deployment {id} {}: {}",
            state.as_str(),
            error.unwrap_or("no reason recorded")
        ));
    }
    let Some(d) = d else { return lines };
    // A failure's message names them already.
    let named = error.is_some_and(|e| d.migrations.iter().all(|m| e.contains(m.as_str())));
    if !d.migrations.is_empty() && !named {
        lines.push(format!("migrations applied: {}", d.migrations.join(", ")));
    } else if d.migrations.is_empty() && state == DeploymentState::Succeeded {
        lines.push("migrations applied: none".to_owned());
    }
    if d.kind == DeploymentKind::Rollback && !d.migrations_kept.is_empty() {
        lines.push(format!(
            "migrations applied since {} last ran, which stay applied: {}",
            d.sha.short(),
            d.migrations_kept.join(", ")
        ));
    }
    lines
}

fn seconds(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// One event as a line of text.
pub fn describe(kind: &EventKind) -> String {
    match kind {
        EventKind::StepStarted { step } => format!("{step} started"),
        EventKind::StepFinished {
            step,
            state,
            duration_ms,
            detail,
        } => match (state, detail) {
            (StepState::Failed, Some(detail)) => {
                format!("✘ {step} failed after {}: {detail}", seconds(*duration_ms))
            }
            (StepState::Failed, None) => format!("✘ {step} failed after {}", seconds(*duration_ms)),
            _ => format!("✔ {step} ({})", seconds(*duration_ms)),
        },
        EventKind::Output { step, line } => format!("{step} | {line}"),
        EventKind::OnceTasksDone => "once tasks done: the fleet's other hosts may start".into(),
        EventKind::Canary {
            step,
            decision,
            by,
            why,
            ..
        } => match decision {
            CanaryDecision::Step | CanaryDecision::Progress => format!("canary | {why}"),
            CanaryDecision::Passed => format!("canary | step {step} passed: {why}"),
            CanaryDecision::Promoted => format!("canary | promoted by {by}: {why}"),
            CanaryDecision::Aborted => format!("canary | aborted by {by}: {why}"),
        },
        EventKind::State { state, error } => match error {
            Some(error) => format!("deployment {state}: {error}"),
            None => format!("deployment {state}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_final_state_has_its_exit_code() {
        let codes: Vec<u8> = [
            DeploymentState::Succeeded,
            DeploymentState::Failed,
            DeploymentState::RolledBack,
            DeploymentState::RollbackFailed,
            DeploymentState::Interrupted,
        ]
        .into_iter()
        .map(|s| exit_of(s) as u8)
        .collect();
        assert_eq!(codes, [0, 3, 4, 5, 9]);
    }
}
