//! `[apps.NAME]`: one app's image, secrets, release tasks and services, and
//! the rules they must follow.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use deployd_proto::DeploymentKind;
use serde::Deserialize;

use super::{
    Backend, CanaryConfig, HealthConfig, MigrationsConfig, Problems, SwarmConfig, SwitchConfig,
    is_plain_name,
};

/// One app: its image, its secrets, its release tasks and its services.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// Image repository including the registry host; releases are tagged
    /// with their commit sha.
    pub image: String,
    /// JSON file with `{"username": ..., "password": ...}` for the registry.
    pub registry_auth_file: Option<PathBuf>,
    /// Env file (Docker's `--env-file` format) given to every container.
    pub env_file: Option<PathBuf>,
    /// Variables given to every container, over those of `env_file`.
    #[serde(default)]
    pub env: EnvVars,
    /// Existing Docker network the containers join (where db and redis live).
    pub network: Option<String>,
    /// Volumes mounted into every container, `name:/path[:ro]`.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// One-off tasks run in order, in the new image, before any service changes.
    #[serde(default)]
    pub release: Vec<TaskConfig>,
    /// Long-running services by name (`web`, `worker`, `beat`, ...).
    pub services: BTreeMap<String, ServiceConfig>,
    /// Order services are rolled in. Default: web, worker, beat, then the
    /// rest by name.
    pub order: Option<Vec<String>>,
    /// How long to keep checking health after the roll; a failure in this
    /// window rolls back like any other. Default: 10 s.
    #[serde(default = "default_verify", with = "humantime_serde")]
    pub verify: Duration,
    /// Releases whose images are kept for rollback. Default: 5.
    #[serde(default = "default_retain")]
    pub retain: usize,
    /// The traffic switch on the app's public address; absent, it is off
    /// and web containers are only published on ephemeral local ports.
    pub switch: Option<SwitchConfig>,
    /// The cgroup every container of the app (services and release tasks)
    /// goes under, as Docker's `--cgroup-parent`: a CPU and memory budget
    /// for the whole app, set on that cgroup. A path such as `/shop` with
    /// the cgroupfs driver, a slice such as `shop.slice` with systemd's.
    pub cgroup_parent: Option<String>,
    /// The migration plan each deployment makes first, and the unsafe
    /// migrations it refuses. Absent: no plan.
    pub migrations: Option<MigrationsConfig>,
    /// Canary deployments: the new release gets a share of real traffic
    /// first, judged by the switch's figures. Needs the switch.
    pub canary: Option<CanaryConfig>,
    /// Webhooks told when a deployment starts and how it ends.
    #[serde(default)]
    pub notify: Vec<super::NotifyConfig>,
    /// Where the services run: `docker` (this host's containers, the
    /// default) or `swarm` (services of the cluster this host manages).
    #[serde(default)]
    pub backend: Backend,
    /// How the services run on the cluster (`backend = "swarm"`).
    pub swarm: Option<SwarmConfig>,
}

/// A release task such as `migrate`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// Short name shown in progress and history.
    pub name: String,
    /// Replaces the image's CMD; the ENTRYPOINT is kept.
    pub command: Vec<String>,
    /// Longest the task may run. Default: 10 min.
    #[serde(default = "default_task_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// When it runs: `["deploy", "rollback"]` (the default), or one of
    /// them. A rollback runs an image that ran before: a check of it or a
    /// migrate adds nothing, while a host-local collectstatic must put the
    /// old release's files back.
    #[serde(default = "default_task_on")]
    pub on: Vec<DeploymentKind>,
    /// In a fleet deployment (several hosts deployed as one), run it on the
    /// first host only: for tasks that change shared state, such as
    /// migrate. Default: false (it runs on every host, as collectstatic
    /// into a host's own volume must).
    #[serde(default)]
    pub once: bool,
    /// With `backend = "swarm"`, run it on every node of the cluster (a
    /// global job, one task per node; all must succeed): for tasks that
    /// write a node's own volume, such as collectstatic. Default: false
    /// (one task, on a node Swarm picks). On the docker backend this host
    /// is every node.
    #[serde(default)]
    pub every_node: bool,
    /// Env file for this task only, over the app's.
    pub env_file: Option<PathBuf>,
    /// Variables for this task only, over the app's and `env_file`'s.
    #[serde(default)]
    pub env: EnvVars,
}

impl TaskConfig {
    /// Whether the task runs in a deployment of this kind.
    pub fn runs_in(&self, kind: DeploymentKind) -> bool {
        self.on.contains(&kind)
    }
}

/// Environment variables written in the configuration, layered over env
/// files. Values may be secrets: `Debug` shows only the names.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct EnvVars(pub BTreeMap<String, String>);

impl fmt::Debug for EnvVars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl EnvVars {
    fn validate(&self, at: &str, problems: &mut Problems) {
        for (name, value) in &self.0 {
            if !crate::env_file::is_variable_name(name) {
                problems.add(
                    format!("{at}.env"),
                    format!("{name:?} is not a variable name (A-Z, a-z, 0-9, _)"),
                );
            } else if value.contains('\0') {
                problems.add(format!("{at}.env.{name}"), "must not hold a NUL byte");
            }
        }
    }
}

/// How a service is rolled, from its role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Start-first, gated on the HTTP health check.
    Web,
    /// Overlapping: new ones must stay up, old ones then drain.
    Worker,
    /// Strict singleton: the old one exits before the new one starts.
    Beat,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Web => "web",
            Self::Worker => "worker",
            Self::Beat => "beat",
        }
    }
}

/// One service of an app.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Defaults to the service's name when that is `web`, `worker` or `beat`.
    pub role: Option<Role>,
    /// Replaces the image's CMD. Default: the image's CMD.
    pub command: Option<Vec<String>>,
    /// Container port to publish (on an ephemeral 127.0.0.1 port). Web only.
    pub port: Option<u16>,
    /// Containers to run. Default: 1.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// HTTP health check. Required for web.
    pub health: Option<HealthConfig>,
    /// Grace after SIGTERM before SIGKILL. Default: 30 s.
    #[serde(default = "default_stop_timeout", with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// Never two at once, not even during a roll. Implied (and required) for beat.
    #[serde(default)]
    pub singleton: bool,
    /// How long a new container must keep running to count as up, when its
    /// image has no HEALTHCHECK. Default: 5 s.
    #[serde(default = "default_min_healthy", with = "humantime_serde")]
    pub min_healthy: Duration,
    /// Env file for this service only, over the app's.
    pub env_file: Option<PathBuf>,
    /// Variables for this service only, over the app's and `env_file`'s.
    #[serde(default)]
    pub env: EnvVars,
}

fn default_task_on() -> Vec<DeploymentKind> {
    vec![DeploymentKind::Deploy, DeploymentKind::Rollback]
}
fn default_verify() -> Duration {
    Duration::from_secs(10)
}
fn default_retain() -> usize {
    5
}
fn default_task_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_replicas() -> u32 {
    1
}
fn default_stop_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_min_healthy() -> Duration {
    Duration::from_secs(5)
}

impl AppConfig {
    pub(super) fn validate(&self, at: &str, name: &str, problems: &mut Problems) {
        if !is_plain_name(name) {
            problems.add(
                at,
                "app names are 1-32 of a-z, 0-9 and -, starting with a letter",
            );
        }
        let repository_host = self.image.split_once('/').map(|(host, _)| host);
        if !repository_host.is_some_and(|h| h.contains(['.', ':']) || h == "localhost") {
            problems.add(
                format!("{at}.image"),
                "must name the registry host, e.g. registry.example.com/shop",
            );
        }
        if self.image.contains(['@', ' '])
            || self
                .image
                .rsplit('/')
                .next()
                .is_some_and(|last| last.contains(':'))
        {
            problems.add(
                format!("{at}.image"),
                "a repository without tag or digest: the sha is the tag",
            );
        }
        if let Some(parent) = &self.cgroup_parent
            && (parent.is_empty() || parent.contains(char::is_whitespace) || parent.contains(".."))
        {
            problems.add(
                format!("{at}.cgroup_parent"),
                "a cgroup path such as /shop, or a slice such as shop.slice",
            );
        }
        let mut task_names = Vec::new();
        for (i, task) in self.release.iter().enumerate() {
            let path = format!("{at}.release[{i}]");
            if !is_plain_name(&task.name) {
                problems.add(
                    format!("{path}.name"),
                    "task names are 1-32 of a-z, 0-9 and -",
                );
            } else if task_names.contains(&&task.name) {
                problems.add(format!("{path}.name"), "task names must be unique");
            }
            task_names.push(&task.name);
            if task.command.is_empty() {
                problems.add(format!("{path}.command"), "must not be empty");
            }
            if task.on.is_empty() {
                problems.add(
                    format!("{path}.on"),
                    "name when the task runs: deploy, rollback or both",
                );
            }
            task.env.validate(&path, problems);
        }
        self.env.validate(at, problems);
        if let Some(migrations) = &self.migrations {
            migrations.validate(&format!("{at}.migrations"), &task_names, problems);
        }
        if self.services.is_empty() {
            problems.add(
                format!("{at}.services"),
                "an app needs at least one service",
            );
        }
        for (service, config) in &self.services {
            let path = format!("{at}.services.{service}");
            if !is_plain_name(service) {
                problems.add(&path, "service names are 1-32 of a-z, 0-9 and -");
            }
            config.validate(&path, service, problems);
        }
        if let Some(order) = &self.order {
            for (i, service) in order.iter().enumerate() {
                if !self.services.contains_key(service) {
                    problems.add(format!("{at}.order[{i}]"), "names no configured service");
                } else if order[..i].contains(service) {
                    problems.add(format!("{at}.order[{i}]"), "names a service twice");
                }
            }
            for service in self.services.keys() {
                if !order.contains(service) {
                    problems.add(
                        format!("{at}.order"),
                        format!("must list every service; {service} is missing"),
                    );
                }
            }
        }
        if let Some(switch) = &self.switch {
            let at = format!("{at}.switch");
            switch.validate(&at, problems);
            let web = self
                .services
                .iter()
                .filter(|(name, cfg)| cfg.role_of(name) == Some(Role::Web))
                .count();
            if web != 1 {
                problems.add(at, "the switch sends traffic to exactly one web service");
            }
        }
        for (i, hook) in self.notify.iter().enumerate() {
            hook.validate(&format!("{at}.notify[{i}]"), problems);
        }
        if let Some(canary) = &self.canary {
            let at = format!("{at}.canary");
            canary.validate(&at, problems);
            if self.switch.is_none() {
                problems.add(
                    at,
                    "a canary's traffic goes through the switch: set [apps.NAME.switch] too",
                );
            } else if let Some((web, _)) = self.switched_service()
                && self.roll_order().first().map(String::as_str) != Some(web)
            {
                problems.add(
                    at,
                    format!(
                        "a canary is judged before anything else changes: {web} must come first \
                         in the roll order (set order = [\"{web}\", ...])"
                    ),
                );
            }
        }
        self.validate_backend(at, name, problems);
        if self.retain < 2 {
            problems.add(
                format!("{at}.retain"),
                "keep at least 2 releases: the current and the previous",
            );
        }
    }

    /// What the backend in force allows.
    fn validate_backend(&self, at: &str, name: &str, problems: &mut Problems) {
        if self.backend != Backend::Swarm {
            if self.swarm.is_some() {
                problems.add(format!("{at}.swarm"), "only for backend = \"swarm\"");
            }
            return;
        }
        if let Some(swarm) = &self.swarm {
            swarm.validate(&format!("{at}.swarm"), problems);
        }
        if self.network.is_none() {
            problems.add(
                format!("{at}.network"),
                "backend = \"swarm\" needs the attachable overlay network the services and \
                 release tasks join",
            );
        }
        let unsupported = [
            (
                "switch",
                self.switch.is_some(),
                "Swarm's routing mesh publishes web (set [apps.NAME.swarm] publish)",
            ),
            (
                "canary",
                self.canary.is_some(),
                "a canary needs the switch, which Swarm's routing mesh replaces",
            ),
            (
                "cgroup_parent",
                self.cgroup_parent.is_some(),
                "Swarm places tasks on any node: limit them per service instead",
            ),
        ];
        for (key, set, why) in unsupported {
            if set {
                problems.add(
                    format!("{at}.{key}"),
                    format!("not with backend = \"swarm\": {why}"),
                );
            }
        }
        // Swarm names services and jobs `<app>_<service>` and
        // `<app>_task-<task>-<8 characters>`, at most 63 characters each.
        for service in self.services.keys() {
            if name.len() + 1 + service.len() > 63 {
                problems.add(
                    format!("{at}.services.{service}"),
                    "with backend = \"swarm\", app and service names together are at most 62 \
                     characters (Swarm's service name: <app>_<service>)",
                );
            }
        }
        for (i, task) in self.release.iter().enumerate() {
            if name.len() + task.name.len() + 15 > 63 {
                problems.add(
                    format!("{at}.release[{i}].name"),
                    "with backend = \"swarm\", app and task names together are at most 48 \
                     characters (Swarm's job name: <app>_task-<task>-<8 characters>)",
                );
            }
        }
        for (i, volume) in self.volumes.iter().enumerate() {
            if volume.starts_with(['/', '.', '~']) {
                problems.add(
                    format!("{at}.volumes[{i}]"),
                    "backend = \"swarm\" mounts named volumes only (each node has its own)",
                );
            }
        }
    }

    /// The web service the switch sends traffic to, if the switch is on.
    pub fn switched_service(&self) -> Option<(&str, &ServiceConfig)> {
        self.switch.as_ref()?;
        self.services
            .iter()
            .find(|(name, cfg)| cfg.role_of(name) == Some(Role::Web))
            .map(|(name, cfg)| (name.as_str(), cfg))
    }

    /// Services in the order they are rolled.
    pub fn roll_order(&self) -> Vec<String> {
        if let Some(order) = &self.order {
            return order.clone();
        }
        let rank = |name: &str| match name {
            "web" => 0,
            "worker" => 1,
            "beat" => 2,
            _ => 3,
        };
        let mut names: Vec<String> = self.services.keys().cloned().collect();
        names.sort_by_key(|n| (rank(n), n.clone()));
        names
    }
}

impl ServiceConfig {
    /// The role: explicit, or the service's name.
    pub fn role_of(&self, name: &str) -> Option<Role> {
        self.role.or(match name {
            "web" => Some(Role::Web),
            "worker" => Some(Role::Worker),
            "beat" => Some(Role::Beat),
            _ => None,
        })
    }

    /// Whether at most one container may ever run.
    pub fn is_singleton(&self, name: &str) -> bool {
        self.singleton || self.role_of(name) == Some(Role::Beat)
    }

    fn validate(&self, at: &str, name: &str, problems: &mut Problems) {
        self.env.validate(at, problems);
        let Some(role) = self.role_of(name) else {
            problems.add(
                format!("{at}.role"),
                "required unless the service is named web, worker or beat",
            );
            return;
        };
        if self.command.as_ref().is_some_and(Vec::is_empty) {
            problems.add(
                format!("{at}.command"),
                "must not be empty (omit it to use the image's CMD)",
            );
        }
        if self.replicas == 0 {
            problems.add(format!("{at}.replicas"), "must be at least 1");
        }
        if self.is_singleton(name) && self.replicas != 1 {
            problems.add(
                format!("{at}.replicas"),
                "a singleton runs exactly one container",
            );
        }
        match role {
            Role::Web => {
                if self.port.is_none() {
                    problems.add(format!("{at}.port"), "web needs the port it listens on");
                }
                match &self.health {
                    None => problems.add(format!("{at}.health"), "web needs a health check"),
                    Some(h) => h.validate(&format!("{at}.health"), problems),
                }
                if self.singleton {
                    problems.add(
                        format!("{at}.singleton"),
                        "web is rolled start-first and cannot be a singleton",
                    );
                }
            }
            Role::Worker | Role::Beat => {
                if self.port.is_some() || self.health.is_some() {
                    problems.add(at, "port and health are for web services only");
                }
            }
        }
    }
}
