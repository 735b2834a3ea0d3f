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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(std::env::var("RUST_LOG").ok().as_deref()))
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
