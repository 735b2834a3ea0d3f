//! What an app runs now: the store's view joined with Docker's.

use deployd_proto::{
    AppLock, AppStatus, CommitSha, ContainerPhase, ContainerStatus, ServiceStatus,
};

use std::time::{Duration, Instant};

use super::{Ctx, EngineError, EngineHandle, label};
use crate::config::ServiceConfig;
use crate::docker::ContainerInfo;

/// A web container's health answer is reused this long: status may be read
/// often, the app should not be probed as often.
const HEALTH_TTL: Duration = Duration::from_secs(2);

impl EngineHandle {
    /// The app's live release, deployment in flight, lock, and every service
    /// container with its release and phase (running, draining, stopped).
    pub async fn status(&self, app: &str) -> Result<AppStatus, EngineError> {
        let cfg = self
            .apps
            .get(app)
            .ok_or_else(|| EngineError::UnknownApp(app.to_owned()))?;
        let store = &self.ctx.store;
        let live = store.live_release(app)?;
        let running = store.unfinished()?.into_iter().find(|d| d.app == app);
        let lock = store.lock_of(app)?.map(|l| AppLock {
            reason: l.reason,
            locked_by: l.locked_by,
            locked_at: l.locked_at,
        });
        // Containers of the live release and of the deployment in flight are
        // current; any other still running is an old one finishing its work.
        let current: Vec<String> = live
            .iter()
            .map(|r| r.sha.to_string())
            .chain(running.iter().map(|d| d.sha.to_string()))
            .collect();
        let mut services = Vec::new();
        for name in cfg.roll_order() {
            let found = self
                .ctx
                .docker
                .containers(&[(label::APP, app), (label::SERVICE, &name)])
                .await?;
            let service = cfg.services.get(&name);
            let mut containers = Vec::new();
            for c in found {
                let sha = c.labels.get(label::SHA).cloned();
                let state = match (c.running, sha.as_ref().is_some_and(|s| current.contains(s))) {
                    (false, _) => ContainerPhase::Stopped,
                    (true, true) => ContainerPhase::Running,
                    (true, false) => ContainerPhase::Draining,
                };
                let health = match (c.running, service) {
                    (true, Some(service)) => self.ctx.health_of(&c, service).await,
                    _ => None,
                };
                containers.push(ContainerStatus {
                    name: c.name,
                    sha: sha.and_then(|s| s.parse::<CommitSha>().ok()),
                    state,
                    status: Some(c.status),
                    health,
                });
            }
            containers.sort_by(|a, b| a.name.cmp(&b.name));
            services.push(ServiceStatus { name, containers });
        }
        Ok(AppStatus {
            app: app.to_owned(),
            live_sha: live.as_ref().map(|r| r.sha.clone()),
            live_digest: live.map(|r| r.digest),
            running_deployment: running.map(|d| d.id),
            lock,
            services,
        })
    }
}

impl Ctx {
    /// A running container's health: the service's HTTP check when it has
    /// one (answers cached briefly), else Docker's HEALTHCHECK if any.
    async fn health_of(&self, c: &ContainerInfo, service: &ServiceConfig) -> Option<String> {
        let (Some(port), Some(health)) = (service.port, &service.health) else {
            return docker_health(&c.status);
        };
        if let Some(answer) = self.cached_health(&c.id) {
            return Some(answer);
        }
        let answer = match self.docker.port(&c.id, port).await {
            Ok(addrs) => match self.probe(addrs.published, health).await {
                Ok(()) => "healthy".to_owned(),
                Err(why) => format!("unhealthy: {why}"),
            },
            Err(_) => "unhealthy: no published port".to_owned(),
        };
        let mut cache = self.health_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, (at, _)| at.elapsed() < HEALTH_TTL);
        cache.insert(c.id.clone(), (Instant::now(), answer.clone()));
        Some(answer)
    }

    fn cached_health(&self, id: &str) -> Option<String> {
        let cache = self.health_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(id)
            .filter(|(at, _)| at.elapsed() < HEALTH_TTL)
            .map(|(_, answer)| answer.clone())
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
    use super::docker_health;

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
