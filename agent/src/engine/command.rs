//! `deployctl run`: a one-off command (`manage.py createsuperuser`, a data
//! fix) in a container of the live release, with a service's environment,
//! network and volumes but none of its traffic. Its output streams back to
//! the caller as it comes; when the caller leaves (Ctrl-C), the container
//! is removed. One command at a time per app unless asked otherwise; every
//! one recorded in the audit log with its exit code.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deployd_proto::{CommitSha, RunEvent, RunRequest};
use tokio::sync::mpsc;

use super::{EngineError, EngineHandle, label};
use crate::config::AppConfig;
use crate::docker::{ContainerSpec, Docker, DockerError};
use crate::env_file::AppEnv;
use crate::store::AuditRecord;

/// Commands of one app running at once, `concurrent` ones included.
const MAX_RUNNING: usize = 4;

/// A command that runs: what it runs in, and what it says.
#[derive(Debug)]
pub struct CommandRun {
    pub sha: CommitSha,
    pub service: String,
    pub container: String,
    /// `started` first, `exited` or `failed` last. Dropping it stops the
    /// command.
    pub events: mpsc::Receiver<RunEvent>,
}

/// Who runs what, per app.
#[derive(Debug, Default)]
pub(crate) struct Commands(Arc<Mutex<HashMap<String, Vec<Running>>>>);

#[derive(Debug, Clone)]
struct Running {
    container: String,
    by: String,
    command: String,
}

/// A place among an app's running commands, given up when dropped.
struct Slot {
    all: Arc<Mutex<HashMap<String, Vec<Running>>>>,
    app: String,
    container: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut all = crate::sync::lock(&self.all);
        if let Some(running) = all.get_mut(&self.app) {
            running.retain(|r| r.container != self.container);
        }
    }
}

impl Commands {
    /// A place for `running`, unless another command runs and this one is
    /// not `concurrent`, or too many run.
    fn take(&self, app: &str, running: Running, concurrent: bool) -> Result<Slot, EngineError> {
        let mut all = crate::sync::lock(&self.0);
        let list = all.entry(app.to_owned()).or_default();
        let busy = match list.first() {
            Some(first) if !concurrent || list.len() >= MAX_RUNNING => Some(first.clone()),
            _ => None,
        };
        if let Some(other) = busy {
            let advice = if concurrent {
                "that is the most at once: wait for one to end"
            } else {
                "wait for it, or run beside it (concurrent)"
            };
            return Err(EngineError::CommandRunning {
                app: app.to_owned(),
                by: other.by,
                command: other.command,
                running: list.len(),
                advice,
            });
        }
        let container = running.container.clone();
        list.push(running);
        Ok(Slot {
            all: self.0.clone(),
            app: app.to_owned(),
            container,
        })
    }
}

/// The service named, which must be one of the app's; else `web`, else
/// the first.
pub(super) fn service_of(
    app: &str,
    cfg: &AppConfig,
    named: Option<&str>,
) -> Result<String, EngineError> {
    match named {
        Some(s) if cfg.services.contains_key(s) => Ok(s.to_owned()),
        Some(s) => {
            let known: Vec<&str> = cfg.services.keys().map(String::as_str).collect();
            Err(EngineError::UnknownService(format!(
                "{app} has no service {s} (it has {})",
                known.join(", ")
            )))
        }
        None if cfg.services.contains_key("web") => Ok("web".to_owned()),
        None => Ok(cfg.services.keys().next().cloned().unwrap_or_default()),
    }
}

/// A command line as a shell would take it back: arguments with spaces or
/// quotes single-quoted. For the audit log and messages.
pub fn shell_words(command: &[String]) -> String {
    let plain = |a: &str| {
        !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c))
    };
    command
        .iter()
        .map(|a| {
            if plain(a) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl super::Ctx {
    /// Commands a stop or crash cut off (their callers went with the
    /// process): their containers removed, their end recorded.
    pub(super) async fn end_leftover_commands(&self, apps: impl Iterator<Item = &String>) {
        for c in self.remove_oneoff_leftovers(apps, "run").await {
            let mut record = AuditRecord::new("run_finished", "interrupted");
            record.subject = Some("deployd".into());
            record.app = c.labels.get(label::APP).cloned();
            record.sha = c.labels.get(label::SHA).cloned();
            record.digest = c.labels.get(label::DIGEST).cloned();
            record.detail = Some(format!(
                "{}: deployd stopped while it ran; removed at the next start",
                c.name
            ));
            if let Err(e) = self.store.append_audit(&record) {
                tracing::error!(error = %e, "cannot audit the end of a command");
            }
        }
    }
}

impl EngineHandle {
    /// Starts `request.command` in a container of the app's live release,
    /// for `by`. Refused, changing nothing, when the app has no live
    /// release, the service is unknown, or another command runs.
    pub fn run_command(
        &self,
        app: &str,
        request: RunRequest,
        by: &str,
    ) -> Result<CommandRun, EngineError> {
        let cfg = self
            .apps
            .get(app)
            .ok_or_else(|| EngineError::UnknownApp(app.to_owned()))?
            .clone();
        let service = service_of(app, &cfg, request.service.as_deref())?;
        let live = self
            .ctx
            .store
            .live_release(app)?
            .ok_or_else(|| EngineError::NothingLive(app.to_owned()))?;
        let env = AppEnv::read(&cfg).map_err(|e| EngineError::Env(e.to_string()))?;
        let short_sha = deployd_proto::short_sha(live.sha.as_str());
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let container = format!("{app}-run-{short_sha}-{}", &run_id[..8]);
        let command = shell_words(&request.command);
        let running = Running {
            container: container.clone(),
            by: by.to_owned(),
            command: command.clone(),
        };
        let slot = self
            .ctx
            .jobs
            .commands
            .take(app, running, request.concurrent)?;
        let spec = ContainerSpec {
            name: Some(container.clone()),
            image: live.pinned(&cfg.image),
            cmd: Some(request.command),
            env: env.service(&service).to_vec(),
            network: cfg.network.clone(),
            volumes: cfg.volumes.clone(),
            labels: HashMap::from([
                (label::APP.to_owned(), app.to_owned()),
                (label::TASK.to_owned(), "run".to_owned()),
                (label::SHA.to_owned(), live.sha.to_string()),
                (label::DIGEST.to_owned(), live.digest.clone()),
            ]),
            cgroup_parent: cfg.cgroup_parent.clone(),
            ..Default::default()
        };
        let timeout = Duration::from_secs(
            request
                .timeout_secs
                .unwrap_or(deployd_proto::DEFAULT_RUN_SECS),
        );
        let (events, receiver) = mpsc::channel(64);
        let ctx = self.ctx.clone();
        let started = RunEvent::Started {
            container: container.clone(),
            service: service.clone(),
            sha: live.sha.clone(),
        };
        let app_name = app.to_owned();
        let by = by.to_owned();
        let sha = live.sha.clone();
        let service_name = service.clone();
        tokio::spawn(async move {
            let _ = events.send(started).await;
            let name = spec.name.clone().unwrap_or_default();
            // deployd stopping ends the command: its caller is told, and
            // nothing is left running unowned.
            let ended = tokio::select! {
                ended = run_streamed(&ctx.docker, spec, timeout, &events) => ended.map_err(|e| e.to_string()),
                () = ctx.stopping.cancelled() => {
                    let _ = ctx.docker.remove(&name).await;
                    Err("deployd is stopping: the command was stopped".to_owned())
                }
            };
            let (outcome, said) = match &ended {
                Ok(code) => (format!("exited {code}"), RunEvent::Exited { code: *code }),
                Err(error) if ctx.stopping.is_cancelled() => (
                    "interrupted".to_owned(),
                    RunEvent::Failed {
                        error: error.clone(),
                    },
                ),
                Err(error) => (
                    "failed".to_owned(),
                    RunEvent::Failed {
                        error: error.clone(),
                    },
                ),
            };
            let _ = events.send(said).await;
            let mut record = AuditRecord::new("run_finished", outcome);
            record.subject = Some("deployd".into());
            record.app = Some(app_name);
            record.sha = Some(live.sha.to_string());
            record.digest = Some(live.digest);
            let ran = format!(
                "run by {by} in {} ({service_name}'s environment): {command}",
                slot.container
            );
            drop(slot);
            record.detail = Some(match ended {
                Ok(_) => ran,
                Err(e) => format!("{ran}; {e}"),
            });
            if let Err(e) = ctx.store.append_audit(&record) {
                tracing::error!(error = %e, "cannot audit the end of a command");
            }
        });
        Ok(CommandRun {
            sha,
            service,
            container,
            events: receiver,
        })
    }
}

/// Runs `spec` to its end, each output line passed on as an event. A
/// reader that left (its receiver dropped) stops and removes the container.
async fn run_streamed(
    docker: &Docker,
    spec: ContainerSpec,
    timeout: Duration,
    events: &mpsc::Sender<RunEvent>,
) -> Result<i64, DockerError> {
    let (lines, mut incoming) = mpsc::channel::<String>(64);
    let run = async move {
        let ended = docker.run_streamed(spec, timeout, &lines).await;
        drop(lines);
        ended
    };
    // Dropping `incoming` is what tells the run its reader left.
    let forward = async move {
        loop {
            tokio::select! {
                line = incoming.recv() => match line {
                    Some(line) => {
                        if events.send(RunEvent::Output { line }).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
                () = events.closed() => return,
            }
        }
    };
    tokio::join!(run, forward).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_reads_back_as_a_shell_would_take_it() {
        let words =
            |w: &[&str]| shell_words(&w.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(
            words(&["python", "manage.py", "migrate", "--plan"]),
            "python manage.py migrate --plan"
        );
        assert_eq!(words(&["sh", "-c", "echo it's"]), r"sh -c 'echo it'\''s'");
        assert_eq!(words(&["printf", ""]), "printf ''");
    }

    #[test]
    fn one_command_at_a_time_unless_concurrent_and_a_few_at_most() {
        let commands = Commands::default();
        let running = |n: usize| Running {
            container: format!("c{n}"),
            by: "alice".into(),
            command: "manage.py shell".into(),
        };
        let first = commands.take("shop", running(0), false).unwrap();
        assert!(matches!(
            commands.take("shop", running(1), false),
            Err(EngineError::CommandRunning { running: 1, .. })
        ));
        assert!(commands.take("blog", running(1), false).is_ok(), "per app");
        let more: Vec<Slot> = (1..MAX_RUNNING)
            .map(|n| commands.take("shop", running(n), true).unwrap())
            .collect();
        assert!(
            commands.take("shop", running(9), true).is_err(),
            "at most {MAX_RUNNING}"
        );
        drop(more);
        drop(first);
        assert!(
            commands.take("shop", running(0), false).is_ok(),
            "given back"
        );
    }
}
