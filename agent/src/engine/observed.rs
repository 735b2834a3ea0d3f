//! What runs, as the engine keeps it current: every container deployd
//! made (from one list call, made again on each Docker event for them,
//! after each of the engine's own steps, and every few seconds), and the
//! last health answer of each running web container (probed in the
//! background). `status` reads this model: no Docker call and no probe
//! happens while a client waits, however many ask.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;

use super::{Ctx, label};
use crate::config::AppConfig;
use crate::docker::ContainerInfo;

/// The list is made again at least this often (Docker's status text, "Up
/// 3 minutes", moves on without an event).
const RELIST_EVERY: Duration = Duration::from_secs(5);
/// Events come in bursts (create, start, health): one list per burst.
const EVENT_BURST: Duration = Duration::from_millis(20);
/// Running web containers are probed this often.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How long the event stream waits before it is opened again after it broke.
const RECONNECT: Duration = Duration::from_secs(1);

/// The model: containers by app, health answers by container id.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    containers: RwLock<Arc<HashMap<String, Vec<ContainerInfo>>>>,
    health: Mutex<HashMap<String, String>>,
    /// Whether a list has been made since the start.
    listed: std::sync::atomic::AtomicBool,
    stale: Notify,
}

impl Observed {
    /// The app's containers as last listed, or `None` before the first list.
    pub fn containers(&self, app: &str) -> Option<Vec<ContainerInfo>> {
        if !self.listed.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let all = crate::sync::read(&self.containers).clone();
        Some(all.get(app).cloned().unwrap_or_default())
    }

    /// The last health answer of a running container with a health check.
    pub fn health(&self, id: &str) -> Option<String> {
        crate::sync::lock(&self.health).get(id).cloned()
    }

    /// Keeps an answer the engine got itself (a roll's health gate).
    pub fn set_health(&self, id: &str, answer: String) {
        crate::sync::lock(&self.health).insert(id.to_owned(), answer);
    }

    fn replace(&self, found: Vec<ContainerInfo>) {
        let mut by_app: HashMap<String, Vec<ContainerInfo>> = HashMap::new();
        for c in found {
            if let Some(app) = c.labels.get(label::APP) {
                by_app.entry(app.clone()).or_default().push(c);
            }
        }
        {
            let mut health = crate::sync::lock(&self.health);
            health.retain(|id, _| by_app.values().flatten().any(|c| c.running && &c.id == id));
        }
        *crate::sync::write(&self.containers) = Arc::new(by_app);
        self.listed
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

impl Ctx {
    /// Lists every container deployd made, into the model.
    pub(crate) async fn relist(&self) {
        match self.docker.containers(&[(label::APP, "")]).await {
            Ok(found) => self.view.observed.replace(found),
            Err(e) => tracing::warn!(error = %e, "cannot list containers for status"),
        }
    }

    /// Keeps the model current until deployd stops: lists on every Docker
    /// event for deployd's containers (a burst at a time), when poked, and
    /// every few seconds; opens the event stream again when it breaks.
    pub(crate) async fn observe(self: Arc<Self>) {
        loop {
            let events = self.docker.container_events(label::APP);
            tokio::pin!(events);
            self.relist().await;
            loop {
                tokio::select! {
                    () = self.stopping.cancelled() => return,
                    event = events.next() => match event {
                        Some(Ok(())) => {
                            tokio::time::sleep(EVENT_BURST).await;
                            // The rest of the burst is covered by this list.
                            while let Some(Some(Ok(()))) = futures_util::FutureExt::now_or_never(events.next()) {}
                            self.relist().await;
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "Docker's event stream broke; opening it again");
                            break;
                        }
                        None => break,
                    },
                    () = self.view.observed.stale.notified() => self.relist().await,
                    () = tokio::time::sleep(RELIST_EVERY) => self.relist().await,
                }
            }
            tokio::select! {
                () = self.stopping.cancelled() => return,
                () = tokio::time::sleep(RECONNECT) => {}
            }
        }
    }

    /// Probes every running web container with a health check, every few
    /// seconds, into the model, until deployd stops.
    pub(crate) async fn probe_health(self: Arc<Self>, apps: HashMap<String, Arc<AppConfig>>) {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.stopping.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut probes = Vec::new();
            for (app, cfg) in &apps {
                let Some(containers) = self.view.observed.containers(app) else {
                    continue;
                };
                for c in containers.into_iter().filter(|c| c.running) {
                    let service = c
                        .labels
                        .get(label::SERVICE)
                        .and_then(|s| cfg.services.get(s));
                    let Some((Some(port), Some(health))) = service.map(|s| (s.port, &s.health))
                    else {
                        continue;
                    };
                    let ctx = self.clone();
                    probes.push(async move {
                        let answer = match c.published(port) {
                            Some(published) => {
                                match ctx.health.probe(published, health).await.healthy(health) {
                                    Ok(_) => "healthy".to_owned(),
                                    Err(probe) => format!("unhealthy: {probe}"),
                                }
                            }
                            None => "unhealthy: no published port".to_owned(),
                        };
                        ctx.view.observed.set_health(&c.id, answer);
                    });
                }
            }
            futures_util::future::join_all(probes).await;
        }
    }
}
