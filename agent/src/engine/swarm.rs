//! The swarm backend: each configured service is a Swarm service
//! `<app>_<service>` that Swarm places and restarts across the cluster;
//! deployd writes its spec, watches the update, and decides when to go back.
//!
//! - web: start-first, `parallelism` tasks at a time; a task counts as
//!   running only once the service's health check (the HTTP check, run by a
//!   command in the container) passes, which is also when the routing mesh
//!   sends it requests. Swarm watches each new task for the verify window
//!   (`monitor`) and pauses the update at the first failure.
//! - worker: start-first, old tasks get `stop_timeout` after SIGTERM.
//! - singletons (beat): stop-first, one task: never two across the cluster.
//!
//! A rollback writes back each changed service's spec as it was read before
//! the roll; a service this deployment created is removed instead.

use std::collections::HashMap;
use std::time::Duration;

use deployd_proto::EventKind;
use tokio::time::Instant;

use super::common::{Failure, Restored};
use super::health::{Probe, describe_request};
use super::label;
use super::run::Run;
use super::service::{Placement, service_labels};
use crate::config::{HealthConfig, Role, ServiceConfig};
use crate::docker::{
    Docker, HealthCheck, PriorSpec, RegistryAuth, ServiceInfo, ServiceMode, SwarmServiceSpec,
    TaskInfo, UpdatePolicy,
};
use crate::env_file::AppEnv;
use crate::store::Release;

/// On the tasks a rollback starts: apart from the rolled ones of the same
/// deployment, even when both run the same digest.
pub(crate) const RESTORED: &str = "deployd.restored";

/// How often the health check runs in each web task.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Failed checks in a row that make a web task unhealthy (Swarm then
/// replaces it).
const HEALTH_RETRIES: u32 = 3;
/// Health requests through the routing mesh without an answer in time, in
/// a row, that fail a verification.
const SLOW_ANSWERS: u32 = 3;

/// The Swarm service of an app's service.
pub(crate) fn service_name(app: &str, service: &str) -> String {
    format!("{app}_{service}")
}

/// The variable the health check finds its request in.
const HEALTH_REQUEST: &str = "DEPLOYD_HEALTH_REQUEST";

/// The program that checks a web task's health from inside it: the HTTP
/// request of `[health]` to the container's own port, no redirect
/// followed, healthy on a status in `expect`. Django images have Python.
/// The request (header values may be credentials) travels in the
/// container's env, not on its command line; see [`health_request`].
pub(crate) fn health_check(health: &HealthConfig) -> HealthCheck {
    // One line of output either way: "HTTP 500", or "no answer: timed out".
    const PROBE: &str = "import http.client,json,os,sys\n\
        r=json.loads(os.environ['DEPLOYD_HEALTH_REQUEST'])\n\
        try:\n \
        c=http.client.HTTPConnection('127.0.0.1',r['port'],timeout=r['timeout'])\n \
        c.request('GET',r['path'],headers=r['headers'])\n \
        s=c.getresponse().status\n\
        except Exception as e:\n \
        print('no answer:',e)\n \
        sys.exit(1)\n\
        print('HTTP',s)\n\
        sys.exit(0 if s in r['expect'] else 1)";
    HealthCheck {
        test: vec!["CMD".into(), "python3".into(), "-c".into(), PROBE.into()],
        interval: HEALTH_INTERVAL,
        timeout: Duration::from_secs(6),
        retries: HEALTH_RETRIES,
        // A task may take this long to become healthy; failures before its
        // first success do not count.
        start_period: health.timeout,
    }
}

/// The health check's request, as the variable [`HEALTH_REQUEST`] holds it.
fn health_request(port: u16, health: &HealthConfig) -> (String, String) {
    let mut headers: serde_json::Map<String, serde_json::Value> = health
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    headers.insert("Host".into(), health.host.clone().into());
    let request = serde_json::json!({
        "port": port,
        "path": health.path,
        "headers": headers,
        "expect": health.expect,
        "timeout": 5,
    });
    (HEALTH_REQUEST.to_owned(), request.to_string())
}

/// The Swarm service of one configured service, running `release`.
pub(crate) fn swarm_spec(
    place: &Placement<'_>,
    service: &str,
    cfg: &ServiceConfig,
    release: &Release,
) -> SwarmServiceSpec {
    let app_cfg = place.app_cfg;
    let singleton = cfg.is_singleton(service);
    let web = cfg.role_of(service) == Some(Role::Web);
    let swarm = app_cfg.swarm.clone().unwrap_or_default();
    let labels = service_labels(place, service, cfg, release);
    let mut env = place.env.service(service).to_vec();
    let checked = cfg.port.zip(cfg.health.as_ref());
    if let Some((port, health)) = checked {
        env.push(health_request(port, health));
    }
    SwarmServiceSpec {
        name: service_name(place.app, service),
        image: release.pinned(&app_cfg.image),
        cmd: cfg.command.clone(),
        env,
        network: app_cfg.network.clone(),
        volumes: app_cfg.volumes.clone(),
        labels,
        mode: ServiceMode::Replicated(cfg.replicas),
        update: Some(UpdatePolicy {
            start_first: !singleton,
            parallelism: if web { swarm.parallelism } else { 1 },
            monitor: app_cfg.verify,
        }),
        stop_grace: Some(cfg.stop_timeout),
        health: checked.map(|(_, health)| health_check(health)),
        publish: match (web, cfg.port, swarm.publish) {
            (true, Some(port), Some(published)) => Some((port, published)),
            _ => None,
        },
    }
}

/// The release a service ran before this deployment changed it.
#[derive(Debug, Clone)]
struct Before {
    sha: String,
    digest: String,
}

impl Before {
    fn of(info: &ServiceInfo) -> Self {
        let get = |key| info.labels.get(key).cloned().unwrap_or_default();
        Self {
            sha: get(label::SHA),
            digest: get(label::DIGEST),
        }
    }
}

/// What rolling one service changed.
#[derive(Debug)]
struct Change {
    service: String,
    /// What it ran before, and its spec then; `None`: this deployment
    /// created it.
    before: Option<(Before, PriorSpec)>,
}

/// The tasks a spec write is waiting for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wanted<'w> {
    deployment: &'w str,
    digest: &'w str,
    restored: bool,
}

impl Wanted<'_> {
    fn matches(&self, t: &TaskInfo) -> bool {
        t.labels.get(label::DEPLOYMENT).map(String::as_str) == Some(self.deployment)
            && t.labels.get(label::DIGEST).map(String::as_str) == Some(self.digest)
            && t.labels.contains_key(RESTORED) == self.restored
    }
}

/// The services rolled so far, in order. No `Debug`: it holds the app's env.
pub(crate) struct Services<'a> {
    run: &'a Run,
    release: Release,
    env: AppEnv,
    auth: Option<RegistryAuth>,
    changes: Vec<Change>,
    /// What it removed of services no longer configured, a line each.
    removed: Vec<String>,
    /// Node names by id, for messages.
    nodes: HashMap<String, String>,
}

impl<'a> Services<'a> {
    pub fn new(run: &'a Run, release: Release, env: AppEnv, auth: Option<RegistryAuth>) -> Self {
        Self {
            run,
            release,
            env,
            auth,
            changes: Vec::new(),
            removed: Vec::new(),
            nodes: HashMap::new(),
        }
    }

    fn placement(&self) -> Placement<'_> {
        Placement {
            app: &self.run.app,
            app_cfg: &self.run.cfg,
            deployment: &self.run.id.0,
            env: &self.env,
        }
    }

    fn cfg(&self, service: &str) -> Result<&'a ServiceConfig, Failure> {
        self.run
            .cfg
            .services
            .get(service)
            .ok_or_else(|| Failure(format!("service {service} is not configured")))
    }

    fn say(&self, step: &str, line: String) {
        self.run.say(step, line);
    }

    /// Services of the app on the cluster that are no longer configured,
    /// and whether each was a singleton.
    pub async fn unconfigured(&self) -> Result<Vec<(String, bool)>, Failure> {
        let run = self.run;
        let found = run.ctx.docker.services(&[(label::APP, &run.app)]).await?;
        Ok(found
            .into_iter()
            .filter(|s| !s.labels.contains_key(label::TASK))
            .filter_map(|s| {
                let service = s.labels.get(label::SERVICE)?.clone();
                let singleton = s.labels.get(label::SINGLETON).is_some_and(|v| v == "true");
                (!run.cfg.services.contains_key(&service)).then_some((service, singleton))
            })
            .collect())
    }

    /// Ends the Swarm service of a service no longer configured: scaled to
    /// no task, waited for until none runs (a singleton's replacement must
    /// not start before), then removed.
    pub async fn remove(&mut self, service: &str) -> Result<(), Failure> {
        let docker = &self.run.ctx.docker;
        let name = service_name(&self.run.app, service);
        let step = format!("remove:{service}");
        if let Some(info) = docker.service(&name).await? {
            let grace = info
                .labels
                .get(label::STOP_TIMEOUT)
                .and_then(|s| s.parse().ok())
                .map_or(Duration::from_secs(10), Duration::from_secs);
            docker
                .restore_service(
                    &name,
                    info.version,
                    &info.prior.scaled(0),
                    self.auth.as_ref(),
                )
                .await?;
            let deadline = Instant::now() + grace + Duration::from_secs(60);
            loop {
                let tasks = docker.tasks(&name).await?;
                let running = tasks.iter().filter(|t| !t.has_ended()).count();
                if running == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(Failure(format!(
                        "{service}: {running} task(s) of {name} still running {} s after it \
                         was scaled to none",
                        (grace + Duration::from_secs(60)).as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        docker.remove_service(&name).await?;
        let did = format!("{service}: service {name} removed");
        self.removed.push(did.clone());
        self.say(
            &step,
            format!("{did}: the service is no longer in the config"),
        );
        Ok(())
    }

    pub fn removed(&self) -> &[String] {
        &self.removed
    }

    /// Writes the new release's spec for `service` (creating the service
    /// the first time) and waits until Swarm has replaced every task and
    /// watched the last for the verify window.
    pub async fn roll(&mut self, service: &str) -> Result<(), Failure> {
        let cfg = self.cfg(service)?;
        let docker = &self.run.ctx.docker;
        if self.nodes.is_empty() {
            self.nodes = docker.swarm_nodes().await.unwrap_or_default();
        }
        let name = service_name(&self.run.app, service);
        let found = docker.service(&name).await?;
        let spec = swarm_spec(&self.placement(), service, cfg, &self.release);
        let step = format!("roll:{service}");
        // Recorded before the write: a failed write may still have changed it.
        self.changes.push(Change {
            service: service.to_owned(),
            before: found.as_ref().map(|f| (Before::of(f), f.prior.clone())),
        });
        match &found {
            None => {
                docker.create_service(spec, self.auth.as_ref()).await?;
                self.say(&step, format!("service {name} created"));
            }
            Some(info) => {
                docker
                    .update_service(info.version, spec, self.auth.as_ref())
                    .await?;
                self.say(
                    &step,
                    format!(
                        "service {name} updated ({}, {} task(s) at a time, each watched for {} s)",
                        if cfg.is_singleton(service) {
                            "stop-first"
                        } else {
                            "start-first"
                        },
                        if cfg.role_of(service) == Some(Role::Web) {
                            self.run.cfg.swarm.clone().unwrap_or_default().parallelism
                        } else {
                            1
                        },
                        self.run.cfg.verify.as_secs()
                    ),
                );
            }
        }
        // Test-only crash hook: deployd killed while Swarm updates.
        self.run
            .ctx
            .journal
            .freeze_point(&format!("{step}:written"))
            .await;
        let wanted = Wanted {
            deployment: &self.run.id.0,
            digest: &self.release.digest,
            restored: false,
        };
        let stale = found.map(|f| f.update.map(|u| u.started_at).unwrap_or_default());
        tokio::select! {
            done = self.converged(&step, &name, cfg, wanted, stale.as_deref()) => done,
            failed = self.watch_rolled(service) => Err(failed),
        }
    }

    /// See [`converge`]; each task that starts running goes to the log.
    async fn converged(
        &self,
        step: &str,
        name: &str,
        cfg: &ServiceConfig,
        wanted: Wanted<'_>,
        before: Option<&str>,
    ) -> Result<(), Failure> {
        let docker = &self.run.ctx.docker;
        let verify = self.run.cfg.verify;
        let say = |line| self.say(step, line);
        converge(docker, &self.nodes, name, cfg, verify, wanted, before, say).await
    }

    /// Watches every changed service for the verify window (and, for a
    /// health-checked service, as long again as the check takes to call a
    /// task unhealthy): see [`Self::check_rolled`]; a bad answer through
    /// the routing mesh fails it too.
    pub async fn verify(&self) -> Result<(), Failure> {
        let run = self.run;
        // A health check that starts failing within the window makes its
        // task fail only after `HEALTH_RETRIES` checks: watched that long too.
        let checked = self.changes.iter().any(|c| {
            run.cfg
                .services
                .get(&c.service)
                .is_some_and(|s| s.health.is_some())
        });
        let grace = match checked {
            true => HEALTH_INTERVAL * (HEALTH_RETRIES + 1),
            false => Duration::ZERO,
        };
        let deadline = Instant::now() + run.cfg.verify + grace;
        let mut slow = 0u32;
        loop {
            self.check_rolled(&self.changes, "failed verification")
                .await?;
            if let Some((port, health)) = self.published_web() {
                match run.ctx.health.probe(port, health).await.healthy(health) {
                    Ok(_) => slow = 0,
                    Err(Probe::Timeout) => {
                        slow += 1;
                        if slow >= SLOW_ANSWERS {
                            return Err(Failure(format!(
                                "web failed verification through the routing mesh: {} answered \
                                 {} ({SLOW_ANSWERS} times in a row)",
                                describe_request(health),
                                Probe::Timeout
                            )));
                        }
                    }
                    Err(probe) => {
                        return Err(Failure(format!(
                            "web failed verification through the routing mesh (port {port}): {} \
                             answered {probe}",
                            describe_request(health)
                        )));
                    }
                }
            }
            if Instant::now() >= deadline && slow == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Fails when a task of this release in one of `changes` has ended
    /// (crashed, refused, or stopped by Swarm for failing its health
    /// check) or got a bad answer from its health check, or when Swarm's
    /// update of one of them paused or rolled back.
    async fn check_rolled(&self, changes: &[Change], failed: &str) -> Result<(), Failure> {
        let run = self.run;
        let docker = &run.ctx.docker;
        let wanted = Wanted {
            deployment: &run.id.0,
            digest: &self.release.digest,
            restored: false,
        };
        for change in changes {
            let name = service_name(&run.app, &change.service);
            let fail = |why: String| Failure(format!("{} {failed}: {why}", change.service));
            let tasks = docker.tasks(&name).await?;
            if let Some(failed) = failed_task(docker, &self.nodes, wanted, &tasks).await {
                return Err(fail(format!("a task {failed}")));
            }
            if let Some(Some(u)) = docker.service(&name).await?.map(|s| s.update)
                && u.state != "completed"
                && u.state != "updating"
            {
                return Err(fail(format!(
                    "Swarm's update is {}: {}",
                    u.state, u.message
                )));
            }
        }
        Ok(())
    }

    /// Watches the services rolled before the last one until one fails
    /// (see [`Self::check_rolled`]): a web release that turns unhealthy
    /// while worker and beat roll is rolled back then, not once they are
    /// done.
    async fn watch_rolled(&self, while_rolling: &str) -> Failure {
        let earlier = &self.changes[..self.changes.len().saturating_sub(1)];
        let failed = format!("failed while {while_rolling} rolled");
        loop {
            if let Err(f) = self.check_rolled(earlier, &failed).await {
                return f;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The published port and health check of a rolled web service.
    fn published_web(&self) -> Option<(u16, &'a HealthConfig)> {
        let publish = self.run.cfg.swarm.as_ref()?.publish?;
        self.changes.iter().find_map(|c| {
            let cfg = self.run.cfg.services.get(&c.service)?;
            (cfg.role_of(&c.service) == Some(Role::Web))
                .then_some(())
                .and(cfg.health.as_ref())
                .map(|h| (publish, h))
        })
    }

    /// Whether any service that existed before had its spec changed.
    pub fn touched_running(&self) -> bool {
        self.changes.iter().any(|c| c.before.is_some())
    }

    /// After a failure that changed no service that existed: removes the
    /// services this deployment created.
    pub async fn discard(&mut self) -> Result<(), Failure> {
        let docker = &self.run.ctx.docker;
        for change in self.changes.iter().rev() {
            docker
                .remove_service(&service_name(&self.run.app, &change.service))
                .await?;
        }
        Ok(())
    }

    /// Puts every changed service back on the spec of the release it ran,
    /// all at once (each is Swarm's own update: web is not kept waiting for
    /// the others), and removes those this deployment created. Carries on
    /// past a service that fails; returns what runs now, or an account of
    /// what failed.
    pub async fn restore(self) -> Result<String, Failure> {
        let outcomes =
            futures_util::future::join_all(self.changes.iter().map(|c| self.restore_service(c)))
                .await;
        let mut restored = Restored::default();
        for (change, outcome) in self.changes.iter().zip(outcomes) {
            match outcome {
                Ok(true) => restored.back.push(change.service.clone()),
                Ok(false) => restored.emptied.push(change.service.clone()),
                Err(f) => restored.failed.push(format!("{}: {}", change.service, f.0)),
            }
        }
        let release = self
            .changes
            .iter()
            .find_map(|c| c.before.as_ref())
            .map_or_else(|| "the previous release".to_owned(), |(b, _)| b.sha.clone());
        let said = restored.account(&release, "did not exist before and were removed")?;
        Ok(said.join("; "))
    }

    /// One service back on what it ran, its spec written back as it was
    /// read before the roll (not rebuilt from today's config); false when
    /// this deployment created it and it was removed instead.
    async fn restore_service(&self, change: &Change) -> Result<bool, Failure> {
        let docker = &self.run.ctx.docker;
        let name = service_name(&self.run.app, &change.service);
        let Some((before, prior)) = &change.before else {
            docker.remove_service(&name).await?;
            return Ok(false);
        };
        let cfg = self.cfg(&change.service)?;
        let info = docker
            .service(&name)
            .await?
            .ok_or_else(|| Failure(format!("service {name} is gone")))?;
        if info.version == prior.version {
            // The roll's write never took: it runs what it ran.
            return Ok(true);
        }
        let labels = HashMap::from([
            (label::DEPLOYMENT.to_owned(), self.run.id.0.clone()),
            (RESTORED.to_owned(), "true".to_owned()),
        ]);
        let stale = info.update.map(|u| u.started_at).unwrap_or_default();
        let auth = self.auth.as_ref();
        docker
            .restore_service(&name, info.version, &prior.relabelled(&labels), auth)
            .await?;
        let wanted = Wanted {
            deployment: &self.run.id.0,
            digest: &before.digest,
            restored: true,
        };
        self.converged("rollback", &name, cfg, wanted, Some(&stale))
            .await?;
        self.run.emit(EventKind::Output {
            step: "rollback".into(),
            line: format!("service {name} runs {} again", before.sha),
        });
        Ok(true)
    }
}

/// Waits until `replicas` tasks of the wanted spec run and no other does,
/// and, after an update, until Swarm calls it completed (the last task
/// watched for `verify`). A paused update, or a new task that failed,
/// fails it with Swarm's words. `before`: the service was updated, and its
/// last update before that began then (that status is not this update's).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn converge(
    docker: &Docker,
    nodes: &HashMap<String, String>,
    name: &str,
    cfg: &ServiceConfig,
    verify: Duration,
    wanted: Wanted<'_>,
    before: Option<&str>,
    mut say: impl FnMut(String),
) -> Result<(), Failure> {
    let updated = before.is_some();
    let per_task = cfg
        .health
        .as_ref()
        .map_or(cfg.min_healthy + Duration::from_secs(60), |h| h.timeout)
        + verify
        + cfg.stop_timeout;
    // Nodes that never ran the release pull it first.
    let deadline = Instant::now() + per_task * cfg.replicas + Duration::from_secs(180);
    let mut told = std::collections::HashSet::new();
    loop {
        let info = docker
            .service(name)
            .await?
            .ok_or_else(|| Failure(format!("service {name} is gone")))?;
        let tasks = docker.tasks(name).await?;
        if let Some(failed) = failed_task(docker, nodes, wanted, &tasks).await {
            return Err(Failure(format!("a new task of {name} {failed}")));
        }
        let update = info
            .update
            .as_ref()
            .filter(|u| Some(u.started_at.as_str()) != before)
            .map(|u| (u.state.as_str(), u.message.as_str()));
        if let Some((state @ ("paused" | "rollback_started" | "rollback_paused"), message)) = update
        {
            return Err(Failure(format!(
                "Swarm's update of {name} is {state}: {message}"
            )));
        }
        let new: Vec<&TaskInfo> = tasks
            .iter()
            .filter(|t| wanted.matches(t) && t.is_running())
            .collect();
        let others = tasks
            .iter()
            .filter(|t| !wanted.matches(t) && !t.has_ended() && t.desired == "running")
            .count();
        for t in &new {
            if told.insert(t.id.clone()) {
                say(format!(
                    "task {name}.{} running on {}",
                    t.slot.unwrap_or_default(),
                    node_name(nodes, &t.node)
                ));
            }
        }
        let tasks_done = new.len() >= cfg.replicas as usize && others == 0;
        let swarm_done = !updated || update.is_some_and(|(s, _)| s == "completed");
        if tasks_done && swarm_done {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Failure(format!(
                "{name} did not converge in time: {} of {} new task(s) running, {others} \
                 other(s) still running, update {}",
                new.len(),
                cfg.replicas,
                update.map_or("not started".to_owned(), |(s, m)| format!("{s}: {m}"))
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A node's name, or its short id when it has none.
pub(crate) fn node_name(nodes: &HashMap<String, String>, id: &str) -> String {
    match nodes.get(id) {
        Some(name) if !name.is_empty() => name.clone(),
        _ => id.chars().take(12).collect(),
    }
}

/// How a task ended, where, in Swarm's words, with its exit code and, when
/// its container is on this node, what its last health checks said.
async fn task_failure(docker: &Docker, nodes: &HashMap<String, String>, t: &TaskInfo) -> String {
    let mut said = format!(
        "(slot {}, on {}) ended {}: {}",
        t.slot.unwrap_or_default(),
        node_name(nodes, &t.node),
        t.state,
        t.error.as_deref().unwrap_or(&t.message)
    );
    if let Some(code) = t.exit_code {
        said.push_str(&format!(", exit code {code}"));
    }
    if let Some(container) = &t.container
        && let Some(checks) = docker.health_checks(container).await
        && !checks.is_empty()
    {
        let checks: Vec<String> = checks.iter().map(ToString::to_string).collect();
        said.push_str(&format!(
            "; its last health checks, oldest first: {}",
            checks.join(", ")
        ));
    }
    said
}

/// The first task of `wanted` that failed, said as by [`task_failure`] or
/// [`bad_answer`]. A new task never ends on its own: one that did crashed,
/// was refused, or was stopped by Swarm for failing its health check. A new
/// release is also judged at its first bad answer; a restored one (a
/// rollback, a recovery) is left to Swarm's own count: a 503 while the
/// database blinks must not fail a rollback.
async fn failed_task(
    docker: &Docker,
    nodes: &HashMap<String, String>,
    wanted: Wanted<'_>,
    tasks: &[TaskInfo],
) -> Option<String> {
    let ours = || tasks.iter().filter(|t| wanted.matches(t));
    if let Some(ended) = ours().find(|t| t.has_ended()) {
        return Some(task_failure(docker, nodes, ended).await);
    }
    if !wanted.restored {
        for t in ours() {
            if let Some(bad) = bad_answer(docker, nodes, t).await {
                return Some(bad);
            }
        }
    }
    None
}

/// A running task whose last health check got a bad answer (the check
/// printed the status), as a failure: a bad answer fails a release at once,
/// as on the docker backend; a check that got no answer in time is left to
/// Swarm, which replaces the task after [`HEALTH_RETRIES`] in a row. Known
/// only for tasks on this node (their containers are on this engine).
async fn bad_answer(
    docker: &Docker,
    nodes: &HashMap<String, String>,
    t: &TaskInfo,
) -> Option<String> {
    let container = t.container.as_deref().filter(|_| t.is_running())?;
    let check = docker.health_checks(container).await?.pop()?;
    (check.failed() && check.output.starts_with("HTTP ")).then(|| {
        format!(
            "(slot {}, on {}) answered its health check with {}",
            t.slot.unwrap_or_default(),
            node_name(nodes, &t.node),
            check.output
        )
    })
}

impl super::Ctx {
    /// Crash recovery of a swarm app's deployment: the cluster kept the
    /// desired state, so each service's spec is brought to one release:
    /// the deployment's own if it had passed verification, otherwise the
    /// live one (a service that already runs it is left alone). Without
    /// a live release, the services this deployment created are removed.
    /// Its leftover release-task jobs are removed first.
    pub(crate) async fn converge_swarm(
        &self,
        d: &deployd_proto::Deployment,
        cfg: &crate::config::AppConfig,
    ) -> Result<String, Failure> {
        let docker = &self.docker;
        for job in docker
            .services(&[(label::APP, &d.app), (label::DEPLOYMENT, &d.id.0)])
            .await?
            .into_iter()
            .filter(|s| s.labels.contains_key(label::TASK))
        {
            docker.remove_service(&job.name).await?;
        }
        let Some(super::recover::Target { release, new }) = self.target(d)? else {
            let mut removed = Vec::new();
            for s in docker
                .services(&[(label::APP, &d.app), (label::DEPLOYMENT, &d.id.0)])
                .await?
            {
                docker.remove_service(&s.name).await?;
                removed.push(s.name);
            }
            return Ok(format!(
                "no earlier release ran; the services it created were removed ({})",
                if removed.is_empty() {
                    "none".to_owned()
                } else {
                    removed.join(", ")
                }
            ));
        };
        let env = AppEnv::read(cfg)?;
        let place = Placement {
            app: &d.app,
            app_cfg: cfg,
            deployment: &d.id.0,
            env: &env,
        };
        let auth = super::prepare::registry_auth(cfg)?;
        let nodes = docker.swarm_nodes().await.unwrap_or_default();
        let mut changed = Vec::new();
        for service in cfg.roll_order() {
            let service_cfg = &cfg.services[&service];
            let name = service_name(&d.app, &service);
            let found = docker.service(&name).await?;
            let runs_it = found.as_ref().is_some_and(|f| {
                release.runs_in(&f.labels) && f.update.as_ref().is_none_or(|u| u.state != "paused")
            });
            if runs_it {
                continue;
            }
            let mut spec = swarm_spec(&place, &service, service_cfg, &release);
            spec.labels.insert(RESTORED.to_owned(), "true".to_owned());
            let before = match found {
                Some(info) => {
                    docker
                        .update_service(info.version, spec, auth.as_ref())
                        .await?;
                    Some(info.update.map(|u| u.started_at).unwrap_or_default())
                }
                None => {
                    docker.create_service(spec, auth.as_ref()).await?;
                    None
                }
            };
            let wanted = Wanted {
                deployment: &d.id.0,
                digest: &release.digest,
                restored: true,
            };
            converge(
                docker,
                &nodes,
                &name,
                service_cfg,
                cfg.verify,
                wanted,
                before.as_deref(),
                |line| tracing::info!(app = %d.app, "{line}"),
            )
            .await
            .map_err(|f| Failure(format!("{service}: {}", f.0)))?;
            changed.push(service);
        }
        if new {
            self.store.mark_live(&d.id)?;
        }
        Ok(match changed.is_empty() {
            true => format!("every service runs {}", release.sha),
            false => format!("{} run {} again", changed.join(", "), release.sha),
        })
    }
}

impl super::Ctx {
    /// A swarm app's services for its status: each one's tasks meant to
    /// run, or running still, with their node, release and state.
    pub(crate) async fn swarm_status(
        &self,
        app: &str,
        cfg: &crate::config::AppConfig,
        current: &[String],
    ) -> Result<Vec<deployd_proto::ServiceStatus>, super::EngineError> {
        use deployd_proto::{ContainerPhase, ContainerStatus, ServiceStatus};
        let docker = &self.docker;
        let nodes = docker.swarm_nodes().await?;
        let found = docker.services(&[(label::APP, app)]).await?;
        let mut names = cfg.roll_order();
        let mut removed = Vec::new();
        for s in &found {
            if let Some(service) = s.labels.get(label::SERVICE)
                && !s.labels.contains_key(label::TASK)
                && !cfg.services.contains_key(service)
            {
                removed.push(service.clone());
            }
        }
        names.extend(removed.iter().cloned());
        let mut services = Vec::new();
        for service in names {
            let name = service_name(app, &service);
            let Some(info) = found.iter().find(|s| s.name == name) else {
                services.push(ServiceStatus {
                    singleton: cfg
                        .services
                        .get(&service)
                        .is_some_and(|c| c.is_singleton(&service)),
                    name: service,
                    removed: false,
                    containers: Vec::new(),
                });
                continue;
            };
            let checked = cfg
                .services
                .get(&service)
                .is_some_and(|c| c.health.is_some());
            let mut containers = Vec::new();
            for t in docker.tasks(&name).await? {
                if t.has_ended() && t.desired != "running" {
                    continue;
                }
                let sha = t.labels.get(label::SHA).cloned();
                let state = match (
                    t.has_ended(),
                    sha.as_ref().is_some_and(|s| current.contains(s)),
                ) {
                    (true, _) => ContainerPhase::Stopped,
                    (false, true) => ContainerPhase::Running,
                    (false, false) => ContainerPhase::Draining,
                };
                let health = match (checked, t.state.as_str()) {
                    // Swarm reports a checked task running once healthy.
                    (true, "running") => Some("healthy".to_owned()),
                    (true, "starting") => Some("starting".to_owned()),
                    _ => None,
                };
                let mut status = t.state.clone();
                if !t.message.is_empty() {
                    status.push_str(&format!(" ({})", t.message));
                }
                if let Some(error) = &t.error {
                    status.push_str(&format!(": {error}"));
                }
                containers.push(ContainerStatus {
                    name: format!("{name}.{}", t.slot.unwrap_or_default()),
                    sha: sha.and_then(|s| s.parse().ok()),
                    state,
                    status: Some(status),
                    health,
                    node: Some(node_name(&nodes, &t.node)),
                });
            }
            containers.sort_by(|a, b| a.name.cmp(&b.name));
            services.push(ServiceStatus {
                singleton: info
                    .labels
                    .get(label::SINGLETON)
                    .is_some_and(|v| v == "true"),
                removed: !cfg.services.contains_key(&service),
                name: service,
                containers,
            });
        }
        Ok(services)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the health check's program with this host's Python against
    /// `port`, as Docker runs it in a task; returns its output and code.
    fn probe(port: u16) -> (String, i32) {
        let health = HealthConfig {
            path: "/healthz/".into(),
            host: "shop.example".into(),
            headers: Default::default(),
            expect: vec![200],
            timeout: Duration::from_secs(5),
        };
        let check = health_check(&health);
        let (var, request) = health_request(port, &health);
        let out = std::process::Command::new(&check.test[1])
            .args(&check.test[2..])
            .env(var, request)
            .output()
            .expect("python3 runs");
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (said, out.status.code().unwrap_or(-1))
    }

    /// A server on a free loopback port answering every request with
    /// `status`, for as long as the test runs.
    fn answering(status: u16) -> u16 {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let _ = conn.read(&mut [0; 4096]);
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        port
    }

    #[test]
    fn the_health_check_says_in_one_line_what_it_got() {
        assert_eq!(probe(answering(200)), ("HTTP 200".to_owned(), 0));
        assert_eq!(probe(answering(500)), ("HTTP 500".to_owned(), 1));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (said, code) = probe(closed);
        assert!(said.starts_with("no answer: "), "{said}");
        assert!(!said.contains('\n'), "{said}");
        assert_eq!(code, 1);
    }
}
