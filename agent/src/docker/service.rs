//! Swarm services: an app's long-running services on a cluster, and its
//! release tasks as one-off jobs. The engine must be a Swarm manager.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use bollard::models::{
    EndpointPortConfig, EndpointPortConfigPublishModeEnum, EndpointSpec, HealthConfig, Mount,
    MountType, NetworkAttachmentConfig, NodeSpecAvailabilityEnum, NodeState, ServiceSpec,
    ServiceSpecMode, ServiceSpecModeReplicated, ServiceSpecModeReplicatedJob,
    ServiceSpecUpdateConfig, ServiceSpecUpdateConfigFailureActionEnum,
    ServiceSpecUpdateConfigOrderEnum, TaskSpec, TaskSpecContainerSpec, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{
    ListServicesOptionsBuilder, ListTasksOptionsBuilder, LogsOptionsBuilder,
    UpdateServiceOptionsBuilder,
};
use futures_util::StreamExt;

use super::container::{LineSink, Lines};
use super::{Docker, DockerError, OneOffOutput, RegistryAuth, status_code, tolerate};

/// A Swarm service as deployd creates it. Images are given pinned
/// (`repo@sha256:...`).
#[derive(Clone, Default)]
pub struct SwarmServiceSpec {
    pub name: String,
    pub image: String,
    /// Replaces the image's CMD; the ENTRYPOINT is kept.
    pub cmd: Option<Vec<String>>,
    /// Holds secrets: only the names are ever printed.
    pub env: Vec<(String, String)>,
    /// The attachable overlay network the tasks join.
    pub network: Option<String>,
    /// Named volumes, `name:/path[:ro]`; each node has its own.
    pub volumes: Vec<String>,
    /// On the service and on each of its containers.
    pub labels: HashMap<String, String>,
    pub mode: ServiceMode,
    /// How a new spec replaces the running tasks.
    pub update: Option<UpdatePolicy>,
    /// How long a task gets after SIGTERM before SIGKILL.
    pub stop_grace: Option<Duration>,
    pub health: Option<HealthCheck>,
    /// (container port, port published through the routing mesh).
    pub publish: Option<(u16, u16)>,
}

impl fmt::Debug for SwarmServiceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env_names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("SwarmServiceSpec")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("cmd", &self.cmd)
            .field("env", &env_names)
            .field("network", &self.network)
            .field("volumes", &self.volumes)
            .field("labels", &self.labels)
            .field("mode", &self.mode)
            .field("update", &self.update)
            .field("stop_grace", &self.stop_grace)
            .field("health", &self.health)
            .field("publish", &self.publish)
            .finish()
    }
}

/// How many tasks a service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceMode {
    /// This many tasks, restarted whenever they exit.
    Replicated(u32),
    /// One task run to its end, never restarted (a release task).
    Job,
    /// One task on every node, each run to its end, never restarted (a
    /// release task that writes a node's own volume).
    GlobalJob,
}

impl Default for ServiceMode {
    fn default() -> Self {
        Self::Replicated(1)
    }
}

/// How a new spec replaces the running tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdatePolicy {
    /// The new task runs (and is healthy) before the old one stops; else
    /// the old one has stopped before the new one starts.
    pub start_first: bool,
    pub parallelism: u32,
    /// How long Swarm watches each new task for a failure.
    pub monitor: Duration,
}

/// A container health check, run by the engine on each task's node.
#[derive(Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Docker's form: `["CMD", program, args...]`.
    pub test: Vec<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Failures in a row that make a task unhealthy.
    pub retries: u32,
    /// Failures during this time after start do not count.
    pub start_period: Duration,
}

impl fmt::Debug for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The program only: what it sends may hold a credential.
        f.debug_struct("HealthCheck")
            .field("program", &self.test.get(1))
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("start_period", &self.start_period)
            .finish()
    }
}

/// A service's spec as it was read from the cluster, to be written back
/// as it was (a rollback), not rebuilt from today's config.
#[derive(Clone)]
pub struct PriorSpec {
    spec: ServiceSpec,
    /// The version it was read at.
    pub version: u64,
}

impl fmt::Debug for PriorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Its env holds secrets.
        f.debug_struct("PriorSpec")
            .field("name", &self.spec.name)
            .field("version", &self.version)
            .finish()
    }
}

/// A service found on the cluster.
#[derive(Debug, Clone)]
pub struct ServiceInfo {
    pub id: String,
    pub name: String,
    /// The spec's version, which an update must name.
    pub version: u64,
    pub labels: HashMap<String, String>,
    /// Tasks asked for; none for jobs.
    pub replicas: Option<u32>,
    /// The last update, if the service was ever updated.
    pub update: Option<UpdateStatus>,
    /// Its spec as read, to write back.
    pub prior: PriorSpec,
}

/// How Swarm's last update of a service went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateStatus {
    /// `updating`, `paused`, `completed`, `rollback_...`.
    pub state: String,
    pub message: String,
    /// When it started, in Swarm's words: tells one update from the next.
    pub started_at: String,
}

/// One task of a service: a container Swarm placed on some node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    pub id: String,
    /// The node's id; empty before the task is placed.
    pub node: String,
    pub slot: Option<i64>,
    /// `new` ... `running`, `complete`, `failed`, `shutdown`, `rejected`.
    pub state: String,
    /// What Swarm wants of it: `running`, `shutdown`, ...
    pub desired: String,
    /// Swarm's words on the state, and an error if it failed.
    pub message: String,
    pub error: Option<String>,
    pub exit_code: Option<i64>,
    pub container: Option<String>,
    /// The image its spec runs.
    pub image: String,
    /// Its container's labels.
    pub labels: HashMap<String, String>,
}

impl TaskInfo {
    /// Whether the task is meant to run and does (healthy, where the
    /// service has a health check: Swarm reports `running` only then).
    pub fn is_running(&self) -> bool {
        self.state == "running" && self.desired == "running"
    }

    /// Whether the task has ended for good (it is replaced, if anything).
    pub fn has_ended(&self) -> bool {
        matches!(
            self.state.as_str(),
            "complete" | "failed" | "shutdown" | "rejected" | "orphaned" | "remove"
        )
    }
}

/// Task listings in a row that may fail before a job is given up.
const POLL_FAILURES: u32 = 10;

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl SwarmServiceSpec {
    fn into_spec(self) -> ServiceSpec {
        let mounts = self
            .volumes
            .iter()
            .filter_map(|v| {
                let mut parts = v.splitn(3, ':');
                let (source, target) = (parts.next()?, parts.next()?);
                Some(Mount {
                    source: Some(source.to_owned()),
                    target: Some(target.to_owned()),
                    typ: Some(MountType::VOLUME),
                    read_only: Some(parts.next() == Some("ro")),
                    ..Default::default()
                })
            })
            .collect();
        let (mode, restart) = match self.mode {
            ServiceMode::Replicated(replicas) => (
                ServiceSpecMode {
                    replicated: Some(ServiceSpecModeReplicated {
                        replicas: Some(i64::from(replicas)),
                    }),
                    ..Default::default()
                },
                TaskSpecRestartPolicyConditionEnum::ANY,
            ),
            ServiceMode::Job => (
                ServiceSpecMode {
                    replicated_job: Some(ServiceSpecModeReplicatedJob {
                        max_concurrent: Some(1),
                        total_completions: Some(1),
                    }),
                    ..Default::default()
                },
                TaskSpecRestartPolicyConditionEnum::NONE,
            ),
            ServiceMode::GlobalJob => (
                ServiceSpecMode {
                    global_job: Some(HashMap::new()),
                    ..Default::default()
                },
                TaskSpecRestartPolicyConditionEnum::NONE,
            ),
        };
        let health_check = self.health.map(|h| HealthConfig {
            test: Some(h.test),
            interval: Some(secs(h.interval)),
            timeout: Some(secs(h.timeout)),
            retries: Some(i64::from(h.retries)),
            start_period: Some(secs(h.start_period)),
            start_interval: None,
        });
        let update_config = self.update.map(|u| ServiceSpecUpdateConfig {
            parallelism: Some(i64::from(u.parallelism)),
            delay: Some(0),
            // deployd decides whether to go back: a failed update stops
            // where it is and says so.
            failure_action: Some(ServiceSpecUpdateConfigFailureActionEnum::PAUSE),
            monitor: Some(secs(u.monitor)),
            max_failure_ratio: Some(0.0),
            order: Some(if u.start_first {
                ServiceSpecUpdateConfigOrderEnum::START_FIRST
            } else {
                ServiceSpecUpdateConfigOrderEnum::STOP_FIRST
            }),
        });
        let endpoint_spec = self.publish.map(|(target, published)| EndpointSpec {
            ports: Some(vec![EndpointPortConfig {
                target_port: Some(i64::from(target)),
                published_port: Some(i64::from(published)),
                publish_mode: Some(EndpointPortConfigPublishModeEnum::INGRESS),
                ..Default::default()
            }]),
            ..Default::default()
        });
        ServiceSpec {
            name: Some(self.name),
            labels: Some(self.labels.clone()),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(self.image),
                    labels: Some(self.labels),
                    args: self.cmd,
                    env: Some(self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
                    mounts: Some(mounts),
                    stop_grace_period: self.stop_grace.map(secs),
                    health_check,
                    ..Default::default()
                }),
                restart_policy: Some(TaskSpecRestartPolicy {
                    condition: Some(restart),
                    ..Default::default()
                }),
                networks: self.network.map(|target| {
                    vec![NetworkAttachmentConfig {
                        target: Some(target),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            mode: Some(mode),
            update_config,
            endpoint_spec,
            ..Default::default()
        }
    }
}

fn service_info(s: bollard::models::Service) -> ServiceInfo {
    let spec = s.spec.unwrap_or_default();
    let version = s.version.and_then(|v| v.index).unwrap_or_default();
    ServiceInfo {
        id: s.id.unwrap_or_default(),
        name: spec.name.clone().unwrap_or_default(),
        version,
        labels: spec.labels.clone().unwrap_or_default(),
        replicas: spec
            .mode
            .as_ref()
            .and_then(|m| m.replicated.as_ref())
            .and_then(|r| r.replicas)
            .and_then(|r| u32::try_from(r).ok()),
        // Kept whole (not copied) to write back.
        prior: PriorSpec { spec, version },
        update: s.update_status.map(|u| UpdateStatus {
            state: u.state.map(|s| s.to_string()).unwrap_or_default(),
            message: u.message.unwrap_or_default(),
            started_at: u.started_at.map(|t| t.to_string()).unwrap_or_default(),
        }),
    }
}

impl PriorSpec {
    /// The same spec with `labels` set on the service and its containers.
    pub fn relabelled(&self, labels: &HashMap<String, String>) -> Self {
        let mut spec = self.spec.clone();
        spec.labels.get_or_insert_default().extend(labels.clone());
        if let Some(container) = spec
            .task_template
            .as_mut()
            .and_then(|t| t.container_spec.as_mut())
        {
            container
                .labels
                .get_or_insert_default()
                .extend(labels.clone());
        }
        Self {
            spec,
            version: self.version,
        }
    }

    /// The same spec running `replicas` tasks.
    pub fn scaled(&self, replicas: u32) -> Self {
        let mut spec = self.spec.clone();
        if let Some(replicated) = spec.mode.as_mut().and_then(|m| m.replicated.as_mut()) {
            replicated.replicas = Some(i64::from(replicas));
        }
        Self {
            spec,
            version: self.version,
        }
    }

    /// The pinned image it runs.
    pub fn image(&self) -> Option<&str> {
        self.spec
            .task_template
            .as_ref()?
            .container_spec
            .as_ref()?
            .image
            .as_deref()
    }
}

fn task_state(state: Option<TaskState>) -> String {
    state.map(|s| s.to_string()).unwrap_or_default()
}

fn task_info(t: bollard::models::Task) -> TaskInfo {
    let status = t.status.unwrap_or_default();
    let container = status.container_status.unwrap_or_default();
    let spec = t.spec.and_then(|s| s.container_spec).unwrap_or_default();
    TaskInfo {
        id: t.id.unwrap_or_default(),
        node: t.node_id.unwrap_or_default(),
        slot: t.slot,
        state: task_state(status.state),
        desired: task_state(t.desired_state),
        message: status.message.unwrap_or_default(),
        error: status.err.filter(|e| !e.is_empty()),
        exit_code: container.exit_code,
        container: container.container_id.filter(|c| !c.is_empty()),
        image: spec.image.unwrap_or_default(),
        labels: spec.labels.unwrap_or_default(),
    }
}

impl Docker {
    /// This engine's node id when it is a Swarm manager; why not otherwise.
    pub async fn swarm_manager(&self) -> Result<String, DockerError> {
        let info = self
            .api
            .info()
            .await
            .map_err(DockerError::engine("read the engine's info"))?;
        let swarm = info.swarm.unwrap_or_default();
        match (swarm.control_available, swarm.node_id) {
            (Some(true), Some(node)) => Ok(node),
            _ => Err(DockerError::Engine {
                action: "run Swarm services".into(),
                reason: "this engine is not a Swarm manager (docker swarm init, or run deployd on \
                         a manager node)"
                    .into(),
            }),
        }
    }

    async fn nodes(&self) -> Result<Vec<bollard::models::Node>, DockerError> {
        self.api
            .list_nodes(None::<bollard::query_parameters::ListNodesOptions>)
            .await
            .map_err(DockerError::engine("list Swarm nodes"))
    }

    /// How many nodes are ready and take tasks: where a global job runs.
    pub async fn ready_nodes(&self) -> Result<usize, DockerError> {
        Ok(self
            .nodes()
            .await?
            .into_iter()
            .filter(|n| {
                let ready = n.status.as_ref().and_then(|s| s.state) == Some(NodeState::READY);
                let active = n.spec.as_ref().and_then(|s| s.availability)
                    == Some(NodeSpecAvailabilityEnum::ACTIVE);
                ready && active
            })
            .count())
    }

    /// Node names by node id.
    pub async fn swarm_nodes(&self) -> Result<HashMap<String, String>, DockerError> {
        Ok(self
            .nodes()
            .await?
            .into_iter()
            .filter_map(|n| {
                let host = n.description.and_then(|d| d.hostname);
                Some((n.id?, host.unwrap_or_default()))
            })
            .collect())
    }

    /// The service named `name`, if there is one.
    pub async fn service(&self, name: &str) -> Result<Option<ServiceInfo>, DockerError> {
        match self.api.inspect_service(name, None).await {
            Ok(s) => Ok(Some(service_info(s))),
            Err(e) if status_code(&e) == Some(404) => Ok(None),
            Err(e) => Err(DockerError::engine(format!("inspect service {name}"))(e)),
        }
    }

    /// Services carrying every label in `labels`.
    pub async fn services(&self, labels: &[(&str, &str)]) -> Result<Vec<ServiceInfo>, DockerError> {
        let label: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let filters = HashMap::from([("label", label)]);
        let options = ListServicesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let found = self
            .api
            .list_services(Some(options))
            .await
            .map_err(DockerError::engine("list services"))?;
        Ok(found.into_iter().map(service_info).collect())
    }

    /// Creates a service; returns its id. `auth` goes with it, for the
    /// nodes that pull its image.
    pub async fn create_service(
        &self,
        spec: SwarmServiceSpec,
        auth: Option<&RegistryAuth>,
    ) -> Result<String, DockerError> {
        let name = spec.name.clone();
        let credentials = auth.map(|a| a.credentials_for(&spec.image));
        let created = self
            .api
            .create_service(spec.into_spec(), credentials)
            .await
            .map_err(DockerError::engine(format!("create service {name}")))?;
        Ok(created.id.unwrap_or_default())
    }

    /// Replaces the spec of the service at `version` (see [`ServiceInfo`]);
    /// Swarm then rolls its tasks by the spec's update policy.
    pub async fn update_service(
        &self,
        version: u64,
        spec: SwarmServiceSpec,
        auth: Option<&RegistryAuth>,
    ) -> Result<(), DockerError> {
        let name = spec.name.clone();
        let credentials = auth.map(|a| a.credentials_for(&spec.image));
        let options = UpdateServiceOptionsBuilder::default()
            .version(i32::try_from(version).unwrap_or(i32::MAX))
            .build();
        self.api
            .update_service(&name, spec.into_spec(), options, credentials)
            .await
            .map_err(DockerError::engine(format!("update service {name}")))?;
        Ok(())
    }

    /// Writes `prior` (a spec read earlier, perhaps relabelled or scaled)
    /// over the service's spec at `version`.
    pub async fn restore_service(
        &self,
        name: &str,
        version: u64,
        prior: &PriorSpec,
        auth: Option<&RegistryAuth>,
    ) -> Result<(), DockerError> {
        let credentials = auth
            .zip(prior.image())
            .map(|(a, image)| a.credentials_for(image));
        let options = UpdateServiceOptionsBuilder::default()
            .version(i32::try_from(version).unwrap_or(i32::MAX))
            .build();
        self.api
            .update_service(name, prior.spec.clone(), options, credentials)
            .await
            .map_err(DockerError::engine(format!("update service {name}")))?;
        Ok(())
    }

    /// Removes a service and so its tasks; one already gone counts.
    pub async fn remove_service(&self, name: &str) -> Result<(), DockerError> {
        let result = self.api.delete_service(name).await;
        tolerate(result, 404, format!("remove service {name}"))
    }

    /// The tasks of the service `name` (past ones Swarm keeps included).
    pub async fn tasks(&self, name: &str) -> Result<Vec<TaskInfo>, DockerError> {
        let filters = HashMap::from([("service", vec![name.to_owned()])]);
        let options = ListTasksOptionsBuilder::default().filters(&filters).build();
        let found = self
            .api
            .list_tasks(Some(options))
            .await
            .map_err(DockerError::engine(format!("list the tasks of {name}")))?;
        Ok(found.into_iter().map(task_info).collect())
    }

    /// Runs `spec` as a job (of one task, or with `every_node` of one task
    /// on every node that is ready) to its end and returns its exit code
    /// (a failed task's, if any failed) and output; the service is removed
    /// whatever happens, a timeout included. `on_line` sees each output
    /// line as it arrives.
    pub async fn run_job(
        &self,
        mut spec: SwarmServiceSpec,
        every_node: bool,
        auth: Option<&RegistryAuth>,
        timeout: Duration,
        mut on_line: impl FnMut(&str) + Send,
    ) -> Result<OneOffOutput, DockerError> {
        let tasks = if every_node {
            spec.mode = ServiceMode::GlobalJob;
            self.ready_nodes().await?
        } else {
            spec.mode = ServiceMode::Job;
            1
        };
        spec.update = None;
        let name = spec.name.clone();
        let what = spec
            .cmd
            .as_ref()
            .map_or_else(|| format!("a job of {}", spec.image), |c| c.join(" "));
        self.create_service(spec, auth).await?;
        let sink = LineSink::Call(&mut on_line);
        let result = match tokio::time::timeout(timeout, self.job_to_end(&name, tasks, sink)).await
        {
            Ok(result) => result,
            Err(_) => Err(DockerError::Timeout { what, timeout }),
        };
        match (result, self.remove_service(&name).await) {
            (Ok(output), Ok(())) => Ok(output),
            (Ok(_), Err(e)) | (Err(e), Ok(())) => Err(e),
            (Err(e), Err(removal)) => {
                tracing::warn!(service = %name, error = %removal, "job not removed");
                Err(e)
            }
        }
    }

    /// Follows a job's output until one of its tasks failed or `tasks` of
    /// them completed, then reads the whole output once more for lines the
    /// follow had not delivered yet.
    async fn job_to_end(
        &self,
        name: &str,
        tasks: usize,
        mut sink: LineSink<'_>,
    ) -> Result<OneOffOutput, DockerError> {
        let follow = LogsOptionsBuilder::default()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .build();
        let mut logs = self.api.service_logs(name, Some(follow));
        let mut lines = Lines::default();
        let mut seen = 0usize;
        let mut poll = tokio::time::interval(Duration::from_millis(500));
        let mut following = true;
        let mut failures = 0u32;
        let ended = loop {
            tokio::select! {
                chunk = logs.next(), if following => match chunk {
                    Some(Ok(chunk)) => {
                        for line in lines.push(chunk.as_ref()) {
                            seen += 1;
                            sink.put(line).await;
                        }
                    }
                    // Read whole at the end instead.
                    Some(Err(_)) | None => following = false,
                },
                _ = poll.tick() => match self.tasks(name).await {
                    Ok(found) => {
                        failures = 0;
                        if let Some(ended) = job_ended(found, tasks) {
                            break ended;
                        }
                    }
                    // The job keeps running: a manager busy for a moment
                    // does not stop a migration halfway.
                    Err(e) => {
                        failures += 1;
                        if failures >= POLL_FAILURES {
                            return Err(e);
                        }
                    }
                },
            }
        };
        drop(logs);
        // The whole output once more: the follow may have missed the last
        // lines (it can end, or lag, when the task does).
        let whole = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .build();
        let mut all = Lines::default();
        let mut count = 0usize;
        let mut rest = self.api.service_logs(name, Some(whole));
        while let Some(chunk) = rest.next().await {
            // The end is known: a broken read keeps the lines followed.
            let Ok(chunk) = chunk else {
                tracing::warn!(service = %name, "the job's whole output could not be read again");
                count = 0;
                break;
            };
            for line in all.push(chunk.as_ref()) {
                count += 1;
                if count > seen {
                    sink.put(line).await;
                }
            }
        }
        if let Some(last) = all.flush() {
            count += 1;
            if count > seen {
                sink.put(last).await;
            }
        }
        let lines = if count >= seen { all } else { lines };
        match ended.state.as_str() {
            "complete" => Ok(OneOffOutput {
                exit_code: ended.exit_code.unwrap_or(0),
                lines: lines.finish(),
            }),
            // Its container may never have run its command (a missing
            // executable): Swarm's reason is the last line.
            "failed" => {
                let mut lines = lines.finish();
                if let Some(error) = ended.error {
                    lines.push(format!("[Swarm: {error}]"));
                }
                Ok(OneOffOutput {
                    exit_code: ended.exit_code.filter(|c| *c != 0).unwrap_or(1),
                    lines,
                })
            }
            _ => Err(DockerError::Engine {
                action: format!("run the job {name}"),
                reason: ended.error.unwrap_or(ended.message),
            }),
        }
    }
}

/// The task that decides how a job of `tasks` tasks ended, once it has:
/// the first that did not complete, or, when `tasks` completed, one of
/// them.
fn job_ended(found: Vec<TaskInfo>, tasks: usize) -> Option<TaskInfo> {
    let ended: Vec<TaskInfo> = found.into_iter().filter(TaskInfo::has_ended).collect();
    if let Some(failed) = ended.iter().position(|t| t.state != "complete") {
        return ended.into_iter().nth(failed);
    }
    (ended.len() >= tasks)
        .then(|| ended.into_iter().next())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_env_names_only() {
        let spec = SwarmServiceSpec {
            name: "shop_web".into(),
            env: vec![("DJANGO_SECRET_KEY".into(), "s3cr3t-value".into())],
            ..Default::default()
        };
        let debug = format!("{spec:?}");
        assert!(
            debug.contains("DJANGO_SECRET_KEY") && !debug.contains("s3cr3t"),
            "{debug}"
        );
    }

    #[test]
    fn volumes_become_named_volume_mounts() {
        let spec = SwarmServiceSpec {
            name: "shop_web".into(),
            volumes: vec!["static:/app/static:ro".into(), "media:/app/media".into()],
            ..Default::default()
        };
        let mounts = spec
            .into_spec()
            .task_template
            .and_then(|t| t.container_spec)
            .and_then(|c| c.mounts)
            .unwrap_or_default();
        let got: Vec<_> = mounts
            .iter()
            .map(|m| (m.source.as_deref(), m.target.as_deref(), m.read_only))
            .collect();
        assert_eq!(
            got,
            [
                (Some("static"), Some("/app/static"), Some(true)),
                (Some("media"), Some("/app/media"), Some(false))
            ]
        );
    }

    #[test]
    fn a_job_on_every_node_is_a_global_job_never_restarted() {
        let spec = SwarmServiceSpec {
            name: "shop_task-collectstatic-01ab".into(),
            mode: ServiceMode::GlobalJob,
            ..Default::default()
        }
        .into_spec();
        let mode = spec.mode.unwrap_or_default();
        assert!(mode.global_job.is_some() && mode.replicated_job.is_none());
        let restart = spec.task_template.and_then(|t| t.restart_policy);
        assert_eq!(
            restart.and_then(|r| r.condition),
            Some(TaskSpecRestartPolicyConditionEnum::NONE)
        );
    }

    fn task(node: &str, state: &str) -> TaskInfo {
        TaskInfo {
            id: format!("task-on-{node}"),
            node: node.into(),
            slot: None,
            state: state.into(),
            desired: "complete".into(),
            message: String::new(),
            error: None,
            exit_code: None,
            container: None,
            image: String::new(),
            labels: HashMap::new(),
        }
    }

    #[test]
    fn a_job_ends_when_every_task_completed_or_one_failed() {
        // Two nodes: one completed task is not the end...
        let one_done = vec![task("a", "complete"), task("b", "running")];
        assert_eq!(job_ended(one_done, 2), None);
        // ...two are.
        let both = vec![task("a", "complete"), task("b", "complete")];
        assert_eq!(job_ended(both, 2).map(|t| t.node), Some("a".into()));
        // A failed task ends it at once, and decides how.
        let failed = vec![task("a", "running"), task("b", "failed")];
        assert_eq!(job_ended(failed, 2).map(|t| t.node), Some("b".into()));
        let completed_first = vec![task("a", "complete"), task("b", "rejected")];
        assert_eq!(
            job_ended(completed_first, 2).map(|t| t.state),
            Some("rejected".into())
        );
        // Not placed yet.
        assert_eq!(job_ended(Vec::new(), 1), None);
    }
}
