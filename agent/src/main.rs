//! `deployd`: parses arguments, sets up logging and calls into the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use deployd::docker::Docker;
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
    /// Connect to the Docker engine and print its version and the API version in use.
    ///
    /// Example: `deployd check-docker` (honours DOCKER_HOST).
    CheckDocker,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
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
    }
    Ok(())
}
