//! `deployctl fleet check`: a fleet's definition, checked against its live
//! hosts.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use deployd_proto::AppStatus;
use futures_util::future::join_all;
use reqwest::Method;
use serde::Serialize;

use crate::client::Client;
use crate::exit::{CliError, Exit};
use crate::fleet::{Fleet, Host, Which, waves};
use crate::settings::Global;

/// Fleets: several hosts running deployd, deployed as one.
#[derive(Debug, Args)]
pub struct FleetCommand {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Check(Check),
}

/// Check a fleet: its definition, then every host at once (reachable,
/// token accepted, app known, not locked, nothing deploying) and that no
/// singleton service (celery beat) runs on more than one host.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  deployctl fleet check --fleet prod\n  deployctl fleet check --fleet-file deploy/fleet.toml --json"
)]
pub struct Check {
    #[command(flatten)]
    which: Which,
}

/// One host as `fleet check` found it.
#[derive(Debug, Serialize)]
struct HostCheck {
    host: String,
    app: String,
    url: String,
    label: Option<String>,
    /// Its live release, if it answered and has one.
    live_sha: Option<String>,
    /// The singleton services configured on it.
    singletons: Vec<String>,
    /// What is wrong with it, if anything.
    problems: Vec<String>,
}

/// What `fleet check --json` prints.
#[derive(Debug, Serialize)]
struct Report {
    fleet: String,
    /// Host names, wave by wave.
    waves: Vec<Vec<String>>,
    hosts: Vec<HostCheck>,
    /// Problems of the fleet as a whole.
    problems: Vec<String>,
}

impl FleetCommand {
    pub async fn run(self, global: &Global, json: bool) -> Result<Exit, CliError> {
        match self.command {
            Command::Check(c) => c.run(global, json).await,
        }
    }
}

impl Check {
    async fn run(self, global: &Global, json: bool) -> Result<Exit, CliError> {
        let fleet = self.which.load(global)?;
        let hosts = join_all(fleet.hosts.iter().map(|h| check_host(global, h))).await;
        let report = report(&fleet, hosts);
        let ok = report.problems.is_empty() && report.hosts.iter().all(|h| h.problems.is_empty());
        if json {
            let line = serde_json::to_string(&report)
                .map_err(|e| CliError::new(Exit::Other, format!("cannot print JSON: {e}")))?;
            println!("{line}");
        } else {
            print_report(&report);
        }
        if ok {
            Ok(Exit::Success)
        } else {
            Err(CliError::new(
                Exit::Other,
                format!("fleet {} is not ready to deploy", fleet.name),
            ))
        }
    }
}

async fn check_host(global: &Global, host: &Host) -> HostCheck {
    let mut check = HostCheck {
        host: host.name.clone(),
        app: host.app.clone(),
        url: host.url.clone(),
        label: host.label.clone(),
        live_sha: None,
        singletons: Vec::new(),
        problems: Vec::new(),
    };
    let status = async {
        let client = Client::new(global.for_host(host).resolve()?)?;
        client
            .call::<AppStatus>(Method::GET, &format!("/v1/apps/{}/status", host.app), None)
            .await
    };
    match status.await {
        Ok(status) => {
            check.live_sha = status.live_sha.map(|s| s.to_string());
            check.singletons = status
                .services
                .iter()
                .filter(|s| s.singleton)
                .map(|s| s.name.clone())
                .collect();
            if let Some(lock) = status.lock {
                check
                    .problems
                    .push(format!("locked by {}: {}", lock.locked_by, lock.reason));
            }
            if let Some(id) = status.running_deployment {
                check.problems.push(format!("deployment {id} is running"));
            }
        }
        Err(e) => check.problems.push(e.message),
    }
    check
}

/// The fleet's waves and its fleet-wide problems, with every host's check.
fn report(fleet: &Fleet, hosts: Vec<HostCheck>) -> Report {
    let mut problems = Vec::new();
    let mut singletons: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for h in &hosts {
        for s in &h.singletons {
            singletons.entry(s).or_default().push(&h.host);
        }
    }
    for (service, on) in singletons {
        if on.len() > 1 {
            problems.push(format!(
                "{service} is a singleton but {} hosts run it ({}): keep it in one host's config",
                on.len(),
                on.join(", ")
            ));
        }
    }
    let waves = waves(fleet.hosts.len(), fleet.first_wave, fleet.max_parallel)
        .into_iter()
        .map(|wave| fleet.hosts[wave].iter().map(|h| h.name.clone()).collect())
        .collect();
    Report {
        fleet: fleet.name.clone(),
        waves,
        hosts,
        problems,
    }
}

fn print_report(report: &Report) {
    println!("fleet {}", report.fleet);
    for (i, wave) in report.waves.iter().enumerate() {
        let once = if i == 0 {
            " (the first host runs the once tasks)"
        } else {
            ""
        };
        println!("  wave {}: {}{once}", i + 1, wave.join(", "));
    }
    println!(
        "{:<24}  {:<12}  {:<8}  {:<12}  {:<10}  PROBLEMS",
        "HOST", "APP", "LABEL", "LIVE", "SINGLETONS"
    );
    for h in &report.hosts {
        let live = h.live_sha.as_deref().map_or("-", |s| &s[..s.len().min(12)]);
        let singletons = if h.singletons.is_empty() {
            "-".to_owned()
        } else {
            h.singletons.join(",")
        };
        let problems = if h.problems.is_empty() {
            "ok".to_owned()
        } else {
            h.problems.join("; ")
        };
        println!(
            "{:<24}  {:<12}  {:<8}  {live:<12}  {singletons:<10}  {problems}",
            h.host,
            h.app,
            h.label.as_deref().unwrap_or("-"),
        );
    }
    let mut lives: Vec<&str> = report
        .hosts
        .iter()
        .filter_map(|h| h.live_sha.as_deref())
        .collect();
    lives.sort_unstable();
    lives.dedup();
    if lives.len() > 1 {
        println!("drift: the hosts run {} different releases", lives.len());
    }
    for p in &report.problems {
        println!("problem: {p}");
    }
}
