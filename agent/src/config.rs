//! The agent's configuration: typed, defaulted, and validated as a whole.
//!
//! Layers, later wins: built-in defaults < the TOML file <
//! `DEPLOYD__SECTION__KEY` environment variables. Validation reports every
//! problem with its key path, so `deployd check-config` can list them all.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod api;
mod app;
mod canary;
mod health;
mod migrations;
mod notify;
mod swarm;
mod switch;

pub use api::{
    ApiConfig, AuthConfig, KeyAlgorithm, KeyConfig, OidcConfig, OperatorConfig, PROJECT_CLAIMS,
    RuleConfig,
};
pub use app::{AppConfig, EnvVars, Role, ServiceConfig, TaskConfig};
pub use canary::CanaryConfig;
pub use health::HealthConfig;
pub use migrations::{MigrationsConfig, UnsafeMigrations};
pub use notify::{NOTIFY_EVENTS, NotifyConfig, NotifyFormat};
pub use swarm::{Backend, SwarmConfig};
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
    /// Deployment events (logs), audit records and plans no deployment
    /// made older than this many
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

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/deployd")
}

/// Names end up in URLs, container names and labels: keep them plain.
pub(super) use deployd_proto::is_plain_name;

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
    fn a_canary_needs_the_switch_rising_steps_and_web_rolled_first() {
        let app = |keys: &str, tables: &str| {
            format!(
                r#"
                [apps.shop]
                image = "registry.example/shop"
                {keys}
                [apps.shop.services.web]
                port = 8000
                health = {{ path = "/healthz/", host = "shop.example" }}
                [apps.shop.services.worker]
                {tables}
                "#
            )
        };
        let switch = "[apps.shop.switch]\nlisten = \"127.0.0.1:8000\"\n";
        let good = app("", &format!("{switch}[apps.shop.canary]\nsteps = [1, 10]"));
        let canary = Config::from_toml(&good).unwrap().apps["shop"]
            .canary
            .clone();
        assert_eq!(canary.unwrap().steps, [1.0, 10.0]);
        let paths = |text: String| -> Vec<String> {
            let problems = Config::from_toml(&text).unwrap_err().0;
            problems.into_iter().map(|p| p.path).collect()
        };
        assert_eq!(paths(app("", "[apps.shop.canary]")), ["apps.shop.canary"]);
        let bad = format!(
            "{switch}[apps.shop.canary]\nsteps = [50, 25, 100]\nmin_requests = 0\n\
             max_error_rate = 2.0\nmax_latency_ratio = 0.5"
        );
        assert_eq!(
            paths(app("", &bad)),
            [
                "apps.shop.canary.steps[1]",
                "apps.shop.canary.steps[2]",
                "apps.shop.canary.min_requests",
                "apps.shop.canary.max_error_rate",
                "apps.shop.canary.max_latency_ratio",
            ]
        );
        let worker_first = app(
            r#"order = ["worker", "web"]"#,
            &format!("{switch}[apps.shop.canary]"),
        );
        assert_eq!(paths(worker_first), ["apps.shop.canary"]);
    }

    #[test]
    fn the_swarm_backend_needs_an_overlay_network_and_refuses_host_only_parts() {
        let app = |keys: &str, tables: &str| {
            format!(
                r#"
                [apps.shop]
                image = "registry.example/shop"
                {keys}
                [apps.shop.services.web]
                port = 8000
                health = {{ path = "/healthz/", host = "shop.example" }}
                {tables}
                "#
            )
        };
        let paths = |text: String| -> Vec<String> {
            let problems = Config::from_toml(&text).unwrap_err().0;
            problems.into_iter().map(|p| p.path).collect()
        };
        let good = app(
            "backend = \"swarm\"\nnetwork = \"shop\"\nvolumes = [\"shop-static:/app/static\"]",
            "[apps.shop.swarm]\npublish = 8000\nparallelism = 2",
        );
        let shop = &Config::from_toml(&good).unwrap().apps["shop"];
        assert_eq!(shop.backend, Backend::Swarm);
        assert_eq!(shop.swarm.as_ref().map(|s| s.parallelism), Some(2));
        // Unset, one web task at a time.
        let plain = app("backend = \"swarm\"\nnetwork = \"shop\"", "");
        let plain = &Config::from_toml(&plain).unwrap().apps["shop"];
        assert_eq!(plain.swarm.clone().unwrap_or_default().parallelism, 1);
        assert_eq!(paths(app("backend = \"swarm\"", "")), ["apps.shop.network"]);
        let host_only = app(
            "backend = \"swarm\"\nnetwork = \"shop\"\ncgroup_parent = \"shop.slice\"\n\
             volumes = [\"/srv/static:/app/static\"]",
            "[apps.shop.switch]\nlisten = \"127.0.0.1:8000\"\n\
             [apps.shop.swarm]\nparallelism = 0",
        );
        assert_eq!(
            paths(host_only),
            [
                "apps.shop.swarm.parallelism",
                "apps.shop.switch",
                "apps.shop.cgroup_parent",
                "apps.shop.volumes[0]",
            ]
        );
        assert_eq!(
            paths(app("", "[apps.shop.swarm]\npublish = 8000")),
            ["apps.shop.swarm"]
        );
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

    #[test]
    fn a_webhook_is_https_or_local_signed_when_json_and_names_known_events() {
        let app = |hooks: &str| {
            format!(
                r#"
                [apps.shop]
                image = "registry.example/shop"
                [apps.shop.services.web]
                port = 8000
                health = {{ path = "/healthz/", host = "shop.example" }}
                {hooks}
                "#
            )
        };
        let good = app(
            "[[apps.shop.notify]]\nurl = \"https://hooks.example/d\"\nsecret_file = \"/k\"\n\
             [[apps.shop.notify]]\nurl = \"http://127.0.0.1:9/d\"\nformat = \"slack\"\n",
        );
        let hooks = Config::from_toml(&good).unwrap().apps["shop"]
            .notify
            .clone();
        assert_eq!(hooks[0].events.len(), NOTIFY_EVENTS.len());
        let bad = app(
            "[[apps.shop.notify]]\nurl = \"http://hooks.example/d\"\nevents = [\"deployed\"]\n",
        );
        let problems = Config::from_toml(&bad).unwrap_err().0;
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "apps.shop.notify[0].url",
                "apps.shop.notify[0].events",
                "apps.shop.notify[0].secret_file"
            ],
            "{problems:?}"
        );
    }

    #[test]
    fn an_operator_is_a_plain_name_and_an_ed25519_key_listed_once() {
        let ed25519 =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEh56GcCkjflsDhk12bx11Tlghc3FxHx0TZqgGWZQDoe";
        let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC2/zgb4nFdfxfrUsMAxhATMgXvJNm+RTdeDmfoOpX3BQuRLiFQn3h9S7NZxd2wjiUpl+QDaYdevoWXB2ZT2bDaUWsMGJRZ4hidGm9C5ydJTOhMJp4r1vV1Mn5EfOANLUWjhm9c7Voo5uD315dJC922Abpl86KW6qIXQWnAatZmCQ==";
        let operator = |name: &str, key: &str| {
            format!("[[auth.operators]]\nname = \"{name}\"\nkey = \"{key}\"\nscopes = [\"read\"]\n")
        };
        let good =
            Config::from_toml(&operator("alice", &format!("{ed25519} alice@laptop"))).unwrap();
        assert_eq!(good.auth.operators[0].apps, ["*"]);
        let text = [
            operator("alice", ed25519),
            operator("bob", ed25519),
            operator("Carol!", rsa),
            operator("dave", "ssh-ed25519 AAAA"),
            "[auth]\nissuer = \"deployctl\"\n".to_owned(),
        ]
        .concat();
        let problems = Config::from_toml(&text).unwrap_err().0;
        let said: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.path, p.reason))
            .collect();
        assert_eq!(
            said,
            [
                "auth.operators[1].key: the same key is listed for another operator",
                "auth.operators[2].name: 1-32 of a-z, 0-9 and -, starting with a letter",
                "auth.operators[2].key: a ssh-rsa key: operators sign with Ed25519 keys (ssh-ed25519)",
                "auth.operators[3].key: not an OpenSSH public key (Base64 encoding error: invalid Base64 length)",
                "auth.issuer: deployctl is the issuer of operator tokens",
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

    #[test]
    fn env_names_and_health_headers_keep_their_case() {
        let text = r#"
            [apps.shop]
            image = "r.example/shop"
            env = { DJANGO_SETTINGS_MODULE = "config.settings.prod" }
            [[apps.shop.release]]
            name = "check"
            command = ["python", "manage.py", "check"]
            on = ["deploy"]
            env = { Mixed_Case = "1" }
            [apps.shop.services.web]
            port = 8000
            health = { path = "/healthz/", host = "shop.example", headers = { "X-Forwarded-Proto" = "https" }, expect = [200, 204] }
            env = { WEB_CONCURRENCY = "4" }
            [apps.shop.services.worker]
        "#;
        let config = Config::from_toml(text).unwrap();
        let shop = &config.apps["shop"];
        assert!(shop.env.0.contains_key("DJANGO_SETTINGS_MODULE"));
        assert!(shop.release[0].env.0.contains_key("Mixed_Case"));
        assert!(shop.release[0].runs_in(deployd_proto::DeploymentKind::Deploy));
        assert!(!shop.release[0].runs_in(deployd_proto::DeploymentKind::Rollback));
        let web = &shop.services["web"];
        assert!(web.env.0.contains_key("WEB_CONCURRENCY"));
        let health = web.health.as_ref().unwrap();
        assert_eq!(health.headers["X-Forwarded-Proto"], "https");
        assert!(health.accepts(204) && !health.accepts(301));
        // Values may be secrets: Debug names the variables only.
        assert_eq!(format!("{:?}", web.env), r#"{"WEB_CONCURRENCY"}"#);
    }

    #[test]
    fn bad_env_names_health_headers_and_statuses_are_refused() {
        let text = r#"
            [apps.shop]
            image = "r.example/shop"
            env = { "A=B" = "1" }
            [[apps.shop.release]]
            name = "check"
            command = ["python"]
            on = []
            [apps.shop.services.web]
            port = 8000
            health = { path = "/healthz/", host = "shop.example", headers = { "Bad Name" = "x", Host = "other", "X-Ok" = "a\u0001b", "Content-Length" = "0", "X-Forwarded-Proto" = "https", "x-forwarded-proto" = "https" }, expect = [] }
            [apps.shop.services.worker]
            health = { path = "/", host = "h", expect = [99] }
        "#;
        let err = Config::from_toml(text).unwrap_err();
        let problems: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            problems,
            [
                "apps.shop.release[0].on: name when the task runs: deploy, rollback or both",
                "apps.shop.env: \"A=B\" is not a variable name (A-Z, a-z, 0-9, _)",
                "apps.shop.services.web.health.headers.Bad Name: is not a header name",
                "apps.shop.services.web.health.headers.Content-Length: framing and connection headers are the client's own",
                "apps.shop.services.web.health.headers.Host: the Host header is set by health.host",
                "apps.shop.services.web.health.headers.X-Ok: is not a header value",
                "apps.shop.services.web.health.headers.x-forwarded-proto: names a header already given (names ignore case)",
                "apps.shop.services.web.health.expect: name at least one status",
                "apps.shop.services.worker: port and health are for web services only",
            ],
            "{err}"
        );
    }
}
