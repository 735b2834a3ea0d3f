//! Fleets: the hosts of one environment, each running deployd, deployed as
//! one. A fleet is a `[fleets.NAME]` table of deployctl's config file, or a
//! file of its own kept in the app's repository (`--fleet-file`):
//!
//! ```toml
//! max_parallel = "50%"     # hosts at once after the first wave: a number or a share
//! first_wave = 1           # hosts deployed first, alone; the first one runs `once` tasks
//! failure_budget = 0       # hosts that may fail before the whole fleet reverts
//! pause = "30s"            # between waves
//!
//! [[hosts]]
//! name = "web-1"           # default: the URL's host and port
//! url = "https://10.0.0.11:8443"
//! ca_cert = "deploy/ca.pem" # or pin_sha256; relative to the fleet file
//! app = "shop"
//! label = "web"
//! ```
//!
//! Loading checks the whole definition and reports every problem with its
//! key path, as the agent's configuration does.

pub mod execute;
pub mod plan;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use plan::{Parallel, waves};

use crate::exit::CliError;
use crate::settings::Global;

/// A fleet as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetDef {
    #[serde(default)]
    max_parallel: Option<ParallelDef>,
    #[serde(default)]
    first_wave: Option<usize>,
    #[serde(default)]
    failure_budget: Option<usize>,
    #[serde(default)]
    pause: Option<String>,
    #[serde(default)]
    hosts: Vec<HostDef>,
}

/// `max_parallel` as written: `2` or `"50%"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ParallelDef {
    Hosts(i64),
    Share(String),
}

/// One host as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostDef {
    name: Option<String>,
    url: String,
    ca_cert: Option<PathBuf>,
    pin_sha256: Option<String>,
    app: String,
    label: Option<String>,
}

/// A checked fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct Fleet {
    pub name: String,
    /// In the order they are deployed; the first runs the `once` tasks.
    pub hosts: Vec<Host>,
    pub max_parallel: Parallel,
    pub first_wave: usize,
    pub failure_budget: usize,
    pub pause: Duration,
}

/// One checked host of a fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub name: String,
    pub url: String,
    pub trust: Trust,
    pub app: String,
    pub label: Option<String>,
}

impl Host {
    /// A client for this host: its URL, app and trust, the token from the
    /// usual layers.
    pub fn client(&self, global: &Global) -> Result<crate::client::Client, CliError> {
        crate::client::Client::new(global.for_host(self).resolve()?)
    }
}

/// How a host's certificate is trusted.
#[derive(Debug, Clone, PartialEq)]
pub enum Trust {
    /// The system roots only.
    System,
    /// The system roots and this PEM CA bundle.
    Ca(PathBuf),
    /// Exactly the certificate with this SHA-256 fingerprint.
    Pin(String),
}

/// One thing wrong with a fleet definition, at a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// A fleet-wide problem for every singleton service (celery beat) that
/// more than one host runs; `hosts` gives each host's name and its
/// singleton services.
pub fn singleton_problems<'a>(
    hosts: impl IntoIterator<Item = (&'a str, Vec<&'a str>)>,
) -> Vec<String> {
    let mut on: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (host, services) in hosts {
        for service in services {
            on.entry(service).or_default().push(host);
        }
    }
    on.into_iter()
        .filter(|(_, hosts)| hosts.len() > 1)
        .map(|(service, hosts)| {
            format!(
                "{service} is a singleton but {} hosts run it ({}): keep it in one host's config",
                hosts.len(),
                hosts.join(", ")
            )
        })
        .collect()
}

/// A host's singleton services as its status reports them: those in its
/// config, and those taken out of it whose containers still run (the host's
/// next deployment stops them first).
pub fn singletons(status: &deployd_proto::AppStatus) -> (Vec<&str>, Vec<&str>) {
    let mut configured = Vec::new();
    let mut leaving = Vec::new();
    for s in status.services.iter().filter(|s| s.singleton) {
        if !s.removed {
            configured.push(s.name.as_str());
        } else if s
            .containers
            .iter()
            .any(|c| c.state != deployd_proto::ContainerPhase::Stopped)
        {
            leaving.push(s.name.as_str());
        }
    }
    (configured, leaving)
}

/// A singleton leaving one host for another: a host still running a
/// singleton its config no longer has must stop it before the host whose
/// config now has it starts one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// The host it leaves (an index into the fleet's hosts).
    pub from: usize,
    /// The host it arrives on.
    pub to: usize,
    /// The singleton services that move, joined (`beat`).
    pub services: String,
}

/// Every singleton move among `hosts` (each host's configured and leaving
/// singletons, as [`singletons`] reads them).
pub fn singleton_moves(hosts: &[(Vec<&str>, Vec<&str>)]) -> Vec<Move> {
    let mut moves = Vec::new();
    for (from, (_, leaving)) in hosts.iter().enumerate() {
        for (to, (configured, _)) in hosts.iter().enumerate() {
            let services: Vec<&str> = leaving
                .iter()
                .copied()
                .filter(|s| configured.contains(s))
                .collect();
            if from != to && !services.is_empty() {
                moves.push(Move {
                    from,
                    to,
                    services: services.join(", "),
                });
            }
        }
    }
    moves
}

/// The `(first, then)` host pairs of `moves`, as wave planning takes them.
pub fn move_pairs(moves: &[Move]) -> Vec<(usize, usize)> {
    moves.iter().map(|m| (m.from, m.to)).collect()
}

/// The fleets of deployctl's config file, by name.
pub type Fleets = BTreeMap<String, FleetDef>;

impl FleetDef {
    /// Reads a fleet file.
    pub fn read(path: &Path) -> Result<Self, Problem> {
        config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| Problem {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
    }

    /// Checks the definition; `at` prefixes key paths (`fleets.prod`),
    /// `base` is where relative CA paths start (the fleet file's
    /// directory).
    pub fn check(&self, name: &str, at: &str, base: &Path) -> Result<Fleet, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut add = |path: String, reason: &str| {
            problems.push(Problem {
                path,
                reason: reason.to_owned(),
            });
        };
        let key = |k: &str| {
            if at.is_empty() {
                k.to_owned()
            } else {
                format!("{at}.{k}")
            }
        };
        if self.hosts.is_empty() {
            add(key("hosts"), "a fleet needs at least one host");
        }
        let mut hosts: Vec<Host> = Vec::new();
        for (i, def) in self.hosts.iter().enumerate() {
            let at = key(&format!("hosts[{i}]"));
            let url = def.url.trim_end_matches('/').to_owned();
            let authority = url.strip_prefix("https://").unwrap_or_default();
            if authority.is_empty() || authority.contains(['/', ' ', '?', '#']) {
                add(
                    format!("{at}.url"),
                    "must be https://host[:port], the agent's API",
                );
            }
            let name = def.name.clone().unwrap_or_else(|| authority.to_owned());
            if !is_host_name(&name) {
                add(
                    format!("{at}.name"),
                    "1-64 of a-z, A-Z, 0-9, '.', ':' and '-'",
                );
            } else if hosts.iter().any(|h| h.name == name) {
                add(
                    format!("{at}.name"),
                    "another host has this name (names default to the URL's host and port)",
                );
            }
            if hosts.iter().any(|h| h.url == url && h.app == def.app) {
                add(at.clone(), "the same app on the same agent twice");
            }
            if !deployd_proto::is_plain_name(&def.app) {
                add(
                    format!("{at}.app"),
                    "an app name: 1-32 of a-z, 0-9 and -, starting with a letter",
                );
            }
            let trust = match (&def.ca_cert, &def.pin_sha256) {
                (Some(_), Some(_)) => {
                    add(at.clone(), "ca_cert or pin_sha256, not both");
                    Trust::System
                }
                (Some(ca), None) => Trust::Ca(base.join(ca)),
                (None, Some(pin)) => {
                    let hex: String = pin.chars().filter(|c| *c != ':').collect();
                    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                        add(
                            format!("{at}.pin_sha256"),
                            "a SHA-256 fingerprint: 64 hex digits, colons allowed",
                        );
                    }
                    Trust::Pin(pin.clone())
                }
                (None, None) => Trust::System,
            };
            hosts.push(Host {
                name,
                url,
                trust,
                app: def.app.clone(),
                label: def.label.clone(),
            });
        }
        let max_parallel = match &self.max_parallel {
            None => Parallel::Hosts(1),
            Some(ParallelDef::Hosts(n)) if *n >= 1 => {
                Parallel::Hosts(usize::try_from(*n).unwrap_or(usize::MAX))
            }
            Some(ParallelDef::Hosts(_)) => {
                add(key("max_parallel"), "at least 1 host");
                Parallel::Hosts(1)
            }
            Some(ParallelDef::Share(text)) => match Parallel::parse_share(text) {
                Some(share) => share,
                None => {
                    add(
                        key("max_parallel"),
                        "a number of hosts, or a share from \"1%\" to \"100%\"",
                    );
                    Parallel::Hosts(1)
                }
            },
        };
        let first_wave = self.first_wave.unwrap_or(1);
        if first_wave == 0 {
            add(
                key("first_wave"),
                "at least 1: the first host runs the once tasks",
            );
        } else if !hosts.is_empty() && first_wave > hosts.len() {
            add(key("first_wave"), "more hosts than the fleet has");
        }
        let failure_budget = self.failure_budget.unwrap_or(0);
        if !hosts.is_empty() && failure_budget >= hosts.len() {
            add(
                key("failure_budget"),
                "must be below the number of hosts: some host has to succeed",
            );
        }
        let pause = match &self.pause {
            None => Duration::ZERO,
            Some(text) => humantime::parse_duration(text).unwrap_or_else(|_| {
                add(key("pause"), "a duration such as \"30s\" or \"2m\"");
                Duration::ZERO
            }),
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Fleet {
            name: name.to_owned(),
            hosts,
            max_parallel,
            first_wave,
            failure_budget,
            pause,
        })
    }
}

/// Which fleet a command acts on: one of the config file, or a file.
#[derive(Debug, Clone, clap::Args)]
pub struct Which {
    /// A fleet of the config file (`[fleets.NAME]`).
    #[arg(
        long,
        conflicts_with = "fleet_file",
        required_unless_present = "fleet_file"
    )]
    pub fleet: Option<String>,
    /// A fleet file, e.g. one kept in the app's repository.
    #[arg(long)]
    pub fleet_file: Option<PathBuf>,
}

/// `--fleet NAME | --fleet-file F` on a command that also works on one
/// host: neither means the one host of the usual settings.
#[derive(Debug, Clone, clap::Args)]
pub struct MaybeFleet {
    /// Every host of a fleet of the config file (`[fleets.NAME]`).
    #[arg(long, conflicts_with = "fleet_file")]
    pub fleet: Option<String>,
    /// Every host of a fleet file, e.g. one kept in the app's repository.
    #[arg(long)]
    pub fleet_file: Option<PathBuf>,
}

impl MaybeFleet {
    /// The fleet named, if one is.
    pub fn which(&self) -> Option<Which> {
        (self.fleet.is_some() || self.fleet_file.is_some()).then(|| Which {
            fleet: self.fleet.clone(),
            fleet_file: self.fleet_file.clone(),
        })
    }
}

impl Which {
    /// Loads and checks the fleet.
    pub fn load(&self, global: &Global) -> Result<Fleet, CliError> {
        let (name, at, base, def) = match (&self.fleet, &self.fleet_file) {
            (_, Some(path)) => {
                let def = FleetDef::read(path).map_err(|p| CliError::usage(p.to_string()))?;
                let name = path
                    .file_stem()
                    .map_or_else(|| "fleet".to_owned(), |s| s.to_string_lossy().into_owned());
                let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
                (name, String::new(), base, def)
            }
            (Some(name), None) => {
                let Some((path, mut fleets)) = global.fleets_from_file()? else {
                    return Err(CliError::usage(format!(
                        "no fleet {name}: there is no config file"
                    ))
                    .hint(
                        "define [fleets.NAME] in deployctl's config file, or pass --fleet-file",
                    ));
                };
                let def = fleets.remove(name).ok_or_else(|| {
                    let known: Vec<&str> = fleets.keys().map(String::as_str).collect();
                    CliError::usage(format!(
                        "no fleet {name} in {} (known: {})",
                        path.display(),
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ))
                })?;
                let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
                (name.clone(), format!("fleets.{name}"), base, def)
            }
            (None, None) => return Err(CliError::usage("which fleet? --fleet or --fleet-file")),
        };
        def.check(&name, &at, &base).map_err(|problems| {
            let lines: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
            CliError::usage(format!("invalid fleet {name}:\n{}", lines.join("\n")))
        })
    }
}

/// A host's name in a fleet: 1 to 64 of a-z, A-Z, 0-9, `.`, `:` and `-`
/// (a host name and port by default).
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> FleetDef {
        config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(config::Config::try_deserialize)
            .unwrap()
    }

    /// The problems `check` reports, as lines.
    fn problems(def: &FleetDef, at: &str) -> Vec<String> {
        def.check("prod", at, Path::new("."))
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_singleton_leaving_one_host_for_another_is_a_move() {
        use deployd_proto::{AppStatus, ContainerPhase, ContainerStatus, ServiceStatus};
        let service = |name: &str, removed: bool, state: Option<ContainerPhase>| ServiceStatus {
            name: name.into(),
            singleton: name == "beat",
            removed,
            containers: state
                .map(|state| ContainerStatus {
                    name: format!("shop-{name}-1"),
                    sha: None,
                    state,
                    status: None,
                    health: None,
                    node: None,
                })
                .into_iter()
                .collect(),
        };
        let status = |services: Vec<ServiceStatus>| AppStatus {
            app: "shop".into(),
            live_sha: None,
            live_digest: None,
            running_deployment: None,
            lock: None,
            services,
        };
        // a: beat out of its config, still running; b: web only; c: beat
        // now in its config; d: beat out of its config, stopped already.
        let a = status(vec![
            service("web", false, Some(ContainerPhase::Running)),
            service("beat", true, Some(ContainerPhase::Running)),
        ]);
        let b = status(vec![service("web", false, Some(ContainerPhase::Running))]);
        let c = status(vec![service("beat", false, None)]);
        let d = status(vec![service("beat", true, Some(ContainerPhase::Stopped))]);
        assert_eq!(singletons(&a), (vec![], vec!["beat"]));
        assert_eq!(singletons(&c), (vec!["beat"], vec![]));
        assert_eq!(singletons(&d), (vec![], vec![]));
        let all: Vec<_> = [&a, &b, &c, &d].map(singletons).into();
        let moves = singleton_moves(&all);
        assert_eq!(move_pairs(&moves), [(0, 2)]);
        assert_eq!(moves[0].services, "beat");
        // Configured on one host only: no problem, even while it moves.
        let configured = [("a", all[0].0.clone()), ("c", all[2].0.clone())];
        assert!(singleton_problems(configured).is_empty());
    }

    #[test]
    fn a_fleet_file_is_checked_whole() {
        let def = parse(
            r#"
            max_parallel = "50%"
            first_wave = 1
            failure_budget = 1
            pause = "30s"
            [[hosts]]
            url = "https://10.0.0.11:8443/"
            ca_cert = "deploy/ca.pem"
            app = "shop"
            label = "web"
            [[hosts]]
            name = "jobs-1"
            url = "https://jobs-1.example.com:8443"
            pin_sha256 = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89"
            app = "shop"
            "#,
        );
        let fleet = def.check("prod", "", Path::new("/repo")).unwrap();
        assert_eq!(fleet.hosts[0].name, "10.0.0.11:8443");
        assert_eq!(fleet.hosts[0].url, "https://10.0.0.11:8443");
        assert_eq!(
            fleet.hosts[0].trust,
            Trust::Ca(PathBuf::from("/repo/deploy/ca.pem"))
        );
        assert!(matches!(fleet.hosts[1].trust, Trust::Pin(_)));
        assert_eq!(fleet.max_parallel, Parallel::Percent(50));
        assert_eq!((fleet.first_wave, fleet.failure_budget), (1, 1));
        assert_eq!(fleet.pause, Duration::from_secs(30));
    }

    #[test]
    fn every_problem_is_reported_with_its_key_path() {
        let def = parse(
            r#"
            max_parallel = "150%"
            first_wave = 3
            failure_budget = 2
            pause = "soon"
            [[hosts]]
            url = "http://web-1:8443"
            app = "Shop"
            [[hosts]]
            name = "web 2"
            url = "https://web-2:8443"
            ca_cert = "ca.pem"
            pin_sha256 = "00"
            app = "shop"
            "#,
        );
        assert_eq!(
            problems(&def, "fleets.prod"),
            [
                "fleets.prod.hosts[0].url: must be https://host[:port], the agent's API",
                "fleets.prod.hosts[0].name: 1-64 of a-z, A-Z, 0-9, '.', ':' and '-'",
                "fleets.prod.hosts[0].app: an app name: 1-32 of a-z, 0-9 and -, starting with a letter",
                "fleets.prod.hosts[1].name: 1-64 of a-z, A-Z, 0-9, '.', ':' and '-'",
                "fleets.prod.hosts[1]: ca_cert or pin_sha256, not both",
                "fleets.prod.max_parallel: a number of hosts, or a share from \"1%\" to \"100%\"",
                "fleets.prod.first_wave: more hosts than the fleet has",
                "fleets.prod.failure_budget: must be below the number of hosts: some host has to succeed",
                "fleets.prod.pause: a duration such as \"30s\" or \"2m\"",
            ]
        );
    }

    #[test]
    fn names_and_agents_are_not_repeated() {
        let def = parse(
            r#"
            max_parallel = 0
            [[hosts]]
            url = "https://web-1:8443"
            app = "shop"
            [[hosts]]
            name = "web-1:8443"
            url = "https://web-1:8443"
            app = "shop"
            "#,
        );
        assert_eq!(
            problems(&def, ""),
            [
                "hosts[1].name: another host has this name (names default to the URL's host and port)",
                "hosts[1]: the same app on the same agent twice",
                "max_parallel: at least 1 host",
            ]
        );
        assert!(parse("").check("x", "", Path::new(".")).is_err());
    }
}
