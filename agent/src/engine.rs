//! The deployment engine: one task per agent, reached through [`EngineHandle`].
//!
//! The engine task owns the only mutable state that must not race (which
//! app has a deployment running) and starts each deployment in a task of its
//! own. Progress goes to the store first, then to live subscribers.

mod backend;
mod canary;
pub(crate) mod command;
mod common;
mod follow;
mod health;
mod journal;
mod logs;
mod observed;
mod plan;
mod prepare;
mod recover;
mod release;
mod roll;
mod run;
mod schema;
mod service;
mod status;
mod swarm;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deployd_proto::{
    AppLock, CommitSha, Deployment, DeploymentEvent, DeploymentId, DeploymentKind, DeploymentState,
};
use time::OffsetDateTime;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use canary::Order as CanaryOrder;
pub use command::CommandRun;

use crate::config::{AppConfig, Config};
use crate::docker::Docker;
use crate::metrics::Metrics;
use crate::store::{FleetLocking, Lock, Store, StoreError};
use crate::switch::Routes;

/// How long a readiness check answers `/readiness` for.
const READINESS_FRESH: Duration = Duration::from_secs(2);

/// Labels on every container deployd creates; after a restart they are how
/// it tells what runs.
pub mod label {
    pub const APP: &str = "deployd.app";
    pub const SERVICE: &str = "deployd.service";
    /// `true` on a singleton service's containers (beat): what a fleet
    /// reads once the service has left the config.
    pub const SINGLETON: &str = "deployd.singleton";
    /// The service's `stop_timeout` in seconds, for stopping its containers
    /// once the service has left the config.
    pub const STOP_TIMEOUT: &str = "deployd.stop-timeout";
    pub const SHA: &str = "deployd.sha";
    pub const DIGEST: &str = "deployd.digest";
    pub const DEPLOYMENT: &str = "deployd.deployment";
    pub const TASK: &str = "deployd.task";
}

/// A request to deploy (or roll back to) a release.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    pub app: String,
    pub sha: CommitSha,
    /// Deploy even when the sha is live already.
    pub force: bool,
    pub reason: Option<String>,
    pub requested_by: String,
    /// Deploy exactly this image digest of the sha (rollbacks: what ran
    /// then, even if the tag was moved since; a fleet: what its first host
    /// resolved the tag to).
    pub digest: Option<String>,
    /// Run no release task (rollbacks only).
    pub skip_tasks: bool,
    /// One host's part of a fleet deployment.
    pub fleet: Option<deployd_proto::FleetPart>,
    /// The plan to hold to: fail if the release, the live release or the
    /// pending migrations changed since it was made.
    pub plan: Option<String>,
    /// Go on past migrations that break the running release.
    pub allow_unsafe_migrations: bool,
    /// Rollbacks: what to do about migrations applied since.
    pub schema: deployd_proto::SchemaRollback,
    /// Run it as a canary, or not; `None`: as the app's `[canary] default`.
    pub canary: Option<bool>,
}

/// Why the engine refused a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no app named {0} is configured")]
    UnknownApp(String),
    #[error("deployment {running} of {app} is still running")]
    Conflict { app: String, running: DeploymentId },
    #[error("{app} is locked by {}: {}", lock.locked_by, lock.reason)]
    Locked { app: String, lock: Box<Lock> },
    #[error("{0} has no earlier successful release to roll back to")]
    NoPreviousRelease(String),
    #[error("{sha} is not among the releases of {app} kept for rollback")]
    UnknownRelease { app: String, sha: CommitSha },
    #[error("no deployment {0}")]
    UnknownDeployment(DeploymentId),
    #[error("no plan {0} on this host")]
    UnknownPlan(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Docker(#[from] crate::docker::DockerError),
    #[error("a prepare of {sha} is still pulling for {app}; ask again once it has ended")]
    Preparing { app: String, sha: CommitSha },
    #[error(
        "plan {id} of {app} is still being made; read it (deployctl plan --show {id}) and ask \
         again once it has ended"
    )]
    Planning { app: String, id: String },
    #[error(
        "{0} has no [apps.{0}.canary] in deployd's config: a canary deployment needs one \
         (and the switch)"
    )]
    CanaryNotConfigured(String),
    #[error("no canary of {0} is running")]
    NoCanary(String),
    #[error("a fleet deployment of {0} runs no canary: deploy the hosts one by one for that")]
    CanaryInFleet(String),
    #[error("{0}")]
    UnknownService(String),
    #[error("{0} has no live release to run a command in: deploy one first")]
    NothingLive(String),
    #[error("{by} runs `{command}` in {app} ({running} command(s) running); {advice}")]
    CommandRunning {
        app: String,
        by: String,
        command: String,
        running: usize,
        advice: &'static str,
    },
    #[error("the app's environment cannot be read: {0}")]
    Env(String),
    #[error("the engine has stopped")]
    Stopped,
    #[error("cannot set up an HTTP client: {0}")]
    HttpClient(String),
}

impl EngineError {
    /// Whether the request was refused before anything was recorded or
    /// started (a conflict, a lock, an unknown app or release).
    pub fn changed_nothing(&self) -> bool {
        matches!(
            self,
            Self::UnknownApp(_)
                | Self::Conflict { .. }
                | Self::Locked { .. }
                | Self::Preparing { .. }
                | Self::Planning { .. }
                | Self::NoPreviousRelease(_)
                | Self::UnknownRelease { .. }
                | Self::CanaryNotConfigured(_)
                | Self::CanaryInFleet(_)
                | Self::NoCanary(_)
                | Self::UnknownService(_)
                | Self::NothingLive(_)
                | Self::CommandRunning { .. }
                | Self::Env(_)
        )
    }
}

/// Shared by the engine task and every deployment task.
#[derive(Debug)]
pub(crate) struct Ctx {
    docker: Docker,
    store: Store,
    health: health::HealthCheck,
    /// Deployments' events, webhooks and audit records.
    journal: journal::Journal,
    /// What status and readiness answer from.
    view: View,
    /// Where public traffic goes.
    traffic: Traffic,
    /// Work beside deployments.
    jobs: Jobs,
    metrics: Arc<Metrics>,
    /// Fires at shutdown: no deployment starts another step.
    stopping: CancellationToken,
}

/// What status and readiness answer from, kept current so that a request
/// costs no Docker call and no store read when nothing changed.
#[derive(Debug, Default)]
struct View {
    /// What runs.
    observed: observed::Observed,
    /// What the store said of each app's status, and at which generation.
    recorded: Mutex<HashMap<String, (u64, status::Recorded)>>,
    /// The last readiness check and when it was made.
    readiness: Mutex<Option<(std::time::Instant, Vec<&'static str>)>>,
}

/// Where public traffic goes.
#[derive(Debug)]
struct Traffic {
    /// Each switched app's route.
    routes: Routes,
    /// The canaries running, where promote and abort go.
    canaries: canary::Canaries,
}

/// Work beside deployments, each kind with its own limits.
#[derive(Debug, Default)]
struct Jobs {
    /// Each app's latest prepare (pull and pin ahead of a deployment).
    prepares: prepare::Prepares,
    /// Plans made by this process that no deployment made, by id.
    planning: Mutex<HashMap<String, plan::Making>>,
    /// One-off commands running (`deployctl run`).
    commands: command::Commands,
}

/// A cheap, cloneable way to talk to the engine.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    ctx: Arc<Ctx>,
    apps: Arc<HashMap<String, Arc<AppConfig>>>,
}

#[derive(Debug)]
enum Command {
    Deploy {
        request: Box<DeployRequest>,
        kind: DeploymentKind,
        /// Rollbacks: the deployment that last made the target release
        /// live; migrations applied after it stay applied.
        target: Option<DeploymentId>,
        reply: oneshot::Sender<Result<Deployment, EngineError>>,
    },
    Finished {
        app: String,
    },
}

impl EngineHandle {
    /// Starts the engine. Deployments a crash interrupted are reconciled
    /// with Docker first (see `recover`), then requests are served.
    pub async fn start(config: &Config, docker: Docker, store: Store) -> Result<Self, EngineError> {
        Self::start_with(config, docker, store, Routes::for_config(config), None).await
    }

    /// Like [`EngineHandle::start`], steering the switch's `routes`: they
    /// are set from what runs first, then follow every roll.
    pub async fn start_routed(
        config: &Config,
        docker: Docker,
        store: Store,
        routes: Routes,
    ) -> Result<Self, EngineError> {
        Self::start_with(config, docker, store, routes, None).await
    }

    /// For the test kit's crash tests: like [`EngineHandle::start`], but
    /// every deployment freezes before the step `before_step` (`finish` for
    /// the final record); the receiver fires when one got there.
    #[cfg(feature = "testkit")]
    pub async fn start_frozen_before(
        config: &Config,
        docker: Docker,
        store: Store,
        before_step: &str,
    ) -> Result<(Self, oneshot::Receiver<()>), EngineError> {
        let (freeze, fired) = journal::Freeze::at(before_step);
        Ok((
            Self::start_with(
                config,
                docker,
                store,
                Routes::for_config(config),
                Some(freeze),
            )
            .await?,
            fired,
        ))
    }

    async fn start_with(
        config: &Config,
        docker: Docker,
        store: Store,
        routes: Routes,
        freeze: Option<journal::Freeze>,
    ) -> Result<Self, EngineError> {
        // Rolling and recovery rely on a valid config (services named in
        // `order` exist, web has a health check, ...).
        config.validate()?;
        crate::install_crypto_provider();
        // Health checks are plain HTTP to containers: no TLS roots needed,
        // so none are loaded (a host without ca-certificates works too).
        let health =
            health::HealthCheck::new().map_err(|e| EngineError::HttpClient(e.to_string()))?;
        let apps: HashMap<String, Arc<AppConfig>> = config
            .apps
            .iter()
            .map(|(name, app)| (name.clone(), Arc::new(app.clone())))
            .collect();
        let configs = apps.iter().map(|(name, cfg)| (name, cfg.as_ref()));
        let notifier = crate::notify::Notifier::new(configs, store.clone())
            .map_err(EngineError::HttpClient)?;
        let journal = journal::Journal::new(store.clone(), notifier, freeze);
        let ctx = Arc::new(Ctx {
            docker,
            store,
            health,
            journal,
            view: View::default(),
            metrics: Arc::new(Metrics::new(&routes)),
            traffic: Traffic {
                routes,
                canaries: canary::Canaries::default(),
            },
            jobs: Jobs::default(),
            stopping: CancellationToken::new(),
        });
        ctx.metrics.register_apps(apps.keys());
        ctx.seed_routes(&apps).await;
        // Before recovery, whose accounts of interrupted deployments set
        // off deliveries of their own.
        match ctx.store.give_up_deliveries(OffsetDateTime::now_utc()) {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                deliveries = n,
                "webhook deliveries cut off by the last stop, given up"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot close webhook deliveries cut off by the last stop")
            }
        }
        ctx.recover(&apps).await?;
        ctx.remove_oneoff_leftovers(apps.keys(), "plan").await;
        ctx.end_leftover_commands(apps.keys()).await;
        ctx.seed_metrics(&apps);
        ctx.relist().await;
        tokio::spawn(ctx.clone().observe());
        tokio::spawn(ctx.clone().probe_health(apps.clone()));
        let (commands, inbox) = mpsc::channel(64);
        let engine = Engine {
            ctx: ctx.clone(),
            apps: apps.clone(),
            running: HashMap::new(),
            commands: commands.clone(),
        };
        tokio::spawn(engine.serve(inbox));
        Ok(Self {
            commands,
            ctx,
            apps: Arc::new(apps),
        })
    }

    /// Shutdown begins: deployments in flight start no further step (the
    /// one under way is cut when the process exits), and event streams end.
    /// Their records stay `running`: the next start reconciles them with
    /// what Docker runs and marks them `interrupted`.
    pub fn stop(&self) {
        self.ctx.stopping.cancel();
    }

    /// Resolves once [`EngineHandle::stop`] was called.
    pub fn stopping(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.ctx.stopping.cancelled()
    }

    /// What keeps the agent from deploying: `docker` (the engine does not
    /// answer within 5 s), `store` (it takes no writes). Empty when ready;
    /// also sets the `deployd_ready` metric.
    pub async fn readiness(&self) -> Vec<&'static str> {
        let mut failing = Vec::new();
        let docker = tokio::time::timeout(Duration::from_secs(5), self.ctx.docker.version());
        match docker.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness: Docker engine not reachable");
                failing.push("docker");
            }
            Err(_) => {
                tracing::warn!("readiness: Docker engine did not answer within 5 s");
                failing.push("docker");
            }
        }
        if let Err(e) = self.ctx.store.check_writable() {
            tracing::warn!(error = %e, "readiness: store not writable");
            failing.push("store");
        }
        self.ctx.metrics.readiness(&failing);
        *crate::sync::lock(&self.ctx.view.readiness) =
            Some((std::time::Instant::now(), failing.clone()));
        failing
    }

    /// Like [`EngineHandle::readiness`], answered from a check made less
    /// than [`READINESS_FRESH`] ago when there is one: `/readiness` may be
    /// asked as often as a load balancer likes without asking Docker as
    /// often.
    pub async fn readiness_recent(&self) -> Vec<&'static str> {
        let recent = crate::sync::lock(&self.ctx.view.readiness)
            .as_ref()
            .filter(|(at, _)| at.elapsed() < READINESS_FRESH)
            .map(|(_, failing)| failing.clone());
        match recent {
            Some(failing) => failing,
            None => self.readiness().await,
        }
    }

    /// The metrics of deployments, the switch and the API.
    pub fn metrics(&self) -> &Metrics {
        &self.ctx.metrics
    }

    /// Starts a deployment; returns it as recorded, before it runs.
    pub async fn deploy(&self, request: DeployRequest) -> Result<Deployment, EngineError> {
        self.submit(request, DeploymentKind::Deploy, None).await
    }

    /// Like [`EngineHandle::deploy`], but while another deployment of the app
    /// runs, waits up to `wait` for it to end, then tries again.
    pub async fn deploy_waiting(
        &self,
        request: DeployRequest,
        wait: Duration,
    ) -> Result<Deployment, EngineError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.deploy(request.clone()).await {
                Err(EngineError::Conflict { running, .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    let _ = tokio::time::timeout_at(deadline, self.wait(&running)).await;
                }
                other => return other,
            }
        }
    }

    /// Rolls `app` back to `request.to`, or to the release live before the
    /// current one. Only the last `retain` releases qualify: older images
    /// are pruned.
    pub async fn rollback(
        &self,
        app: &str,
        requested_by: &str,
        request: deployd_proto::RollbackRequest,
    ) -> Result<Deployment, EngineError> {
        let deployd_proto::RollbackRequest {
            to,
            reason,
            skip_tasks,
            fleet,
            schema,
        } = request;
        let cfg = self
            .apps
            .get(app)
            .ok_or_else(|| EngineError::UnknownApp(app.to_owned()))?;
        let releases = self.ctx.store.live_releases(app, cfg.retain)?;
        let (target, made_live) = match to {
            Some(sha) => releases.iter().find(|(r, _)| r.sha == sha).ok_or_else(|| {
                EngineError::UnknownRelease {
                    app: app.to_owned(),
                    sha: sha.clone(),
                }
            })?,
            None => releases
                .get(1)
                .ok_or_else(|| EngineError::NoPreviousRelease(app.to_owned()))?,
        };
        let request = DeployRequest {
            app: app.to_owned(),
            sha: target.sha.clone(),
            force: true,
            reason,
            requested_by: requested_by.to_owned(),
            digest: Some(target.digest.clone()),
            skip_tasks,
            fleet,
            plan: None,
            allow_unsafe_migrations: false,
            schema,
            canary: Some(false),
        };
        let target = Some(made_live.clone());
        self.submit(request, DeploymentKind::Rollback, target).await
    }

    async fn submit(
        &self,
        request: DeployRequest,
        kind: DeploymentKind,
        target: Option<DeploymentId>,
    ) -> Result<Deployment, EngineError> {
        // Shutting down: a deployment accepted now would only freeze.
        if self.ctx.stopping.is_cancelled() {
            return Err(EngineError::Stopped);
        }
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Deploy {
                request: Box::new(request),
                kind,
                target,
                reply,
            })
            .await
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Live events of every deployment, as they are recorded.
    pub fn subscribe(&self) -> broadcast::Receiver<(DeploymentId, DeploymentEvent)> {
        self.ctx.journal.subscribe()
    }

    /// The store, for tests that read it whole; the API asks the engine's
    /// own methods instead.
    #[cfg(feature = "testkit")]
    pub fn store(&self) -> &Store {
        &self.ctx.store
    }

    /// The Docker engine deployments run on.
    pub fn docker(&self) -> &Docker {
        &self.ctx.docker
    }

    /// Locks `app` (an admin's lock, replacing any other).
    pub fn lock(&self, app: &str, reason: &str, by: &str) -> Result<AppLock, EngineError> {
        self.check_app(app)?;
        self.ctx.store.lock(app, reason, by)?;
        self.lock_of(app)?
            .ok_or_else(|| EngineError::Store(StoreError::Corrupt("a lock vanished".into())))
    }

    /// Locks `app` for a fleet deployment, held by the token `holder`
    /// (issuer, id): refused while another lock holds it or a deployment
    /// not of that fleet runs. Locking again for the same fleet deployment
    /// (a resumed one) replaces the holder.
    pub fn lock_for_fleet(
        &self,
        app: &str,
        by: &str,
        fleet: &deployd_proto::FleetLock,
        holder: (&str, &str),
    ) -> Result<AppLock, EngineError> {
        self.check_app(app)?;
        let what = if fleet.rollback {
            "rollback"
        } else {
            "deployment"
        };
        let reason = format!(
            "fleet {what} {} of {} (fleet {}) holds it",
            fleet.id, fleet.sha, fleet.name
        );
        match self
            .ctx
            .store
            .lock_for_fleet(app, &reason, by, fleet, holder)?
        {
            FleetLocking::Taken => {}
            FleetLocking::Held(lock) => {
                return Err(EngineError::Locked {
                    app: app.to_owned(),
                    lock,
                });
            }
            FleetLocking::Running(running) => {
                return Err(EngineError::Conflict {
                    app: app.to_owned(),
                    running,
                });
            }
        }
        self.lock_of(app)?
            .ok_or_else(|| EngineError::Store(StoreError::Corrupt("a lock vanished".into())))
    }

    /// Lifts `app`'s lock; with `fleet`, only a lock held for that fleet
    /// deployment (another is refused, unchanged). Whether there was one.
    pub fn unlock(&self, app: &str, fleet: Option<&str>) -> Result<bool, EngineError> {
        self.check_app(app)?;
        match fleet {
            None => Ok(self.ctx.store.unlock(app)?),
            Some(id) => self
                .ctx
                .store
                .unlock_fleet(app, id)?
                .map_err(|lock| EngineError::Locked {
                    app: app.to_owned(),
                    lock: Box::new(lock),
                }),
        }
    }

    /// The app's lock, as the API shows it.
    pub fn lock_of(&self, app: &str) -> Result<Option<AppLock>, EngineError> {
        Ok(self.ctx.store.lock_of(app)?.map(AppLock::from))
    }

    /// The app's lock as recorded, with its holder.
    pub(crate) fn held_lock(&self, app: &str) -> Result<Option<Lock>, EngineError> {
        Ok(self.ctx.store.lock_of(app)?)
    }

    /// `Ok` if `app` is configured.
    pub fn check_app(&self, app: &str) -> Result<(), EngineError> {
        if self.apps.contains_key(app) {
            Ok(())
        } else {
            Err(EngineError::UnknownApp(app.to_owned()))
        }
    }

    /// The release `app`'s running canary deploys, if one runs.
    pub fn canary_sha(&self, app: &str) -> Result<CommitSha, EngineError> {
        self.check_app(app)?;
        self.ctx
            .traffic
            .canaries
            .sha(app)
            .ok_or_else(|| EngineError::NoCanary(app.to_owned()))
    }

    /// Promotes or aborts `app`'s running canary; its deployment.
    pub fn canary_order(&self, app: &str, order: CanaryOrder) -> Result<DeploymentId, EngineError> {
        self.check_app(app)?;
        self.ctx
            .traffic
            .canaries
            .order(app, order)
            .ok_or_else(|| EngineError::NoCanary(app.to_owned()))
    }
}

struct Engine {
    ctx: Arc<Ctx>,
    apps: HashMap<String, Arc<AppConfig>>,
    running: HashMap<String, DeploymentId>,
    commands: mpsc::Sender<Command>,
}

impl Engine {
    async fn serve(mut self, mut inbox: mpsc::Receiver<Command>) {
        while let Some(command) = inbox.recv().await {
            match command {
                Command::Deploy {
                    request,
                    kind,
                    target,
                    reply,
                } => {
                    let _ = reply.send(self.accept(*request, kind, target.as_ref()));
                }
                Command::Finished { app } => {
                    self.running.remove(&app);
                }
            }
        }
    }

    /// Checks a request, records it and starts it; never waits on Docker.
    fn accept(
        &mut self,
        request: DeployRequest,
        kind: DeploymentKind,
        target: Option<&DeploymentId>,
    ) -> Result<Deployment, EngineError> {
        let app = self
            .apps
            .get(&request.app)
            .cloned()
            .ok_or_else(|| EngineError::UnknownApp(request.app.clone()))?;
        if let Some(running) = self.running.get(&request.app) {
            // The store is the truth: a deployment that recorded its end is
            // over, even if its task has not reported back yet.
            let ended = self
                .ctx
                .store
                .get(running)?
                .is_none_or(|d| d.state.is_terminal());
            if !ended {
                return Err(EngineError::Conflict {
                    app: request.app,
                    running: running.clone(),
                });
            }
            self.running.remove(&request.app);
        }
        // A fleet moves host by host: one host's canary would be judged
        // alone, so fleet parts never run one.
        let canary = match (request.canary, &app.canary) {
            (Some(true), _) if request.fleet.is_some() => {
                return Err(EngineError::CanaryInFleet(request.app));
            }
            (Some(true), None) => return Err(EngineError::CanaryNotConfigured(request.app)),
            (Some(asked), _) => asked,
            (None, Some(canary)) => {
                canary.by_default && kind == DeploymentKind::Deploy && request.fleet.is_none()
            }
            (None, None) => false,
        };
        let live = self.ctx.store.live_release(&request.app)?;
        // A rollback leaves the schema as it is: say which migrations the
        // release it goes back to did not see when it last ran.
        let migrations_kept = match target {
            Some(target) => self.ctx.store.migrations_after(&request.app, target)?,
            None => Vec::new(),
        };
        let deployment = Deployment {
            id: DeploymentId(uuid::Uuid::now_v7().to_string()),
            app: request.app.clone(),
            kind,
            sha: request.sha.clone(),
            digest: request.digest.clone(),
            previous_sha: live.as_ref().map(|r| r.sha.clone()),
            requested_by: request.requested_by,
            reason: request.reason,
            force: request.force,
            state: DeploymentState::Queued,
            error: None,
            migrations: Vec::new(),
            migrations_kept,
            skip_tasks: request.skip_tasks,
            fleet: request.fleet,
            plan: None,
            reviewed_plan: request.plan,
            allow_unsafe_migrations: request.allow_unsafe_migrations,
            schema: request.schema,
            canary,
            steps: Vec::new(),
            created_at: OffsetDateTime::now_utc(),
            finished_at: None,
        };
        let fleet = deployment.fleet.as_ref().map(|f| f.id.as_str());
        if let Err(lock) = self.ctx.store.insert_unless_locked(&deployment, fleet)? {
            return Err(EngineError::Locked {
                app: request.app,
                lock,
            });
        }
        if live.as_ref().is_some_and(|r| r.sha == request.sha) && !request.force {
            // Already live: a no-op success, recorded like any other.
            let run = run::Run::new(self.ctx.clone(), app, &deployment, live);
            run.finish(DeploymentState::Succeeded, None);
            return Ok(self.ctx.store.get(&deployment.id)?.unwrap_or(deployment));
        }
        self.running
            .insert(request.app.clone(), deployment.id.clone());
        let run = run::Run::new(self.ctx.clone(), app, &deployment, live);
        let done = self.commands.clone();
        let app_name = request.app;
        tokio::spawn(async move {
            // Awaited as a task of its own, so that even a panic in it frees
            // the app (the store still says `running`: the next start
            // reconciles it).
            if let Err(e) = tokio::spawn(run.execute()).await {
                tracing::error!(app = %app_name, error = %e, "deployment task failed");
            }
            let _ = done.send(Command::Finished { app: app_name }).await;
        });
        Ok(deployment)
    }
}

impl Ctx {
    /// Before each step: never returns once deployd is stopping (the
    /// deployment is cut at this boundary; the next start reconciles it),
    /// nor where the crash hook freezes deployments.
    async fn step_boundary(&self, step: &str) {
        if self.stopping.is_cancelled() {
            tracing::warn!(step, "deployd is stopping: this step does not start");
            std::future::pending::<()>().await;
        }
        self.journal.freeze_point(step).await;
    }
}
