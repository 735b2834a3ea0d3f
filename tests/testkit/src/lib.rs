//! deployd's test kit: what the agent's and deployctl's integration tests
//! (and the benchmarks among the agent's examples) share to work against
//! the real test bed (`scripts/testbed.sh up`): scopes with their own
//! registry repository and network, the sample app's configuration, agents
//! in-process behind real TLS, a local OIDC issuer, and waiting on events.
//! A dev-dependency only; it turns on deployd's `testkit` feature.
//!
//! Every Docker object a test creates carries the label `deployd.test=<scope
//! id>` and is removed when the test ends, failed or not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod agent;
pub mod engine;
pub mod oidc;
pub mod pki;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deployd::docker::{ContainerSpec, ContainerState, Docker, ImageRef, RegistryAuth};
use deployd::engine::DeployRequest;
use deployd::env_file;
use deployd_proto::{CommitSha, SchemaRollback};

/// Every release the test bed pushes.
pub const VARIANTS: [&str; 16] = [
    "release-1",
    "release-2",
    "migrate-fails",
    "healthz-500",
    "web-crash",
    "worker-crash",
    "slow-boot",
    "unhealthy-after-5-checks",
    "needs-feature-key",
    "drop-column",
    "stop-reading",
    "not-null-no-default",
    "expand",
    "irreversible-data",
    "errors-10pct",
    "slow-3x",
];

/// The sample app's commands, as the example configuration runs them.
pub const MIGRATE: &[&str] = &["python", "manage.py", "migrate", "--noinput"];
pub const COLLECTSTATIC: &[&str] = &["python", "manage.py", "collectstatic", "--noinput"];
pub const WORKER: &[&str] = &[
    "celery",
    "-A",
    "config",
    "worker",
    "-l",
    "info",
    "-Q",
    "default,etl",
];
pub const BEAT: &[&str] = &["celery", "-A", "config", "beat", "-l", "info"];

/// How a test or benchmark tunes the sample app's config section.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// The verify window, as TOML duration text.
    pub verify: &'static str,
    pub web_replicas: u32,
    /// Whether `manage.py check --deploy` runs as the first release task.
    pub check: bool,
    /// `[migrations] unsafe`, when deployments make a migration plan.
    pub migrations: Option<&'static str>,
    /// `backend = "swarm"`: services on the engine's Swarm.
    pub swarm: bool,
}

impl Tuning {
    /// Engine tests: every release task, two web replicas, a short verify.
    pub const TEST: Tuning = Tuning {
        verify: "8s",
        web_replicas: 2,
        check: true,
        migrations: None,
        swarm: false,
    };

    /// Like [`Tuning::TEST`], with a migration plan that refuses unsafe
    /// migrations, as the example config has it.
    pub const PLANNED: Tuning = Tuning {
        migrations: Some("refuse"),
        ..Self::TEST
    };
}

/// A plain deployment of `sha` to `app`, as an API request makes one: no
/// pin, no fleet, no plan, nothing skipped or allowed.
pub fn deploy_request(app: &str, sha: CommitSha, requested_by: &str) -> DeployRequest {
    DeployRequest {
        app: app.to_owned(),
        sha,
        force: false,
        reason: None,
        requested_by: requested_by.to_owned(),
        digest: None,
        skip_tasks: false,
        fleet: None,
        plan: None,
        allow_unsafe_migrations: false,
        schema: SchemaRollback::Check,
        canary: None,
    }
}

/// The example config's app section for the sample app, pointed at this
/// scope's network and the test bed's secrets, with waits short enough for
/// tests and long enough for every variant.
pub fn app_config(scope: &Scope, app: &str, repository: &str, tuning: Tuning) -> String {
    let bed = &scope.bed;
    let check = if tuning.check {
        format!(
            r#"
        [[apps.{app}.release]]
        name = "check"
        command = ["python", "manage.py", "check", "--deploy", "--fail-level", "WARNING"]
        on = ["deploy"]"#
        )
    } else {
        String::new()
    };
    let backend = match tuning.swarm {
        true => "\n        backend = \"swarm\"",
        false => "",
    };
    let migrations = match tuning.migrations {
        Some(unsafe_migrations) => format!(
            r#"
        [apps.{app}.migrations]
        unsafe = "{unsafe_migrations}""#
        ),
        None => String::new(),
    };
    format!(
        r#"
        [apps.{app}]{backend}
        image = "{repository}"
        registry_auth_file = "{auth}"
        env_file = "{env}"
        network = "{network}"
        volumes = ["{volume}:/app/static"]
        verify = "{verify}"{migrations}{check}
        [[apps.{app}.release]]
        name = "migrate"
        command = ["python", "manage.py", "migrate", "--noinput"]
        once = true
        [[apps.{app}.release]]
        name = "collectstatic"
        command = ["python", "manage.py", "collectstatic", "--noinput"]
        every_node = true
        [apps.{app}.services.web]
        command = ["gunicorn", "config.wsgi:application", "--bind", "0.0.0.0:8000"]
        port = 8000
        replicas = {replicas}
        health = {{ path = "/healthz/", host = "{host}", headers = {{ "X-Forwarded-Proto" = "https" }}, timeout = "45s" }}
        stop_timeout = "10s"
        [apps.{app}.services.worker]
        command = ["celery", "-A", "config", "worker", "-l", "info", "-Q", "default,etl"]
        stop_timeout = "30s"
        min_healthy = "3s"
        env = {{ SHOP_SERVICE_ENV = "worker only" }}
        [apps.{app}.services.beat]
        command = ["celery", "-A", "config", "beat", "-l", "info"]
        singleton = true
        min_healthy = "3s"
        stop_timeout = "10s"
        "#,
        auth = bed.var("REGISTRY_AUTH"),
        env = bed.var("APP_ENV"),
        network = scope.network,
        volume = scope.static_volume(),
        host = bed.app_host(),
        verify = tuning.verify,
        replicas = tuning.web_replicas,
    )
}

/// The label every test object carries; `scripts/testbed.sh down` sweeps it.
pub const TEST_LABEL: &str = "deployd.test";

/// What `scripts/testbed.sh up` wrote to `testbed.env`.
#[derive(Debug, Clone)]
pub struct Testbed {
    vars: HashMap<String, String>,
}

impl Testbed {
    pub fn load() -> Self {
        let path = std::env::var_os("DEPLOYD_TESTBED_ENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| state_dir().join("testbed.env"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read {} ({e}): bring the test bed up first with `scripts/testbed.sh up`",
                path.display()
            )
        });
        let vars = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Self { vars }
    }

    pub fn var(&self, key: &str) -> &str {
        self.vars
            .get(&format!("DEPLOYD_TESTBED_{key}"))
            .unwrap_or_else(|| panic!("testbed.env has no DEPLOYD_TESTBED_{key}"))
    }

    /// The fake commit sha a release variant is tagged with, e.g. `release-1`.
    pub fn sha(&self, variant: &str) -> CommitSha {
        let key = format!("SHA_{}", variant.to_uppercase().replace('-', "_"));
        self.var(&key).parse().unwrap()
    }

    pub fn image(&self, variant: &str) -> ImageRef {
        ImageRef::new(self.var("REPOSITORY"), self.sha(variant))
    }

    pub fn registry_auth(&self) -> RegistryAuth {
        RegistryAuth::from_file(self.var("REGISTRY_AUTH").as_ref()).unwrap()
    }

    pub fn app_env(&self) -> Vec<(String, String)> {
        env_file::read(self.var("APP_ENV").as_ref()).unwrap()
    }

    pub fn app_host(&self) -> &str {
        self.var("APP_HOST")
    }
}

fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DEPLOYD_TESTBED_DIR") {
        return dir.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache")
        });
    cache.join("deployd-testbed")
}

/// One test's private corner of the engine: a network and labelled objects.
#[derive(Debug)]
pub struct Scope {
    pub docker: Docker,
    pub bed: Testbed,
    pub id: String,
    pub network: String,
}

impl Scope {
    /// A scope whose network is an attachable overlay network of the
    /// engine's Swarm (`scripts/testbed.sh swarm up`), or a bridge.
    async fn on(overlay: bool) -> Self {
        // Unique across processes and machines sharing an engine: the
        // random tail of a UUID v7.
        let id = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
        let docker = Docker::connect().await.expect("the Docker engine answers");
        let network = format!("deployd-test-{id}");
        let scope = Self {
            docker,
            bed: Testbed::load(),
            id,
            network,
        };
        let labels = scope.labels();
        let docker = &scope.docker;
        if overlay {
            docker
                .swarm_manager()
                .await
                .expect("the engine is a Swarm manager: run `scripts/testbed.sh swarm up` first");
            docker
                .create_overlay_network(&scope.network, labels)
                .await
                .unwrap();
        } else {
            docker.create_network(&scope.network, labels).await.unwrap();
        }
        scope
    }

    /// The app name engine tests deploy under: unique per scope.
    pub fn app(&self) -> String {
        format!("t{}", self.id)
    }

    /// A second app, for tests of several apps on one host.
    pub fn second_app(&self) -> String {
        format!("{}b", self.app())
    }

    fn apps(&self) -> [String; 2] {
        [self.app(), self.second_app()]
    }

    /// The app's static files volume.
    pub fn static_volume(&self) -> String {
        format!("{}-static", self.network)
    }

    pub fn labels(&self) -> HashMap<String, String> {
        HashMap::from([(TEST_LABEL.to_owned(), self.id.clone())])
    }

    /// Pulls a test bed release with the registry credentials.
    pub async fn pull(&self, variant: &str) -> deployd::docker::PulledImage {
        let auth = self.bed.registry_auth();
        self.docker
            .pull(&self.bed.image(variant), Some(&auth))
            .await
            .unwrap()
    }

    /// The registry repository this scope's app deploys from, as a CI
    /// pipeline would fill it: every test bed release is pushed to it, so
    /// that pruning by the engine never touches the test bed's own images.
    pub async fn publish_releases(&self) -> String {
        self.publish_releases_of(&self.app()).await
    }

    /// Like [`Scope::publish_releases`], for `app` (one of the scope's).
    pub async fn publish_releases_of(&self, app: &str) -> String {
        let repository = format!("{}/{app}", self.bed.var("REGISTRY"));
        let auth = self.bed.registry_auth();
        for variant in VARIANTS {
            let source = self.bed.image(variant).to_string();
            let target = ImageRef::new(repository.clone(), self.bed.sha(variant));
            self.docker
                .tag_and_push(&source, &target, &auth)
                .await
                .unwrap();
        }
        repository
    }

    /// A container on this scope's network with the app's env file.
    pub fn app_container(&self, image: &str, cmd: &[&str]) -> ContainerSpec {
        ContainerSpec {
            image: image.to_owned(),
            cmd: (!cmd.is_empty()).then(|| cmd.iter().map(|s| s.to_string()).collect()),
            env: self.bed.app_env(),
            network: Some(self.network.clone()),
            labels: self.labels(),
            ..Default::default()
        }
    }

    /// Starts PostgreSQL as `db` on this scope's network; returns once healthy.
    pub async fn start_db(&self) {
        self.start_db_as("db").await;
    }

    /// Starts PostgreSQL reachable as `alias`; returns once healthy.
    pub async fn start_db_as(&self, alias: &str) {
        let env = env_file::read(self.bed.var("DB_ENV").as_ref()).unwrap();
        let id = self
            .docker
            .start(ContainerSpec {
                image: self.bed.var("POSTGRES_IMAGE").to_owned(),
                env,
                network: Some(self.network.clone()),
                network_aliases: vec![alias.to_owned()],
                labels: self.labels(),
                ..Default::default()
            })
            .await
            .unwrap();
        poll(
            "PostgreSQL to be healthy",
            Duration::from_secs(60),
            || async {
                match self.docker.state(&id).await.unwrap() {
                    ContainerState::Running { health, .. } => {
                        (health.as_deref() == Some("healthy")).then_some(())
                    }
                    exited => panic!("PostgreSQL exited: {exited:?}"),
                }
            },
        )
        .await;
    }

    /// Starts Redis as `redis` on this scope's network.
    pub async fn start_redis(&self) {
        self.docker
            .start(ContainerSpec {
                image: self.bed.var("REDIS_IMAGE").to_owned(),
                network: Some(self.network.clone()),
                network_aliases: vec!["redis".into()],
                labels: self.labels(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Removes everything the scope made. Containers still stopping in the
    /// background (draining workers) may hold the network a little longer.
    async fn cleanup(&self) {
        // Swarm services first: their tasks hold the network.
        if self.docker.swarm_manager().await.is_ok() {
            for app in self.apps() {
                for service in self
                    .docker
                    .services(&[("deployd.app", &app)])
                    .await
                    .unwrap()
                {
                    self.docker.remove_service(&service.name).await.unwrap();
                }
            }
        }
        for attempt in 0.. {
            let mut ids = self
                .docker
                .containers_labelled(TEST_LABEL, &self.id)
                .await
                .unwrap();
            for app in self.apps() {
                ids.extend(
                    self.docker
                        .containers_labelled("deployd.app", &app)
                        .await
                        .unwrap(),
                );
            }
            // Swarm removes a removed service's task containers itself, and
            // refuses a second removal meanwhile ("already in progress"):
            // what is left is listed again in the next round.
            let mut refused = None;
            for id in ids {
                if let Err(e) = self.docker.remove(&id).await {
                    refused = Some(e);
                }
            }
            match self.docker.remove_network(&self.network).await {
                Ok(()) => break,
                Err(e) if attempt == 120 => {
                    panic!("cleanup: {e}; a container's removal last said: {refused:?}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
        self.docker
            .remove_volume(&self.static_volume())
            .await
            .unwrap();
        for app in self.apps() {
            let repository = format!("{}/{app}", self.bed.var("REGISTRY"));
            for reference in self.docker.image_refs(&repository).await.unwrap() {
                self.docker.remove_image_ref(&reference).await.unwrap();
            }
        }
    }
}

/// Runs a test body in its own scope and cleans the scope up afterwards,
/// also when the body panics (the panic is then re-raised).
pub async fn scoped<F, Fut>(body: F)
where
    F: FnOnce(Arc<Scope>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    scoped_on(false, body).await;
}

/// Like [`scoped`], on an overlay network of the engine's Swarm.
pub async fn swarm_scoped<F, Fut>(body: F)
where
    F: FnOnce(Arc<Scope>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    scoped_on(true, body).await;
}

async fn scoped_on<F, Fut>(overlay: bool, body: F)
where
    F: FnOnce(Arc<Scope>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    // HTTP clients of tests need the TLS provider the agent uses.
    deployd::install_crypto_provider();
    let scope = Arc::new(Scope::on(overlay).await);
    let result = tokio::spawn(body(scope.clone())).await;
    scope.cleanup().await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Polls `check` until it returns `Some`, starting fast and backing off;
/// panics with `what` once `timeout` has passed.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    settle(what, timeout, || {
        let checked = check();
        async move { checked.await.ok_or("nothing yet") }
    })
    .await
}

/// Polls `check` until it returns `Ok`, as `poll` does; once `timeout` has
/// passed, panics with `what` and the last `Err`: what was seen instead.
pub async fn settle<T, D, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    D: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, D>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    loop {
        let seen = match check().await {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last seen: {seen:#?}"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// Starts an agent of its own on `state_dir`, deploys `request` with it,
/// and kills it once the deployment reaches `boundary` (see
/// `EngineHandle::start_frozen_before`): the agent lives in a runtime of its
/// own, and dropping that runtime stops every task of it where it stands,
/// as a kill would.
pub fn crash_at(
    config: &deployd::config::Config,
    state_dir: &std::path::Path,
    request: DeployRequest,
    boundary: &str,
) {
    let (config, dir, boundary) = (config.clone(), state_dir.to_owned(), boundary.to_owned());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let docker = Docker::connect().await.unwrap();
            let store = deployd::store::Store::open(&dir).unwrap();
            let (engine, reached) = deployd::engine::EngineHandle::start_frozen_before(
                &config, docker, store, &boundary,
            )
            .await
            .unwrap();
            engine.deploy(request).await.unwrap();
            reached.await.unwrap();
        });
        runtime.shutdown_background();
    })
    .join()
    .unwrap();
}
