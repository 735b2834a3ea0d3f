//! `deployctl`: the client CI deploy stages and operators run against
//! deployd. Parses arguments, resolves settings, runs one command, and
//! exits with a code scripts can branch on (see `--help`).

mod client;
mod commands;
mod exit;
mod fleet;
mod follow;
mod oidc;
mod operator;
mod settings;
mod tls;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands::{
    Ctx, canary, completions, deploy, history, keygen, lock, logs, plan, rollback, run, status,
    whoami,
};
use crate::exit::{CliError, EXIT_CODES_HELP, Exit};
use crate::settings::Global;

/// Deploy, roll back and inspect releases on hosts running deployd.
#[derive(Debug, Parser)]
#[command(version, about, after_help = EXIT_CODES_HELP, arg_required_else_help = true)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    /// Machine-readable output: JSON (one event per line when following).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Deploy(deploy::Deploy),
    Plan(plan::PlanCommand),
    Rollback(rollback::Rollback),
    Promote(canary::Promote),
    Abort(canary::Abort),
    Status(status::Status),
    History(history::History),
    Logs(logs::Logs),
    Lock(lock::Lock),
    Unlock(lock::Unlock),
    Whoami(whoami::Whoami),
    Run(run::Run),
    Keygen(keygen::Keygen),
    Fleet(commands::fleet::FleetCommand),
    Completions(completions::Completions),
    /// Print the manual page (roff), as the package installs it.
    #[command(hide = true)]
    Manpage,
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    if let Command::Completions(c) = &cli.command {
        c.run();
        return ExitCode::SUCCESS;
    }
    if let Command::Manpage = &cli.command {
        let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
        return match page.render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => Err(CliError::new(Exit::Other, format!("cannot start: {e}"))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "error: {}", e.message);
            if let Some(hint) = &e.hint {
                let _ = writeln!(err, "hint: {hint}");
            }
            e.exit.into()
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        // It exits with its command's own code.
        Command::Run(c) => c.run(&Ctx::new(&cli.global, cli.json)?).await,
        command => run_command(Cli { command, ..cli })
            .await
            .map(ExitCode::from),
    }
}

async fn run_command(cli: Cli) -> Result<Exit, CliError> {
    // A fleet names its own hosts: no single agent URL is needed.
    let command = match cli.command {
        Command::Fleet(c) => return c.run(&cli.global, cli.json).await,
        Command::Keygen(c) => return c.run(&cli.global, cli.json),
        Command::Deploy(c) => match c.fleet.which() {
            Some(which) => return c.run_fleet(which, &cli.global, cli.json).await,
            None => Command::Deploy(c),
        },
        Command::Rollback(c) => match c.fleet.which() {
            Some(which) => return c.run_fleet(which, &cli.global, cli.json).await,
            None => Command::Rollback(c),
        },
        Command::Status(c) => match c.fleet.which() {
            Some(which) => return c.run_fleet(which, &cli.global, cli.json).await,
            None => Command::Status(c),
        },
        Command::History(c) => match c.fleet.which() {
            Some(which) => return c.run_fleet(which, &cli.global, cli.json).await,
            None => Command::History(c),
        },
        other => other,
    };
    let ctx = Ctx::new(&cli.global, cli.json)?;
    match command {
        Command::Deploy(c) => c.run(&ctx).await,
        Command::Plan(c) => c.run(&ctx).await,
        Command::Rollback(c) => c.run(&ctx).await,
        Command::Promote(c) => c.run(&ctx).await,
        Command::Abort(c) => c.run(&ctx).await,
        Command::Status(c) => c.run(&ctx).await,
        Command::History(c) => c.run(&ctx).await,
        Command::Logs(c) => c.run(&ctx).await,
        Command::Lock(c) => c.run(&ctx).await,
        Command::Unlock(c) => c.run(&ctx).await,
        Command::Whoami(c) => c.run(&ctx).await,
        Command::Fleet(_)
        | Command::Keygen(_)
        | Command::Run(_)
        | Command::Completions(_)
        | Command::Manpage => Ok(Exit::Success),
    }
}
