//! Deploying and rolling back a fleet as one deployment.
//!
//! 1. Preflight, every host at once: reachable, token accepted, app not
//!    locked, nothing running, no singleton on two hosts; drift shown.
//! 2. Lock every host for the fleet deployment. The lock names it, so a
//!    second fleet or a single-host deployment is refused, and the token
//!    that took it makes the rest of this host's part without being spent
//!    again (tokens are single use per host).
//! 3. Prepare every host at once (pull and pin); all must resolve the tag
//!    to one digest, or nothing starts.
//! 4. Waves: the first host alone with the `once` tasks (migrate), the rest
//!    of the first wave, then `max_parallel` at a time, pausing between.
//! 5. Past the failure budget: no further host starts, hosts in flight
//!    end, and every host this deployment changed goes back to the release
//!    it ran before, in parallel.
//! 6. Unlock every host.
//!
//! Everything a resumed run needs is on the hosts: the lock names the
//! fleet deployment and its release, and each host's record of its part
//! says what it ran before. A deployctl that dies leaves the hosts locked;
//! `deploy --fleet --resume` or `rollback --fleet` finishes the job.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use deployd_proto::{
    AppStatus, CommitSha, DeployRequest, Deployment, DeploymentKind, DeploymentPage,
    DeploymentState, FleetLock, FleetPart, LockRequest, PrepareRequest, PrepareState, Prepared,
    RollbackRequest, SchemaRollback, Scope, WhoAmI,
};
use futures_util::future::join_all;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use reqwest::Method;
use serde::Serialize;
use tokio::sync::Notify;

use super::plan::{HostEnd, fleet_exit, ordered_waves, over_budget};
use super::{Fleet, Host, Move};
use crate::client::Client;
use crate::exit::{CliError, Exit};
use crate::follow::{HostView, Style, follow_host};
use crate::settings::Global;

/// How long every host together may take to prepare (pull).
const PREPARE_FOR: Duration = Duration::from_secs(30 * 60);

/// One host of the fleet and its client.
struct Member {
    host: Host,
    client: Client,
}

/// What preflight saw of one host.
#[derive(Debug, Clone)]
struct Seen {
    status: AppStatus,
    /// Its recent deployments, newest first.
    history: Vec<Deployment>,
}

impl Seen {
    /// Its latest part of fleet deployment `id` of `kind`.
    fn part_of_kind(&self, id: &str, kind: DeploymentKind) -> Option<&Deployment> {
        self.history
            .iter()
            .find(|d| d.kind == kind && d.fleet.as_ref().is_some_and(|f| f.id == id))
    }

    /// Its latest part of fleet deployment `id`.
    fn part_of(&self, id: &str) -> Option<&Deployment> {
        self.history
            .iter()
            .find(|d| d.fleet.as_ref().is_some_and(|f| f.id == id))
    }
}

/// What a fleet deployment asks for.
#[derive(Debug)]
pub struct DeployOptions {
    pub sha: CommitSha,
    pub reason: Option<String>,
    /// Refuse when the hosts run different releases.
    pub require_same: bool,
    /// Finish the fleet deployment that holds the hosts' locks.
    pub resume: bool,
    /// Every host goes on past migrations that break the running release.
    pub allow_unsafe_migrations: bool,
    pub json: bool,
}

/// How one host's part ended.
#[derive(Debug, Clone, Serialize)]
struct Outcome {
    host: String,
    deployment: Option<String>,
    state: Option<String>,
    error: Option<String>,
    /// For a host the fleet reverted: how the revert ended.
    reverted: Option<String>,
    /// Its lock stays: its part's end is not known, or lifting it failed.
    locked: bool,
}

impl Outcome {
    /// A host's line: its part's record and end, or `none` if it has none.
    fn of(host: &str, ended: Option<&Ended>, none: &str) -> Self {
        let mut outcome = Self {
            host: host.to_owned(),
            deployment: None,
            state: None,
            error: None,
            reverted: None,
            locked: false,
        };
        match ended {
            None => outcome.state = Some(none.to_owned()),
            Some((d, result)) => {
                outcome.deployment = d.as_ref().map(|d| d.id.0.clone());
                match result {
                    Ok(state) => outcome.state = Some(state.as_str().to_owned()),
                    Err(e) => outcome.error = Some(e.message.clone()),
                }
            }
        }
        outcome
    }
}

/// What `--json` prints last.
#[derive(Debug, Serialize)]
struct Summary<'a> {
    fleet: &'a str,
    id: &'a str,
    kind: &'a str,
    sha: &'a str,
    outcome: &'a str,
    hosts: Vec<Outcome>,
}

/// Output for a fleet: notes (stderr, or nothing with `--json`) and the
/// live table's rows.
struct Out {
    json: bool,
    style: Style,
    table: Option<MultiProgress>,
    name: String,
}

impl Out {
    fn new(fleet: &Fleet, json: bool) -> Self {
        let style = Style::pick(json);
        Self {
            json,
            style,
            table: (style == Style::Live).then(MultiProgress::new),
            name: fleet.name.clone(),
        }
    }

    fn note(&self, line: &str) {
        if self.json {
            return;
        }
        let line = format!("fleet {}: {line}", self.name);
        match &self.table {
            Some(table) => {
                let _ = table.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    /// How one host's deployment is shown.
    fn view(&self, host: &str, wave: &str) -> HostView {
        let row = self.table.as_ref().map(|table| {
            let row = table.add(ProgressBar::new_spinner());
            row.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed:.dim}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            row.set_message(format!("{host:<20} {wave:<8} starting"));
            row.enable_steady_tick(Duration::from_millis(120));
            row
        });
        HostView {
            host: host.to_owned(),
            row,
            wave: wave.to_owned(),
            once_done: None,
        }
    }

    fn end_row(view: &HostView, state: &str) {
        if let Some(row) = &view.row {
            row.set_style(
                ProgressStyle::with_template("  {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            row.finish_with_message(format!("{:<20} {:<8} {state}", view.host, view.wave));
        }
    }
}

/// Connects to every host (no request yet).
fn connect(global: &Global, fleet: &Fleet) -> Result<Vec<Member>, CliError> {
    fleet
        .hosts
        .iter()
        .map(|host| {
            Ok(Member {
                host: host.clone(),
                client: host.client(global)?,
            })
        })
        .collect()
}

impl Member {
    fn app(&self) -> &str {
        &self.host.app
    }

    /// Status, history and whether the token may `scope` the app.
    async fn look(&self, scope: Scope) -> Result<Seen, CliError> {
        let app = self.app();
        let who: WhoAmI = self.client.get("/v1/whoami").await?;
        let may = who
            .grants
            .iter()
            .any(|g| g.scopes.contains(&scope) && g.apps.iter().any(|a| a == "*" || a == app));
        if !may {
            return Err(CliError::new(
                Exit::Auth,
                format!("the token ({}) may not {scope:?} {app}", who.subject).to_lowercase(),
            ));
        }
        let status: AppStatus = self.client.get(&format!("/v1/apps/{app}/status")).await?;
        let page: DeploymentPage = self
            .client
            .get(&format!("/v1/apps/{app}/deployments?limit=50"))
            .await?;
        Ok(Seen {
            status,
            history: page.deployments,
        })
    }

    async fn lock(&self, lock: &FleetLock, reason: &str) -> Result<(), CliError> {
        let body = LockRequest {
            reason: reason.to_owned(),
            fleet: Some(lock.clone()),
        };
        let _: deployd_proto::AppLock = self
            .client
            .call(Method::PUT, &format!("/v1/apps/{}/lock", self.app()), &body)
            .await?;
        Ok(())
    }

    async fn unlock(&self, id: &str) -> Result<(), CliError> {
        self.client
            .call_empty(
                Method::DELETE,
                &format!("/v1/apps/{}/lock?fleet={id}", self.app()),
            )
            .await
    }

    /// Pulls and pins `sha`, asking until it ends.
    async fn prepare(&self, sha: &CommitSha) -> Result<String, CliError> {
        let body = PrepareRequest { sha: sha.clone() };
        let path = format!("/v1/apps/{}/prepare", self.app());
        let deadline = tokio::time::Instant::now() + PREPARE_FOR;
        loop {
            let prepared: Prepared = self.client.call(Method::POST, &path, &body).await?;
            match prepared.state {
                PrepareState::Ready => {
                    return prepared
                        .digest
                        .ok_or_else(|| CliError::new(Exit::Other, "the agent prepared no digest"));
                }
                PrepareState::Failed => {
                    return Err(CliError::new(
                        Exit::Failed,
                        prepared
                            .error
                            .unwrap_or_else(|| "the pull failed".to_owned()),
                    ));
                }
                PrepareState::Pulling if tokio::time::Instant::now() > deadline => {
                    return Err(CliError::new(
                        Exit::Failed,
                        format!("still pulling after {} s", PREPARE_FOR.as_secs()),
                    ));
                }
                PrepareState::Pulling => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    /// POSTs a deployment or rollback.
    async fn post(&self, path: &str, body: &impl Serialize) -> Result<Deployment, CliError> {
        self.client
            .call::<Deployment>(Method::POST, path, body)
            .await
    }

    /// A refusal because a part of the same fleet deployment already runs
    /// here (another deployctl resumed it too): that part, to follow.
    async fn or_ours(
        &self,
        posted: Result<Deployment, CliError>,
        fleet: Option<&FleetPart>,
    ) -> Result<Deployment, CliError> {
        let (Err(e), Some(fleet)) = (&posted, fleet) else {
            return posted;
        };
        let Some(running) = e.running.as_deref().filter(|_| e.exit == Exit::Conflict) else {
            return posted;
        };
        match self
            .client
            .get::<Deployment>(&format!("/v1/deployments/{running}"))
            .await
        {
            Ok(d) if d.fleet.as_ref().is_some_and(|f| f.id == fleet.id) => Ok(d),
            _ => posted,
        }
    }

    /// Starts this host's part and follows it to its end.
    async fn run_part(&self, request: Part, out: &Out, view: HostView) -> Ended {
        let app = self.app();
        let started = match request {
            Part::Deploy(body) => {
                let posted = self
                    .post(&format!("/v1/apps/{app}/deployments"), &body)
                    .await;
                self.or_ours(posted, body.fleet.as_ref()).await
            }
            Part::Rollback(body) => self.post(&format!("/v1/apps/{app}/rollback"), &body).await,
            Part::Follow(id) => {
                self.client
                    .get::<Deployment>(&format!("/v1/deployments/{id}"))
                    .await
            }
        };
        let deployment = match started {
            Ok(d) => d,
            Err(e) => {
                Out::end_row(&view, "refused");
                return (None, Err(e));
            }
        };
        out.note(&format!(
            "{}: {} {} started ({})",
            self.host.name, deployment.kind, deployment.sha, deployment.id
        ));
        let ended = follow_host(
            &self.client,
            &deployment.id.0,
            out.style,
            Some(view.clone()),
        )
        .await;
        Out::end_row(
            &view,
            &match &ended {
                Ok(state) => state.as_str().to_owned(),
                Err(e) => e.message.clone(),
            },
        );
        (Some(deployment), ended)
    }
}

/// How a host's part ended: its record (if it started) and final state.
type Ended = (Option<Deployment>, Result<DeploymentState, CliError>);

/// What a host is asked to do.
enum Part {
    Deploy(DeployRequest),
    Rollback(RollbackRequest),
    /// A part already running (a resumed fleet deployment).
    Follow(String),
}

/// The worse of two exit codes for a preflight refusal.
fn worse(a: Exit, b: Exit) -> Exit {
    let rank = |e: Exit| match e {
        Exit::Conflict => 3,
        Exit::Auth => 2,
        Exit::Unreachable => 1,
        _ => 0,
    };
    if rank(b) > rank(a) { b } else { a }
}

/// A fresh fleet deployment id.
fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Preflight: every host looked at; problems refuse the fleet deployment.
struct Preflight {
    seen: Vec<Seen>,
    /// The fleet deployment of this fleet that holds the hosts' locks.
    held: Option<FleetLock>,
}

/// What every host looked like, and what is in the way of a fleet
/// deployment: one reading for `fleet check` and for preflight.
pub(crate) struct Assessment {
    /// What is in the way on each host, in the fleet's order.
    pub hosts: Vec<Vec<String>>,
    /// Problems of the fleet as a whole.
    pub fleet: Vec<String>,
    /// The fleet deployment of this fleet that holds the hosts' locks:
    /// one to resume or revert.
    pub held: Option<FleetLock>,
    /// The hosts' live releases, when they differ.
    pub drift: Option<String>,
    /// The exit code a refusal gets.
    pub exit: Exit,
}

impl Assessment {
    /// Every problem, each host's named.
    fn problems(&self, members: &[Member]) -> Vec<String> {
        let mut problems: Vec<String> = members
            .iter()
            .zip(&self.hosts)
            .flat_map(|(m, host)| host.iter().map(|p| format!("{}: {p}", m.host.name)))
            .collect();
        problems.extend(self.fleet.iter().cloned());
        problems
    }
}

fn assess(fleet: &Fleet, looked: &[Result<Seen, CliError>]) -> Assessment {
    let mut a = Assessment {
        hosts: vec![Vec::new(); looked.len()],
        fleet: Vec::new(),
        held: None,
        drift: None,
        exit: Exit::Other,
    };
    let names: Vec<&str> = fleet.hosts.iter().map(|h| h.name.as_str()).collect();
    // The hosts' locks: this fleet's own deployment (to resume or revert),
    // or another holder.
    for (i, look) in looked.iter().enumerate() {
        let s = match look {
            Ok(s) => s,
            Err(e) => {
                a.exit = worse(a.exit, e.exit);
                a.hosts[i].push(e.message.clone());
                continue;
            }
        };
        let Some(lock) = &s.status.lock else { continue };
        match &lock.fleet {
            Some(f) if f.name == fleet.name => {
                if let Some(held) = a.held.as_ref().filter(|h| h.id != f.id) {
                    a.hosts[i].push(format!(
                        "locked for fleet deployment {}, other hosts for {}",
                        f.id, held.id
                    ));
                    a.exit = Exit::Conflict;
                }
                a.held.get_or_insert_with(|| f.clone());
            }
            _ => {
                a.hosts[i].push(format!("locked by {}: {}", lock.locked_by, lock.reason));
                a.exit = Exit::Conflict;
            }
        }
    }
    for (i, look) in looked.iter().enumerate() {
        let Ok(s) = look else { continue };
        if let Some(running) = &s.status.running_deployment {
            let ours = a
                .held
                .as_ref()
                .is_some_and(|h| s.part_of(&h.id).is_some_and(|d| d.id == *running));
            if !ours {
                a.hosts[i].push(format!("deployment {running} is running"));
                a.exit = Exit::Conflict;
            }
        }
    }
    a.fleet.extend(super::singleton_problems(
        looked.iter().zip(&names).filter_map(|(look, name)| {
            look.as_ref()
                .ok()
                .map(|s| (*name, super::singletons(&s.status).0))
        }),
    ));
    let singletons: Vec<(Vec<&str>, Vec<&str>)> = looked
        .iter()
        .map(|look| {
            look.as_ref()
                .map(|s| super::singletons(&s.status))
                .unwrap_or_default()
        })
        .collect();
    let all: Vec<usize> = (0..looked.len()).collect();
    let pairs = super::move_pairs(&super::singleton_moves(&singletons));
    if ordered_waves(&all, fleet.first_wave, fleet.max_parallel, &pairs).is_none() {
        a.fleet
            .push("singletons trade places between hosts: move one per deployment".into());
    }
    let lives: Vec<(&str, String)> = looked
        .iter()
        .zip(&names)
        .filter_map(|(look, name)| {
            let live = look.as_ref().ok()?.status.live_sha.as_ref();
            Some((*name, live.map_or("none".to_owned(), ToString::to_string)))
        })
        .collect();
    let mut distinct: Vec<&str> = lives.iter().map(|(_, sha)| sha.as_str()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() > 1 {
        let each: Vec<String> = lives.iter().map(|(h, sha)| format!("{h} {sha}")).collect();
        a.drift = Some(format!(
            "drift: the hosts run {} releases ({})",
            distinct.len(),
            each.join(", ")
        ));
    }
    a
}

/// Looks at every host of a fleet at once, as the deployment would with
/// `scope`: for `fleet check`.
pub(crate) async fn inspect(
    global: &Global,
    fleet: &Fleet,
    scope: Scope,
) -> Result<(Vec<Option<AppStatus>>, Assessment), CliError> {
    let members = connect(global, fleet)?;
    let looked = join_all(members.iter().map(|m| m.look(scope))).await;
    let assessment = assess(fleet, &looked);
    let statuses = looked
        .into_iter()
        .map(|l| l.ok().map(|s| s.status))
        .collect();
    Ok((statuses, assessment))
}

async fn preflight(
    members: &[Member],
    fleet: &Fleet,
    scope: Scope,
    out: &Out,
    require_same: bool,
) -> Result<Preflight, CliError> {
    let looked = join_all(members.iter().map(|m| m.look(scope))).await;
    let a = assess(fleet, &looked);
    let mut problems = a.problems(members);
    if let Some(drift) = &a.drift {
        if require_same {
            problems.push(format!("{drift}; --require-same refuses it"));
        } else {
            out.note(drift);
        }
    }
    if !problems.is_empty() {
        return Err(refusal(fleet, &problems, a.exit));
    }
    let seen = looked.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(Preflight { seen, held: a.held })
}

/// The waves for the hosts still to do, and the singleton moves among
/// them. A singleton (beat) moving between hosts is stopped where it
/// leaves before it starts where it arrives: that host goes first, and the
/// other waits for it (see [`startable`]).
fn plan(
    fleet: &Fleet,
    todo: &[usize],
    seen: &[Seen],
    members: &[Member],
    out: &Out,
) -> Result<(Vec<Vec<usize>>, Vec<Move>), CliError> {
    let singletons: Vec<_> = seen.iter().map(|s| super::singletons(&s.status)).collect();
    let moves = super::singleton_moves(&singletons);
    for m in &moves {
        out.note(&format!(
            "{} moves from {} to {}: {} stops it first",
            m.services,
            members[m.from].host.name,
            members[m.to].host.name,
            members[m.from].host.name
        ));
    }
    let pairs = super::move_pairs(&moves);
    // Preflight refused a cycle, and the hosts to do are some of those.
    let waves = ordered_waves(todo, fleet.first_wave, fleet.max_parallel, &pairs)
        .ok_or_else(|| CliError::new(Exit::Other, "singletons trade places between hosts"))?;
    Ok((waves, moves))
}

/// The hosts of `wave` that may start, and how many may not: a host that
/// would start a singleton still running on a host whose part did not
/// succeed in this run (`ran`) is held back, and said so.
fn startable(
    wave: &[usize],
    moves: &[Move],
    ran: &[bool],
    members: &[Member],
    out: &Out,
) -> (Vec<usize>, usize) {
    let mut start = Vec::new();
    let mut held = 0;
    for &i in wave {
        match moves.iter().find(|m| m.to == i && !ran[m.from]) {
            Some(m) => {
                out.note(&format!(
                    "{}: not started: {} still runs on {}, whose part did not succeed here",
                    members[i].host.name, m.services, members[m.from].host.name
                ));
                held += 1;
            }
            None => start.push(i),
        }
    }
    (start, held)
}

fn refusal(fleet: &Fleet, problems: &[String], exit: Exit) -> CliError {
    let mut message = format!("fleet {}: nothing was changed:", fleet.name);
    for p in problems {
        let _ = write!(message, "\n  {p}");
    }
    let error = CliError::new(exit, message);
    if exit == Exit::Conflict {
        error.hint(
            "a fleet deployment that deployctl left behind is finished by `deployctl deploy <sha> --fleet NAME --resume` or `deployctl rollback --fleet NAME`",
        )
    } else {
        error
    }
}

/// Locks every host for `lock`. On any refusal, lifts the locks this run
/// took, unless the hosts were already held for it (`held`: a resumed
/// fleet deployment keeps its locks whatever happens).
async fn lock_all(
    members: &[Member],
    lock: &FleetLock,
    out: &Out,
    held: bool,
) -> Result<(), CliError> {
    let what = if lock.rollback {
        "rollback"
    } else {
        "deployment"
    };
    let reason = format!("fleet {what} {} of {}", lock.id, lock.sha);
    let locked = join_all(members.iter().map(|m| m.lock(lock, &reason))).await;
    let mut problems = Vec::new();
    let mut exit = Exit::Other;
    for (m, r) in members.iter().zip(&locked) {
        if let Err(e) = r {
            exit = worse(exit, e.exit);
            problems.push(format!("{}: {}", m.host.name, e.message));
        }
    }
    if problems.is_empty() {
        out.note(&format!(
            "{} hosts locked for fleet {what} {}",
            members.len(),
            lock.id
        ));
        return Ok(());
    }
    let mut message = format!("fleet {what} {}: locking failed:", lock.id);
    for p in problems {
        let _ = write!(message, "\n  {p}");
    }
    if held {
        let _ = write!(
            message,
            "\nthe hosts stay locked for it; nothing else was changed"
        );
        return Err(CliError::new(exit, message));
    }
    let taken: Vec<&Member> = members
        .iter()
        .zip(&locked)
        .filter(|(_, r)| r.is_ok())
        .map(|(m, _)| m)
        .collect();
    let lifted = join_all(taken.iter().map(|m| m.unlock(&lock.id))).await;
    let stuck: Vec<&str> = taken
        .iter()
        .zip(lifted)
        .filter(|(_, r)| r.is_err())
        .map(|(m, _)| m.host.name.as_str())
        .collect();
    if stuck.is_empty() {
        let _ = write!(message, "\nnothing was changed");
    } else {
        let _ = write!(
            message,
            "\nnothing was deployed, but these hosts stay locked for it: {} (deployctl unlock)",
            stuck.join(", ")
        );
    }
    Err(CliError::new(exit, message))
}

/// Lifts the lock of fleet deployment `id` on every host whose part has a
/// known end; returns the hosts whose lock stays (said on stderr, also
/// with `--json`). A host whose part's end is unknown keeps its lock, so
/// that nothing else starts there before `--resume` or `rollback --fleet`.
async fn unlock_all(
    members: &[Member],
    id: &str,
    out: &Out,
    outcomes: &[Option<Ended>],
) -> Vec<usize> {
    let unknown = |i: usize| matches!(outcomes.get(i), Some(Some((_, Err(_)))));
    let lifted = join_all(
        members
            .iter()
            .enumerate()
            .filter(|&(i, _)| !unknown(i))
            .map(|(i, m)| async move { (i, m.unlock(id).await) }),
    )
    .await;
    let mut kept: Vec<usize> = (0..members.len()).filter(|&i| unknown(i)).collect();
    for i in &kept {
        eprintln!(
            "fleet {}: {}: stays locked for fleet deployment {id}: its part's end is not known \
             (finish it: --resume, or rollback --fleet)",
            out.name, members[*i].host.name
        );
    }
    for (i, r) in lifted {
        if let Err(e) = r {
            eprintln!(
                "fleet {}: {}: its lock stays: {} (deployctl unlock)",
                out.name, members[i].host.name, e.message
            );
            kept.push(i);
        }
    }
    kept
}

/// Prepares every host; the one digest they all resolved `sha` to.
async fn prepare_all(
    members: &[Member],
    sha: &CommitSha,
    out: &Out,
) -> Result<String, Vec<String>> {
    out.note(&format!("preparing {sha} on {} hosts", members.len()));
    let prepared = join_all(members.iter().map(|m| m.prepare(sha))).await;
    let mut problems = Vec::new();
    let mut digests: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (m, p) in members.iter().zip(&prepared) {
        match p {
            Ok(digest) => digests.entry(digest).or_default().push(&m.host.name),
            Err(e) => problems.push(format!("{}: {}", m.host.name, e.message)),
        }
    }
    if digests.len() > 1 {
        for (digest, on) in &digests {
            problems.push(format!("{} resolved {sha} to {digest}", on.join(", ")));
        }
        problems.push("every host must deploy the same image".to_owned());
    }
    match (problems.is_empty(), digests.keys().next()) {
        (true, Some(digest)) => {
            out.note(&format!("every host resolved {sha} to {digest}"));
            Ok((*digest).to_owned())
        }
        _ => Err(problems),
    }
}

/// `deployctl deploy <sha> --fleet NAME`.
pub async fn deploy(global: &Global, fleet: &Fleet, o: DeployOptions) -> Result<Exit, CliError> {
    let out = Out::new(fleet, o.json);
    let members = connect(global, fleet)?;
    let pre = preflight(&members, fleet, Scope::Deploy, &out, o.require_same).await?;
    let lock = match (&pre.held, o.resume) {
        (Some(held), true) if held.rollback => {
            return Err(CliError::new(
                Exit::Conflict,
                format!(
                    "fleet {}: a fleet rollback ({}) holds the hosts",
                    fleet.name, held.id
                ),
            )
            .hint(format!(
                "finish it: deployctl rollback --fleet {}",
                fleet.name
            )));
        }
        (Some(held), true) if held.sha != o.sha => {
            return Err(CliError::usage(format!(
                "fleet {}: the fleet deployment to resume ({}) ships {}, not {}",
                fleet.name, held.id, held.sha, o.sha
            )));
        }
        (Some(held), true) => {
            out.note(&format!("resuming fleet deployment {}", held.id));
            held.clone()
        }
        (Some(held), false) => {
            return Err(CliError::new(
                Exit::Conflict,
                format!(
                    "fleet {}: fleet deployment {} of {} holds the hosts",
                    fleet.name, held.id, held.sha
                ),
            )
            .hint(if held.rollback {
                format!("finish it: deployctl rollback --fleet {}", fleet.name)
            } else {
                format!(
                    "finish it: deployctl deploy {} --fleet {} --resume, or deployctl rollback --fleet {}",
                    held.sha, fleet.name, fleet.name
                )
            }));
        }
        (None, true) => {
            return Err(CliError::usage(format!(
                "fleet {}: there is no fleet deployment to resume (no host is locked for one)",
                fleet.name
            )));
        }
        (None, false) => FleetLock {
            id: new_id(),
            name: fleet.name.clone(),
            sha: o.sha.clone(),
            rollback: false,
        },
    };
    let id = lock.id.clone();
    let resumed = pre.held.is_some();
    lock_all(&members, &lock, &out, resumed).await?;
    let digest = match prepare_all(&members, &o.sha, &out).await {
        Ok(digest) => digest,
        Err(mut problems) => {
            // A resumed deployment keeps its hosts locked: it changed some.
            if resumed {
                problems.push(format!("the hosts stay locked for fleet deployment {id}"));
            } else {
                unlock_all(&members, &id, &out, &[]).await;
            }
            return Err(refusal(fleet, &problems, Exit::Failed));
        }
    };

    // Hosts still to do, in the fleet's order: a resumed deployment skips
    // the hosts whose part succeeded and follows those still running.
    let mut outcomes: Vec<Option<Ended>> = (0..members.len()).map(|_| None).collect();
    let mut todo = Vec::new();
    let mut once_done = false;
    for (i, s) in pre.seen.iter().enumerate() {
        match s.part_of(&id) {
            Some(d)
                if d.state == DeploymentState::Succeeded && d.kind == DeploymentKind::Deploy =>
            {
                once_done |= d.fleet.as_ref().is_some_and(|f| f.once_tasks);
                out.note(&format!("{}: done before ({})", members[i].host.name, d.id));
                outcomes[i] = Some((Some(d.clone()), Ok(DeploymentState::Succeeded)));
            }
            _ => todo.push(i),
        }
    }
    let (plan, moves) = plan(fleet, &todo, &pre.seen, &members, &out)?;
    let mut ran = vec![false; members.len()];
    let part_for = |i: usize, once: bool| {
        let running = pre.seen[i]
            .part_of(&id)
            .filter(|d| !d.state.is_terminal())
            .map(|d| d.id.0.clone());
        match running {
            Some(running) => Part::Follow(running),
            None => Part::Deploy(DeployRequest {
                sha: o.sha.clone(),
                force: false,
                reason: o.reason.clone(),
                digest: Some(digest.clone()),
                fleet: Some(FleetPart {
                    id: id.clone(),
                    host: members[i].host.name.clone(),
                    once_tasks: once,
                }),
                plan: None,
                allow_unsafe_migrations: o.allow_unsafe_migrations,
                // A fleet moves host by host; a canary is one host's.
                canary: Some(false),
            }),
        }
    };
    let mut failures = 0usize;
    for (n, wave) in plan.iter().enumerate() {
        if n > 0 && !fleet.pause.is_zero() {
            out.note(&format!("pausing {} s", fleet.pause.as_secs()));
            tokio::time::sleep(fleet.pause).await;
        }
        let label = format!("wave {}", n + 1);
        let start = |i: usize, once: bool, view: HostView| {
            members[i].run_part(part_for(i, once), &out, view)
        };
        let (wave, held_back) = startable(wave, &moves, &ran, &members, &out);
        failures += held_back;
        let mut ended: Vec<(usize, Ended)> = Vec::new();
        let mut stop = false;
        if n == 0 && !once_done {
            // The host that runs the once tasks (migrate) starts first; the
            // rest of its wave starts once those are done, so no host runs
            // the new code before its schema exists.
            let (first, rest) = (wave[0], &wave[1..]);
            let tasks_done = Arc::new(Notify::new());
            let mut view = out.view(&members[first].host.name, &label);
            view.once_done = Some(Arc::clone(&tasks_done));
            let first_part = start(first, true, view);
            tokio::pin!(first_part);
            let early = tokio::select! {
                result = &mut first_part => Some(result),
                () = tasks_done.notified() => None,
            };
            let others = || {
                join_all(
                    rest.iter()
                        .map(|&i| start(i, false, out.view(&members[i].host.name, &label))),
                )
            };
            match early {
                Some(result) if !matches!(result.1, Ok(DeploymentState::Succeeded)) => {
                    out.note(&format!(
                        "{}: the host running the once tasks failed: no other host starts",
                        members[first].host.name
                    ));
                    ended.push((first, result));
                    stop = true;
                }
                Some(result) => {
                    ended.push((first, result));
                    ended.extend(rest.iter().copied().zip(others().await));
                }
                None => {
                    let (result, rest_ended) = tokio::join!(first_part, others());
                    ended.push((first, result));
                    ended.extend(rest.iter().copied().zip(rest_ended));
                }
            }
        } else {
            let parts = wave
                .iter()
                .map(|&i| start(i, false, out.view(&members[i].host.name, &label)));
            ended.extend(wave.iter().copied().zip(join_all(parts).await));
        }
        for (i, result) in ended {
            if matches!(result.1, Ok(DeploymentState::Succeeded)) {
                once_done = true;
                ran[i] = true;
            } else {
                failures += 1;
            }
            outcomes[i] = Some(result);
        }
        if stop || over_budget(failures, fleet.failure_budget) {
            stop = true;
        }
        if stop {
            break;
        }
    }

    let over = over_budget(failures, fleet.failure_budget) || outcomes.iter().any(Option::is_none);
    // A host this deployment moved to the release, as the revert sees it:
    // the release to go back to, or why it cannot.
    let mut reverted: BTreeMap<usize, Result<DeploymentState, CliError>> = BTreeMap::new();
    if over {
        let mut changed: Vec<(usize, CommitSha)> = Vec::new();
        for (i, o) in outcomes.iter().enumerate() {
            let Some((Some(d), Ok(DeploymentState::Succeeded))) = o else {
                continue;
            };
            match &d.previous_sha {
                // Already on the release before: nothing moved.
                Some(previous) if *previous == d.sha => {
                    reverted.insert(i, Ok(DeploymentState::Succeeded));
                }
                Some(previous) => changed.push((i, previous.clone())),
                None => {
                    reverted.insert(
                        i,
                        Err(CliError::new(
                            Exit::RollbackFailed,
                            "it ran no release before: nothing to go back to",
                        )),
                    );
                }
            }
        }
        out.note(&format!(
            "{failures} host(s) failed, past the failure budget of {}: reverting {} host(s)",
            fleet.failure_budget,
            changed.len()
        ));
        // The locks say the fleet deployment is being reverted: a deployctl
        // that dies now is finished by `rollback --fleet`, not `--resume`.
        let reverting = FleetLock {
            rollback: true,
            ..lock.clone()
        };
        if let Err(e) = lock_all(&members, &reverting, &out, true).await {
            out.note(&e.message);
        }
        let reverts = changed.iter().map(|(i, previous)| {
            let m = &members[*i];
            let part = Part::Rollback(RollbackRequest {
                // Undoing its own change, as a host's own rollback does:
                // the migrations stay applied, unchecked, as before.
                schema: SchemaRollback::Force,
                to: Some(previous.clone()),
                reason: Some(format!("fleet deployment {id} reverted")),
                skip_tasks: false,
                fleet: Some(FleetPart {
                    id: id.clone(),
                    host: m.host.name.clone(),
                    once_tasks: false,
                }),
            });
            m.run_part(part, &out, out.view(&m.host.name, "revert"))
        });
        let ended = join_all(reverts).await;
        for ((i, _), (_, state)) in changed.iter().zip(ended) {
            reverted.insert(*i, state);
        }
    }
    let kept = unlock_all(&members, &id, &out, &outcomes).await;

    let mut hosts = Vec::new();
    let mut ends = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let mut outcome = Outcome::of(&m.host.name, outcomes[i].as_ref(), "not started");
        let end = match &outcomes[i] {
            None => HostEnd::NotStarted,
            Some((_, Ok(DeploymentState::Succeeded))) => HostEnd::Succeeded,
            Some((_, Ok(DeploymentState::Failed))) => HostEnd::Failed,
            Some((_, Ok(DeploymentState::RolledBack))) => HostEnd::RolledBack,
            Some((_, Ok(DeploymentState::RollbackFailed))) => HostEnd::RollbackFailed,
            Some(_) => HostEnd::Unknown,
        };
        let revert = reverted.get(&i).map(|r| {
            outcome.reverted = Some(match r {
                Ok(state) => state.as_str().to_owned(),
                Err(e) => e.message.clone(),
            });
            matches!(r, Ok(DeploymentState::Succeeded))
        });
        ends.push((end, revert));
        outcome.locked = kept.contains(&i);
        hosts.push(outcome);
    }
    let exit = fleet_exit(&ends, fleet.failure_budget);
    let outcome = match exit {
        Exit::Success if failures > 0 => "succeeded within the failure budget",
        Exit::Success => "succeeded",
        Exit::Failed => {
            "failed before any host ran the release (each host's line says what it changed)"
        }
        Exit::RolledBack => "rolled back: every host runs its previous release",
        Exit::RollbackFailed => "rollback failed on a host: see its line",
        _ => "failed",
    };
    finish(
        &out,
        &Summary {
            fleet: &fleet.name,
            id: &id,
            kind: "deploy",
            sha: o.sha.as_str(),
            outcome,
            hosts,
        },
    )?;
    Ok(exit)
}

/// The worse of two outcomes' exit codes.
fn worst_exit(a: Exit, b: Exit) -> Exit {
    let rank = |e: Exit| match e {
        Exit::Success => 0,
        Exit::Failed => 1,
        Exit::RolledBack => 2,
        Exit::Other => 3,
        _ => 4,
    };
    if rank(b) > rank(a) { b } else { a }
}

/// The closing table (or JSON line).
fn finish(out: &Out, summary: &Summary<'_>) -> Result<(), CliError> {
    if out.json {
        let line = serde_json::to_string(summary)
            .map_err(|e| CliError::new(Exit::Other, format!("cannot print JSON: {e}")))?;
        println!("{line}");
        return Ok(());
    }
    let mut text = format!(
        "fleet {} {} {} ({}): {}\n",
        summary.fleet, summary.kind, summary.sha, summary.id, summary.outcome
    );
    let _ = writeln!(
        text,
        "  {:<20}  {:<16}  {:<20}  REVERTED",
        "HOST", "STATE", "DEPLOYMENT"
    );
    for h in &summary.hosts {
        let _ = writeln!(
            text,
            "  {:<20}  {:<16}  {:<20}  {}",
            h.host,
            h.state.as_deref().unwrap_or("-"),
            h.deployment
                .as_deref()
                .map_or("-", crate::commands::short_id),
            h.reverted.as_deref().unwrap_or("-")
        );
        if let Some(e) = &h.error {
            let _ = writeln!(text, "    {e}");
        }
        if h.locked {
            let _ = writeln!(text, "    still locked for {}", summary.id);
        }
    }
    eprint!("{text}");
    Ok(())
}

/// The release each host ran before its live one was deployed: the
/// previous release of the deployment that made it live.
fn before_live(seen: &Seen) -> Option<CommitSha> {
    let live = seen.status.live_sha.as_ref()?;
    seen.history
        .iter()
        .find(|d| {
            d.kind == DeploymentKind::Deploy
                && d.state == DeploymentState::Succeeded
                && d.sha == *live
                && d.previous_sha.as_ref().is_some_and(|p| p != live)
        })
        .and_then(|d| d.previous_sha.clone())
}

/// `deployctl rollback --fleet NAME [--to SHA]`: every host back to one
/// release, in the fleet's waves; or, when a fleet deployment deployctl
/// left behind holds the hosts, the revert of every host it changed.
pub async fn rollback(
    global: &Global,
    fleet: &Fleet,
    to: Option<CommitSha>,
    reason: Option<String>,
    json: bool,
) -> Result<Exit, CliError> {
    let out = Out::new(fleet, json);
    let members = connect(global, fleet)?;
    let pre = preflight(&members, fleet, Scope::Rollback, &out, false).await?;
    // A held fleet deployment with deploy parts is reverted; a held fleet
    // rollback is finished, to its own release.
    let reverting = pre.held.as_ref().filter(|held| {
        pre.seen
            .iter()
            .any(|s| s.part_of_kind(&held.id, DeploymentKind::Deploy).is_some())
    });
    let lock = match (&pre.held, reverting) {
        (Some(held), Some(_)) => {
            out.note(&format!(
                "reverting fleet deployment {} of {}, left unfinished",
                held.id, held.sha
            ));
            FleetLock {
                rollback: true,
                ..held.clone()
            }
        }
        (Some(held), None) => {
            if to.as_ref().is_some_and(|to| *to != held.sha) {
                return Err(CliError::usage(format!(
                    "fleet {}: fleet rollback {} to {} holds the hosts; finish it without --to",
                    fleet.name, held.id, held.sha
                )));
            }
            held.clone()
        }
        (None, _) => FleetLock {
            id: new_id(),
            name: fleet.name.clone(),
            sha: match &to {
                Some(to) => to.clone(),
                None => agreed_before(fleet, &members, &pre.seen)?,
            },
            rollback: true,
        },
    };
    let id = lock.id.clone();
    lock_all(&members, &lock, &out, pre.held.is_some()).await?;
    // Parts still running (a dead deployctl's) end first; then every host
    // is looked at again, to know what each now runs.
    let mut outcomes: Vec<Option<Ended>> = (0..members.len()).map(|_| None).collect();
    let running: Vec<(usize, String)> = pre
        .seen
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.part_of(&id)
                .filter(|d| !d.state.is_terminal())
                .map(|d| (i, d.id.0.clone()))
        })
        .collect();
    let follows = running.iter().map(|(i, running)| {
        let m = &members[*i];
        m.run_part(
            Part::Follow(running.clone()),
            &out,
            out.view(&m.host.name, "running"),
        )
    });
    for ((i, _), ended) in running.iter().zip(join_all(follows).await) {
        outcomes[*i] = Some(ended);
    }
    let seen = if running.is_empty() {
        pre.seen
    } else {
        let looked = join_all(members.iter().map(|m| m.look(Scope::Rollback))).await;
        looked.into_iter().collect::<Result<Vec<_>, _>>()?
    };
    // Per host: the release to go back to (none: it stays as it is).
    let targets: Vec<Option<CommitSha>> = seen
        .iter()
        .map(|s| {
            let target = if reverting.is_some() {
                // Only a host this deployment moved goes back, to what it ran
                // before; a host whose part failed restored itself.
                s.part_of_kind(&id, DeploymentKind::Deploy)
                    .filter(|d| d.state == DeploymentState::Succeeded)
                    .and_then(|d| d.previous_sha.clone())?
            } else {
                lock.sha.clone()
            };
            (s.status.live_sha.as_ref() != Some(&target)).then_some(target)
        })
        .collect();
    let todo: Vec<usize> = (0..members.len())
        .filter(|&i| targets[i].is_some())
        .collect();
    let (plan, moves) = plan(fleet, &todo, &seen, &members, &out)?;
    let mut ran = vec![false; members.len()];
    let mut failures = 0usize;
    for (n, wave) in plan.iter().enumerate() {
        if n > 0 && !fleet.pause.is_zero() {
            tokio::time::sleep(fleet.pause).await;
        }
        let label = format!("wave {}", n + 1);
        let (wave, held_back) = startable(wave, &moves, &ran, &members, &out);
        failures += held_back;
        let wave = &wave;
        let parts = wave.iter().map(|&i| {
            let m = &members[i];
            let part = Part::Rollback(RollbackRequest {
                schema: Default::default(),
                to: targets[i].clone(),
                reason: reason.clone(),
                skip_tasks: false,
                fleet: Some(FleetPart {
                    id: id.clone(),
                    host: m.host.name.clone(),
                    once_tasks: n == 0 && i == wave[0],
                }),
            });
            m.run_part(part, &out, out.view(&m.host.name, &label))
        });
        let ended = join_all(parts).await;
        for (&i, result) in wave.iter().zip(ended) {
            if matches!(result.1, Ok(DeploymentState::Succeeded)) {
                ran[i] = true;
            } else {
                failures += 1;
            }
            outcomes[i] = Some(result);
        }
        if over_budget(failures, fleet.failure_budget) {
            break;
        }
    }
    let kept = unlock_all(&members, &id, &out, &outcomes).await;
    let mut worst = Exit::Success;
    let hosts: Vec<Outcome> = members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let none = if targets[i].is_none() {
                "unchanged"
            } else {
                "not started"
            };
            let mut outcome = Outcome::of(&m.host.name, outcomes[i].as_ref(), none);
            outcome.locked = kept.contains(&i);
            let exit = match &outcomes[i] {
                None if targets[i].is_some() => Exit::RollbackFailed,
                None => Exit::Success,
                Some((_, Ok(state))) => crate::follow::exit_of(*state),
                Some((_, Err(_))) => Exit::Other,
            };
            worst = worst_exit(worst, exit);
            outcome
        })
        .collect();
    let outcome = if worst == Exit::Success {
        "every host runs the release"
    } else {
        "a host did not get there: see its line"
    };
    finish(
        &out,
        &Summary {
            fleet: &fleet.name,
            id: &id,
            kind: "rollback",
            sha: lock.sha.as_str(),
            outcome,
            hosts,
        },
    )?;
    Ok(worst)
}

/// The release every host ran before its live one, when they agree.
fn agreed_before(fleet: &Fleet, members: &[Member], seen: &[Seen]) -> Result<CommitSha, CliError> {
    let mut befores: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (m, s) in members.iter().zip(seen) {
        let before = before_live(s).map_or("none".to_owned(), |s| s.to_string());
        befores.entry(before).or_default().push(&m.host.name);
    }
    let mut agreed = befores.keys().filter(|k| *k != "none");
    match (agreed.next(), agreed.next(), befores.contains_key("none")) {
        (Some(sha), None, false) => sha
            .parse()
            .map_err(|_| CliError::new(Exit::Other, format!("a host reported sha {sha}"))),
        _ => {
            let each: Vec<String> = befores
                .iter()
                .map(|(sha, on)| format!("{}: {sha}", on.join(", ")))
                .collect();
            Err(CliError::usage(format!(
                "fleet {}: the hosts ran different releases before their live one ({}); name one with --to",
                fleet.name,
                each.join("; ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use deployd_proto::{AppLock, DeploymentId, FleetPart, ServiceStatus};

    use super::*;
    use crate::fleet::Trust;
    use crate::fleet::plan::Parallel;

    fn fleet() -> Fleet {
        let host = |name: &str| Host {
            name: name.into(),
            url: format!("https://{name}:8443"),
            trust: Trust::System,
            app: "shop".into(),
            label: None,
        };
        Fleet {
            name: "prod".into(),
            hosts: vec![host("a"), host("b"), host("c")],
            max_parallel: Parallel::Hosts(1),
            first_wave: 1,
            failure_budget: 0,
            pause: Duration::ZERO,
        }
    }

    fn seen(live: &str) -> Seen {
        Seen {
            status: AppStatus {
                app: "shop".into(),
                live_sha: Some(live.parse().unwrap()),
                live_digest: None,
                running_deployment: None,
                lock: None,
                services: vec![ServiceStatus {
                    name: "beat".into(),
                    singleton: true,
                    removed: false,
                    containers: Vec::new(),
                }],
            },
            history: Vec::new(),
        }
    }

    fn lock(fleet: Option<FleetLock>) -> Option<AppLock> {
        Some(AppLock {
            reason: "held".into(),
            locked_by: "ops".into(),
            locked_at: time::OffsetDateTime::UNIX_EPOCH,
            fleet,
        })
    }

    #[test]
    fn preflight_and_fleet_check_read_the_hosts_alike() {
        let prod = fleet();
        let held = FleetLock {
            id: "f1".into(),
            name: "prod".into(),
            sha: "bbbbbbb".parse().unwrap(),
            rollback: false,
        };
        // a: held by this fleet's deployment, its part running; b: locked
        // by hand; c: unreachable.
        let mut a = seen("aaaaaaa");
        a.status.lock = lock(Some(held.clone()));
        a.status.running_deployment = Some(DeploymentId("d1".into()));
        let mut part = deployment("d1");
        part.fleet = Some(FleetPart {
            id: "f1".into(),
            host: "a".into(),
            once_tasks: true,
        });
        a.history.push(part);
        let mut b = seen("bbbbbbb");
        b.status.lock = lock(None);
        b.status.services[0].singleton = false;
        let looked = vec![
            Ok(a),
            Ok(b),
            Err(CliError::new(Exit::Unreachable, "cannot connect")),
        ];
        let got = assess(&prod, &looked);
        assert_eq!(got.held.as_ref().map(|h| h.id.as_str()), Some("f1"));
        assert!(got.hosts[0].is_empty(), "{:?}", got.hosts[0]);
        assert_eq!(got.hosts[1], ["locked by ops: held"]);
        assert_eq!(got.hosts[2], ["cannot connect"]);
        assert_eq!(got.exit, Exit::Conflict);
        assert!(got.fleet.is_empty(), "{:?}", got.fleet);
        assert_eq!(
            got.drift.as_deref(),
            Some("drift: the hosts run 2 releases (a aaaaaaa, b bbbbbbb)")
        );

        // Beat in two hosts' configs; a deployment running outside any
        // fleet deployment.
        let mut c = seen("aaaaaaa");
        c.status.running_deployment = Some(DeploymentId("d9".into()));
        let looked = vec![Ok(seen("aaaaaaa")), Ok(seen("aaaaaaa")), Ok(c)];
        let got = assess(&prod, &looked);
        assert_eq!(got.hosts[2], ["deployment d9 is running"]);
        assert_eq!(got.fleet.len(), 1);
        assert!(
            got.fleet[0].starts_with("beat is a singleton but 3 hosts"),
            "{:?}",
            got.fleet
        );
        assert!(got.drift.is_none());
    }

    fn deployment(id: &str) -> Deployment {
        Deployment {
            id: DeploymentId(id.into()),
            app: "shop".into(),
            kind: DeploymentKind::Deploy,
            sha: "bbbbbbb".parse().unwrap(),
            digest: None,
            previous_sha: None,
            requested_by: "ci".into(),
            reason: None,
            force: false,
            state: DeploymentState::Running,
            error: None,
            migrations: Vec::new(),
            migrations_kept: Vec::new(),
            plan: None,
            reviewed_plan: None,
            allow_unsafe_migrations: false,
            schema: Default::default(),
            skip_tasks: false,
            fleet: None,
            canary: false,
            steps: Vec::new(),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            finished_at: None,
        }
    }
}
