//! Migration plans: before anything runs, the release's own Django says
//! what `migrate` would do from the live migration state, and each
//! operation is judged by what it does to the release still running.
//!
//! The inspection is deployd's own Python program (`inspect_migrations.py`),
//! passed to `manage.py shell -c` in a one-off container of the release's
//! image with the app's env and network: nothing is installed in the image,
//! and the program makes its database session read-only before it reads
//! the migration state (`plan/inspect.rs`). A deployment's `plan` step
//! makes one and refuses what the app refuses; `deployctl plan` makes one
//! to review first.

mod inspect;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use deployd_proto::{
    CommitSha, MigrationPlan, Plan, PlanState, PlannedService, PlannedTask, Touches, Verdict,
};

use super::common::Failure;
use super::label;
use super::run::Run;
use super::{Ctx, EngineError, EngineHandle};
use crate::config::{AppConfig, MigrationsConfig, UnsafeMigrations};
use crate::docker::PulledImage;
use crate::env_file::AppEnv;
pub(crate) use inspect::Inspection;

impl Run {
    /// The `plan` step of a deployment: inspects the release (an app with
    /// `[migrations]`), records the plan, holds it to the reviewed plan if
    /// there is one, and refuses migrations that break the running release
    /// if the app does.
    pub(crate) async fn plan(
        &self,
        image: &PulledImage,
        env: &AppEnv,
        migrations: Option<&MigrationsConfig>,
    ) -> Result<(), Failure> {
        let id = uuid::Uuid::now_v7().to_string();
        let live = self
            .previous
            .as_ref()
            .map(|r| (r.sha.clone(), r.digest.clone()));
        let mut plan = new_plan(
            id,
            &self.app,
            &self.cfg,
            self.sha.clone(),
            live,
            &self.requested_by,
        );
        plan.deployment = Some(self.id.clone());
        plan.digest = Some(image.digest.clone());
        if let Some(migrations) = migrations {
            let mut inspected = self
                .inspect(migrations, &image.pinned, env, None, &plan.id)
                .await?;
            // In a fleet another host may run another release: only the
            // schema is known to be the same everywhere.
            if let Some(live) = self.previous.as_ref().filter(|_| !self.in_fleet) {
                let tables = self.ctx.tables_of(&self.app, &live.digest)?;
                judge_by_models(&mut inspected, tables.as_ref(), live.sha.short());
            }
            for line in describe(&inspected) {
                self.say("plan", line);
            }
            plan.migrations = Some(inspected);
        }
        plan.state = PlanState::Ready;
        self.ctx.store.put_plan(&plan)?;
        self.ctx.store.set_plan(&self.id, &plan.id)?;
        if let Some(reviewed) = &self.reviewed_plan {
            let reviewed = self.ctx.store.plan(reviewed)?.ok_or_else(|| {
                Failure(format!(
                    "no plan {reviewed} on this host; review a new one (deployctl plan)"
                ))
            })?;
            if let Some(why) = stale(&reviewed, &plan) {
                return Err(Failure(why));
            }
            self.say(
                "plan",
                format!("holds to the reviewed plan {}", reviewed.id),
            );
        }
        let breaking = plan.migrations.as_ref().map(breaking).unwrap_or_default();
        let Some(migrations) = migrations.filter(|_| !breaking.is_empty()) else {
            return Ok(());
        };
        let Some(running) = &self.previous else {
            self.say(
                "plan",
                "no release runs yet: nothing for these migrations to break".into(),
            );
            return Ok(());
        };
        let running = running.sha.short();
        let what = format!(
            "{} would break release {running} while it still runs: {}",
            if breaking.len() == 1 {
                "a migration"
            } else {
                "migrations"
            },
            breaking.join("; ")
        );
        let said = gate(
            migrations.unsafe_migrations,
            self.allow_unsafe_migrations,
            &what,
        )?;
        if let Some(line) = said {
            self.say("plan", line);
        }
        Ok(())
    }
}

/// What a deployment does about migrations that would break the running
/// release (`what` names them), by the app's policy and whether an admin
/// allowed them for this deployment: fails, or goes on, saying why.
fn gate(policy: UnsafeMigrations, allowed: bool, what: &str) -> Result<Option<String>, Failure> {
    match policy {
        UnsafeMigrations::Refuse if allowed => Ok(Some(format!(
            "allowed for this deployment (--allow-unsafe-migrations): {what}"
        ))),
        UnsafeMigrations::Refuse => Err(Failure(format!(
            "refused: {what}. Ship such a change in steps (expand, then contract): first \
             what the new code needs, nullable or with a database default; then a release \
             whose models no longer use the old, its migration left out; then the drop or \
             rename, safe once the running release's models do not use what it changes. \
             To go on now: --allow-unsafe-migrations --reason (admin scope)"
        ))),
        UnsafeMigrations::Warn => Ok(Some(format!(
            "warning: {what} ([migrations] unsafe = \"warn\")"
        ))),
        UnsafeMigrations::Allow => Ok(None),
    }
}

/// A plan this process makes outside a deployment.
#[derive(Debug)]
pub(super) struct Making {
    app: String,
    /// Why its end could not be recorded, if it could not.
    unrecorded: Option<String>,
}

impl EngineHandle {
    /// Starts a plan of `sha`: recorded as `planning`, then pulled and
    /// inspected in a task of its own. Changes nothing that runs.
    pub fn plan(&self, app: &str, sha: CommitSha, requested_by: &str) -> Result<Plan, EngineError> {
        let cfg = self
            .apps
            .get(app)
            .cloned()
            .ok_or_else(|| EngineError::UnknownApp(app.to_owned()))?;
        let live = self.ctx.store.live_release(app)?.map(|r| (r.sha, r.digest));
        let id = uuid::Uuid::now_v7().to_string();
        let plan = new_plan(id, app, &cfg, sha, live, requested_by);
        // One at a time per app: each pulls and runs a container.
        let mut planning = self.ctx.planning();
        let busy = planning
            .iter()
            .find(|(_, m)| m.app == app && m.unrecorded.is_none());
        if let Some((id, _)) = busy {
            return Err(EngineError::Planning {
                app: app.to_owned(),
                id: id.clone(),
            });
        }
        self.ctx.store.put_plan(&plan)?;
        planning.insert(
            plan.id.clone(),
            Making {
                app: app.to_owned(),
                unrecorded: None,
            },
        );
        drop(planning);
        tokio::spawn(Arc::clone(&self.ctx).make_plan(cfg, plan.clone()));
        Ok(plan)
    }

    /// A plan by id. One still `planning` that no task makes any more is
    /// told as failed: deployd restarted meanwhile, or its end could not be
    /// recorded.
    pub fn plan_by_id(&self, id: &str) -> Result<Plan, EngineError> {
        // Read under the lock a plan's end is recorded under, so that a plan
        // ending meanwhile is seen either still making or recorded.
        let planning = self.ctx.planning();
        let mut plan = self
            .ctx
            .store
            .plan(id)?
            .ok_or_else(|| EngineError::UnknownPlan(id.to_owned()))?;
        if plan.state == PlanState::Planning {
            match planning.get(id) {
                Some(Making {
                    unrecorded: None, ..
                }) => {}
                Some(Making {
                    unrecorded: Some(why),
                    ..
                }) => {
                    plan.state = PlanState::Failed;
                    plan.error = Some(format!("the plan ended, but could not be recorded: {why}"));
                }
                None => {
                    plan.state = PlanState::Failed;
                    plan.error = Some("deployd restarted while the plan was being made".into());
                }
            }
        }
        Ok(plan)
    }
}

impl Ctx {
    /// Removes one-off containers of `task` (`plan`, `run`) a stop or
    /// crash left behind: neither a plan nor a command outlives a restart
    /// (a plan reads as failed; a command's caller was cut off). Returns
    /// those removed.
    pub(super) async fn remove_oneoff_leftovers(
        &self,
        apps: impl Iterator<Item = &String>,
        task: &str,
    ) -> Vec<crate::docker::ContainerInfo> {
        let mut removed = Vec::new();
        for app in apps {
            let labels = [(label::APP, app.as_str()), (label::TASK, task)];
            let found = match self.docker.containers(&labels).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(%app, task, error = %e, "cannot list leftover one-off containers");
                    continue;
                }
            };
            for c in found {
                match self.docker.remove(&c.id).await {
                    Ok(()) => removed.push(c),
                    Err(e) => {
                        tracing::warn!(%app, container = %c.name, error = %e, "leftover one-off container not removed");
                    }
                }
            }
        }
        removed
    }

    /// The tables the models of an app's release use, as its deployment's
    /// plan recorded them; `None` if no plan did.
    pub(super) fn tables_of(&self, app: &str, digest: &str) -> Result<Option<Tables>, Failure> {
        let plan = self.store.plan_of_release(app, digest)?;
        Ok(plan.and_then(|p| p.migrations).and_then(|m| m.tables))
    }

    fn planning(&self) -> std::sync::MutexGuard<'_, HashMap<String, Making>> {
        crate::sync::lock(&self.jobs.planning)
    }

    /// Pulls and inspects a plan's release; records how it ended.
    async fn make_plan(self: Arc<Self>, cfg: Arc<AppConfig>, mut plan: Plan) {
        let mut guard = Unfinished {
            ctx: Arc::clone(&self),
            id: Some(plan.id.clone()),
        };
        let made = async {
            let env = AppEnv::read(&cfg)?;
            let image = self.pull_recorded(&plan.app, &cfg, &plan.sha).await?;
            plan.digest = Some(image.digest.clone());
            if let Some(migrations) = &cfg.migrations {
                let mut inspected = self
                    .inspect_migrations(Inspection {
                        app: &plan.app,
                        cfg: &cfg,
                        migrations,
                        image: &image.pinned,
                        env: &env,
                        targets: None,
                        id: &plan.id,
                    })
                    .await?;
                if let Some((sha, digest)) = &plan.live {
                    let tables = self.tables_of(&plan.app, digest)?;
                    judge_by_models(&mut inspected, tables.as_ref(), sha.short());
                }
                plan.migrations = Some(inspected);
            }
            Ok::<_, Failure>(())
        };
        match made.await {
            Ok(()) => plan.state = PlanState::Ready,
            Err(f) => {
                plan.state = PlanState::Failed;
                plan.error = Some(f.0);
            }
        }
        tracing::info!(app = %plan.app, plan = %plan.id, state = ?plan.state, "plan ended");
        guard.id = None;
        let mut planning = self.planning();
        match self.store.put_plan(&plan) {
            Ok(()) => {
                planning.remove(&plan.id);
            }
            Err(e) => {
                tracing::error!(plan = %plan.id, error = %e, "cannot record the plan");
                // Told as failed with the reason until deployd restarts.
                if let Some(making) = planning.get_mut(&plan.id) {
                    making.unrecorded = Some(e.to_string());
                }
            }
        }
    }
}

/// Frees a plan's app if the task making it panics, so that the next plan
/// is not refused as `preparing` until deployd restarts.
struct Unfinished {
    ctx: Arc<Ctx>,
    /// Taken once the plan's end is being recorded.
    id: Option<String>,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(id) = &self.id {
            self.ctx.planning().remove(id);
        }
    }
}

/// A plan's record before it is inspected: the release, what runs now,
/// and what a deployment of it would roll and run.
pub(crate) fn new_plan(
    id: String,
    app: &str,
    cfg: &AppConfig,
    sha: CommitSha,
    live: Option<(CommitSha, String)>,
    requested_by: &str,
) -> Plan {
    Plan {
        id,
        app: app.to_owned(),
        sha,
        state: PlanState::Planning,
        error: None,
        digest: None,
        live,
        unsafe_migrations: cfg
            .migrations
            .as_ref()
            .map_or(UnsafeMigrations::Allow, |m| m.unsafe_migrations),
        migrations: None,
        services: cfg
            .roll_order()
            .into_iter()
            .filter_map(|name| {
                let service = cfg.services.get(&name)?;
                let role = service.role_of(&name).map_or("", |r| r.as_str());
                Some(PlannedService {
                    role: role.to_owned(),
                    replicas: service.replicas,
                    name,
                })
            })
            .collect(),
        tasks: cfg
            .release
            .iter()
            .filter(|t| t.runs_in(deployd_proto::DeploymentKind::Deploy))
            .map(|t| PlannedTask {
                name: t.name.clone(),
                command: t.command.clone(),
                once: t.once,
            })
            .collect(),
        deployment: None,
        requested_by: requested_by.to_owned(),
        created_at: time::OffsetDateTime::now_utc(),
    }
}

/// The plan as log lines: each migration, each operation with its verdict.
pub(crate) fn describe(plan: &MigrationPlan) -> Vec<String> {
    let mut lines = Vec::new();
    let what = if plan.migrations.iter().any(|m| m.backwards) {
        "applied since"
    } else {
        "to apply"
    };
    let on = format!("(Django {}, {})", plan.django, plan.vendor);
    lines.push(match plan.migrations.len() {
        0 => format!("no migration {what} {on}"),
        1 => format!("1 migration {what} {on}:"),
        n => format!("{n} migrations {what} {on}:"),
    });
    for m in &plan.migrations {
        lines.push(format!("  {}: {}", m.label(), m.verdict()));
        for o in &m.operations {
            lines.push(format!(
                "    {} {}: {}: {}",
                o.operation,
                o.description,
                o.verdict.as_str().to_uppercase(),
                o.why
            ));
        }
    }
    lines
}

/// The tables a release's models use, each with its columns.
pub(crate) type Tables = BTreeMap<String, BTreeSet<String>>;

/// Clears the operations judged to break `release` that touch nothing its
/// models use (`tables`, recorded by its own plan): a column it stopped
/// reading may be dropped while it runs. Without a record, every verdict
/// stands.
pub(crate) fn judge_by_models(plan: &mut MigrationPlan, tables: Option<&Tables>, release: &str) {
    let Some(tables) = tables else { return };
    let uses = |t: &Touches| {
        tables
            .get(&t.table)
            .is_some_and(|columns| t.column.as_ref().is_none_or(|c| columns.contains(c)))
    };
    let operations = plan.migrations.iter_mut().flat_map(|m| &mut m.operations);
    for o in operations.filter(|o| o.verdict == Verdict::Breaks) {
        if let Some(t) = o.touches.as_ref().filter(|t| !uses(t)) {
            o.verdict = Verdict::Safe;
            o.why =
                format!("release {release} does not use {t} (not in its models): no concern of it");
        }
    }
}

/// The operations that break the running release, each as
/// `app.migration Operation (why)`.
pub(crate) fn breaking(plan: &MigrationPlan) -> Vec<String> {
    plan.operations_judged(Verdict::Breaks)
        .map(|(m, o)| format!("{} {} ({})", m.label(), o.operation, o.why))
        .collect()
}

/// Why a deployment may not hold to the plan it was reviewed with: what
/// differs between `reviewed` and the plan its own step made.
pub(crate) fn stale(reviewed: &Plan, fresh: &Plan) -> Option<String> {
    let live = |p: &Plan| {
        p.live
            .as_ref()
            .map_or_else(|| "none".to_owned(), |(sha, _)| sha.short().to_owned())
    };
    let mut changes = Vec::new();
    if reviewed.app != fresh.app || reviewed.sha != fresh.sha {
        return Some(format!(
            "plan {} is of {} {}, not of this deployment",
            reviewed.id,
            reviewed.app,
            reviewed.sha.short()
        ));
    }
    if reviewed.state != PlanState::Ready {
        return Some(format!("plan {} did not finish", reviewed.id));
    }
    if reviewed.digest != fresh.digest {
        changes.push(format!(
            "the tag now resolves to another image ({} then, {} now)",
            reviewed.digest.as_deref().unwrap_or("none"),
            fresh.digest.as_deref().unwrap_or("none")
        ));
    }
    if reviewed.live != fresh.live {
        changes.push(format!(
            "the live release changed ({} then, {} now)",
            live(reviewed),
            live(fresh)
        ));
    }
    let pending = |p: &Plan| {
        p.migrations
            .as_ref()
            .map(MigrationPlan::labels)
            .unwrap_or_default()
    };
    let (then, now) = (pending(reviewed), pending(fresh));
    if then != now {
        let list = |l: &[String]| {
            if l.is_empty() {
                "none".to_owned()
            } else {
                l.join(", ")
            }
        };
        changes.push(format!(
            "the pending migrations changed ({} then, {} now)",
            list(&then),
            list(&now)
        ));
    }
    (!changes.is_empty()).then(|| {
        format!(
            "plan {} is stale: {}; review a new plan (deployctl plan {})",
            reviewed.id,
            changes.join("; "),
            fresh.sha.short()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use deployd_proto::PlannedMigration;
    use deployd_proto::PlannedOperation;

    pub(super) fn migration(name: &str, verdict: Verdict) -> PlannedMigration {
        PlannedMigration {
            app: "shop".into(),
            name: name.into(),
            backwards: false,
            operations: vec![PlannedOperation {
                operation: "RemoveField".into(),
                description: "Remove field queue from heartbeat".into(),
                verdict,
                why: "drops column heartbeat.queue".into(),
                reversible: true,
                touches: (verdict == Verdict::Breaks).then(|| Touches {
                    table: "shop_heartbeat".into(),
                    column: Some("queue".into()),
                }),
            }],
            sql: vec!["ALTER TABLE ...".into()],
        }
    }

    /// The wire fixture's plan (live: bbbb..., sha aaaa...), with these
    /// migrations.
    fn plan(migrations: Vec<PlannedMigration>) -> Plan {
        let mut plan: Plan =
            serde_json::from_str(include_str!("../../../proto/tests/data/plan.json")).unwrap();
        plan.id = "p1".into();
        plan.sha = "a".repeat(40).parse().unwrap();
        plan.live = Some(("b".repeat(40).parse().unwrap(), "sha256:0".into()));
        if let Some(m) = &mut plan.migrations {
            m.migrations = migrations;
        }
        plan
    }

    #[test]
    fn a_plan_is_stale_when_what_it_showed_changed() {
        let reviewed = plan(vec![migration("0003_x", Verdict::Safe)]);
        assert_eq!(stale(&reviewed, &reviewed.clone()), None);
        let mut fresh = reviewed.clone();
        fresh.migrations = plan(vec![
            migration("0003_x", Verdict::Safe),
            migration("0004_y", Verdict::Breaks),
        ])
        .migrations;
        fresh.live = Some(("c".repeat(40).parse().unwrap(), "sha256:2".into()));
        let why = stale(&reviewed, &fresh).unwrap();
        assert_eq!(
            why,
            "plan p1 is stale: the live release changed (bbbbbbbbbbbb then, cccccccccccc now); \
             the pending migrations changed (shop.0003_x then, shop.0003_x, shop.0004_y now); \
             review a new plan (deployctl plan aaaaaaaaaaaa)"
        );
        let mut other = reviewed.clone();
        other.sha = "d".repeat(40).parse().unwrap();
        assert!(
            stale(&reviewed, &other)
                .unwrap()
                .contains("not of this deployment")
        );
    }

    #[test]
    fn a_drop_is_no_concern_of_a_release_whose_models_do_not_use_it() {
        let schema = |m| plan(vec![m]).migrations.unwrap();
        let tables = |columns: &[&str]| -> Tables {
            let columns = columns.iter().map(|c| (*c).to_owned()).collect();
            BTreeMap::from([("shop_heartbeat".to_owned(), columns)])
        };
        // Its models still read the column: it breaks.
        let mut reads = schema(migration("0003_x", Verdict::Breaks));
        judge_by_models(&mut reads, Some(&tables(&["id", "queue"])), "bbbbbbbbbbbb");
        assert_eq!(breaking(&reads).len(), 1);
        // No record of its models: the verdict stands.
        judge_by_models(&mut reads, None, "bbbbbbbbbbbb");
        assert_eq!(breaking(&reads).len(), 1);
        // It stopped reading it.
        let mut stopped = schema(migration("0003_x", Verdict::Breaks));
        judge_by_models(&mut stopped, Some(&tables(&["id"])), "bbbbbbbbbbbb");
        assert!(breaking(&stopped).is_empty());
        let o = &stopped.migrations[0].operations[0];
        assert_eq!(o.verdict, Verdict::Safe);
        assert_eq!(
            o.why,
            "release bbbbbbbbbbbb does not use shop_heartbeat.queue (not in its models): no concern of it"
        );
        // A whole table it has no model on.
        let mut table = schema(migration("0003_x", Verdict::Breaks));
        table.migrations[0].operations[0].touches = Some(Touches {
            table: "shop_order".into(),
            column: None,
        });
        judge_by_models(&mut table, Some(&tables(&["id", "queue"])), "bbbbbbbbbbbb");
        assert!(breaking(&table).is_empty());
        // Breaks, but the inspector could not say through what.
        let mut unknown = schema(migration("0003_x", Verdict::Breaks));
        unknown.migrations[0].operations[0].touches = None;
        judge_by_models(&mut unknown, Some(&tables(&[])), "bbbbbbbbbbbb");
        assert_eq!(breaking(&unknown).len(), 1);
    }

    #[test]
    fn the_log_names_every_operation_and_its_verdict() {
        let p = plan(vec![migration("0003_x", Verdict::Breaks)]);
        let described = describe(p.migrations.as_ref().unwrap());
        assert_eq!(
            described,
            [
                "1 migration to apply (Django 5.2.19, postgresql):",
                "  shop.0003_x: breaks",
                "    RemoveField Remove field queue from heartbeat: BREAKS: drops column heartbeat.queue",
            ]
        );
    }

    #[test]
    fn the_gate_refuses_warns_or_lets_through_by_policy() {
        let what = "a migration would break release 0123456789ab while it still runs: x";
        let refused = gate(UnsafeMigrations::Refuse, false, what).unwrap_err().0;
        assert!(
            refused.starts_with(&format!("refused: {what}. "))
                && refused.contains("expand, then contract"),
            "{refused}"
        );
        assert_eq!(
            gate(UnsafeMigrations::Refuse, true, what).unwrap(),
            Some(format!(
                "allowed for this deployment (--allow-unsafe-migrations): {what}"
            ))
        );
        for allowed in [false, true] {
            assert_eq!(
                gate(UnsafeMigrations::Warn, allowed, what).unwrap(),
                Some(format!("warning: {what} ([migrations] unsafe = \"warn\")"))
            );
            assert_eq!(gate(UnsafeMigrations::Allow, allowed, what).unwrap(), None);
        }
    }
}
