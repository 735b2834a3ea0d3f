//! Crash recovery: at start, every deployment the store says was in flight
//! is reconciled with what Docker runs.
//!
//! Each service of the app converges to one release: the new one if the
//! deployment had passed verification (only its cleanup was cut short),
//! otherwise the last release that was live. Containers of any other
//! release, and leftover one-off task containers, are removed; missing ones
//! are recreated from the pinned digest. The deployment ends `interrupted`,
//! with an account of what runs.

use std::collections::HashMap;
use std::sync::Arc;

use deployd_proto::{Deployment, DeploymentState, EventKind, StepState};

use super::roll::{Placement, Started};
use super::run::Failure;
use super::{Ctx, label};
use crate::config::{AppConfig, ServiceConfig};
use crate::docker::ContainerInfo;
use crate::env_file;
use crate::store::StoreError;

/// The release a service is converged to.
struct Target {
    sha: String,
    digest: String,
    /// Whether it is the interrupted deployment's own release.
    new: bool,
}

impl Ctx {
    /// Reconciles every unfinished deployment; returns how many there were.
    pub(crate) async fn recover(
        &self,
        apps: &HashMap<String, Arc<AppConfig>>,
    ) -> Result<usize, StoreError> {
        let unfinished = self.store.unfinished()?;
        for d in &unfinished {
            let account = match apps.get(&d.app) {
                Some(cfg) => match self.converge(d, cfg).await {
                    Ok(account) => account,
                    Err(f) => format!("converging failed: {}", f.0),
                },
                None => {
                    "the app is no longer configured; its containers were left as they are".into()
                }
            };
            let error = format!("deployd stopped while this deployment ran; {account}");
            tracing::warn!(deployment.id = %d.id, app = %d.app, %error, "recovered");
            self.store
                .set_state(&d.id, DeploymentState::Interrupted, Some(&error))?;
            self.emit(
                &d.id,
                EventKind::State {
                    state: DeploymentState::Interrupted,
                    error: Some(error),
                },
            );
        }
        Ok(unfinished.len())
    }

    async fn converge(&self, d: &Deployment, cfg: &AppConfig) -> Result<String, Failure> {
        let tasks = self
            .docker
            .containers(&[(label::APP, &d.app), (label::DEPLOYMENT, &d.id.0)])
            .await?;
        for task in tasks.iter().filter(|c| c.labels.contains_key(label::TASK)) {
            self.docker.remove(&task.id).await?;
        }
        let verified = d
            .steps
            .iter()
            .any(|s| s.name == "verify" && s.state == StepState::Succeeded);
        let target = match (verified, &d.digest, self.store.live_release(&d.app)?) {
            (true, Some(digest), _) => Target {
                sha: d.sha.to_string(),
                digest: digest.clone(),
                new: true,
            },
            (_, _, Some(live)) => Target {
                sha: live.sha.to_string(),
                digest: live.digest,
                new: false,
            },
            (_, _, None) => return self.remove_deployment(d).await,
        };
        let env = match &cfg.env_file {
            Some(path) => env_file::read(path)?,
            None => Vec::new(),
        };
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
        Ok(format!("every service runs {} again", target.sha))
    }

    /// First deployment of an app: there is nothing to go back to.
    async fn remove_deployment(&self, d: &Deployment) -> Result<String, Failure> {
        for c in self
            .docker
            .containers(&[(label::APP, &d.app), (label::DEPLOYMENT, &d.id.0)])
            .await?
        {
            self.docker.remove(&c.id).await?;
        }
        Ok("no earlier release ran; its containers were removed".into())
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
        let (mut keep, other): (Vec<ContainerInfo>, Vec<ContainerInfo>) =
            all.into_iter().partition(|c| {
                c.labels.get(label::SHA) == Some(&target.sha)
                    && c.labels.get(label::DIGEST) == Some(&target.digest)
            });
        // Others go first, so a singleton never has two.
        for c in &other {
            self.docker.remove(&c.id).await?;
        }
        keep.sort_by_key(|c| !c.running);
        let wanted = cfg.replicas as usize;
        for extra in keep.drain(wanted.min(keep.len())..) {
            self.docker.remove(&extra.id).await?;
        }
        let mut ready = 0;
        for c in keep {
            if !c.running {
                self.docker.restart_stopped(&c.id).await?;
            }
            let port = match cfg.port {
                Some(p) => Some(self.docker.published_port(&c.id, p).await?),
                None => None,
            };
            let started = Started { id: c.id, port };
            // A kept container may have been told to stop (a draining worker):
            // one that does not stay up is replaced.
            match self.wait_ready(&started, cfg).await {
                Ok(()) => ready += 1,
                Err(_) => self.docker.remove(&started.id).await?,
            }
        }
        // Indexes from 200 keep names apart from the deployment's own.
        let indexes = 200 + ready as u32..200 + wanted as u32;
        let release = (target.sha.as_str(), target.digest.as_str());
        for started in self
            .start_release(place, service, cfg, release, indexes)
            .await?
        {
            self.wait_ready(&started, cfg).await?;
        }
        Ok(())
    }
}
