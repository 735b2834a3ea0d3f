//! deployd, the deployment agent that runs on every Docker host.
//!
//! The binary (`main.rs`) only parses arguments and calls into this library,
//! so integration tests drive exactly the code that production runs.

#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod api;
pub mod audit;
pub mod auth;
pub mod config;
pub mod docker;
pub mod engine;
pub mod env_file;
pub mod init;
pub mod limit;
pub mod metrics;
pub mod notify;
pub mod store;
pub mod switch;
mod sync;
pub mod systemd;

use std::time::Duration;

use anyhow::Context;

/// Makes ring the process's TLS provider (the API server, the HTTP
/// clients). Harmless when one is installed already.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An HTTPS client for deployd's own calls out (OIDC keys, the audit sink):
/// 10 s per request, no proxy, HTTPS only, trusting the system roots and
/// the PEM bundle `ca` if given. Errors name the file, never its content.
pub(crate) fn https_client(ca: Option<&std::path::Path>) -> Result<reqwest::Client, String> {
    install_crypto_provider();
    let mut http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .https_only(true)
        .no_proxy();
    if let Some(path) = ca {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{} is not a PEM CA bundle: {e}", path.display()))?
        {
            http = http.add_root_certificate(cert);
        }
    }
    http.build().map_err(|e| e.to_string())
}

/// How often readiness is checked for the `deployd_ready` metric.
const READINESS_INTERVAL: Duration = Duration::from_secs(15);

/// How often summaries of refused unauthenticated requests are written.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// How long requests in flight may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The configuration read again on SIGHUP, or why it could not be.
pub type Reloaded = Result<config::Config, config::ConfigError>;

/// Runs the agent until `shutdown` resolves: reconciles what a crash
/// interrupted, then serves the API. `reload` brings the configuration
/// read again on SIGHUP: `apply_reload` says what takes effect at once.
pub async fn run(
    config: config::Config,
    mut reload: tokio::sync::mpsc::Receiver<Reloaded>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let api_config = config
        .api
        .clone()
        .context("the configuration has no [api] section: deployd run serves the HTTPS API")?;
    for warning in config.warnings() {
        tracing::warn!("configuration: {warning}");
    }
    limit::raise_open_files();
    let auth = auth::Authenticator::new(&config.auth)?.for_host(&api_config.tls_cert)?;
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "cannot create state directory {}",
            config.state_dir.display()
        )
    })?;
    let store = store::Store::open(&config.state_dir)?;
    // Before anything writes a record: new heads are anchored from here on.
    let stopping = tokio_util::sync::CancellationToken::new();
    let audit_tasks = audit::start(&config, &store, &stopping)?;
    // Public listeners first: from here on no connection is refused, and
    // requests wait until the engine knows where to send them.
    let routes = switch::Routes::for_config(&config);
    let public = switch::Switch::bind(&config, &routes)?.serve()?;
    let docker = docker::Docker::connect().await?;
    let engine = engine::EngineHandle::start_routed(&config, docker, store, routes).await?;
    let state = api::ApiState::new(engine, auth, config.auth.max_failures_per_minute);
    let server = api::Server::start(state.clone(), &api_config).await?;
    let scrape = match &config.metrics {
        Some(m) => Some(metrics_listener(m.listen, state.engine.clone()).await?),
        None => None,
    };
    tracing::info!(apps = config.apps.len(), addr = %server.addr(), "deployd ready");
    systemd::ready("serving");
    let watchdog = systemd::watchdog();
    let readiness = tokio::spawn({
        let engine = state.engine.clone();
        async move {
            let mut tick = tokio::time::interval(READINESS_INTERVAL);
            loop {
                tick.tick().await;
                engine.readiness().await;
            }
        }
    });
    // Each minute of refused unauthenticated requests ends in one summary.
    let summaries = tokio::spawn({
        let state = state.clone();
        async move {
            let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
            loop {
                tick.tick().await;
                state.write_refusal_summaries(false);
            }
        }
    });
    let mut running = config;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(reloaded) = reload.recv() => {
                systemd::reloading();
                apply_reload(&mut running, reloaded, &server, &state);
                systemd::ready("serving");
            }
        }
    }
    systemd::stopping();
    tracing::info!("shutting down: no new requests, finishing those in flight");
    state.engine.stop();
    tokio::join!(server.shutdown(SHUTDOWN_GRACE), public.shutdown());
    if let Some(scrape) = scrape {
        scrape.abort();
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    readiness.abort();
    summaries.abort();
    state.write_refusal_summaries(true);
    stopping.cancel();
    for task in audit_tasks {
        let _ = task.await;
    }
    Ok(())
}

/// `[metrics] listen`: `/metrics` in plain HTTP, without a token.
async fn metrics_listener(
    addr: std::net::SocketAddr,
    engine: engine::EngineHandle,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics.listen"))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics listening (plain HTTP)");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let engine = engine.clone();
            async move { api::metrics::exposition(engine.metrics()) }
        }),
    );
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics listener failed");
        }
    }))
}

/// SIGHUP: the TLS certificate, key and client CA, and the `[auth]`
/// section (keys, OIDC issuers and rules), take effect at once, for new connections and
/// requests. Other changes are named and wait for a restart. A
/// configuration that does not load, or whose new TLS material or keys do
/// not, changes nothing.
fn apply_reload(
    running: &mut config::Config,
    reloaded: Reloaded,
    server: &api::Server,
    state: &api::ApiState,
) {
    let new = match reloaded {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("configuration not reloaded, nothing changed: {e}");
            return;
        }
    };
    let Some(api) = new.api.clone() else {
        tracing::error!("configuration not reloaded, nothing changed: it has no [api] section");
        return;
    };
    let auth = match auth::Authenticator::new(&new.auth).and_then(|a| a.for_host(&api.tls_cert)) {
        Ok(auth) => auth,
        Err(e) => {
            tracing::error!(error = %e, "configuration not reloaded, nothing changed: [auth]");
            return;
        }
    };
    if let Err(e) = server.reload_tls(&api) {
        tracing::error!(error = %e, "configuration not reloaded, nothing changed: TLS");
        return;
    }
    tracing::info!("TLS certificate and key reloaded");
    // Always: a key file may have changed under an unchanged path.
    state.replace_authenticator(auth);
    tracing::info!("[auth] reloaded: token keys, OIDC issuers and rules");
    // The TLS settings (certificate, key, client CA) took effect; the rest
    // of [api] did not.
    let mut at_restart = Vec::new();
    let mut api_rest = api.clone();
    if let Some(old) = &running.api {
        api_rest.tls_cert.clone_from(&old.tls_cert);
        api_rest.tls_key.clone_from(&old.tls_key);
        api_rest.client_ca.clone_from(&old.client_ca);
    }
    for (changed, key) in [
        (Some(&api_rest) != running.api.as_ref(), "api"),
        (
            new.auth.max_failures_per_minute != running.auth.max_failures_per_minute,
            "auth.max_failures_per_minute",
        ),
        (new.apps != running.apps, "apps"),
        (new.state_dir != running.state_dir, "state_dir"),
        (
            new.switch_threads != running.switch_threads,
            "switch_threads",
        ),
        (new.metrics != running.metrics, "metrics"),
        (new.store != running.store, "store"),
        (new.audit != running.audit, "audit"),
    ] {
        if changed {
            at_restart.push(key);
        }
    }
    if !at_restart.is_empty() {
        tracing::warn!(
            keys = %at_restart.join(", "),
            "changed, taking effect at the next restart"
        );
    }
    // What is in force now: the next reload compares with it.
    if let Some(old) = running.api.as_mut() {
        old.tls_cert = api.tls_cert;
        old.tls_key = api.tls_key;
        old.client_ca = api.client_ca;
    }
    let max_failures = running.auth.max_failures_per_minute;
    running.auth = new.auth;
    running.auth.max_failures_per_minute = max_failures;
}
