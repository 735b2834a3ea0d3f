//! A real agent in-process: the engine behind the HTTPS API on a free
//! port, with a test CA, a signing key and a client that trusts the CA.

use std::time::Duration;

use deployd::api::{ApiState, Server};
use deployd::auth::{Authenticator, TokenRequest};
use deployd::config::Config;
use deployd::engine::EngineHandle;
use deployd::store::Store;
use deployd_proto::Scope as TokenScope;

use super::pki::{Issued, Pki};
use super::{Scope, Tuning, app_config};

/// A running agent and what it takes to talk to it.
#[derive(Debug)]
pub struct TestAgent {
    pub url: String,
    pub server: Server,
    pub engine: EngineHandle,
    /// What the API's handlers share (the refusal summaries, say).
    pub api: ApiState,
    pub config: Config,
    pub pki: Pki,
    pub tls: Issued,
    pub state: tempfile::TempDir,
}

impl TestAgent {
    /// An agent ready to deploy the scope's app: its releases pushed to a
    /// repository of its own, its database and broker running.
    pub async fn deploying(scope: &Scope) -> Self {
        let repository = scope.publish_releases().await;
        let agent = Self::start(scope, &repository, "").await;
        scope.start_db().await;
        scope.start_redis().await;
        agent
    }

    /// Like [`TestAgent::deploying`], with deployments that make a
    /// migration plan and refuse unsafe migrations.
    pub async fn planning(scope: &Scope) -> Self {
        let repository = scope.publish_releases().await;
        let agent = Self::start_tuned(scope, &repository, "", "", Tuning::PLANNED).await;
        scope.start_db().await;
        scope.start_redis().await;
        agent
    }

    /// Like [`TestAgent::deploying`], on the swarm backend: the scope must
    /// be a [`super::swarm_scoped`] one.
    pub async fn on_swarm(scope: &Scope) -> Self {
        let repository = scope.publish_releases().await;
        let tuning = Tuning {
            swarm: true,
            ..Tuning::TEST
        };
        let agent = Self::start_tuned(scope, &repository, "", "", tuning).await;
        scope.start_db().await;
        scope.start_redis().await;
        agent
    }

    /// Starts an agent for the scope's app, deploying from `repository`.
    /// `extra_api` is appended to the `[api]` section (`client_ca = ...`).
    pub async fn start(scope: &Scope, repository: &str, extra_api: &str) -> Self {
        Self::start_with(scope, repository, extra_api, "").await
    }

    /// Like [`TestAgent::start`]; `extra_auth` follows the `[auth]` section
    /// and its `ops` key (more `[[auth.keys]]`, `[[auth.oidc]]`).
    pub async fn start_with(
        scope: &Scope,
        repository: &str,
        extra_api: &str,
        extra_auth: &str,
    ) -> Self {
        Self::start_tuned(scope, repository, extra_api, extra_auth, Tuning::TEST).await
    }

    async fn start_tuned(
        scope: &Scope,
        repository: &str,
        extra_api: &str,
        extra_auth: &str,
        tuning: Tuning,
    ) -> Self {
        deployd::install_crypto_provider();
        let pki = Pki::new();
        let tls = pki.server("agent");
        let (private, public) = pki.signing_key("ops");
        let state = tempfile::tempdir().unwrap();
        let text = format!(
            r#"
            state_dir = "{state}"
            [api]
            listen = "127.0.0.1:0"
            tls_cert = "{cert}"
            tls_key = "{key}"
            {extra_api}
            [auth]
            max_token_age = "2h"
            [[auth.keys]]
            id = "ops"
            algorithm = "EdDSA"
            public_key = "{public}"
            private_key = "{private}"
            {extra_auth}
            {app}
            "#,
            state = state.path().display(),
            cert = tls.cert.display(),
            key = tls.key.display(),
            public = public.display(),
            private = private.display(),
            app = app_config(scope, &scope.app(), repository, tuning),
        );
        let config = Config::from_toml(&text).unwrap();
        let store = Store::open(state.path()).unwrap();
        let engine = EngineHandle::start(&config, scope.docker.clone(), store)
            .await
            .unwrap();
        let auth = Authenticator::new(&config.auth)
            .unwrap()
            .for_host(&tls.cert)
            .unwrap();
        let api_state = ApiState::new(engine.clone(), auth, config.auth.max_failures_per_minute);
        let server = Server::start(api_state.clone(), config.api.as_ref().unwrap())
            .await
            .unwrap();
        Self {
            url: format!("https://localhost:{}", server.addr().port()),
            server,
            engine,
            api: api_state,
            config,
            pki,
            tls,
            state,
        }
    }

    /// A client that trusts the test CA only. No deadline on a whole
    /// request: an event stream lasts as long as its deployment, longer on
    /// a slow machine; only a silence of two minutes fails it.
    pub fn client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.pki.ca_pem().as_bytes()).unwrap();
        reqwest::Client::builder()
            .tls_certs_only([ca])
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .build()
            .unwrap()
    }

    /// A token signed with the agent's key.
    pub fn token(&self, subject: &str, scopes: &[TokenScope], apps: &[&str]) -> String {
        self.token_for(TokenRequest {
            key: None,
            subject: subject.to_owned(),
            scopes: scopes.to_vec(),
            apps: apps.iter().map(|a| a.to_string()).collect(),
            sha: None,
            ttl: Duration::from_secs(600),
        })
    }

    pub fn token_for(&self, request: TokenRequest) -> String {
        deployd::auth::issue(&self.config.auth, &request).unwrap()
    }

    /// GETs `path` with `token`, expecting 200 and JSON.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str, token: &str) -> T {
        let response = self
            .client()
            .get(self.at(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK, "GET {path}");
        response.json().await.unwrap()
    }

    /// `url` + `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}
