//! Rolling services to the new release, by role, and undoing it.
//!
//! - web: new containers start first and must pass the HTTP health check;
//!   only then are the old ones stopped (kept, stopped, until the deployment
//!   succeeds, so a rollback restarts them in seconds).
//! - worker: new containers must stay up for `min_healthy`; old ones then
//!   drain in the background (SIGTERM, `stop_timeout`), not holding the
//!   deployment open.
//! - singletons (beat): the old container has exited before the new one is
//!   created, in rollbacks too.

use std::collections::HashMap;

use deployd_proto::EventKind;
use futures_util::future::{join_all, try_join_all};

use super::common::{Failure, Restored};
use super::health::{Probe, describe_request};
use super::label;
use super::run::Run;
use super::service::{Placement, Started, service_spec};
use super::status::{removed_services, was_singleton};
use crate::config::{Role, ServiceConfig};
use crate::docker::ContainerInfo;
use crate::env_file::AppEnv;
use crate::store::Release;

/// Health requests in a row without an answer in time that fail a
/// verification.
const SLOW_ANSWERS: u32 = 3;

/// What rolling one service changed.
#[derive(Debug)]
struct Change {
    service: String,
    new: Vec<Started>,
    /// Old containers stopped by this deployment and kept for rollback.
    stopped: Vec<String>,
    /// Old containers sent to drain; a rollback recreates them instead.
    draining: Vec<String>,
    /// Old containers running when the roll began.
    old_running: usize,
}

/// The docker backend's roll: the services' containers rolled so far, in
/// order, and how. No `Debug`: it holds the app's env.
pub(crate) struct Containers<'a> {
    run: &'a Run,
    release: Release,
    env: AppEnv,
    changes: Vec<Change>,
    /// Whether the switch sent traffic to this release's web containers.
    traffic_moved: bool,
    /// Whether a discard then sent the app's traffic nowhere (503).
    traffic_stopped: bool,
    /// What it stopped and removed of services no longer configured, a
    /// line per service; a rollback does not bring them back.
    removed: Vec<String>,
    /// The release a canary of this deployment was aborted back to.
    canary_aborted: Option<deployd_proto::CommitSha>,
}

/// How a service's containers are replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    StartFirst,
    Overlap,
    StopFirst,
}

/// How long a container of a service no longer configured may take to stop:
/// the `stop_timeout` it was started with (whole seconds, rounded up), else
/// Docker's usual 10 s.
fn removed_grace(c: &ContainerInfo) -> std::time::Duration {
    let seconds = c
        .labels
        .get(label::STOP_TIMEOUT)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    std::time::Duration::from_secs(seconds)
}

fn strategy(name: &str, cfg: &ServiceConfig) -> Strategy {
    if cfg.is_singleton(name) {
        Strategy::StopFirst
    } else if cfg.role_of(name) == Some(Role::Web) {
        Strategy::StartFirst
    } else {
        Strategy::Overlap
    }
}

impl<'a> Containers<'a> {
    pub fn new(run: &'a Run, release: Release, env: AppEnv) -> Self {
        Self {
            run,
            release,
            env,
            changes: Vec::new(),
            traffic_moved: false,
            traffic_stopped: false,
            removed: Vec::new(),
            canary_aborted: None,
        }
    }

    /// Services no longer in the config whose containers remain, and
    /// whether each was a singleton.
    pub async fn unconfigured(&self) -> Result<Vec<(String, bool)>, Failure> {
        let found = self
            .run
            .ctx
            .docker
            .containers(&[(label::APP, &self.run.app)])
            .await?;
        Ok(removed_services(&self.run.cfg, &found)
            .into_iter()
            .map(|(service, found)| {
                let singleton = found.iter().any(|c| was_singleton(service, c));
                (service.to_owned(), singleton)
            })
            .collect())
    }

    /// Stops (each within its own `stop_timeout`) and removes the
    /// containers of a service no longer configured. What it did is kept
    /// for the deployment's account, whole or in part.
    pub async fn remove(&mut self, service: &str) -> Result<(), Failure> {
        let docker = &self.run.ctx.docker;
        let found = docker
            .containers(&[(label::APP, &self.run.app), (label::SERVICE, service)])
            .await?;
        let ended = join_all(found.iter().map(|c| async move {
            let stopped = if c.running {
                docker.stop(&c.id, removed_grace(c)).await.map(|()| true)
            } else {
                Ok(false)
            };
            match stopped {
                Ok(stopped) => (stopped, docker.remove(&c.id).await.err()),
                Err(e) => (false, Some(e)),
            }
        }))
        .await;
        let running = found.iter().filter(|c| c.running).count();
        let stopped = ended.iter().filter(|(stopped, _)| *stopped).count();
        let errors: Vec<String> = ended
            .into_iter()
            .filter_map(|(_, e)| e.map(|e| e.to_string()))
            .collect();
        let removed = found.len() - errors.len();
        let did = format!(
            "{service}: {stopped} of {running} running container(s) stopped, \
             {removed} of {} removed",
            found.len()
        );
        if stopped > 0 || removed > 0 {
            self.removed.push(did.clone());
        }
        self.run.emit(EventKind::Output {
            step: format!("remove:{service}"),
            line: format!("{did}: the service is no longer in the config"),
        });
        match errors.first() {
            None => Ok(()),
            Some(first) => Err(Failure(format!("{did}: {first}"))),
        }
    }

    /// What it stopped and removed of services that left the config, a
    /// line per service.
    pub fn removed(&self) -> &[String] {
        &self.removed
    }

    fn cfg(&self, service: &str) -> Result<&'a ServiceConfig, Failure> {
        self.run
            .cfg
            .services
            .get(service)
            .ok_or_else(|| Failure(format!("service {service} is not configured")))
    }

    /// Replaces `service`'s containers with the new release's.
    pub async fn roll(&mut self, service: &str) -> Result<(), Failure> {
        let cfg = self.cfg(service)?;
        let old: Vec<ContainerInfo> = self
            .old_containers(service)
            .await?
            .into_iter()
            .filter(|c| c.running)
            .collect();
        self.changes.push(Change {
            service: service.to_owned(),
            new: Vec::new(),
            stopped: Vec::new(),
            draining: Vec::new(),
            old_running: old.len(),
        });
        match strategy(service, cfg) {
            Strategy::StartFirst => {
                self.start_new(service, cfg).await?;
                self.wait_new_ready(service, cfg).await?;
                let new = self.current().new.clone();
                self.canary(service, &new).await?;
                if let Some(done) = self
                    .run
                    .ctx
                    .switch_traffic(&self.run.app, &self.run.cfg, service, &new)
                    .await?
                {
                    self.traffic_moved = true;
                    self.run.emit(EventKind::Output {
                        step: format!("roll:{service}"),
                        line: done,
                    });
                }
                self.stop_old(&old, cfg).await?;
            }
            Strategy::Overlap => {
                self.start_new(service, cfg).await?;
                self.wait_new_ready(service, cfg).await?;
                for c in old {
                    self.drain(c.id, cfg);
                }
            }
            Strategy::StopFirst => {
                self.stop_old(&old, cfg).await?;
                self.start_new(service, cfg).await?;
                self.wait_new_ready(service, cfg).await?;
            }
        }
        Ok(())
    }

    /// A canary deployment's steps, for the switched web service: returns
    /// once the new release may take every client.
    async fn canary(&mut self, service: &str, new: &[Started]) -> Result<(), Failure> {
        let run = self.run;
        let (true, Some(cfg), Some(route), Some(switch), Some((web, _))) = (
            run.canary,
            &run.cfg.canary,
            run.ctx.traffic.routes.get(&run.app),
            &run.cfg.switch,
            run.cfg.switched_service(),
        ) else {
            return Ok(());
        };
        if web != service {
            return Ok(());
        }
        let step = format!("roll:{service}");
        let stable = route.upstreams();
        // The release the switch sends clients to now.
        let old = stable
            .first()
            .and_then(|u| u.release.parse().ok())
            .or_else(|| run.previous.as_ref().map(|p| p.sha.clone()));
        let Some(old) = old.filter(|_| !stable.is_empty()) else {
            run.say(
                &step,
                "no canary: no release takes clients yet, so there is nothing to judge the new \
                 one against: it takes every client at once"
                    .into(),
            );
            return Ok(());
        };
        let mut releases: Vec<&str> = stable.iter().map(|u| &*u.release).collect();
        releases.sort_unstable();
        releases.dedup();
        for r in &mut releases {
            *r = &r[..r.len().min(12)];
        }
        if releases.len() > 1 {
            run.say(
                &step,
                format!(
                    "no canary: clients go to several releases now ({}), so there is no one \
                     release to judge the new one against: it takes every client at once",
                    releases.join(", ")
                ),
            );
            return Ok(());
        }
        if old == run.sha {
            run.say(
                &step,
                format!(
                    "no canary: {} takes the clients already, and a release is not judged \
                     against itself: it takes every client at once",
                    old.short()
                ),
            );
            return Ok(());
        }
        let canary = new
            .iter()
            .map(Started::upstream)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Failure("a web container has no address on its network".into()))?;
        let place = (stable.as_slice(), canary.as_slice(), &old);
        match super::canary::run(run, cfg, route, place, switch.drain_timeout).await {
            Ok(_) => Ok(()),
            Err(f) => {
                self.canary_aborted = Some(old);
                Err(f)
            }
        }
    }

    /// The release an aborted canary sent every client back to.
    pub fn canary_aborted(&self) -> Option<&deployd_proto::CommitSha> {
        self.canary_aborted.as_ref()
    }

    fn current(&mut self) -> &mut Change {
        let last = self.changes.len() - 1;
        &mut self.changes[last]
    }

    async fn start_new(&mut self, service: &str, cfg: &ServiceConfig) -> Result<(), Failure> {
        for index in 0..cfg.replicas {
            let spec = service_spec(&self.placement(), service, cfg, &self.release, index);
            let started = self.run.ctx.start_service(spec, cfg).await?;
            self.current().new.push(started);
        }
        Ok(())
    }

    /// Waits until every new container of the service is ready (healthy
    /// for web, up for the rest), failing with the first that is not. The
    /// answer each web container passed with goes to the log.
    async fn wait_new_ready(&mut self, service: &str, cfg: &ServiceConfig) -> Result<(), Failure> {
        let ctx = &self.run.ctx;
        let new = self.current().new.clone();
        let ready = try_join_all(new.iter().map(|c| ctx.wait_ready(c, cfg)))
            .await
            .map_err(|f| Failure(format!("new {service} container: {}", f.0)))?;
        for (c, healthy) in new.iter().zip(ready) {
            if let (Some(healthy), Some(health)) = (healthy, &cfg.health) {
                self.run.emit(EventKind::Output {
                    step: format!("roll:{service}"),
                    line: format!(
                        "container {} healthy after {} check(s) in {} ms: {} answered {}",
                        &c.id[..c.id.len().min(12)],
                        healthy.checks,
                        healthy.after.as_millis(),
                        describe_request(health),
                        healthy.answer
                    ),
                });
            }
        }
        Ok(())
    }

    async fn stop_old(
        &mut self,
        old: &[ContainerInfo],
        cfg: &ServiceConfig,
    ) -> Result<(), Failure> {
        let docker = &self.run.ctx.docker;
        // Recorded before stopping: a failed stop still needs a restart.
        self.current()
            .stopped
            .extend(old.iter().map(|c| c.id.clone()));
        try_join_all(old.iter().map(|c| docker.stop(&c.id, cfg.stop_timeout))).await?;
        Ok(())
    }

    /// Stops an old container in the background, then removes it.
    fn drain(&mut self, id: String, cfg: &ServiceConfig) {
        self.current().draining.push(id.clone());
        self.run.ctx.drain(id, cfg.stop_timeout);
    }

    fn placement(&self) -> Placement<'_> {
        Placement {
            app: &self.run.app,
            app_cfg: &self.run.cfg,
            deployment: &self.run.id.0,
            env: &self.env,
        }
    }

    /// Containers of `service` that this deployment did not create.
    async fn old_containers(&self, service: &str) -> Result<Vec<ContainerInfo>, Failure> {
        let found = self
            .run
            .ctx
            .docker
            .containers(&[(label::APP, &self.run.app), (label::SERVICE, service)])
            .await?;
        Ok(found
            .into_iter()
            .filter(|c| c.labels.get(label::DEPLOYMENT) != Some(&self.run.id.0))
            .collect())
    }

    /// Keeps checking every new container for the verify window. A bad
    /// answer fails it at once; no answer in time does only
    /// [`SLOW_ANSWERS`] times in a row (one slow answer from a loaded host
    /// is not a bad release), and the window ends only on an answer.
    pub async fn verify(&self) -> Result<(), Failure> {
        let ctx = &self.run.ctx;
        let deadline = tokio::time::Instant::now() + self.run.cfg.verify;
        let mut slow: HashMap<String, u32> = HashMap::new();
        loop {
            for change in &self.changes {
                let cfg = self.cfg(&change.service)?;
                for c in &change.new {
                    let fail = |why: String| {
                        Failure(format!("{} failed verification: {why}", change.service))
                    };
                    ctx.ensure_alive(&c.id).await.map_err(|f| fail(f.0))?;
                    if let (Some(port), Some(health)) = (c.port, &cfg.health) {
                        match ctx.health.probe(port, health).await.healthy(health) {
                            Ok(_) => {
                                slow.remove(&c.id);
                            }
                            Err(Probe::Timeout) => {
                                let times = slow.entry(c.id.clone()).or_default();
                                *times += 1;
                                if *times >= SLOW_ANSWERS {
                                    return Err(fail(format!(
                                        "{} answered {} ({} times in a row)",
                                        describe_request(health),
                                        Probe::Timeout,
                                        SLOW_ANSWERS
                                    )));
                                }
                            }
                            Err(probe) => {
                                return Err(fail(format!(
                                    "{} answered {probe}",
                                    describe_request(health)
                                )));
                            }
                        }
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline && slow.is_empty() {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    /// Whether any container that ran before was stopped or drained.
    pub fn touched_running(&self) -> bool {
        self.changes
            .iter()
            .any(|c| !c.stopped.is_empty() || !c.draining.is_empty())
    }

    /// After success: removes the old containers kept for rollback and any
    /// stopped leftovers of earlier deployments.
    pub async fn retire_old(&self) -> Result<(), Failure> {
        let docker = &self.run.ctx.docker;
        for change in &self.changes {
            for c in self.old_containers(&change.service).await? {
                if !c.running {
                    docker.remove(&c.id).await?;
                }
            }
        }
        Ok(())
    }

    /// Whether a discard sent the app's traffic nowhere: the switch answers
    /// 503 until a release is live.
    pub fn traffic_stopped(&self) -> bool {
        self.traffic_stopped
    }

    /// After a failure that changed nothing that ran before: removes what
    /// was started. Traffic this release had taken (a first deployment's)
    /// goes nowhere first: the switch answers 503, never a removed container.
    pub async fn discard(&mut self) -> Result<(), Failure> {
        let docker = &self.run.ctx.docker;
        if self.traffic_moved
            && let Some((web, _)) = self.run.cfg.switched_service()
            && let Some(done) = self
                .run
                .ctx
                .switch_traffic(&self.run.app, &self.run.cfg, web, &[])
                .await?
        {
            self.traffic_stopped = true;
            self.run.emit(EventKind::Output {
                step: "discard".into(),
                line: done,
            });
        }
        for change in self.changes.iter().rev() {
            for c in &change.new {
                docker.remove(&c.id).await?;
            }
        }
        Ok(())
    }

    /// Puts every changed service back on the previous release, last first.
    /// Carries on past a service that fails, so as many as possible run the
    /// previous release; returns what runs now, or an account of what failed.
    pub async fn restore(self) -> Result<String, Failure> {
        let mut restored = Restored::default();
        for change in self.changes.iter().rev() {
            match self.restore_service(change).await {
                Ok(0) => restored.emptied.push(change.service.clone()),
                Ok(_) => restored.back.push(change.service.clone()),
                Err(f) => restored.failed.push(format!("{}: {}", change.service, f.0)),
            }
        }
        let restored = restored.in_roll_order();
        let release = self
            .run
            .previous
            .as_ref()
            .map_or_else(|| "the previous release".to_owned(), |p| p.sha.to_string());
        let mut said = restored.account(
            &release,
            "had no container running before and have none now",
        )?;
        let web = self.run.cfg.switched_service().map(|(web, _)| web);
        if self.traffic_moved {
            let web_emptied = web.is_some_and(|w| restored.emptied.iter().any(|e| e == w));
            said.push(match web_emptied {
                false => format!("traffic had moved to the new release and went back to {release}"),
                true => "traffic had moved to the new release; the switch now answers 503 (no web container is live)".to_owned(),
            });
        }
        Ok(said.join("; "))
    }

    /// One service back on the previous release; returns how many of its
    /// containers run it. Singletons lose the new container first; the
    /// others keep it until the old ones are ready, so the service is never
    /// left with nothing that had something before.
    async fn restore_service(&self, change: &Change) -> Result<usize, Failure> {
        let docker = &self.run.ctx.docker;
        let cfg = self.cfg(&change.service)?;
        let touched = !change.stopped.is_empty() || !change.draining.is_empty();
        if !touched && change.old_running > 0 {
            // What ran still runs, with the traffic (a web service that
            // failed its health check, or a canary aborted, before its old
            // containers stopped): only the new ones go.
            for c in &change.new {
                docker.remove(&c.id).await?;
            }
            return Ok(change.old_running);
        }
        let singleton = cfg.is_singleton(&change.service);
        if singleton {
            for c in &change.new {
                docker.remove(&c.id).await?;
            }
        }
        let mut back = Vec::new();
        for id in &change.stopped {
            let restarted = async {
                docker.restart_stopped(id).await?;
                self.run.ctx.started(id, cfg).await
            };
            match restarted.await {
                Ok(started) => back.push(started),
                // Recreated from the digest below instead.
                Err(_) => docker.remove(id).await?,
            }
        }
        let missing = (cfg.replicas as usize).saturating_sub(back.len());
        if touched && missing > 0 {
            back.extend(
                self.recreate_previous(&change.service, cfg, missing)
                    .await?,
            );
        }
        for c in &back {
            self.run
                .ctx
                .wait_ready(c, cfg)
                .await
                .map_err(|f| Failure(format!("restored container: {}", f.0)))?;
        }
        if let Some(done) = self
            .run
            .ctx
            .switch_traffic(&self.run.app, &self.run.cfg, &change.service, &back)
            .await?
        {
            self.run.emit(EventKind::Output {
                step: "rollback".into(),
                line: done,
            });
        }
        if !singleton {
            for c in &change.new {
                docker.remove(&c.id).await?;
            }
        }
        Ok(back.len())
    }

    /// New containers of the previous release, from its pinned digest.
    async fn recreate_previous(
        &self,
        service: &str,
        cfg: &ServiceConfig,
        count: usize,
    ) -> Result<Vec<Started>, Failure> {
        let previous = self.run.previous.as_ref().ok_or_else(|| {
            Failure(format!(
                "{service} had no recorded previous release to recreate"
            ))
        })?;
        // Indexes from 100 keep names apart from this deployment's own.
        self.run
            .ctx
            .start_release(
                &self.placement(),
                service,
                cfg,
                previous,
                100..100 + count as u32,
            )
            .await
    }
}
