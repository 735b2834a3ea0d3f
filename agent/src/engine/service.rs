//! Starting, readying, switching, draining, stopping and retiring service
//! containers: what a roll, a rollback and crash recovery all do to them.
//! Traffic always moves before containers go: a container is never removed
//! while the switch may still send it a request.

use std::collections::HashMap;

use tracing::Instrument;

use super::common::{Failure, short_id};
use super::health::Healthy;
use super::label;
use crate::config::{AppConfig, Role, ServiceConfig};
use crate::docker::{ContainerInfo, ContainerSpec};
use crate::env_file::AppEnv;
use crate::store::Release;
use crate::switch::Upstream;

/// A container this deployment started.
#[derive(Debug, Clone)]
pub(crate) struct Started {
    pub id: String,
    /// Published host port, for web.
    pub port: Option<u16>,
    /// The web port at the container's own address, where the switch sends
    /// traffic, and the release it runs (its `deployd.sha` label).
    pub direct: Option<(std::net::SocketAddr, std::sync::Arc<str>)>,
}

impl Started {
    /// Where the switch sends this container's share of traffic.
    pub fn upstream(&self) -> Option<Upstream> {
        self.direct.as_ref().map(|(addr, release)| Upstream {
            container: self.id.clone(),
            addr: *addr,
            release: release.clone(),
        })
    }
}

/// Where a service container goes: which app, deployment and env. No
/// `Debug`: the env holds secrets.
pub(crate) struct Placement<'p> {
    pub app: &'p str,
    pub app_cfg: &'p AppConfig,
    pub deployment: &'p str,
    pub env: &'p AppEnv,
}

impl Release {
    /// Whether a container or Swarm service with these labels runs this
    /// release: the same commit pinned to the same digest.
    pub(crate) fn runs_in(&self, labels: &HashMap<String, String>) -> bool {
        labels.get(label::SHA).map(String::as_str) == Some(self.sha.as_str())
            && labels.get(label::DIGEST) == Some(&self.digest)
    }
}

/// What a service's containers (or Swarm service) are labelled with, so
/// that a restarted agent can tell what they are.
pub(crate) fn service_labels(
    place: &Placement<'_>,
    service: &str,
    cfg: &ServiceConfig,
    release: &Release,
) -> HashMap<String, String> {
    HashMap::from([
        (label::APP.to_owned(), place.app.to_owned()),
        (label::SERVICE.to_owned(), service.to_owned()),
        (label::SHA.to_owned(), release.sha.to_string()),
        (label::DIGEST.to_owned(), release.digest.clone()),
        (label::DEPLOYMENT.to_owned(), place.deployment.to_owned()),
        (
            label::SINGLETON.to_owned(),
            cfg.is_singleton(service).to_string(),
        ),
        (
            label::STOP_TIMEOUT.to_owned(),
            cfg.stop_timeout.as_secs_f64().ceil().to_string(),
        ),
    ])
}

/// The container of one replica of a service, labelled so that a restarted
/// agent can tell what it is.
pub(crate) fn service_spec(
    place: &Placement<'_>,
    service: &str,
    cfg: &ServiceConfig,
    release: &Release,
    index: u32,
) -> ContainerSpec {
    let short_sha = release.sha.short();
    ContainerSpec {
        name: Some(format!(
            "{}-{service}-{short_sha}-{}-{index}",
            place.app,
            short_id(place.deployment)
        )),
        image: release.pinned(&place.app_cfg.image),
        cmd: cfg.command.clone(),
        env: place.env.service(service).to_vec(),
        network: place.app_cfg.network.clone(),
        network_aliases: Vec::new(),
        volumes: place.app_cfg.volumes.clone(),
        labels: service_labels(place, service, cfg, release),
        publish: cfg.port,
        stop_timeout: Some(cfg.stop_timeout),
        restart: true,
        cgroup_parent: place.app_cfg.cgroup_parent.clone(),
    }
}

impl super::Ctx {
    /// Starts a service container; learns its published port.
    pub(crate) async fn start_service(
        &self,
        spec: ContainerSpec,
        cfg: &ServiceConfig,
    ) -> Result<Started, Failure> {
        let id = self.docker.start(spec).await?;
        match self.started(&id, cfg).await {
            Ok(started) => Ok(started),
            Err(f) => {
                // Not tracked anywhere yet: remove it here or it leaks.
                let _ = self.docker.remove(&id).await;
                Err(f)
            }
        }
    }

    /// A running container of a service, with where its web port is reached.
    pub(crate) async fn started(&self, id: &str, cfg: &ServiceConfig) -> Result<Started, Failure> {
        let addrs = match cfg.port {
            Some(p) => Some(self.docker.port(id, p).await?),
            None => None,
        };
        Ok(Started {
            id: id.to_owned(),
            port: addrs.as_ref().map(|a| a.published),
            direct: addrs.and_then(|mut a| {
                let release = a.labels.remove(label::SHA).unwrap_or_default();
                a.direct.map(|addr| (addr, release.into()))
            }),
        })
    }

    /// Starts containers of an earlier release from its pinned digest, one per
    /// index in `indexes` (which keeps their names apart).
    pub(crate) async fn start_release(
        &self,
        place: &Placement<'_>,
        service: &str,
        cfg: &ServiceConfig,
        release: &Release,
        indexes: std::ops::Range<u32>,
    ) -> Result<Vec<Started>, Failure> {
        let mut started = Vec::new();
        for index in indexes {
            let spec = service_spec(place, service, cfg, release, index);
            started.push(self.start_service(spec, cfg).await?);
        }
        Ok(started)
    }

    /// Stops a container in the background (SIGTERM, then `timeout` to finish
    /// its work), then removes it.
    pub(crate) fn drain(&self, id: String, timeout: std::time::Duration) {
        let docker = self.docker.clone();
        // In the deployment's span: its log lines name the deployment.
        tokio::spawn(
            async move {
                if let Err(e) = docker.stop(&id, timeout).await {
                    tracing::warn!(container = %id, error = %e, "draining container did not stop");
                }
                if let Err(e) = docker.remove(&id).await {
                    tracing::warn!(container = %id, error = %e, "drained container not removed");
                }
            }
            .in_current_span(),
        );
    }

    /// If `service` is the app's switched web service: sends its traffic to
    /// `to` from now on, then drains the containers that had it. Returns
    /// what happened, for the deployment's log.
    pub(crate) async fn switch_traffic(
        &self,
        app: &str,
        app_cfg: &AppConfig,
        service: &str,
        to: &[Started],
    ) -> Result<Option<String>, Failure> {
        let (Some(route), Some(switch), Some((web, _))) = (
            self.traffic.routes.get(app),
            &app_cfg.switch,
            app_cfg.switched_service(),
        ) else {
            return Ok(None);
        };
        if web != service {
            return Ok(None);
        }
        let upstreams = to
            .iter()
            .map(Started::upstream)
            .collect::<Option<Vec<Upstream>>>()
            .ok_or_else(|| Failure("a web container has no address on its network".into()))?;
        let draining = route.switch_to(&upstreams);
        let old = draining.containers().len();
        let started = std::time::Instant::now();
        let drained = draining.finish(switch.drain_timeout).await;
        let to = match upstreams.len() {
            0 => "nothing (the switch answers 503: no web container is live)".to_owned(),
            n => format!("{n} container(s)"),
        };
        let mut line = format!(
            "traffic switched to {to}; {old} drained in {} ms",
            started.elapsed().as_millis()
        );
        if drained.cut > 0 {
            line.push_str(&format!(
                ", {} request(s) still running at the {} s drain timeout were ended",
                drained.cut,
                switch.drain_timeout.as_secs()
            ));
            tracing::warn!(%app, cut = drained.cut, "drain timeout ended requests");
        }
        Ok(Some(line))
    }

    /// Waits until a service container is ready: healthy for web (the
    /// answer that passed is returned), up for the rest.
    pub(crate) async fn wait_ready(
        &self,
        c: &Started,
        cfg: &ServiceConfig,
    ) -> Result<Option<Healthy>, Failure> {
        match (c.port, &cfg.health) {
            (Some(port), Some(health)) => self.wait_healthy(&c.id, port, health).await.map(Some),
            _ => self.wait_up(&c.id, cfg.min_healthy).await.map(|()| None),
        }
    }

    /// Gracefully ends a container that is not of the release a service
    /// converges to: web is stopped, the others drain in the background.
    pub(crate) async fn retire(
        &self,
        c: &ContainerInfo,
        service: &str,
        cfg: &ServiceConfig,
    ) -> Result<(), Failure> {
        if c.running && cfg.role_of(service) != Some(Role::Web) {
            self.drain(c.id.clone(), cfg.stop_timeout);
            return Ok(());
        }
        self.stop_and_remove(c, cfg).await
    }

    pub(crate) async fn stop_and_remove(
        &self,
        c: &ContainerInfo,
        cfg: &ServiceConfig,
    ) -> Result<(), Failure> {
        if c.running {
            self.docker.stop(&c.id, cfg.stop_timeout).await?;
        }
        self.docker.remove(&c.id).await?;
        Ok(())
    }
}
