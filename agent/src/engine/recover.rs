//! Crash recovery: at start, every deployment the store says was in flight
//! is reconciled with what Docker runs.
//!
//! Each service of the app converges to one release: the new one if the
//! deployment had passed verification (only its cleanup was cut short),
//! otherwise the last release that was live. Missing containers are
//! recreated from the pinned digest; once they are ready, containers of any
//! other release are ended as a roll would (web stopped with its stop
//! timeout, workers drained in the background; a singleton's before its
//! replacement starts). Leftover one-off task containers are removed. The
//! deployment ends `interrupted`, with an account of what runs.
//!
//! Apps with nothing in flight are tidied: containers of releases other
//! than the live one (an old worker whose drain a restart cut short) are
//! ended the same way.

use std::collections::HashMap;
use std::sync::Arc;

use deployd_proto::{CanaryDecision, Deployment, DeploymentState, EventKind, StepState};
use tracing::Instrument;

use super::common::Failure;
use super::service::Placement;
use super::{Ctx, label};
use crate::config::{AppConfig, Backend, ServiceConfig};
use crate::docker::ContainerInfo;
use crate::env_file::AppEnv;
use crate::store::{Release, StoreError};

/// The release a service is converged to.
pub(super) struct Target {
    pub release: Release,
    /// Whether it is the interrupted deployment's own release.
    pub new: bool,
}

impl Ctx {
    /// At start, before recovery: each switched app's traffic goes to the web
    /// containers running now (the live release's, if any of them run), so
    /// the public address answers while recovery converges.
    pub(crate) async fn seed_routes(&self, apps: &HashMap<String, Arc<AppConfig>>) {
        for (app, cfg) in apps {
            let (Some(route), Some((web, web_cfg))) =
                (self.traffic.routes.get(app), cfg.switched_service())
            else {
                continue;
            };
            let upstreams = match self.running_web(app, web, web_cfg).await {
                Ok(upstreams) => upstreams,
                Err(f) => {
                    tracing::warn!(%app, error = %f.0, "cannot tell which web containers run");
                    Vec::new()
                }
            };
            // Nothing had traffic yet: there is nothing to drain.
            let _ = route.switch_to(&upstreams);
        }
    }

    /// At start, after recovery: each app's live release, and when it
    /// went live, as metrics.
    pub(crate) fn seed_metrics(&self, apps: &HashMap<String, Arc<AppConfig>>) {
        for (app, cfg) in apps {
            let (live, since) = match self.store.live_since(app) {
                Ok(Some(live)) => live,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(%app, error = %e, "cannot read the live release");
                    continue;
                }
            };
            let at = match self.store.get(&since) {
                Ok(d) => d
                    .and_then(|d| d.finished_at)
                    .map(std::time::SystemTime::from),
                Err(_) => None,
            };
            self.metrics
                .live(app, cfg.services.keys(), live.sha.as_str(), at);
        }
    }

    async fn running_web(
        &self,
        app: &str,
        web: &str,
        cfg: &ServiceConfig,
    ) -> Result<Vec<crate::switch::Upstream>, Failure> {
        let live = self.store.live_release(app)?;
        let running: Vec<ContainerInfo> = self
            .docker
            .containers(&[(label::APP, app), (label::SERVICE, web)])
            .await?
            .into_iter()
            .filter(|c| c.running)
            .collect();
        let is_live = |c: &ContainerInfo| live.as_ref().is_some_and(|l| l.runs_in(&c.labels));
        let chosen: Vec<&ContainerInfo> = if running.iter().any(is_live) {
            running.iter().filter(|c| is_live(c)).collect()
        } else {
            running.iter().collect()
        };
        let mut upstreams = Vec::new();
        for c in chosen {
            if let Some(upstream) = self.started(&c.id, cfg).await?.upstream() {
                upstreams.push(upstream);
            }
        }
        Ok(upstreams)
    }

    /// Reconciles every unfinished deployment, then tidies the other apps;
    /// returns how many deployments were unfinished.
    pub(crate) async fn recover(
        &self,
        apps: &HashMap<String, Arc<AppConfig>>,
    ) -> Result<usize, StoreError> {
        let unfinished = self.store.unfinished()?;
        for d in &unfinished {
            let span = tracing::info_span!("deployment", deployment.id = %d.id, app = %d.app, sha = %d.sha);
            let account = match apps.get(&d.app) {
                Some(cfg) if cfg.backend == Backend::Swarm => {
                    match self.converge_swarm(d, cfg).instrument(span.clone()).await {
                        Ok(account) => account,
                        Err(f) => format!("converging failed: {}", f.0),
                    }
                }
                Some(cfg) => match self.converge(d, cfg).instrument(span.clone()).await {
                    Ok(account) => account,
                    Err(f) => format!("converging failed: {}", f.0),
                },
                None => {
                    "the app is no longer configured; its containers were left as they are".into()
                }
            };
            let error = format!("deployd stopped while this deployment ran; {account}");
            span.in_scope(|| tracing::warn!(%error, "recovered"));
            self.store
                .set_state(&d.id, DeploymentState::Interrupted, Some(&error))?;
            self.metrics.interrupted(&d.app, d.kind);
            self.journal
                .ended(&d.id, DeploymentState::Interrupted, Some(&error));
            self.journal.emit(
                &d.id,
                EventKind::State {
                    state: DeploymentState::Interrupted,
                    error: Some(error),
                },
            );
        }
        for (app, cfg) in apps {
            // Swarm keeps a swarm app's services as their specs say.
            if unfinished.iter().any(|d| &d.app == app) || cfg.backend == Backend::Swarm {
                continue;
            }
            match self.tidy(app, cfg).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(%app, containers = n, "ended leftovers of earlier releases")
                }
                Err(f) => {
                    tracing::warn!(%app, error = %f.0, "leftovers of earlier releases not ended")
                }
            }
        }
        Ok(unfinished.len())
    }

    /// What an interrupted deployment's app converges to: its own release
    /// if it had passed verification (only its cleanup was cut short),
    /// else the live one; none when no release was ever live.
    pub(super) fn target(&self, d: &Deployment) -> Result<Option<Target>, StoreError> {
        let verified = d
            .steps
            .iter()
            .any(|s| s.name == "verify" && s.state == StepState::Succeeded);
        Ok(
            match (verified, &d.digest, self.store.live_release(&d.app)?) {
                (true, Some(digest), _) => Some(Target {
                    release: Release {
                        sha: d.sha.clone(),
                        digest: digest.clone(),
                    },
                    new: true,
                }),
                (_, _, Some(live)) => Some(Target {
                    release: live,
                    new: false,
                }),
                (_, _, None) => None,
            },
        )
    }

    async fn converge(&self, d: &Deployment, cfg: &AppConfig) -> Result<String, Failure> {
        let tasks = self
            .docker
            .containers(&[(label::APP, &d.app), (label::DEPLOYMENT, &d.id.0)])
            .await?;
        for task in tasks.iter().filter(|c| c.labels.contains_key(label::TASK)) {
            self.docker.remove(&task.id).await?;
        }
        let Some(target) = self.target(d)? else {
            return self.remove_deployment(d, cfg).await;
        };
        let env = AppEnv::read(cfg)?;
        let place = Placement {
            app: &d.app,
            app_cfg: cfg,
            deployment: &d.id.0,
            env: &env,
        };
        for service in cfg.roll_order() {
            let service_cfg = &cfg.services[&service];
            self.converge_service(&place, &service, service_cfg, &target)
                .await
                .map_err(|f| Failure(format!("{service}: {}", f.0)))?;
        }
        if target.new {
            self.store.mark_live(&d.id)?;
        }
        // A canary cut short ends as an abort would: every client back on
        // the running release, the canary's containers drained.
        // One whose step was under way (not yet promoted): its last turn
        // is a step, its progress or a passed step.
        let canary_ran = d.canary
            && !target.new
            && self.store.events(&d.id, 0).is_ok_and(|events| {
                events
                    .iter()
                    .rev()
                    .find_map(|e| match &e.kind {
                        EventKind::Canary { decision, .. } => Some(*decision),
                        _ => None,
                    })
                    .is_some_and(|d| {
                        matches!(
                            d,
                            CanaryDecision::Step
                                | CanaryDecision::Progress
                                | CanaryDecision::Passed
                        )
                    })
            });
        let canary = if canary_ran {
            "its canary ended, every client back on the running release; "
        } else {
            ""
        };
        Ok(format!(
            "{canary}every service runs {} again",
            target.release.sha
        ))
    }

    /// First deployment of an app: there is nothing to go back to. Its
    /// containers get their stop timeout, then are removed.
    async fn remove_deployment(&self, d: &Deployment, cfg: &AppConfig) -> Result<String, Failure> {
        // Its web containers may have traffic: it goes nowhere first.
        let mut stopped = None;
        if let Some((web, _)) = cfg.switched_service() {
            stopped = self.switch_traffic(&d.app, cfg, web, &[]).await?;
        }
        for c in self
            .docker
            .containers(&[(label::APP, &d.app), (label::DEPLOYMENT, &d.id.0)])
            .await?
        {
            let service = c.labels.get(label::SERVICE);
            match service.and_then(|s| cfg.services.get(s)) {
                Some(service_cfg) => self.stop_and_remove(&c, service_cfg).await?,
                None => self.docker.remove(&c.id).await?,
            }
        }
        let switch = match stopped {
            Some(_) => " (the switch answers 503)",
            None => "",
        };
        Ok(format!(
            "no earlier release ran; its containers were removed{switch}"
        ))
    }

    async fn converge_service(
        &self,
        place: &Placement<'_>,
        service: &str,
        cfg: &ServiceConfig,
        target: &Target,
    ) -> Result<(), Failure> {
        let all = self
            .docker
            .containers(&[(label::APP, place.app), (label::SERVICE, service)])
            .await?;
        let (mut keep, other): (Vec<ContainerInfo>, Vec<ContainerInfo>) = all
            .into_iter()
            .partition(|c| target.release.runs_in(&c.labels));
        keep.sort_by_key(|c| !c.running);
        let wanted = cfg.replicas as usize;
        let extra: Vec<ContainerInfo> = keep.drain(wanted.min(keep.len())..).collect();
        let singleton = cfg.is_singleton(service);
        if singleton {
            // The other one has exited before the target starts.
            for c in other.iter().chain(&extra) {
                self.stop_and_remove(c, cfg).await?;
            }
        }
        let mut ready = Vec::new();
        for c in keep {
            if !c.running {
                self.docker.restart_stopped(&c.id).await?;
            }
            let started = self.started(&c.id, cfg).await?;
            // A kept container may have been told to stop (a draining worker):
            // one that does not stay up is replaced.
            match self.wait_ready(&started, cfg).await {
                Ok(_) => ready.push(started),
                Err(_) => self.docker.remove(&started.id).await?,
            }
        }
        // Indexes from 200 keep names apart from the deployment's own.
        let indexes = 200 + ready.len() as u32..200 + wanted as u32;
        for started in self
            .start_release(place, service, cfg, &target.release, indexes)
            .await?
        {
            self.wait_ready(&started, cfg).await?;
            ready.push(started);
        }
        if let Some(done) = self
            .switch_traffic(place.app, place.app_cfg, service, &ready)
            .await?
        {
            tracing::info!(app = %place.app, %service, "{done}");
        }
        if !singleton {
            // Only now that the target is ready: web never has nothing up.
            for c in other.iter().chain(&extra) {
                self.retire(c, service, cfg).await?;
            }
        }
        Ok(())
    }

    /// At start, for an app with no deployment in flight: ends what is left
    /// of other releases (old containers whose drain or removal a restart
    /// cut short). A stray singleton is stopped before anything else runs.
    async fn tidy(&self, app: &str, cfg: &AppConfig) -> Result<usize, Failure> {
        let Some(live) = self.store.live_release(app)? else {
            return Ok(0);
        };
        let mut ended = 0;
        for service in cfg.roll_order() {
            let Some(service_cfg) = cfg.services.get(&service) else {
                continue;
            };
            let found = self
                .docker
                .containers(&[(label::APP, app), (label::SERVICE, &service)])
                .await?;
            let (of_live, other): (Vec<&ContainerInfo>, Vec<&ContainerInfo>) =
                found.iter().partition(|c| live.runs_in(&c.labels));
            if other.is_empty() {
                continue;
            }
            // Traffic the start gave to another release's web containers
            // (no live one ran) goes to the live ones before those end.
            let mut ready = Vec::new();
            for c in of_live.iter().filter(|c| c.running) {
                ready.push(self.started(&c.id, service_cfg).await?);
            }
            self.switch_traffic(app, cfg, &service, &ready).await?;
            for c in other {
                if service_cfg.is_singleton(&service) {
                    self.stop_and_remove(c, service_cfg).await?;
                } else {
                    self.retire(c, &service, service_cfg).await?;
                }
                ended += 1;
            }
        }
        Ok(ended)
    }
}
