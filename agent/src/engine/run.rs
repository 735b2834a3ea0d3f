//! One deployment from start to end: pull, release tasks, roll, verify, and
//! on failure, rollback.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use deployd_proto::{
    CommitSha, Deployment, DeploymentId, DeploymentKind, DeploymentState, EventKind, StepState,
};
use tracing::Instrument;

use super::Ctx;
use super::backend::Rollout;
use super::common::Failure;
use super::prepare::registry_auth;
use crate::config::{AppConfig, Backend, TaskConfig};
use crate::docker::{ImageRef, PulledImage, RegistryAuth};
use crate::env_file::AppEnv;
use crate::store::Release;

/// Everything a running deployment needs.
#[derive(Debug)]
pub(crate) struct Run {
    pub ctx: Arc<Ctx>,
    pub app: String,
    pub cfg: Arc<AppConfig>,
    pub id: DeploymentId,
    pub sha: CommitSha,
    /// What ran before this deployment, from the store.
    pub previous: Option<Release>,
    /// The exact digest to deploy, when one was asked for (rollbacks, and
    /// the hosts of a fleet).
    pub pin: Option<String>,
    pub kind: DeploymentKind,
    /// Run no release task (a rollback's `--skip-tasks`).
    skip_tasks: bool,
    /// Skip the `once` release tasks: another host of the fleet runs them.
    skip_once: bool,
    /// A fleet part that runs the `once` release tasks for the fleet.
    runs_once: bool,
    /// A fleet part: the other hosts may run other releases than this one.
    pub in_fleet: bool,
    /// When it began to run here, for its duration metric.
    started: Instant,
    /// Migrations its release tasks applied, in order.
    migrations: std::sync::Mutex<Vec<String>>,
    /// Who asked, for the plan it makes.
    pub requested_by: String,
    /// The plan it must hold to.
    pub reviewed_plan: Option<String>,
    /// Migrations that break the running release are allowed.
    pub allow_unsafe_migrations: bool,
    /// Rollbacks: what to do about migrations applied since.
    pub schema: deployd_proto::SchemaRollback,
    /// Migrations a rollback's `migrate-back` reversed, in order.
    unapplied: std::sync::Mutex<Vec<String>>,
    /// A canary: the new web containers get a share of clients first.
    pub canary: bool,
}

impl Run {
    pub fn new(
        ctx: Arc<Ctx>,
        cfg: Arc<AppConfig>,
        d: &Deployment,
        previous: Option<Release>,
    ) -> Self {
        Self {
            ctx,
            app: d.app.clone(),
            cfg,
            id: d.id.clone(),
            sha: d.sha.clone(),
            previous,
            pin: d.digest.clone(),
            kind: d.kind,
            skip_tasks: d.skip_tasks,
            skip_once: d.fleet.as_ref().is_some_and(|f| !f.once_tasks),
            runs_once: d.fleet.as_ref().is_some_and(|f| f.once_tasks),
            in_fleet: d.fleet.is_some(),
            started: Instant::now(),
            migrations: std::sync::Mutex::default(),
            requested_by: d.requested_by.clone(),
            reviewed_plan: d.reviewed_plan.clone(),
            allow_unsafe_migrations: d.allow_unsafe_migrations,
            schema: d.schema,
            unapplied: std::sync::Mutex::default(),
            canary: d.canary,
        }
    }

    /// Adds migrations a release task applied to the deployment's record.
    pub fn applied_migrations(&self, applied: Vec<String>) -> Result<(), Failure> {
        if applied.is_empty() {
            return Ok(());
        }
        let all = {
            let mut all = crate::sync::lock(&self.migrations);
            all.extend(applied);
            all.clone()
        };
        self.ctx.store.set_migrations(&self.id, &all)?;
        Ok(())
    }

    /// Adds migrations a rollback's `migrate-back` reversed.
    pub fn unapplied_migrations(&self, unapplied: Vec<String>) {
        crate::sync::lock(&self.unapplied).extend(unapplied);
    }

    /// The final message of a deployment that failed because of `cause`:
    /// what it changed (`changed`, in order), then the migrations it
    /// applied, which stay applied whatever happens to the services.
    fn account(&self, cause: &str, changed: &[String]) -> String {
        let mut message = cause.to_owned();
        let migrations = crate::sync::lock(&self.migrations);
        let unapplied = crate::sync::lock(&self.unapplied);
        if changed.is_empty() && migrations.is_empty() && unapplied.is_empty() {
            message.push_str("; nothing running was changed");
            return message;
        }
        for change in changed {
            message.push_str("; ");
            message.push_str(change);
        }
        if !migrations.is_empty() {
            message.push_str(&format!(
                "; migrations applied, which stay applied: {}",
                migrations.join(", ")
            ));
        }
        if !unapplied.is_empty() {
            message.push_str(&format!(
                "; migrations reversed (--migrate-back), which stay reversed: {} (a release \
                 that had them needs them applied again: deploy it)",
                unapplied.join(", ")
            ));
        }
        message
    }

    pub fn emit(&self, kind: EventKind) {
        self.ctx.journal.emit(&self.id, kind);
    }

    /// A line of the step's output in the deployment's log.
    pub fn say(&self, step: &str, line: String) {
        self.emit(EventKind::Output {
            step: step.to_owned(),
            line,
        });
    }

    /// Records the terminal state, in the store first, then in the audit log.
    pub fn finish(&self, state: DeploymentState, error: Option<String>) {
        if let Err(e) = self.ctx.store.set_state(&self.id, state, error.as_deref()) {
            tracing::error!(deployment.id = %self.id, error = %e, "cannot record final state");
        }
        self.ctx.journal.ended(&self.id, state, error.as_deref());
        let metrics = &self.ctx.metrics;
        metrics.deployment(&self.app, self.kind, state, self.started.elapsed());
        if state == DeploymentState::Succeeded {
            metrics.live(
                &self.app,
                self.cfg.services.keys(),
                self.sha.as_str(),
                Some(std::time::SystemTime::now()),
            );
        }
        self.emit(EventKind::State { state, error });
    }

    /// Runs `work` as the step `name`, recording its start, end and timing.
    /// Recovery after a crash decides from these records, so a step whose
    /// start cannot be recorded does not begin, and one whose end cannot be
    /// recorded fails.
    pub async fn step<T>(
        &self,
        name: &str,
        work: impl Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        self.ctx.step_boundary(name).await;
        let started = EventKind::StepStarted {
            step: name.to_owned(),
        };
        self.ctx
            .journal
            .record(&self.id, started)
            .map_err(|e| Failure(format!("cannot record the start of {name}: {e}")))?;
        let (result, finished) = self.timed(name, work).await;
        // Status sees what the step changed before its end is told.
        self.ctx.relist().await;
        match (result, self.ctx.journal.record(&self.id, finished)) {
            (Ok(value), Ok(())) => Ok(value),
            (Ok(_), Err(e)) => Err(Failure(format!("cannot record the end of {name}: {e}"))),
            (Err(f), _) => Err(f),
        }
    }

    /// Like [`Run::step`] for undoing (`discard`, `rollback`): it runs even
    /// when the store cannot record it.
    pub async fn undo_step<T>(
        &self,
        name: &str,
        work: impl Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        self.ctx.step_boundary(name).await;
        self.emit(EventKind::StepStarted {
            step: name.to_owned(),
        });
        let (result, finished) = self.timed(name, work).await;
        self.emit(finished);
        result
    }

    async fn timed<T>(
        &self,
        name: &str,
        work: impl Future<Output = Result<T, Failure>>,
    ) -> (Result<T, Failure>, EventKind) {
        tracing::info!(step = name, "step started");
        let started = Instant::now();
        let result = work.await;
        let elapsed = started.elapsed();
        self.ctx
            .metrics
            .step(&self.app, name, result.is_ok(), elapsed);
        let duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        let (state, detail) = match &result {
            Ok(_) => {
                tracing::info!(step = name, duration_ms, "step succeeded");
                (StepState::Succeeded, None)
            }
            Err(f) => {
                tracing::warn!(step = name, duration_ms, error = %f.0, "step failed");
                (StepState::Failed, Some(f.0.clone()))
            }
        };
        let finished = EventKind::StepFinished {
            step: name.to_owned(),
            state,
            duration_ms,
            detail,
        };
        (result, finished)
    }

    /// The whole deployment; records its outcome.
    /// Every log line of it, and of the tasks it spawns, carries the
    /// deployment's id, app and sha.
    pub async fn execute(self) {
        let span = tracing::info_span!("deployment", deployment.id = %self.id, app = %self.app, sha = %self.sha);
        self.execute_in_span().instrument(span).await;
    }

    async fn execute_in_span(self) {
        if let Err(e) = self
            .ctx
            .store
            .set_state(&self.id, DeploymentState::Running, None)
        {
            tracing::error!(error = %e, "cannot record start");
        }
        self.emit(EventKind::State {
            state: DeploymentState::Running,
            error: None,
        });
        self.ctx.journal.started(&self.id);
        let (state, error) = self.outcome().await;
        self.ctx.journal.freeze_point("finish").await;
        self.ctx.relist().await;
        tracing::info!(
            ?state,
            error = error.as_deref().unwrap_or(""),
            "deployment ended"
        );
        self.finish(state, error);
    }

    async fn outcome(&self) -> (DeploymentState, Option<String>) {
        // Errors name the file and line, never its content.
        let (env, auth) = match self.step("prepare", self.prepare()).await {
            Ok(prepared) => prepared,
            Err(f) => return self.failed(&f.0),
        };
        let image = match self.step("pull", self.pull(auth.as_ref())).await {
            Ok(image) => image,
            Err(f) => return self.failed(&f.0),
        };
        if let Err(e) = self.ctx.store.set_digest(&self.id, &image.digest) {
            return self.failed(&e.to_string());
        }
        // A reviewed plan is held to even where no migration is planned.
        let migrations = self.cfg.migrations.as_ref();
        if self.kind == DeploymentKind::Deploy
            && (migrations.is_some() || self.reviewed_plan.is_some())
            && let Err(f) = self.step("plan", self.plan(&image, &env, migrations)).await
        {
            return self.failed(&f.0);
        }
        if let Some(migrations) = &self.cfg.migrations
            && self.kind == DeploymentKind::Rollback
        {
            let checked = self.check_schema(&env, auth.as_ref(), migrations);
            match self.step("schema", checked).await {
                Ok(None) => {}
                Ok(Some(reversal)) => {
                    let reversed = self.migrate_back(&reversal, &env, migrations);
                    if let Err(f) = self.step("migrate-back", reversed).await {
                        return self.failed(&f.0);
                    }
                }
                Err(f) => return self.failed(&f.0),
            }
        }
        // Where the fleet's other hosts may start: after the last `once`
        // task that runs here, when this part runs them.
        let once_until = self.runs_once.then(|| {
            self.cfg
                .release
                .iter()
                .rposition(|t| t.once && self.skips(t).is_none())
                .map_or(0, |i| i + 1)
        });
        if once_until == Some(0) {
            self.emit(EventKind::OnceTasksDone);
        }
        for (n, task) in self.cfg.release.iter().enumerate() {
            let step = format!("task:{}", task.name);
            if let Some(why) = self.skips(task) {
                self.emit(EventKind::Output {
                    step,
                    line: format!("skipped: {why}"),
                });
                continue;
            }
            if let Err(f) = self.step(&step, self.run_task(task, &image, &env)).await {
                return self.failed(&f.0);
            }
            if once_until == Some(n + 1) {
                self.emit(EventKind::OnceTasksDone);
            }
        }
        let release = Release {
            sha: self.sha.clone(),
            digest: image.digest.clone(),
        };
        let mut rollout = Rollout::new(self, release, env, auth);
        // Services taken out of the config: singletons go before any other
        // service rolls, stop-first (a beat moving to another host has
        // exited here before that host starts one), but with a canary only
        // once it passed (web rolls first then), so that an abort leaves
        // them running; the others once the release is verified, as their
        // replacements (a renamed service) must be up first.
        let (singletons, others): (Vec<_>, Vec<_>) = match rollout.unconfigured().await {
            Ok(found) => found.into_iter().partition(|(_, singleton)| *singleton),
            Err(f) => return self.failed(&f.0),
        };
        let mut singletons = Some(singletons);
        let canary = self.canary && self.cfg.canary.is_some();
        for (n, service) in self.cfg.roll_order().into_iter().enumerate() {
            if n == usize::from(canary)
                && let Some(singletons) = singletons.take()
                && let Err(f) = self.remove_singletons(&mut rollout, singletons).await
            {
                return self.roll_back(rollout, f).await;
            }
            let step = format!("roll:{service}");
            if let Err(f) = self.step(&step, rollout.roll(&service)).await {
                return self.roll_back(rollout, f).await;
            }
        }
        if let Some(singletons) = singletons.take()
            && let Err(f) = self.remove_singletons(&mut rollout, singletons).await
        {
            return self.roll_back(rollout, f).await;
        }
        if let Err(f) = self.step("verify", rollout.verify()).await {
            return self.roll_back(rollout, f).await;
        }
        for (service, _) in others {
            let step = format!("remove:{service}");
            if let Err(f) = self.step(&step, rollout.remove(&service)).await {
                // The release runs and is healthy; the next deployment
                // tries again.
                tracing::warn!(error = %f.0, "containers of a removed service not removed");
            }
        }
        if let Err(f) = self.step("cleanup", rollout.retire_old()).await {
            // The release runs and is healthy; leftovers are removed at the
            // next deployment.
            tracing::warn!(error = %f.0, "old containers not removed");
        }
        if let Err(f) = self.step("prune", self.prune(&image)).await {
            tracing::warn!(error = %f.0, "old release images not pruned");
        }
        (DeploymentState::Succeeded, None)
    }

    async fn roll_back(
        &self,
        mut rollout: Rollout<'_>,
        cause: Failure,
    ) -> (DeploymentState, Option<String>) {
        let removed = (!rollout.removed().is_empty()).then(|| {
            format!(
                "{} (no longer in the config; not brought back)",
                rollout.removed().join("; ")
            )
        });
        if !rollout.touched_running() {
            let discarded = self.undo_step("discard", rollout.discard()).await;
            let mut changed: Vec<String> = removed.into_iter().collect();
            // A canary had real clients: it was rolled back, not refused.
            let state = match rollout.canary_aborted() {
                Some(old) => {
                    changed.push(format!(
                        "every client went back to {old} at once, and the new web \
                         containers drained and were removed"
                    ));
                    DeploymentState::RolledBack
                }
                None => DeploymentState::Failed,
            };
            if rollout.traffic_stopped() {
                changed.push(
                    "its web containers had taken traffic and none ran before to go back to: \
                     the switch now answers 503 (no web container is live)"
                        .to_owned(),
                );
            }
            let mut message = self.account(&cause.0, &changed);
            if let Err(f) = discarded {
                message.push_str(&format!(" (removing its new containers failed: {})", f.0));
            }
            return (state, Some(message));
        }
        let (state, undone) = match self.undo_step("rollback", rollout.restore()).await {
            Ok(restored) => (
                DeploymentState::RolledBack,
                format!("rolled back: {restored}"),
            ),
            Err(f) => (
                DeploymentState::RollbackFailed,
                format!("rollback failed: {}", f.0),
            ),
        };
        let changed: Vec<String> = removed.into_iter().chain([undone]).collect();
        (state, Some(self.account(&cause.0, &changed)))
    }

    /// Ends a deployment that failed before any service was rolled.
    fn failed(&self, cause: &str) -> (DeploymentState, Option<String>) {
        (DeploymentState::Failed, Some(self.account(cause, &[])))
    }

    /// Why a release task does not run in this deployment, if it does not.
    fn skips(&self, task: &TaskConfig) -> Option<String> {
        if self.skip_tasks {
            Some("this rollback was asked to skip release tasks (--skip-tasks)".into())
        } else if task.once && self.skip_once {
            Some("a once task: the fleet deployment runs it on its first host".into())
        } else if !task.runs_in(self.kind) {
            let on: Vec<String> = task.on.iter().map(|k| format!("\"{k}\"")).collect();
            Some(format!(
                "it does not run on {} (on = [{}])",
                self.kind,
                on.join(", ")
            ))
        } else {
            None
        }
    }

    async fn prepare(&self) -> Result<(AppEnv, Option<RegistryAuth>), Failure> {
        if self.cfg.backend == Backend::Swarm {
            self.ctx.docker.swarm_manager().await?;
        }
        Ok((AppEnv::read(&self.cfg)?, registry_auth(&self.cfg)?))
    }

    async fn pull(&self, auth: Option<&RegistryAuth>) -> Result<PulledImage, Failure> {
        let image = ImageRef::new(self.cfg.image.clone(), self.sha.clone());
        Ok(match &self.pin {
            Some(digest) => self.ctx.docker.pull_digest(&image, digest, auth).await?,
            None => self.ctx.docker.pull(&image, auth).await?,
        })
    }
}

impl Run {
    /// Stops and removes singletons no longer in the config, one step each.
    async fn remove_singletons(
        &self,
        rollout: &mut Rollout<'_>,
        singletons: Vec<(String, bool)>,
    ) -> Result<(), Failure> {
        for (service, _) in singletons {
            let step = format!("remove:{service}");
            self.step(&step, rollout.remove(&service)).await?;
        }
        Ok(())
    }

    /// Keeps the images of the last `retain` releases (this one, the
    /// previous, ...) and removes the other images deployd pulled for the
    /// app, failed releases' included. An image a container still uses is
    /// left for a later prune.
    async fn prune(&self, current: &PulledImage) -> Result<(), Failure> {
        let mut keep = vec![current.digest.clone()];
        let earlier = self.ctx.store.live_releases(&self.app, self.cfg.retain)?;
        keep.extend(
            earlier
                .into_iter()
                .map(|(r, _)| r.digest)
                .filter(|d| *d != current.digest)
                .take(self.cfg.retain.saturating_sub(1)),
        );
        for release in self.ctx.store.pulled(&self.app)? {
            if keep.contains(&release.digest) {
                continue;
            }
            let (repo, sha, digest) = (&self.cfg.image, release.sha.as_str(), &release.digest);
            let docker = &self.ctx.docker;
            if docker.remove_image_ref(&format!("{repo}:{sha}")).await?
                && docker.remove_image_ref(&release.pinned(repo)).await?
            {
                tracing::info!(%sha, %digest, "pruned release image");
                self.ctx.store.forget_prepared(&self.app, sha, digest)?;
                self.ctx.jobs.prepares.forget(&self.app, sha);
            }
        }
        Ok(())
    }
}
