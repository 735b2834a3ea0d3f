//! What an app runs now: the store's view joined with Docker's.

use deployd_proto::{
    AppLock, AppStatus, CommitSha, ContainerPhase, ContainerStatus, ServiceStatus,
};

use super::{EngineError, EngineHandle, label};

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
            let mut containers: Vec<ContainerStatus> = found
                .into_iter()
                .map(|c| {
                    let sha = c.labels.get(label::SHA).cloned();
                    let state = match (c.running, sha.as_ref().is_some_and(|s| current.contains(s)))
                    {
                        (false, _) => ContainerPhase::Stopped,
                        (true, true) => ContainerPhase::Running,
                        (true, false) => ContainerPhase::Draining,
                    };
                    ContainerStatus {
                        name: c.name,
                        sha: sha.and_then(|s| s.parse::<CommitSha>().ok()),
                        state,
                    }
                })
                .collect();
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
