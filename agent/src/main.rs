//! `deployd`: parses arguments, sets up logging and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use deployd::config::Config;
use deployd::docker::Docker;
use deployd::engine::EngineHandle;
use deployd::store::Store;
use tracing_subscriber::EnvFilter;

/// The deployd agent: deploys a Django app's releases on this Docker host.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: reconcile what a crash interrupted, then serve until SIGTERM.
    ///
    /// Example: `deployd run --config /etc/deployd/deployd.toml`
    Run {
        /// Configuration file (see `agent/deployd.example.toml`).
        #[arg(long, default_value = "/etc/deployd/deployd.toml")]
        config: PathBuf,
    },
    /// Check a configuration file; print every problem with its key path.
    ///
    /// Example: `deployd check-config --config /etc/deployd/deployd.toml`
    CheckConfig {
        #[arg(long, default_value = "/etc/deployd/deployd.toml")]
        config: PathBuf,
    },
    /// Connect to the Docker engine and print its version and the API version in use.
    ///
    /// Example: `deployd check-docker` (honours DOCKER_HOST).
    CheckDocker,
}

/// `RUST_LOG` (default `info`), with bollard held at `warn` whatever it says:
/// at debug, bollard logs request and response bodies, and container
/// bodies carry the app's environment, secrets included.
fn log_filter(rust_log: Option<&str>) -> EnvFilter {
    let base =
        EnvFilter::try_new(rust_log.unwrap_or("info")).unwrap_or_else(|_| EnvFilter::new("info"));
    match "bollard=warn".parse() {
        Ok(directive) => base.add_directive(directive),
        Err(_) => base,
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(std::env::var("RUST_LOG").ok().as_deref()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::CheckConfig { config } = &cli.command {
        return check_config(config);
    }
    // Two worker threads: the agent waits on Docker and HTTP, it does not compute.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let result = runtime
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(serve(cli.command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            tracing::info!(
                apps = config.apps.len(),
                "configuration {} is valid",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            std::fs::create_dir_all(&config.state_dir).with_context(|| {
                format!(
                    "cannot create state directory {}",
                    config.state_dir.display()
                )
            })?;
            let store = Store::open(&config.state_dir)?;
            let docker = Docker::connect().await?;
            let _engine = EngineHandle::start(&config, docker, store).await?;
            tracing::info!(apps = config.apps.len(), "deployd ready");
            shutdown_signal().await?;
            tracing::info!("shutting down");
        }
        Command::CheckDocker => {
            let docker = Docker::connect()
                .await
                .context("Docker engine check failed")?;
            let version = docker
                .version()
                .await
                .context("Docker engine check failed")?;
            tracing::info!(engine = %version.engine, api = %version.api, "Docker engine reachable");
        }
        Command::CheckConfig { .. } => {}
    }
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    tokio::select! {
        _ = term.recv() => {}
        result = tokio::signal::ctrl_c() => result.context("cannot watch SIGINT")?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bollard_stays_quiet_even_at_debug_and_trace() {
        for rust_log in [Some("debug"), Some("trace"), Some("bollard=trace"), None] {
            let filter = log_filter(rust_log).to_string();
            assert!(filter.contains("bollard=warn"), "{rust_log:?}: {filter}");
            assert!(!filter.contains("bollard=trace"), "{rust_log:?}: {filter}");
        }
    }
}
