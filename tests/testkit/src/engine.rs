//! An engine in-process, without the API: the engine and swarm tests'
//! agent, on a state directory of its own and the scope's releases.

use deployd::config::Config;
use deployd::engine::{DeployRequest, EngineHandle};
use deployd::store::Store;
use deployd_proto::{Deployment, DeploymentState, RollbackRequest};

use super::{Scope, Tuning, app_config, deploy_request};

#[derive(Debug)]
pub struct Agent {
    pub engine: EngineHandle,
    pub app: String,
    pub config: Config,
    pub state: tempfile::TempDir,
}

/// The sample app's config section, tuned, for a state directory.
fn config_tuned(
    scope: &Scope,
    state_dir: &std::path::Path,
    repository: &str,
    tuning: Tuning,
) -> Config {
    let text = format!(
        "state_dir = \"{}\"\n{}",
        state_dir.display(),
        app_config(scope, &scope.app(), repository, tuning)
    );
    Config::from_toml(&text).unwrap()
}

/// An engine deploying the scope's app (releases published to a registry
/// repository of its own), with PostgreSQL and Redis up.
pub async fn agent_tuned(scope: &Scope, tuning: Tuning) -> Agent {
    let state = tempfile::tempdir().unwrap();
    let repository = scope.publish_releases().await;
    let config = config_tuned(scope, state.path(), &repository, tuning);
    let store = Store::open(state.path()).unwrap();
    let engine = EngineHandle::start(&config, scope.docker.clone(), store)
        .await
        .unwrap();
    scope.start_db().await;
    scope.start_redis().await;
    Agent {
        engine,
        app: scope.app(),
        config,
        state,
    }
}

impl Agent {
    pub fn request(&self, scope: &Scope, variant: &str) -> DeployRequest {
        DeployRequest {
            reason: Some(format!("test {variant}")),
            ..deploy_request(&self.app, scope.bed.sha(variant), "engine-test")
        }
    }

    /// Deploys `variant` and waits for the end.
    pub async fn deploy(&self, scope: &Scope, variant: &str) -> Deployment {
        let started = self
            .engine
            .deploy(self.request(scope, variant))
            .await
            .unwrap();
        self.engine.wait(&started.id).await.unwrap()
    }

    /// Rolls back as `ops` and waits for the end.
    pub async fn rollback(&self, request: RollbackRequest) -> Deployment {
        let started = self
            .engine
            .rollback(&self.app, "ops", request)
            .await
            .unwrap();
        self.engine.wait(&started.id).await.unwrap()
    }

    /// Deploys `variant` with an agent of its own on this state directory,
    /// kills that agent at `boundary` (see `crash_at`), and starts the
    /// engine again on what it left. Returns the restarted engine and the
    /// crashed deployment's record, after checking that the record is kept
    /// (the newest of `earlier` + 1) and ended `interrupted`.
    pub async fn crash_and_restart(
        &self,
        scope: &Scope,
        variant: &str,
        boundary: &str,
        earlier: usize,
    ) -> (EngineHandle, Deployment) {
        let request = self.request(scope, variant);
        super::crash_at(&self.config, self.state.path(), request, boundary);
        let store = Store::open(self.state.path()).unwrap();
        let restarted = EngineHandle::start(&self.config, scope.docker.clone(), store)
            .await
            .unwrap();
        let mut history = restarted.store().history(&self.app, 100, None).unwrap();
        assert_eq!(
            history.len(),
            earlier + 1,
            "{boundary}: no deployment is lost"
        );
        let crashed = history.swap_remove(0);
        assert_eq!(
            crashed.state,
            DeploymentState::Interrupted,
            "{boundary}: {crashed:#?}"
        );
        (restarted, crashed)
    }
}
