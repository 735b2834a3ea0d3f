//! deployd, the deployment agent that runs on every Docker host.
//!
//! The binary (`main.rs`) only parses arguments and calls into this library,
//! so integration tests drive exactly the code that production runs.

#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod api;
pub mod auth;
pub mod config;
pub mod docker;
pub mod engine;
pub mod env_file;
pub mod init;
pub mod metrics;
pub mod store;
pub mod switch;
pub mod systemd;

use std::time::Duration;

use anyhow::Context;

/// Makes ring the process's TLS provider (the API server, the HTTP
/// clients). Harmless when one is installed already.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How long requests in flight may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the agent until `shutdown` resolves: reconciles what a crash
/// interrupted, then serves the API. `reload` fires on SIGHUP: TLS material
/// is read again.
pub async fn run(
    config: config::Config,
    mut reload: tokio::sync::mpsc::Receiver<()>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let api_config = config
        .api
        .clone()
        .context("the configuration has no [api] section: deployd run serves the HTTPS API")?;
    let auth = auth::Authenticator::new(&config.auth)?;
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "cannot create state directory {}",
            config.state_dir.display()
        )
    })?;
    let store = store::Store::open(&config.state_dir)?;
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
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = reload.recv() => {
                systemd::reloading();
                match server.reload_tls(&api_config) {
                    Ok(()) => tracing::info!("TLS certificate and key reloaded"),
                    Err(e) => tracing::error!(error = %e, "TLS reload failed; the old certificate stays"),
                }
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
