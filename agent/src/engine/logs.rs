//! `deployctl logs --service`: the app's own output through the API, from
//! every running container of a service (on the swarm backend, every
//! running task, on whichever node), each line tagged with its container
//! (or task and node). Followed, the set of containers is read again every
//! second, so a deploy's new containers join the stream (from their first
//! line) and the old ones leave it when they stop. Not yet for a Swarm
//! task: the manager keeps an ended task's followed log stream open (until
//! its service is removed), so a replaced task is never said to leave.

use std::collections::HashSet;
use std::time::Duration;

use deployd_proto::LogEvent;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{EngineError, EngineHandle, label};
use crate::config::Backend;
use crate::docker::{Docker, LogSource, LogWindow};

/// How often a followed service's containers are listed again.
const RELIST: Duration = Duration::from_secs(1);

impl EngineHandle {
    /// The log lines of `service` (default: web, else the first) of `app`
    /// in `window`; followed until the receiver is dropped, else sorted by
    /// time and ended.
    pub fn logs(
        &self,
        app: &str,
        service: Option<&str>,
        window: LogWindow,
    ) -> Result<mpsc::Receiver<LogEvent>, EngineError> {
        let cfg = self
            .apps
            .get(app)
            .ok_or_else(|| EngineError::UnknownApp(app.to_owned()))?;
        let service = super::command::service_of(app, cfg, service)?;
        let (out, events) = mpsc::channel(256);
        let source = Sources {
            docker: self.ctx.docker.clone(),
            app: app.to_owned(),
            service,
            swarm: cfg.backend == Backend::Swarm,
        };
        tokio::spawn(async move {
            if window.follow {
                follow(&source, window, out).await;
            } else {
                recent(&source, window, out).await;
            }
        });
        Ok(events)
    }
}

/// Where a service's output comes from.
struct Sources {
    docker: Docker,
    app: String,
    service: String,
    /// Swarm tasks, not this host's containers.
    swarm: bool,
}

/// A running container, or a running Swarm task, whose lines are read.
#[derive(Debug, Clone)]
struct Source {
    from: LogSource,
    /// What its lines are tagged with.
    name: String,
    sha: Option<deployd_proto::CommitSha>,
}

impl Sources {
    /// The running containers (or tasks) of the service.
    async fn running(&self) -> Vec<Source> {
        let (docker, app, service) = (&self.docker, &self.app, &self.service);
        let found = if self.swarm {
            self.tasks().await
        } else {
            let labels = [
                (label::APP, app.as_str()),
                (label::SERVICE, service.as_str()),
            ];
            docker.containers(&labels).await.map(|found| {
                found
                    .into_iter()
                    .filter(|c| c.running)
                    .map(|c| Source {
                        sha: c.labels.get(label::SHA).and_then(|s| s.parse().ok()),
                        from: LogSource::Container(c.id),
                        name: c.name,
                    })
                    .collect()
            })
        };
        found.unwrap_or_else(|e| {
            tracing::warn!(%app, %service, error = %e, "cannot list containers for logs");
            Vec::new()
        })
    }

    /// The running tasks of the service, named as `deployctl status` names
    /// them: `<app>_<service>.<slot> on <node>`.
    async fn tasks(&self) -> Result<Vec<Source>, crate::docker::DockerError> {
        let name = super::swarm::service_name(&self.app, &self.service);
        let tasks: Vec<_> = self
            .docker
            .tasks(&name)
            .await?
            .into_iter()
            .filter(|t| t.is_running())
            .collect();
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let nodes = self.docker.swarm_nodes().await?;
        Ok(tasks
            .into_iter()
            .map(|t| Source {
                name: format!(
                    "{name}.{} on {}",
                    t.slot.unwrap_or_default(),
                    super::swarm::node_name(&nodes, &t.node)
                ),
                sha: t.labels.get(label::SHA).and_then(|s| s.parse().ok()),
                from: LogSource::Task(t.id),
            })
            .collect())
    }
}

fn joined(c: &Source) -> LogEvent {
    LogEvent::Joined {
        container: c.name.clone(),
        sha: c.sha.clone(),
    }
}

/// Makes `c`'s lines.
fn line_of(c: &Source) -> impl Fn(time::OffsetDateTime, String) -> LogEvent + use<> {
    let container = c.name.clone();
    move |at, line| LogEvent::Line {
        container: container.clone(),
        at,
        line,
    }
}

/// Every running container's lines in `window`, merged by time.
async fn recent(source: &Sources, window: LogWindow, out: mpsc::Sender<LogEvent>) {
    let containers = source.running().await;
    let docker = &source.docker;
    let mut lines = Vec::new();
    for c in &containers {
        if out.send(joined(c)).await.is_err() {
            return;
        }
        let (tx, mut rx) = mpsc::channel(1024);
        let read = async move {
            if let Err(e) = docker.pipe_logs(&c.from, window, &tx, line_of(c)).await {
                tracing::warn!(container = %c.name, error = %e, "cannot read logs");
            }
        };
        let collect = async {
            while let Some(line) = rx.recv().await {
                lines.push(line);
            }
        };
        // A caller who left stops the reading.
        tokio::select! {
            _ = async { tokio::join!(read, collect) } => {}
            () = out.closed() => return,
        }
    }
    let at = |e: &LogEvent| match e {
        LogEvent::Line { at, .. } => Some(*at),
        _ => None,
    };
    lines.sort_by_key(at);
    for line in lines {
        if out.send(line).await.is_err() {
            return;
        }
    }
}

/// The running containers' lines in `window`, then new lines as they
/// come; containers started later (a deploy's, or one restarted) from the
/// listing before the one that found them, which is their first line.
async fn follow(source: &Sources, window: LogWindow, out: mpsc::Sender<LogEvent>) {
    let mut followed = HashSet::new();
    let mut readers = JoinSet::new();
    let mut window = window;
    loop {
        // A second of overlap: lines are never lost between listings.
        let listed_at = time::OffsetDateTime::now_utc().unix_timestamp() - 1;
        for c in source.running().await {
            if followed.insert(c.from.clone()) {
                readers.spawn(follow_one(source.docker.clone(), c, window, out.clone()));
            }
        }
        window = LogWindow {
            follow: true,
            tail: None,
            since: Some(listed_at),
        };
        // A container whose lines ended (it stopped) may run again.
        while let Some(ended) = readers.try_join_next() {
            if let Ok(from) = ended {
                followed.remove(&from);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RELIST) => {}
            () = out.closed() => break,
        }
    }
    readers.abort_all();
}

/// One container: joined, its lines, left when it stops. Returns whose
/// lines they were.
async fn follow_one(
    docker: Docker,
    c: Source,
    window: LogWindow,
    out: mpsc::Sender<LogEvent>,
) -> LogSource {
    if out.send(joined(&c)).await.is_err() {
        return c.from;
    }
    if let Err(e) = docker.pipe_logs(&c.from, window, &out, line_of(&c)).await {
        tracing::warn!(container = %c.name, error = %e, "cannot follow logs");
    }
    let _ = out.send(LogEvent::Left { container: c.name }).await;
    c.from
}
