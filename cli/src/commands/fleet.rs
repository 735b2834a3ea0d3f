//! `deployctl fleet check`: a fleet's definition, checked against its live
//! hosts.

use clap::{Args, Subcommand};
use deployd_proto::{AppStatus, Scope};
use futures_util::future::join_all;
use serde::Serialize;

use crate::exit::{CliError, Exit};
use crate::fleet::execute::{Assessment, inspect};
use crate::fleet::plan::ordered_waves;
use crate::fleet::{Fleet, Host, Which, move_pairs, singleton_moves, singletons, waves};
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
    Status(FleetStatus),
}

/// Every host of a fleet: live release, health, the fleet deployment that
/// holds it (one a deployctl left behind shows here), drift. The same as
/// `deployctl status --fleet`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  deployctl fleet status --fleet prod")]
pub struct FleetStatus {
    #[command(flatten)]
    which: Which,
}

/// Check a fleet: its definition, then every host at once as a fleet
/// deployment's preflight would (reachable, the token may deploy there, app
/// known, not locked, nothing deploying), that no singleton service (celery
/// beat) is configured on more than one host, and the waves it would take.
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
    /// Singleton services taken out of its config that still run: its next
    /// deployment stops them, before another host starts them.
    leaving: Vec<String>,
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
    /// The hosts' live releases, when they differ.
    drift: Option<String>,
    /// Singletons moving between hosts, as `beat: a -> c`: the fleet
    /// deployment takes the host they leave first.
    moves: Vec<String>,
    /// Problems of the fleet as a whole.
    problems: Vec<String>,
}

impl FleetCommand {
    pub async fn run(self, global: &Global, json: bool) -> Result<Exit, CliError> {
        match self.command {
            Command::Check(c) => c.run(global, json).await,
            Command::Status(c) => status(&c.which.load(global)?, global, json).await,
        }
    }
}

impl Check {
    async fn run(self, global: &Global, json: bool) -> Result<Exit, CliError> {
        let fleet = self.which.load(global)?;
        let (statuses, assessment) = inspect(global, &fleet, Scope::Deploy).await?;
        let report = report(&fleet, &statuses, assessment);
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

/// One host's app status.
async fn host_status(global: &Global, host: &Host) -> Result<AppStatus, CliError> {
    host.client(global)?
        .get(&format!("/v1/apps/{}/status", host.app))
        .await
}

/// The fleet's waves, every host as preflight sees it, and the fleet's
/// problems.
fn report(fleet: &Fleet, statuses: &[Option<AppStatus>], assessment: Assessment) -> Report {
    let hosts: Vec<HostCheck> = fleet
        .hosts
        .iter()
        .zip(statuses)
        .zip(assessment.hosts)
        .map(|((host, status), problems)| {
            let (singletons, leaving) = status.as_ref().map(singletons).unwrap_or_default();
            let owned = |list: Vec<&str>| list.into_iter().map(str::to_owned).collect();
            HostCheck {
                host: host.name.clone(),
                app: host.app.clone(),
                url: host.url.clone(),
                label: host.label.clone(),
                live_sha: status
                    .as_ref()
                    .and_then(|s| s.live_sha.as_ref())
                    .map(ToString::to_string),
                singletons: owned(singletons),
                leaving: owned(leaving),
                problems,
            }
        })
        .collect();
    let mut problems = assessment.fleet;
    if let Some(held) = &assessment.held {
        problems.push(if held.rollback {
            format!(
                "fleet rollback {} to {} holds the hosts: finish it with `deployctl rollback --fleet {}`",
                held.id, held.sha, fleet.name
            )
        } else {
            format!(
                "fleet deployment {} of {} holds the hosts: finish it with `deployctl deploy {} --fleet {} --resume` or `deployctl rollback --fleet {}`",
                held.id, held.sha, held.sha, fleet.name, fleet.name
            )
        });
    }
    let each: Vec<(Vec<&str>, Vec<&str>)> = hosts
        .iter()
        .map(|h| (names(&h.singletons), names(&h.leaving)))
        .collect();
    let found = singleton_moves(&each);
    let pairs = move_pairs(&found);
    let moves = found
        .iter()
        .map(|m| {
            format!(
                "{}: {} -> {}",
                m.services, hosts[m.from].host, hosts[m.to].host
            )
        })
        .collect();
    let all: Vec<usize> = (0..fleet.hosts.len()).collect();
    // A cycle is one of the assessment's problems: the fleet's order then.
    let waves =
        ordered_waves(&all, fleet.first_wave, fleet.max_parallel, &pairs).unwrap_or_else(|| {
            waves(fleet.hosts.len(), fleet.first_wave, fleet.max_parallel)
                .into_iter()
                .map(|r| all[r].to_vec())
                .collect()
        });
    let waves = waves
        .into_iter()
        .map(|wave| {
            wave.into_iter()
                .map(|i| fleet.hosts[i].name.clone())
                .collect()
        })
        .collect();
    Report {
        fleet: fleet.name.clone(),
        waves,
        hosts,
        drift: assessment.drift,
        moves,
        problems,
    }
}

fn names(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
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
    if let Some(drift) = &report.drift {
        println!("{drift}");
    }
    for m in &report.moves {
        println!("moves: {m} (its host deploys first)");
    }
    for p in &report.problems {
        println!("problem: {p}");
    }
}

/// One host's row of `status --fleet`.
#[derive(Debug, Serialize)]
struct HostStatus {
    host: String,
    app: String,
    /// The host's status, or why it could not be read.
    status: Option<AppStatus>,
    error: Option<String>,
}

async fn status_of(global: &Global, host: &Host) -> HostStatus {
    let (status, error) = match host_status(global, host).await {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(e.message)),
    };
    HostStatus {
        host: host.name.clone(),
        app: host.app.clone(),
        status,
        error,
    }
}

/// A host's health in a word: its running containers, and how many of
/// those with a check are healthy.
fn health(status: &AppStatus) -> String {
    let running: Vec<&deployd_proto::ContainerStatus> = status
        .services
        .iter()
        .flat_map(|s| &s.containers)
        .filter(|c| c.state == deployd_proto::ContainerPhase::Running)
        .collect();
    let checked: Vec<_> = running.iter().filter(|c| c.health.is_some()).collect();
    let healthy = checked
        .iter()
        .filter(|c| c.health.as_deref() == Some("healthy"))
        .count();
    if checked.is_empty() {
        format!("{} running", running.len())
    } else {
        format!(
            "{} running, {healthy}/{} healthy",
            running.len(),
            checked.len()
        )
    }
}

/// `deployctl status --fleet` and `deployctl fleet status`.
pub async fn status(fleet: &Fleet, global: &Global, json: bool) -> Result<Exit, CliError> {
    let hosts = join_all(fleet.hosts.iter().map(|h| status_of(global, h))).await;
    if json {
        let line = serde_json::json!({"fleet": fleet.name, "hosts": hosts});
        println!("{line}");
    } else {
        let mut lives: Vec<String> = hosts
            .iter()
            .filter_map(|h| h.status.as_ref())
            .map(|s| {
                s.live_sha
                    .as_ref()
                    .map_or("none".into(), ToString::to_string)
            })
            .collect();
        lives.sort_unstable();
        lives.dedup();
        // The release most hosts run; the others drift from it.
        let common = lives
            .iter()
            .max_by_key(|sha| {
                hosts
                    .iter()
                    .filter_map(|h| h.status.as_ref())
                    .filter(|s| {
                        s.live_sha
                            .as_ref()
                            .map_or("none".into(), ToString::to_string)
                            == **sha
                    })
                    .count()
            })
            .cloned();
        println!("fleet {}", fleet.name);
        println!(
            "{:<20}  {:<12}  {:<12}  {:<24}  {:<6}  LOCK",
            "HOST", "APP", "LIVE", "HEALTH", "DRIFT"
        );
        for h in &hosts {
            let Some(s) = &h.status else {
                println!(
                    "{:<20}  {:<12}  unreachable: {}",
                    h.host,
                    h.app,
                    h.error.as_deref().unwrap_or("")
                );
                continue;
            };
            let live = s
                .live_sha
                .as_ref()
                .map_or("none".to_owned(), ToString::to_string);
            let drift = if lives.len() > 1 && Some(&live) != common.as_ref() {
                "yes"
            } else {
                "-"
            };
            let lock = match (&s.lock, &s.running_deployment) {
                (Some(l), _) => match &l.fleet {
                    Some(f) => format!("fleet deployment {} of {}", f.id, f.sha.short()),
                    None => format!("locked by {}: {}", l.locked_by, l.reason),
                },
                (None, Some(id)) => format!("deploying {id}"),
                (None, None) => "-".to_owned(),
            };
            println!(
                "{:<20}  {:<12}  {:<12}  {:<24}  {drift:<6}  {lock}",
                h.host,
                h.app,
                deployd_proto::short_sha(&live),
                health(s)
            );
        }
        if lives.len() > 1 {
            println!("drift: the hosts run {} releases", lives.len());
        }
    }
    if hosts.iter().any(|h| h.status.is_none()) {
        return Err(CliError::new(
            Exit::Unreachable,
            format!("fleet {}: a host could not be read", fleet.name),
        ));
    }
    Ok(Exit::Success)
}

/// `deployctl history --fleet`: every host's deployments, newest first.
pub async fn history(
    fleet: &Fleet,
    global: &Global,
    limit: u16,
    json: bool,
) -> Result<Exit, CliError> {
    let pages = join_all(fleet.hosts.iter().map(|host| async move {
        host.client(global)?
            .get::<deployd_proto::DeploymentPage>(&format!(
                "/v1/apps/{}/deployments?limit={limit}",
                host.app
            ))
            .await
    }))
    .await;
    let mut rows: Vec<(&str, deployd_proto::Deployment)> = Vec::new();
    let mut unreadable = Vec::new();
    for (host, page) in fleet.hosts.iter().zip(pages) {
        match page {
            Ok(page) => rows.extend(
                page.deployments
                    .into_iter()
                    .map(|d| (host.name.as_str(), d)),
            ),
            Err(e) => unreadable.push(format!("{}: {}", host.name, e.message)),
        }
    }
    rows.sort_by_key(|row| std::cmp::Reverse(row.1.created_at));
    rows.truncate(usize::from(limit) * fleet.hosts.len());
    if json {
        let hosts: Vec<serde_json::Value> = rows
            .iter()
            .map(|(host, d)| serde_json::json!({"host": host, "deployment": d}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"fleet": fleet.name, "deployments": hosts})
        );
    } else {
        println!(
            "{:<20}  {:<12}  {:<20}  {:<9}  {:<15}  {:<12}  {:<12}  REASON / ERROR",
            "HOST", "ID", "WHEN (UTC)", "KIND", "STATE", "SHA", "FLEET"
        );
        for (host, d) in &rows {
            let when = d
                .created_at
                .format(time::macros::format_description!(
                    "[year]-[month]-[day] [hour]:[minute]:[second]"
                ))
                .unwrap_or_default();
            let fleet_id = d
                .fleet
                .as_ref()
                .map_or("-".to_owned(), |f| super::short_id(&f.id).to_owned());
            println!(
                "{host:<20}  {:<12}  {when:<20}  {:<9}  {:<15}  {:<12}  {fleet_id:<12}  {}",
                super::short_id(&d.id.0),
                d.kind.as_str(),
                d.state.as_str(),
                d.sha.short(),
                d.error.as_deref().or(d.reason.as_deref()).unwrap_or("")
            );
        }
    }
    for line in &unreadable {
        eprintln!("unreadable: {line}");
    }
    if unreadable.is_empty() {
        Ok(Exit::Success)
    } else {
        Err(CliError::new(
            Exit::Unreachable,
            format!("fleet {}: a host could not be read", fleet.name),
        ))
    }
}
