//! `deployd`: parses arguments, sets up logging and calls into the library.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use deployd::auth::TokenRequest;
use deployd::config::Config;
use deployd::docker::Docker;
use deployd::store::{AuditHead, ChainCheck, Store};
use deployd_proto::{CommitSha, Scope};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// The deployd agent: deploys a Django app's releases on this Docker host.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// How log lines are written to stderr: `human`, or `json` (one object
    /// per line, with the span fields such as deployment.id) for journald
    /// and log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "DEPLOYD_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
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
    /// Set up a new host: TLS key and certificate, token signing key pair,
    /// and a configuration using them; prints what deployctl needs.
    ///
    /// Example: `deployd init --dir /etc/deployd --san deploy-1.example.com --san 10.0.0.5`
    Init {
        /// Where the files go; existing files are never overwritten.
        #[arg(long, default_value = "/etc/deployd")]
        dir: PathBuf,
        /// A DNS name or IP address clients reach the agent by (repeat).
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        /// Address the API will listen on.
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: std::net::SocketAddr,
        /// Where the agent keeps its deployment store.
        #[arg(long, default_value = "/var/lib/deployd")]
        state_dir: PathBuf,
        /// For the packaged systemd unit: the daemon reads its TLS key from
        /// systemd's credentials directory (LoadCredential=), not from --dir.
        #[arg(long, value_name = "DIR", num_args = 0..=1,
              default_missing_value = "/run/credentials/deployd.service")]
        credentials_dir: Option<PathBuf>,
    },
    /// Print the documented example configuration.
    DefaultConfig,
    /// Print the manual page (roff), as the package installs it.
    #[command(hide = true)]
    Manpage,
    /// Tokens signed with a key of the configuration.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The audit log in the state directory.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain, and check it against what was anchored
    /// outside the database: the head file (`[audit] head_file`), heads
    /// given with --head, and the log (--anchors). Names the first record
    /// that was edited or removed, the newest records deleted, or a chain
    /// rewritten from one record on.
    ///
    /// Example: `deployd audit verify --anchors <(journalctl -u deployd -o cat)`
    Verify {
        #[arg(long, default_value = "/etc/deployd/deployd.toml")]
        config: PathBuf,
        /// A head as the log or a remote sink has it: SEQ:HASH. Repeatable.
        #[arg(long, value_parser = parse_head)]
        head: Vec<AuditHead>,
        /// A file of deployd's log lines: every `audit_seq`/`audit_hash`
        /// pair in it is an anchor.
        #[arg(long)]
        anchors: Option<PathBuf>,
    },
    /// Print the last records, one JSON object per line.
    ///
    /// Example: `deployd audit tail --limit 50`
    Tail {
        #[arg(long, default_value = "/etc/deployd/deployd.toml")]
        config: PathBuf,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a new token, signed with a configured key that has a private key.
    ///
    /// Example: `deployd token issue --sub ci-shop --scope deploy,rollback,read --app shop --ttl 1h`
    Issue {
        #[arg(long, default_value = "/etc/deployd/deployd.toml")]
        config: PathBuf,
        /// Who the token is for (its `sub`).
        #[arg(long)]
        sub: String,
        /// Comma-separated: read, deploy, rollback, admin, run, logs.
        #[arg(long, value_delimiter = ',', required = true)]
        scope: Vec<Scope>,
        /// Apps it applies to (repeat or comma-separate); every app when absent.
        #[arg(long, value_delimiter = ',')]
        app: Vec<String>,
        /// Only this commit may be deployed with it.
        #[arg(long)]
        sha: Option<CommitSha>,
        /// Lifetime, e.g. 15m, 1h, 7d; at most auth.max_token_age.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The key to sign with (auth.keys[].id); the first that can sign by default.
        #[arg(long)]
        key: Option<String>,
    },
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

fn init_logging(format: LogFormat) {
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match &cli.command {
        Command::CheckConfig { config } => return check_config(config),
        Command::Token(TokenCommand::Issue { .. }) => return issue_token(cli.command),
        Command::Audit(audit) => return audit_command(audit),
        Command::Init { .. } => return init_command(&cli.command),
        Command::Manpage => {
            // A daemon: section 8.
            let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).section("8");
            return match page.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            };
        }
        Command::DefaultConfig => {
            let mut out = std::io::stdout().lock();
            return match out.write_all(deployd::config::EXAMPLE.as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            };
        }
        _ => {}
    }
    // Four worker threads: the agent mostly waits on Docker and HTTP, but
    // its store writes wait on the disk (fsync) on these threads too; two
    // more than a small host's cores keep the API answering meanwhile.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
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
            for warning in config.warnings() {
                tracing::warn!("{warning}");
            }
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
            let path = config;
            let config = Config::load(&path)?;
            let (reload_tx, reload) = tokio::sync::mpsc::channel(1);
            let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reading {} again", path.display());
                    if reload_tx.send(Config::load(&path)).await.is_err() {
                        break;
                    }
                }
            });
            let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
            let shutdown = async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            };
            deployd::run(config, reload, shutdown).await?;
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
        Command::CheckConfig { .. }
        | Command::Token(_)
        | Command::Audit(_)
        | Command::Init { .. }
        | Command::Manpage
        | Command::DefaultConfig => {}
    }
    Ok(())
}

fn parse_head(text: &str) -> Result<AuditHead, String> {
    AuditHead::parse(text)
}

/// The anchors `audit verify` checks against: the head file if there is
/// one, `--head`s, and the pairs found in `--anchors`.
fn audit_anchors(
    config: &Config,
    heads: &[AuditHead],
    log: Option<&std::path::Path>,
) -> anyhow::Result<(Vec<AuditHead>, Vec<String>)> {
    let mut anchors = heads.to_vec();
    let mut sources = Vec::new();
    if !heads.is_empty() {
        sources.push(format!("{} given", heads.len()));
    }
    let head_file = config.audit.head_file(&config.state_dir);
    if head_file.exists() {
        anchors.push(AuditHead::read(&head_file).map_err(anyhow::Error::msg)?);
        sources.push(format!("the head file {}", head_file.display()));
    }
    if let Some(log) = log {
        let text = std::fs::read_to_string(log)
            .with_context(|| format!("cannot read {}", log.display()))?;
        let found = AuditHead::from_log(&text);
        sources.push(format!("{} from {}", found.len(), log.display()));
        anchors.extend(found);
    }
    Ok((anchors, sources))
}

/// `deployd audit ...`: exit 0 when the chain holds, 1 when it is broken
/// or unreadable.
fn audit_command(command: &AuditCommand) -> ExitCode {
    let (AuditCommand::Verify { config, .. } | AuditCommand::Tail { config, .. }) = command;
    let loaded = Config::load(config)
        .map_err(anyhow::Error::from)
        .and_then(|c| {
            let store = Store::open_existing(&c.state_dir)?;
            Ok((c, store))
        });
    let (config, store) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    let result = match command {
        AuditCommand::Verify { head, anchors, .. } => {
            let (anchors, sources) = match audit_anchors(&config, head, anchors.as_deref()) {
                Ok(found) => found,
                Err(e) => {
                    tracing::error!("{e:#}");
                    return ExitCode::FAILURE;
                }
            };
            let against = if sources.is_empty() {
                "no anchor outside the database: removing the newest records goes unnoticed"
                    .to_owned()
            } else {
                format!("checked against {}", sources.join(", "))
            };
            match store.verify_audit_against(&anchors) {
                Ok(ChainCheck::Intact(n)) => {
                    writeln!(out, "audit log intact: {n} records ({against})")
                        .map(|()| ExitCode::SUCCESS)
                }
                Ok(ChainCheck::Broken { seq, reason }) => writeln!(
                    out,
                    "audit log broken at record {seq}: {reason} ({against})"
                )
                .map(|()| ExitCode::FAILURE),
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        AuditCommand::Tail { limit, .. } => match store.audit_tail(*limit) {
            Ok(entries) => entries
                .iter()
                .try_for_each(|e| {
                    let line = serde_json::json!({"seq": e.seq, "record": e.record});
                    writeln!(out, "{line}")
                })
                .map(|()| ExitCode::SUCCESS),
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        },
    };
    result.unwrap_or(ExitCode::FAILURE)
}

/// `deployd init`: the files, then what to tell deployctl.
fn init_command(command: &Command) -> ExitCode {
    let Command::Init {
        dir,
        sans,
        listen,
        state_dir,
        credentials_dir,
    } = command
    else {
        return ExitCode::FAILURE;
    };
    let options = deployd::init::InitOptions {
        dir: dir.clone(),
        sans: sans.clone(),
        listen: *listen,
        state_dir: state_dir.clone(),
        credentials_dir: credentials_dir.clone(),
    };
    let report = match deployd::init::init(&options) {
        Ok(report) => report,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let host = &sans[0];
    let url = if host.contains(':') {
        format!("https://[{host}]:{}", listen.port())
    } else {
        format!("https://{host}:{}", listen.port())
    };
    let text = format!(
        "wrote {config}\n\
         TLS certificate {cert}\n\
         \x20 SHA-256 fingerprint {fp}\n\
         token signing key {key} (keep it off CI hosts; mode 0600)\n\
         \n\
         deployctl settings:\n\
         \x20 export DEPLOYCTL_URL={url}\n\
         \x20 export DEPLOYCTL_CA_CERT={cert}   # or pin --pin-sha256 {fp}\n\
         \x20 export DEPLOYCTL_TOKEN=$(deployd token issue --config {config} --sub ops \
         --scope read,deploy,rollback,admin --ttl 1h)\n\
         \n\
         next: add your apps (deployd default-config), then deployd check-config --config {config}\n\
         under systemd: systemctl enable --now deployd.socket deployd.service\n",
        config = report.config.display(),
        cert = report.tls_cert.display(),
        fp = report.fingerprint,
        key = report.signing_key.display(),
    );
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// Prints a signed token on stdout, and nothing else there.
fn issue_token(command: Command) -> ExitCode {
    let Command::Token(TokenCommand::Issue {
        config,
        sub,
        scope,
        app,
        sha,
        ttl,
        key,
    }) = command
    else {
        return ExitCode::FAILURE;
    };
    let config = match Config::load(&config) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let request = TokenRequest {
        key,
        subject: sub,
        scopes: scope,
        apps: app,
        sha: sha.map(|s| s.to_string()),
        ttl,
    };
    match deployd::auth::issue(&config.auth, &request) {
        Ok(token) => {
            let mut out = std::io::stdout().lock();
            match writeln!(out, "{token}") {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
        Err(e) => {
            tracing::error!("cannot issue a token: {e}");
            ExitCode::FAILURE
        }
    }
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
