//! `deployctl logs --service`: the app's own output through the API, from
//! every running container of a service, each line tagged with its
//! container. Followed, the set of containers is read again every second,
//! so a deploy's new containers join the stream (from their first line) and
//! the old ones leave it when they stop.

use std::collections::HashSet;
use std::time::Duration;

use deployd_proto::LogEvent;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{EngineError, EngineHandle, label};
use crate::docker::{ContainerInfo, Docker, LogWindow};

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
        let docker = self.ctx.docker.clone();
        let app = app.to_owned();
        tokio::spawn(async move {
            if window.follow {
                follow(&docker, &app, &service, window, out).await;
            } else {
                recent(&docker, &app, &service, window, out).await;
            }
        });
        Ok(events)
    }
}

/// The running containers of `service`.
async fn running(docker: &Docker, app: &str, service: &str) -> Vec<ContainerInfo> {
    let labels = [(label::APP, app), (label::SERVICE, service)];
    match docker.containers(&labels).await {
        Ok(found) => found.into_iter().filter(|c| c.running).collect(),
        Err(e) => {
            tracing::warn!(%app, %service, error = %e, "cannot list containers for logs");
            Vec::new()
        }
    }
}

fn joined(c: &ContainerInfo) -> LogEvent {
    LogEvent::Joined {
        container: c.name.clone(),
        sha: c.labels.get(label::SHA).and_then(|s| s.parse().ok()),
    }
}

/// Makes `c`'s lines.
fn line_of(c: &ContainerInfo) -> impl Fn(time::OffsetDateTime, String) -> LogEvent + use<> {
    let container = c.name.clone();
    move |at, line| LogEvent::Line {
        container: container.clone(),
        at,
        line,
    }
}

/// Every running container's lines in `window`, merged by time.
async fn recent(
    docker: &Docker,
    app: &str,
    service: &str,
    window: LogWindow,
    out: mpsc::Sender<LogEvent>,
) {
    let containers = running(docker, app, service).await;
    let mut lines = Vec::new();
    for c in &containers {
        if out.send(joined(c)).await.is_err() {
            return;
        }
        let (tx, mut rx) = mpsc::channel(1024);
        let read = async move {
            if let Err(e) = docker.pipe_logs(&c.id, window, &tx, line_of(c)).await {
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
async fn follow(
    docker: &Docker,
    app: &str,
    service: &str,
    window: LogWindow,
    out: mpsc::Sender<LogEvent>,
) {
    let mut followed = HashSet::new();
    let mut readers = JoinSet::new();
    let mut window = window;
    loop {
        // A second of overlap: lines are never lost between listings.
        let listed_at = time::OffsetDateTime::now_utc().unix_timestamp() - 1;
        for c in running(docker, app, service).await {
            if followed.insert(c.id.clone()) {
                readers.spawn(follow_one(docker.clone(), c, window, out.clone()));
            }
        }
        window = LogWindow {
            follow: true,
            tail: None,
            since: Some(listed_at),
        };
        // A container whose lines ended (it stopped) may run again.
        while let Some(ended) = readers.try_join_next() {
            if let Ok(id) = ended {
                followed.remove(&id);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RELIST) => {}
            () = out.closed() => break,
        }
    }
    readers.abort_all();
}

/// One container: joined, its lines, left when it stops. Returns its id.
async fn follow_one(
    docker: Docker,
    c: ContainerInfo,
    window: LogWindow,
    out: mpsc::Sender<LogEvent>,
) -> String {
    if out.send(joined(&c)).await.is_err() {
        return c.id;
    }
    if let Err(e) = docker.pipe_logs(&c.id, window, &out, line_of(&c)).await {
        tracing::warn!(container = %c.name, error = %e, "cannot follow logs");
    }
    let _ = out.send(LogEvent::Left { container: c.name }).await;
    c.id
}
