//! What an app runs now: the store's view joined with the engine's model of
//! what Docker runs (see `observed`); no Docker call per request.

use deployd_proto::{
    AppLock, AppStatus, CommitSha, ContainerPhase, ContainerStatus, ServiceStatus,
};

use super::{Ctx, EngineError, EngineHandle, label};
use std::collections::BTreeMap;

use crate::config::{AppConfig, Backend, ServiceConfig};
use crate::docker::ContainerInfo;

impl EngineHandle {
    /// The app's live release, deployment in flight, lock, and every service
    /// container with its release and phase (running, draining, stopped).
    pub async fn status(&self, app: &str) -> Result<AppStatus, EngineError> {
        let cfg = self
            .apps
            .get(app)
            .ok_or_else(|| EngineError::UnknownApp(app.to_owned()))?;
        let Recorded {
            live,
            running,
            lock,
        } = self.ctx.recorded(app)?;
        // Containers of the live release and of the deployment in flight are
        // current; any other still running is an old one finishing its work.
        let current: Vec<String> = live
            .iter()
            .map(|r| r.sha.to_string())
            .chain(running.iter().map(|(_, sha)| sha.to_string()))
            .collect();
        let services = match cfg.backend {
            Backend::Docker => self.ctx.container_status(app, cfg, &current).await,
            Backend::Swarm => self.ctx.swarm_status(app, cfg, &current).await?,
        };
        Ok(AppStatus {
            app: app.to_owned(),
            live_sha: live.as_ref().map(|r| r.sha.clone()),
            live_digest: live.map(|r| r.digest),
            running_deployment: running.map(|(id, _)| id),
            lock,
            services,
        })
    }
}

/// Containers of services no longer in the app's config, by service: the
/// next deployment stops and removes them.
pub(crate) fn removed_services<'a>(
    cfg: &AppConfig,
    found: &'a [ContainerInfo],
) -> BTreeMap<&'a str, Vec<&'a ContainerInfo>> {
    let mut removed: BTreeMap<&str, Vec<&ContainerInfo>> = BTreeMap::new();
    for c in found {
        if let Some(service) = c.labels.get(label::SERVICE)
            && !cfg.services.contains_key(service)
        {
            removed.entry(service.as_str()).or_default().push(c);
        }
    }
    removed
}

/// Whether a container of a service no longer configured was a singleton's:
/// its label says so, or, from an agent that did not label it, its name is
/// beat.
pub(crate) fn was_singleton(service: &str, c: &ContainerInfo) -> bool {
    match c.labels.get(label::SINGLETON) {
        Some(value) => value == "true",
        None => service == "beat",
    }
}

/// What the store says of an app for its status: read again only when the
/// store changed since (see [`crate::store::Store::generation`]).
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    live: Option<crate::store::Release>,
    running: Option<(deployd_proto::DeploymentId, CommitSha)>,
    lock: Option<AppLock>,
}

impl Ctx {
    /// A docker app's services for its status: each one's containers, from
    /// the engine's model of what runs.
    async fn container_status(
        &self,
        app: &str,
        cfg: &AppConfig,
        current: &[String],
    ) -> Vec<ServiceStatus> {
        let found = match self.view.observed.containers(app) {
            Some(found) => found,
            // Not listed yet (only just started): list once now.
            None => {
                self.relist().await;
                self.view.observed.containers(app).unwrap_or_default()
            }
        };
        let mut services = Vec::new();
        let removed = removed_services(cfg, &found);
        let names = cfg
            .roll_order()
            .into_iter()
            .chain(removed.keys().map(|s| (*s).to_owned()));
        for name in names {
            let service = cfg.services.get(&name);
            let mut containers = Vec::new();
            for c in found
                .iter()
                .filter(|c| c.labels.get(label::SERVICE) == Some(&name))
            {
                let sha = c.labels.get(label::SHA).cloned();
                let state = match (c.running, sha.as_ref().is_some_and(|s| current.contains(s))) {
                    (false, _) => ContainerPhase::Stopped,
                    (true, true) => ContainerPhase::Running,
                    (true, false) => ContainerPhase::Draining,
                };
                let health = match (c.running, service) {
                    (true, Some(service)) => self.health_of(c, service),
                    _ => None,
                };
                containers.push(ContainerStatus {
                    name: c.name.clone(),
                    sha: sha.and_then(|s| s.parse::<CommitSha>().ok()),
                    state,
                    status: Some(c.status.clone()),
                    health,
                    node: None,
                });
            }
            containers.sort_by(|a, b| a.name.cmp(&b.name));
            let singleton = match service {
                Some(service) => service.is_singleton(&name),
                None => removed
                    .get(name.as_str())
                    .is_some_and(|found| found.iter().any(|c| was_singleton(&name, c))),
            };
            services.push(ServiceStatus {
                removed: service.is_none(),
                name,
                singleton,
                containers,
            });
        }
        services
    }
    /// The app's live release, deployment in flight and lock, from the
    /// store or, when nothing was written since they were read, from then.
    fn recorded(&self, app: &str) -> Result<Recorded, EngineError> {
        let generation = self.store.generation();
        if let Some((at, recorded)) = crate::sync::lock(&self.view.recorded).get(app)
            && *at == generation
        {
            return Ok(recorded.clone());
        }
        let store = &self.store;
        let recorded = Recorded {
            live: store.live_release(app)?,
            running: store.in_flight(app)?,
            lock: store.lock_of(app)?.map(AppLock::from),
        };
        crate::sync::lock(&self.view.recorded)
            .insert(app.to_owned(), (generation, recorded.clone()));
        Ok(recorded)
    }

    /// A running container's health as last seen: the service's HTTP check
    /// when it has one (probed in the background), else Docker's
    /// HEALTHCHECK if any.
    fn health_of(&self, c: &ContainerInfo, service: &ServiceConfig) -> Option<String> {
        if service.port.is_some() && service.health.is_some() {
            return Some(
                self.view
                    .observed
                    .health(&c.id)
                    .unwrap_or_else(|| "starting: not probed yet".to_owned()),
            );
        }
        docker_health(&c.status)
    }
}

/// Docker's HEALTHCHECK verdict from its status text (`Up 3 minutes
/// (healthy)`), if the image has one.
fn docker_health(status: &str) -> Option<String> {
    if status.contains("(healthy)") {
        Some("healthy".into())
    } else if status.contains("(unhealthy)") {
        Some("unhealthy: its HEALTHCHECK fails".into())
    } else if status.contains("(health: starting)") {
        Some("starting".into())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::{Config, EXAMPLE};

    fn container(service: &str, singleton: Option<&str>) -> ContainerInfo {
        let mut labels = HashMap::from([(label::SERVICE.to_owned(), service.to_owned())]);
        if let Some(value) = singleton {
            labels.insert(label::SINGLETON.to_owned(), value.to_owned());
        }
        ContainerInfo {
            id: format!("{service}-1"),
            name: format!("shop-{service}-1"),
            labels,
            running: true,
            status: "Up 3 minutes".into(),
            ports: Vec::new(),
        }
    }

    #[test]
    fn services_taken_out_of_the_config_are_found_with_what_they_were() {
        let config = Config::from_toml(EXAMPLE).unwrap();
        let mut shop = config.apps["shop"].clone();
        shop.services.remove("beat");
        let found = [
            container("web", Some("false")),
            container("beat", Some("true")),
            container("scheduler", Some("true")),
            container("flower", Some("false")),
            container("beat2", None),
        ];
        let removed = removed_services(&shop, &found);
        assert_eq!(
            removed.keys().copied().collect::<Vec<_>>(),
            ["beat", "beat2", "flower", "scheduler"]
        );
        let singleton = |name: &str| was_singleton(name, removed[name][0]);
        assert!(singleton("beat"));
        assert!(singleton("scheduler"));
        assert!(!singleton("flower"));
        // Unlabelled (an older agent's container): by its name.
        assert!(!singleton("beat2"));
        assert!(was_singleton("beat", &container("beat", None)));
    }

    #[test]
    fn docker_health_is_read_from_its_status_text() {
        assert_eq!(
            docker_health("Up 3 minutes (healthy)").as_deref(),
            Some("healthy")
        );
        assert_eq!(
            docker_health("Up 1 second (health: starting)").as_deref(),
            Some("starting")
        );
        assert!(
            docker_health("Up 5 minutes (unhealthy)")
                .unwrap()
                .starts_with("unhealthy")
        );
        assert_eq!(docker_health("Up 3 minutes"), None);
    }
}
