//! `deployctl`: the client CI deploy stages and operators run against deployd.
//!
//! The deploy, rollback and status commands arrive with the agent's HTTPS
//! API; until then the binary only answers `--help` and `--version`.

use clap::Parser;

/// Deploy, roll back and inspect releases on hosts running deployd.
#[derive(Debug, Parser)]
#[command(version, about, arg_required_else_help = true)]
struct Cli {}

fn main() {
    Cli::parse();
}
