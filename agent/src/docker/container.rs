//! Containers: one-off release tasks and long-running service containers.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, EndpointSettings, HealthStatusEnum, HostConfig,
    NetworkingConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures_util::StreamExt;

use super::{Docker, DockerError, status_code, tolerate};

/// How a container is created. Images are given pinned (`repo@sha256:...`).
#[derive(Clone, Default)]
pub struct ContainerSpec {
    /// Container name; Docker picks one when absent.
    pub name: Option<String>,
    /// Image reference, pinned by digest for release containers.
    pub image: String,
    /// Replaces the image's CMD; the ENTRYPOINT is kept.
    pub cmd: Option<Vec<String>>,
    /// Environment, typically from the app's env file. Holds secrets: only
    /// the names are ever printed.
    pub env: Vec<(String, String)>,
    /// User-defined network to join, where the app's db and redis live.
    pub network: Option<String>,
    /// Names other containers on `network` reach this one by.
    pub network_aliases: Vec<String>,
    /// Volume mounts in Docker's `source:target[:mode]` form.
    pub volumes: Vec<String>,
    /// Labels; deployd finds its containers by them after a restart.
    pub labels: HashMap<String, String>,
    /// A container TCP port to publish on an ephemeral 127.0.0.1 port.
    pub publish: Option<u16>,
    /// How long `docker stop` waits after SIGTERM before SIGKILL.
    pub stop_timeout: Option<Duration>,
    /// Restart the container when it dies or the engine restarts, unless
    /// it was stopped on purpose (service containers, not one-off tasks).
    pub restart: bool,
    /// The cgroup it goes under (`--cgroup-parent`).
    pub cgroup_parent: Option<String>,
}

impl fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env_names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("ContainerSpec")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("cmd", &self.cmd)
            .field("env", &env_names)
            .field("network", &self.network)
            .field("network_aliases", &self.network_aliases)
            .field("volumes", &self.volumes)
            .field("labels", &self.labels)
            .field("publish", &self.publish)
            .field("stop_timeout", &self.stop_timeout)
            .field("cgroup_parent", &self.cgroup_parent)
            .field("restart", &self.restart)
            .finish()
    }
}

impl ContainerSpec {
    fn into_body(self) -> ContainerCreateBody {
        let port = self.publish.map(|p| format!("{p}/tcp"));
        let port_bindings = port.clone().map(|port| {
            let binding = PortBinding {
                host_ip: Some("127.0.0.1".into()),
                host_port: Some(String::new()),
            };
            HashMap::from([(port, Some(vec![binding]))])
        });
        let networking_config = self.network.clone().map(|network| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                network,
                EndpointSettings {
                    aliases: Some(self.network_aliases.clone()),
                    ..Default::default()
                },
            )])),
        });
        ContainerCreateBody {
            image: Some(self.image),
            cmd: self.cmd,
            env: Some(
                self.env
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
            ),
            labels: Some(self.labels),
            exposed_ports: port.map(|p| vec![p]),
            stop_timeout: self.stop_timeout.map(|t| t.as_secs() as i64),
            host_config: Some(HostConfig {
                network_mode: self.network,
                binds: Some(self.volumes),
                port_bindings,
                restart_policy: self.restart.then_some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                    maximum_retry_count: None,
                }),
                cgroup_parent: self.cgroup_parent,
                ..Default::default()
            }),
            networking_config,
            ..Default::default()
        }
    }
}

/// Where a service container's port is reached, and its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortAddrs {
    /// The ephemeral port on 127.0.0.1 it is published on.
    pub published: u16,
    /// The container's address on its network (none for host networking).
    pub direct: Option<std::net::SocketAddr>,
    pub labels: HashMap<String, String>,
}

/// What a one-off container did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneOffOutput {
    /// The process's exit status.
    pub exit_code: i64,
    /// stdout and stderr lines in arrival order; the last
    /// [`OneOffOutput::MAX_LINES`] are kept, where a failure's cause is.
    pub lines: Vec<String>,
}

impl OneOffOutput {
    /// Lines kept per task, so a chatty task cannot exhaust memory.
    pub const MAX_LINES: usize = 2000;
}

/// A container's coarse state, as a rollout must see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    /// Running, with the image's HEALTHCHECK verdict if it has one, and how
    /// often the engine restarted it after it died.
    Running {
        health: Option<String>,
        restarts: i64,
    },
    /// Exited (or waiting to be restarted) with this status.
    Exited { exit_code: i64 },
}

/// One run of a container's health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckRun {
    /// What it printed, on one line.
    pub output: String,
    pub exit_code: i64,
}

impl HealthCheckRun {
    pub fn failed(&self) -> bool {
        self.exit_code != 0
    }
}

impl fmt::Display for HealthCheckRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.output.is_empty() {
            true => write!(f, "exit code {}", self.exit_code),
            false => f.write_str(&self.output),
        }
    }
}

/// A container found by its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Name without Docker's leading slash.
    pub name: String,
    pub labels: HashMap<String, String>,
    /// Running, or restarting after a crash.
    pub running: bool,
    /// Docker's own words: `Up 3 minutes (healthy)`, `Exited (0) 1 hour ago`.
    pub status: String,
    /// Published ports: (container port, port on the host).
    pub ports: Vec<(u16, u16)>,
}

impl ContainerInfo {
    /// The host port `port` is published on, if it is.
    pub fn published(&self, port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|(private, _)| *private == port)
            .map(|(_, public)| *public)
    }
}

impl Docker {
    /// Runs `spec` to completion, like `docker run --rm`, and returns its exit
    /// code and output. The container is removed whatever happens, a timeout
    /// included.
    ///
    /// `on_line` sees each output line as it arrives, for live progress.
    pub async fn run_oneoff(
        &self,
        spec: ContainerSpec,
        timeout: Duration,
        mut on_line: impl FnMut(&str) + Send,
    ) -> Result<OneOffOutput, DockerError> {
        self.run_to_removal(spec, timeout, None, LineSink::Call(&mut on_line))
            .await
    }

    /// Like [`Docker::run_oneoff`] for a reader far away: each output line
    /// is sent to `out`, waiting for room (a slow reader slows the reading
    /// of the output, it does not fill memory). When `out` closes (the
    /// reader left), the container is stopped and removed at once.
    pub async fn run_streamed(
        &self,
        spec: ContainerSpec,
        timeout: Duration,
        out: &tokio::sync::mpsc::Sender<String>,
    ) -> Result<i64, DockerError> {
        self.run_to_removal(spec, timeout, Some(out), LineSink::Channel(out))
            .await
            .map(|output| output.exit_code)
    }

    async fn run_to_removal(
        &self,
        spec: ContainerSpec,
        timeout: Duration,
        reader: Option<&tokio::sync::mpsc::Sender<String>>,
        sink: LineSink<'_>,
    ) -> Result<OneOffOutput, DockerError> {
        let what = spec.cmd.as_ref().map_or_else(
            || format!("a one-off container of {}", spec.image),
            |c| c.join(" "),
        );
        let id = self.create(spec).await?;
        let left = async {
            match reader {
                Some(reader) => reader.closed().await,
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            ended = tokio::time::timeout(timeout, self.run_to_end(&id, sink)) => match ended {
                Ok(result) => result,
                Err(_) => Err(DockerError::Timeout { what, timeout }),
            },
            () = left => Err(DockerError::Abandoned { what }),
        };
        match (result, self.remove(&id).await) {
            (Ok(output), Ok(())) => Ok(output),
            (Ok(_), Err(e)) | (Err(e), Ok(())) => Err(e),
            (Err(e), Err(removal)) => {
                tracing::warn!(container = %id, error = %removal, "one-off container not removed");
                Err(e)
            }
        }
    }

    async fn run_to_end(
        &self,
        id: &str,
        mut sink: LineSink<'_>,
    ) -> Result<OneOffOutput, DockerError> {
        self.api
            .start_container(id, None)
            .await
            .map_err(DockerError::engine("start a one-off container"))?;
        let options = LogsOptionsBuilder::default()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .build();
        let mut logs = self.api.logs(id, Some(options));
        let mut lines = Lines::default();
        while let Some(chunk) = logs.next().await {
            let chunk = chunk.map_err(DockerError::engine("read one-off container output"))?;
            for line in lines.push(chunk.as_ref()) {
                sink.put(line).await;
            }
        }
        if let Some(rest) = lines.flush() {
            sink.put(rest).await;
        }
        let exit_code = self.exit_code(id).await?;
        Ok(OneOffOutput {
            exit_code,
            lines: lines.finish(),
        })
    }

    /// Sends a container's (or a Swarm task's) output lines to `out`, each
    /// made by `make` from the time the engine took it in and the line: the
    /// last `tail` lines (all: `None`) since `since` (Unix seconds), then
    /// with `follow` the new ones until the container stops. Ends early,
    /// without error, once `out` is closed.
    pub async fn pipe_logs<T>(
        &self,
        from: &LogSource,
        logs: LogWindow,
        out: &tokio::sync::mpsc::Sender<T>,
        make: impl Fn(time::OffsetDateTime, String) -> T,
    ) -> Result<(), DockerError> {
        let options = Some(logs.options());
        match from {
            LogSource::Container(id) => pipe_stream(self.api.logs(id, options), out, make)
                .await
                .map_err(DockerError::engine("read a container's logs")),
            LogSource::Task(id) => pipe_stream(self.api.task_logs(id, options), out, make)
                .await
                .map_err(DockerError::engine("read a task's logs")),
        }
    }

    /// Waits until a container is no longer running; returns its exit
    /// status. Its output ending is not enough: the engine may record the
    /// exit a moment later.
    async fn exit_code(&self, id: &str) -> Result<i64, DockerError> {
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut answers = self.api.wait_container(id, Some(options));
        match answers.next().await {
            Some(Ok(answer)) => Ok(answer.status_code),
            // bollard turns a non-zero status into an error.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(DockerError::engine("wait for a one-off container")(e)),
            None => Err(DockerError::Engine {
                action: "wait for a one-off container".into(),
                reason: "the engine did not report its exit".into(),
            }),
        }
    }

    /// Creates and starts a long-running container; returns its id.
    pub async fn start(&self, spec: ContainerSpec) -> Result<String, DockerError> {
        let id = self.create(spec).await?;
        if let Err(e) = self.api.start_container(&id, None).await {
            // Best effort: the start error is the one worth reporting.
            let _ = self.remove(&id).await;
            return Err(DockerError::engine("start a container")(e));
        }
        Ok(id)
    }

    async fn create(&self, spec: ContainerSpec) -> Result<String, DockerError> {
        let options = spec
            .name
            .as_deref()
            .map(|name| CreateContainerOptionsBuilder::default().name(name).build());
        let image = spec.image.clone();
        let created = self
            .api
            .create_container(options, spec.into_body())
            .await
            .map_err(DockerError::engine(format!(
                "create a container from {image}"
            )))?;
        Ok(created.id)
    }

    /// Where a container port is reached: its published 127.0.0.1 port, and
    /// the container's own address on its network.
    pub async fn port(&self, id: &str, port: u16) -> Result<PortAddrs, DockerError> {
        let inspect = self
            .api
            .inspect_container(id, None)
            .await
            .map_err(DockerError::engine("inspect a container"))?;
        let settings = inspect.network_settings.unwrap_or_default();
        let published = settings
            .ports
            .and_then(|mut ports| ports.remove(&format!("{port}/tcp")))
            .flatten()
            .and_then(|bindings| bindings.into_iter().find_map(|b| b.host_port))
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| DockerError::Engine {
                action: "find a published port".into(),
                reason: format!("port {port}/tcp of container {id} is not published"),
            })?;
        let direct = settings
            .networks
            .unwrap_or_default()
            .into_values()
            .filter_map(|n| n.ip_address)
            .find_map(|ip| ip.parse::<std::net::IpAddr>().ok())
            .map(|ip| std::net::SocketAddr::new(ip, port));
        let labels = inspect.config.and_then(|c| c.labels).unwrap_or_default();
        Ok(PortAddrs {
            published,
            direct,
            labels,
        })
    }

    /// Whether a container runs, and how healthy it is.
    pub async fn state(&self, id: &str) -> Result<ContainerState, DockerError> {
        let inspect = self
            .api
            .inspect_container(id, None)
            .await
            .map_err(DockerError::engine("inspect a container"))?;
        let state = inspect.state.unwrap_or_default();
        if state.running == Some(true) && state.restarting != Some(true) {
            let health = state
                .health
                .and_then(|h| h.status)
                .filter(|s| !matches!(s, HealthStatusEnum::EMPTY | HealthStatusEnum::NONE))
                .map(|s| s.to_string());
            Ok(ContainerState::Running {
                health,
                restarts: inspect.restart_count.unwrap_or_default(),
            })
        } else {
            // No exit code means the engine does not know how it ended:
            // never read that as success.
            let exit_code = state.exit_code.ok_or_else(|| DockerError::Engine {
                action: "inspect a container".into(),
                reason: format!("container {id} is not running and has no exit code"),
            })?;
            Ok(ContainerState::Exited { exit_code })
        }
    }

    /// A container's last health checks (the engine keeps five), oldest
    /// first, if it has a check and is on this engine (a Swarm task's may
    /// run on another node).
    pub async fn health_checks(&self, id: &str) -> Option<Vec<HealthCheckRun>> {
        let inspect = self.api.inspect_container(id, None).await.ok()?;
        let log = inspect.state?.health?.log?;
        Some(
            log.into_iter()
                .map(|run| HealthCheckRun {
                    output: run
                        .output
                        .unwrap_or_default()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" "),
                    exit_code: run.exit_code.unwrap_or_default(),
                })
                .collect(),
        )
    }

    /// Removes a container and its anonymous volumes, stopping it if needed.
    /// A container that is already gone counts as removed.
    pub async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        let result = self.api.remove_container(id, Some(options)).await;
        tolerate(result, 404, "remove a container")
    }

    /// Ids of all containers, running or not, carrying `label=value`.
    pub async fn containers_labelled(
        &self,
        label: &str,
        value: &str,
    ) -> Result<Vec<String>, DockerError> {
        let found = self.containers(&[(label, value)]).await?;
        Ok(found.into_iter().map(|c| c.id).collect())
    }

    /// All containers, running or not, that carry every `label=value` given
    /// (an empty value: the label with any value).
    pub async fn containers(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<ContainerInfo>, DockerError> {
        let wanted = labels
            .iter()
            .map(|(k, v)| {
                if v.is_empty() {
                    (*k).to_owned()
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        let filters = HashMap::from([("label", wanted)]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .api
            .list_containers(Some(options))
            .await
            .map_err(DockerError::engine("list containers"))?;
        Ok(containers
            .into_iter()
            .filter_map(|c| {
                Some(ContainerInfo {
                    id: c.id?,
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .map(|n| n.trim_start_matches('/').to_owned())
                        .unwrap_or_default(),
                    labels: c.labels.unwrap_or_default(),
                    status: c.status.unwrap_or_default(),
                    ports: c
                        .ports
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|p| Some((p.private_port, p.public_port?)))
                        .collect(),
                    // A crash-looping container is as alive as a running one:
                    // it must be stopped like one.
                    running: matches!(
                        c.state,
                        Some(
                            ContainerSummaryStateEnum::RUNNING
                                | ContainerSummaryStateEnum::RESTARTING
                        )
                    ),
                })
            })
            .collect())
    }

    /// Stops a container: SIGTERM (or the image's STOPSIGNAL), then SIGKILL
    /// after `timeout`. Returns once it has exited, or at once if it is
    /// gone.
    pub async fn stop(&self, id: &str, timeout: Duration) -> Result<(), DockerError> {
        let seconds = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(seconds).build();
        // The engine answers once the container has exited, after up to
        // `timeout`: bollard's default 120 s request limit would cut a long
        // worker drain short.
        let api = self
            .api
            .clone()
            .with_timeout(timeout.saturating_add(Duration::from_secs(60)));
        match api.stop_container(id, Some(options)).await {
            // Gone already: it is not running either.
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            result => tolerate(result, 304, "stop a container"),
        }
    }

    /// Starts an existing, stopped container again.
    pub async fn restart_stopped(&self, id: &str) -> Result<(), DockerError> {
        let result = self.api.start_container(id, None).await;
        tolerate(result, 304, "start a container")
    }

    /// The last `lines` lines a container printed, to explain why it died.
    pub async fn tail_logs(&self, id: &str, lines: usize) -> Result<Vec<String>, DockerError> {
        let tail = lines.to_string();
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .tail(&tail)
            .build();
        let mut logs = self.api.logs(id, Some(options));
        let mut collected = Lines::default();
        while let Some(chunk) = logs.next().await {
            let chunk = chunk.map_err(DockerError::engine("read container logs"))?;
            collected.push(chunk.as_ref());
        }
        Ok(collected.finish())
    }
}

/// Longest line kept whole; longer ones are split.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// Whose output to read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LogSource {
    /// A container on this engine, by id.
    Container(String),
    /// A Swarm task on any node, by id: the manager fetches its output
    /// from there.
    Task(String),
}

/// Which of a container's log lines to read.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWindow {
    /// Keep reading new lines until the container stops.
    pub follow: bool,
    /// Only the last this many (of those since `since`).
    pub tail: Option<usize>,
    /// Only those since this time (Unix seconds).
    pub since: Option<i64>,
}

/// Where a one-off container's output lines go as they come.
pub(super) enum LineSink<'a> {
    Call(&'a mut (dyn FnMut(&str) + Send)),
    Channel(&'a tokio::sync::mpsc::Sender<String>),
}

impl LineSink<'_> {
    pub(super) async fn put(&mut self, line: String) {
        match self {
            Self::Call(call) => call(&line),
            // A reader that left is noticed by `run_to_removal`.
            Self::Channel(out) => {
                let _ = out.send(line).await;
            }
        }
    }
}

/// Splits a stream of output chunks into lines. Docker frames carry whatever
/// one write() produced: several lines, or part of one.
#[derive(Debug, Default)]
pub(super) struct Lines {
    partial: Vec<u8>,
    done: VecDeque<String>,
}

impl Lines {
    /// Takes a chunk; returns the lines it completed.
    pub(super) fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        let mut completed = Vec::new();
        for piece in chunk.split_inclusive(|&b| b == b'\n') {
            match piece.strip_suffix(b"\n") {
                Some(rest) => {
                    self.partial.extend_from_slice(rest);
                    completed.push(self.keep_partial());
                }
                None => self.partial.extend_from_slice(piece),
            }
            // Output without newlines (progress bars) is cut, not hoarded.
            if self.partial.len() > MAX_LINE_BYTES {
                completed.push(self.keep_partial());
            }
        }
        completed
    }

    /// The unterminated rest of the output, as a last line.
    pub(super) fn flush(&mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| self.keep_partial())
    }

    fn keep_partial(&mut self) -> String {
        let bytes = std::mem::take(&mut self.partial);
        let line = String::from_utf8_lossy(&bytes)
            .trim_end_matches('\r')
            .to_owned();
        self.done.push_back(line.clone());
        if self.done.len() > OneOffOutput::MAX_LINES {
            self.done.pop_front();
        }
        line
    }

    pub(super) fn finish(mut self) -> Vec<String> {
        self.flush();
        self.done.into()
    }
}

impl LogWindow {
    /// The engine's options for this window, with timestamps.
    fn options(self) -> bollard::query_parameters::LogsOptions {
        let mut options = LogsOptionsBuilder::default()
            .follow(self.follow)
            .stdout(true)
            .stderr(true)
            .timestamps(true)
            .tail(
                &self
                    .tail
                    .map_or_else(|| "all".to_owned(), |n| n.to_string()),
            );
        if let Some(since) = self.since {
            options = options.since(i32::try_from(since).unwrap_or(i32::MAX));
        }
        options.build()
    }
}

/// Sends the lines of a timestamped log stream to `out` (see
/// [`Docker::pipe_logs`]); a stream whose source is gone (404) ends there.
async fn pipe_stream<T>(
    mut stream: impl futures_util::Stream<
        Item = Result<bollard::container::LogOutput, bollard::errors::Error>,
    > + Unpin,
    out: &tokio::sync::mpsc::Sender<T>,
    make: impl Fn(time::OffsetDateTime, String) -> T,
) -> Result<(), bollard::errors::Error> {
    let mut lines = Lines::default();
    let stamped = |line: String| {
        // `2026-12-01T22:15:45.123456789Z the line`
        let (at, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let at = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
        make(at, rest.to_owned())
    };
    loop {
        let chunk = tokio::select! {
            chunk = stream.next() => chunk,
            () = out.closed() => return Ok(()),
        };
        let Some(chunk) = chunk else { break };
        let chunk = match chunk {
            Ok(chunk) => chunk,
            // Gone meanwhile: its lines end here.
            Err(e) if status_code(&e) == Some(404) => break,
            Err(e) => return Err(e),
        };
        for line in lines.push(chunk.as_ref()) {
            if out.send(stamped(line)).await.is_err() {
                return Ok(());
            }
        }
    }
    if let Some(rest) = lines.flush() {
        let _ = out.send(stamped(rest)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_reassembled_across_chunks() {
        let mut lines = Lines::default();
        assert!(lines.push(b"Applying shop.0001").is_empty());
        assert_eq!(
            lines.push(b"_initial... OK\r\nApplying "),
            ["Applying shop.0001_initial... OK"]
        );
        lines.push(b"shop.0002... OK\nlast line without newline");
        assert_eq!(
            lines.finish(),
            [
                "Applying shop.0001_initial... OK",
                "Applying shop.0002... OK",
                "last line without newline"
            ]
        );
    }

    #[test]
    fn endless_lines_are_cut() {
        let mut lines = Lines::default();
        for _ in 0..100 {
            lines.push(&[b'#'; 4096]);
        }
        let kept = lines.finish();
        assert!(kept.iter().all(|l| l.len() <= MAX_LINE_BYTES + 4096));
        assert_eq!(kept.iter().map(String::len).sum::<usize>(), 100 * 4096);
    }

    #[test]
    fn only_the_last_lines_are_kept() {
        let mut lines = Lines::default();
        for i in 0..OneOffOutput::MAX_LINES + 5 {
            lines.push(format!("line {i}\n").as_bytes());
        }
        let kept = lines.finish();
        assert_eq!(kept.len(), OneOffOutput::MAX_LINES);
        assert_eq!(kept[0], "line 5");
    }

    #[test]
    fn debug_shows_env_names_only() {
        let spec = ContainerSpec {
            image: "r/shop@sha256:00".into(),
            env: vec![("DJANGO_SECRET_KEY".into(), "s3cr3t-value".into())],
            ..Default::default()
        };
        let debug = format!("{spec:?}");
        assert!(
            debug.contains("DJANGO_SECRET_KEY") && !debug.contains("s3cr3t"),
            "{debug}"
        );
    }
}
