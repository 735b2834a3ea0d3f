//! The agent's configuration: typed, defaulted, and validated as a whole.
//!
//! Layers, later wins: built-in defaults < the TOML file <
//! `DEPLOYD__SECTION__KEY` environment variables. Validation reports every
//! problem with its key path, so `deployd check-config` can list them all.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod api;
mod switch;

pub use api::{
    ApiConfig, AuthConfig, KeyAlgorithm, KeyConfig, OidcConfig, PROJECT_CLAIMS, RuleConfig,
};
pub use switch::SwitchConfig;

/// The documented example configuration (`deployd default-config`).
pub const EXAMPLE: &str = include_str!("../deployd.example.toml");

/// The whole agent configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory for the deployment store (SQLite). Default: `/var/lib/deployd`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The HTTPS API; `deployd run` requires it.
    pub api: Option<ApiConfig>,
    /// Which tokens the API accepts.
    #[serde(default)]
    pub auth: AuthConfig,
    /// The apps this host runs, by name.
    #[serde(default)]
    pub apps: BTreeMap<String, AppConfig>,
    /// Threads serving the switches' public listeners. Default: 1 (about
    /// 29,000 small requests a second on a loaded 2-core host, see README),
    /// leaving the other cores to the apps.
    #[serde(default = "default_switch_threads")]
    pub switch_threads: usize,
    /// A second, plain-HTTP address serving `/metrics` without a token.
    /// Absent: metrics only on the API, for a token with `read` on every app.
    pub metrics: Option<MetricsConfig>,
    /// How long the store keeps deployment events and audit records.
    #[serde(default)]
    pub store: StoreConfig,
    /// Where the audit chain is anchored outside the store.
    #[serde(default)]
    pub audit: AuditConfig,
}

/// `[store]`: retention.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Deployment events (logs) and audit records older than this many
    /// days are removed, daily and at start; deployments themselves stay
    /// in the history. A checkpoint record keeps the audit chain
    /// verifiable. Default: 90.
    #[serde(default = "default_retain_days")]
    pub retain_days: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            retain_days: default_retain_days(),
        }
    }
}

fn default_retain_days() -> u32 {
    90
}

/// `[audit]`: anchors of the hash chain outside the store, so that deleting
/// the newest records or rewriting the chain is noticed (`deployd audit
/// verify`). Every record's hash also goes to the log (journald) always.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// A file holding the newest record's number and hash, replaced on
    /// every record; best on another disk or a log host's mount. Default:
    /// `audit-head` in the state directory (which guards against edits of
    /// the database file alone).
    pub head_file: Option<PathBuf>,
    /// HTTPS endpoint receiving every record as it is written: a POST of
    /// `{"seq", "prev_hash", "hash", "record"}` per record, in order,
    /// retried until it answers 2xx; never holds a deployment.
    pub forward_url: Option<String>,
    /// PEM CA bundle trusted for `forward_url`, besides the system roots.
    pub forward_ca: Option<PathBuf>,
    /// File holding a bearer token sent to `forward_url`.
    pub forward_token_file: Option<PathBuf>,
}

impl AuditConfig {
    /// The head file in force.
    pub fn head_file(&self, state_dir: &Path) -> PathBuf {
        self.head_file
            .clone()
            .unwrap_or_else(|| state_dir.join("audit-head"))
    }

    fn validate(&self, problems: &mut Problems) {
        if let Some(url) = &self.forward_url
            && !url.starts_with("https://")
        {
            problems.add("audit.forward_url", "must be an https:// URL");
        }
        if self.forward_url.is_none()
            && (self.forward_ca.is_some() || self.forward_token_file.is_some())
        {
            problems.add(
                "audit",
                "forward_ca and forward_token_file need forward_url",
            );
        }
    }
}

/// `[metrics]`: where Prometheus scrapes without a token.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// e.g. `127.0.0.1:9187`. Anyone who reaches it reads every app's
    /// release and counts: keep it on loopback or a private network.
    pub listen: std::net::SocketAddr,
}

fn default_switch_threads() -> usize {
    1
}

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
}

/// The HTTP check a web container must pass.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Path to GET, e.g. `/healthz/`; 200 means healthy.
    pub path: String,
    /// Host header to send (Django's ALLOWED_HOSTS refuses others).
    pub host: String,
    /// How long a new container may take to become healthy. Default: 60 s.
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/deployd")
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
fn default_health_timeout() -> Duration {
    Duration::from_secs(60)
}

/// One thing wrong with a configuration, at a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// e.g. `apps.shop.services.web.health`.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Why a configuration was refused: every problem found.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError(pub Vec<Problem>);

impl Config {
    /// Loads `path`, applies `DEPLOYD__...` environment overrides, validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let built = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(config::Environment::with_prefix("DEPLOYD").separator("__"))
            .build()
            .and_then(config::Config::try_deserialize::<Self>)
            .map_err(|e| {
                ConfigError(vec![Problem {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                }])
            })?;
        built.validate()?;
        Ok(built)
    }

    /// Parses TOML text (no environment layer) and validates it.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(config::Config::try_deserialize::<Self>)
            .map_err(|e| {
                ConfigError(vec![Problem {
                    path: "config".into(),
                    reason: e.to_string(),
                }])
            })?;
        built.validate()?;
        Ok(built)
    }

    /// What is valid but probably not meant (`check-config` and the start
    /// log name them).
    pub fn warnings(&self) -> Vec<Problem> {
        let mut warnings = Problems::default();
        self.auth.warnings(&mut warnings);
        warnings.0
    }

    /// Every problem of the configuration, or `Ok`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        if let Some(api) = &self.api {
            api.validate(&mut problems);
        }
        self.auth.validate(&mut problems);
        self.audit.validate(&mut problems);
        if self.store.retain_days == 0 {
            problems.add("store.retain_days", "must be at least 1");
        }
        if !(1..=64).contains(&self.switch_threads) {
            problems.add("switch_threads", "must be between 1 and 64");
        }
        let mut public = Vec::new();
        for (name, app) in &self.apps {
            app.validate(&format!("apps.{name}"), name, &mut problems);
            if let Some(switch) = &app.switch {
                let at = format!("apps.{name}.switch.listen");
                let port = switch.listen.port();
                if port != 0 && public.contains(&switch.listen) {
                    problems.add(at, "another app listens there already");
                } else if port != 0 && self.api.as_ref().is_some_and(|a| a.listen == switch.listen)
                {
                    problems.add(at, "the API listens there already");
                }
                public.push(switch.listen);
            }
        }
        if let Some(metrics) = &self.metrics {
            let port = metrics.listen.port();
            if port != 0 && public.contains(&metrics.listen) {
                problems.add("metrics.listen", "an app's switch listens there already");
            } else if port != 0
                && self
                    .api
                    .as_ref()
                    .is_some_and(|a| a.listen == metrics.listen)
            {
                problems.add("metrics.listen", "the API listens there already");
            }
        }
        if problems.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems.0))
        }
    }
}

/// Problems found so far, in the order the keys were checked.
#[derive(Debug, Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            reason: reason.into(),
        });
    }
}

/// Names end up in container names and labels: keep them plain.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

impl AppConfig {
    fn validate(&self, at: &str, name: &str, problems: &mut Problems) {
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
        if self.retain < 2 {
            problems.add(
                format!("{at}.retain"),
                "keep at least 2 releases: the current and the previous",
            );
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
                    Some(h) if !h.path.starts_with('/') => {
                        problems.add(format!("{at}.health.path"), "must start with /")
                    }
                    Some(h) if h.host.is_empty() || h.host.contains(['/', ' ']) => {
                        problems.add(format!("{at}.health.host"), "must be a host name")
                    }
                    Some(_) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_valid() {
        let config = Config::from_toml(EXAMPLE).unwrap();
        let shop = &config.apps["shop"];
        assert_eq!(shop.roll_order(), ["web", "worker", "beat"]);
        assert_eq!(shop.release.len(), 3);
        assert_eq!(
            shop.services["worker"].stop_timeout,
            Duration::from_secs(600)
        );
        assert!(shop.services["beat"].is_singleton("beat"));
        let switch = shop.switch.as_ref().unwrap();
        assert_eq!(switch.listen.port(), 8000);
        assert_eq!(shop.switched_service().unwrap().0, "web");
        assert_eq!(config.auth.keys[0].id, "ops-2026");
        let github = &config.auth.oidc[0];
        assert_eq!(github.rules[0].claims["environment"], "production");
        assert_eq!(config.auth.oidc[1].rules[0].claims["ref_protected"], "true");
    }

    #[test]
    fn an_oidc_rule_must_bind_the_audience_and_a_claim() {
        let text = r#"
            [[auth.oidc]]
            name = "github"
            issuer = "https://token.actions.githubusercontent.com"
            jwks_url = "http://example.invalid/jwks"
            [[auth.oidc.rules]]
            audience = ""
            claims = {}
            apps = ["shop"]
            scopes = ["deploy"]
        "#;
        let problems = Config::from_toml(text).unwrap_err().0;
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "auth.oidc[0].jwks_url",
                "auth.oidc[0].rules[0]",
                "auth.oidc[0].rules[0].claims"
            ],
            "{problems:?}"
        );
    }

    /// A rule that binds only claims every project of the issuer shares.
    fn rule(claims: &str) -> String {
        format!(
            r#"
            [[auth.oidc]]
            name = "github"
            issuer = "https://token.actions.githubusercontent.com"
            jwks_url = "https://token.actions.githubusercontent.com/.well-known/jwks"
            [[auth.oidc.rules]]
            audience = "deployd"
            claims = {claims}
            apps = ["shop"]
            scopes = ["deploy"]
            "#
        )
    }

    #[test]
    fn an_oidc_rule_must_bind_the_project_exactly() {
        for claims in [
            r#"{ environment = "production" }"#,
            r#"{ environment = "production", ref = "refs/heads/main" }"#,
            r#"{ repository = "acme/*" }"#,
            r#"{ repository = "acme/sho?" }"#,
            r#"{ project_path = "" }"#,
            r#"{ repository_owner = "acme" }"#,
        ] {
            let problems = Config::from_toml(&rule(claims)).unwrap_err().0;
            assert_eq!(problems.len(), 1, "{claims}: {problems:?}");
            assert_eq!(problems[0].path, "auth.oidc[0].rules[0].claims");
            assert!(problems[0].reason.contains("repository_id"), "{problems:?}");
        }
        for claims in [
            r#"{ repository = "acme/shop" }"#,
            r#"{ repository_id = "123456", environment = "prod*" }"#,
            r#"{ project_path = "acme/shop" }"#,
            r#"{ project_id = "42" }"#,
        ] {
            let config = Config::from_toml(&rule(claims)).unwrap();
            assert!(config.warnings().is_empty(), "{claims}");
        }
        // Allowed, but said: a ref prefix matches branches anyone may push.
        let config = Config::from_toml(&rule(
            r#"{ repository = "acme/shop", ref = "refs/heads/*" }"#,
        ))
        .unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].path, "auth.oidc[0].rules[0].claims.ref");
    }

    #[test]
    fn every_problem_is_reported_with_its_key_path() {
        let text = r#"
            [apps.Shop]
            image = "shop:latest"
            [[apps.Shop.release]]
            name = "migrate"
            command = []
            [apps.Shop.services.web]
            replicas = 2
            [apps.Shop.services.beat]
            replicas = 2
            [apps.Shop.services.mailer]
            command = ["python", "mailer.py"]
        "#;
        let err = Config::from_toml(text).unwrap_err();
        let paths: Vec<&str> = err.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "apps.Shop",
                "apps.Shop.image",
                "apps.Shop.image",
                "apps.Shop.release[0].command",
                "apps.Shop.services.beat.replicas",
                "apps.Shop.services.mailer.role",
                "apps.Shop.services.web.port",
                "apps.Shop.services.web.health",
            ],
            "{err}"
        );
    }

    #[test]
    fn roll_order_must_name_each_service_once() {
        let text = r#"
            [apps.shop]
            image = "r.example/shop"
            order = ["worker", "worker", "cron"]
            [apps.shop.services.worker]
            [apps.shop.services.beat]
        "#;
        let err = Config::from_toml(text).unwrap_err();
        let problems: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            problems,
            [
                "apps.shop.order[1]: names a service twice",
                "apps.shop.order[2]: names no configured service",
                "apps.shop.order: must list every service; beat is missing",
            ]
        );
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_refused() {
        let err =
            Config::from_toml("[apps.shop]\nimage = \"r.example/shop\"\nimgae = 1\n").unwrap_err();
        assert!(err.to_string().contains("imgae"), "{err}");
        let text = "[apps.shop]\nimage = \"r.example/shop\"\nverify = \"ten seconds\"\n[apps.shop.services.worker]\n";
        let err = Config::from_toml(text).unwrap_err();
        assert!(err.to_string().contains("verify"), "{err}");
    }
}
