//! Migration plans: before anything runs, the release's own Django says
//! what `migrate` would do from the live migration state, and each
//! operation is judged by what it does to the release still running.
//!
//! The inspection is deployd's own Python program (`inspect_migrations.py`),
//! passed to `manage.py shell -c` in a one-off container of the release's
//! image with the app's env and network: nothing is installed in the image,
//! and the program makes its database session read-only before it reads
//! the migration state. A deployment's `plan` step makes one and refuses
//! what the app refuses; `deployctl plan` makes one to review first.

use std::collections::HashMap;
use std::sync::Arc;

use deployd_proto::{
    CommitSha, MigrationPlan, Plan, PlanState, PlannedMigration, PlannedService, PlannedTask,
    Verdict,
};
use serde::Deserialize;

use deployd_proto::EventKind;

use super::common::{Failure, short_id};
use super::label;
use super::run::Run;
use super::{Ctx, EngineError, EngineHandle};
use crate::config::{AppConfig, MigrationsConfig, UnsafeMigrations};
use crate::docker::{ContainerSpec, ImageRef, PulledImage, RegistryAuth};
use crate::env_file::AppEnv;

const INSPECTOR: &str = include_str!("plan/inspect_migrations.py");
const HEADER: &str = "deployd-migration-plan: ";
const MIGRATION: &str = "deployd-migration: ";
const END: &str = "deployd-migration-plan-end";
/// Output lines of a failed inspection quoted in its failure.
const QUOTED_LINES: usize = 3;

/// One inspection of a release's migrations.
pub(crate) struct Inspection<'a> {
    pub app: &'a str,
    pub cfg: &'a AppConfig,
    pub migrations: &'a MigrationsConfig,
    /// The image, pinned by digest.
    pub image: &'a str,
    pub env: &'a AppEnv,
    /// Plan back to this migration state (`[app, name]`); absent, forward
    /// to the release's own leaves.
    pub targets: Option<&'a [(String, String)]>,
    /// Names the container (`<app>-plan-<id>`) and labels it.
    pub id: &'a str,
}

/// The inspector's first line.
#[derive(Deserialize)]
#[serde(untagged)]
enum Header {
    Failed {
        error: String,
    },
    Planned {
        django: String,
        vendor: String,
        leaves: Vec<(String, String)>,
        count: usize,
    },
}

/// What the inspector printed, taken line by line.
#[derive(Default)]
struct Answer {
    header: Option<Header>,
    migrations: Vec<PlannedMigration>,
    ended: bool,
    /// A line of the answer that could not be read.
    unreadable: Option<String>,
}

impl Answer {
    /// Takes the answer's lines; other output (the app's own) is left.
    fn take(&mut self, line: &str) {
        let read = if let Some(json) = line.strip_prefix(HEADER) {
            serde_json::from_str(json).map(|h| self.header = Some(h))
        } else if let Some(json) = line.strip_prefix(MIGRATION) {
            serde_json::from_str(json).map(|m| self.migrations.push(m))
        } else {
            if line == END {
                self.ended = true;
            }
            Ok(())
        };
        if let Err(e) = read {
            self.unreadable.get_or_insert(e.to_string());
        }
    }

    fn finish(self, exit_code: i64, output: &[String]) -> Result<MigrationPlan, Failure> {
        let quoted = || {
            let last = &output[output.len().saturating_sub(QUOTED_LINES)..];
            if last.is_empty() {
                "no output".to_owned()
            } else {
                last.join(" | ")
            }
        };
        match self.header {
            Some(Header::Failed { error }) => {
                Err(Failure(format!("the migration plan failed: {error}")))
            }
            Some(Header::Planned {
                django,
                vendor,
                leaves,
                count,
            }) if self.ended && self.migrations.len() == count && self.unreadable.is_none() => {
                Ok(MigrationPlan {
                    django,
                    vendor,
                    leaves,
                    migrations: self.migrations,
                })
            }
            _ if let Some(e) = self.unreadable => Err(Failure(format!(
                "the migration plan's answer cannot be read ({e})"
            ))),
            _ => Err(Failure(format!(
                "the migration plan did not finish (manage.py shell exited with {exit_code}): {}",
                quoted()
            ))),
        }
    }
}

impl Ctx {
    /// Runs the inspector; what `migrate` would do, judged.
    pub(crate) async fn inspect_migrations(
        &self,
        i: Inspection<'_>,
    ) -> Result<MigrationPlan, Failure> {
        let task = i.migrations.env_of_task.as_deref().unwrap_or("migrate");
        let mut env = i.env.task(task).to_vec();
        let request = match i.targets {
            Some(targets) => serde_json::json!({ "targets": targets }),
            None => serde_json::json!({}),
        };
        env.push(("DEPLOYD_INSPECT".into(), request.to_string()));
        // In the environment, not the command line: a timeout's message
        // quotes the command.
        env.push(("DEPLOYD_INSPECTOR".into(), INSPECTOR.into()));
        let mut cmd = i.migrations.manage.clone();
        cmd.extend([
            "shell".into(),
            "-c".into(),
            "import os; exec(os.environ['DEPLOYD_INSPECTOR'], {'__name__': 'deployd'})".into(),
        ]);
        let spec = ContainerSpec {
            name: Some(format!("{}-plan-{}", i.app, short_id(i.id))),
            image: i.image.to_owned(),
            cmd: Some(cmd),
            env,
            network: i.cfg.network.clone(),
            // Settings may read files from them.
            volumes: i.cfg.volumes.clone(),
            labels: HashMap::from([
                (label::APP.to_owned(), i.app.to_owned()),
                (label::TASK.to_owned(), "plan".to_owned()),
            ]),
            cgroup_parent: i.cfg.cgroup_parent.clone(),
            ..Default::default()
        };
        let mut answer = Answer::default();
        let output = self
            .docker
            .run_oneoff(spec, i.migrations.timeout, |line| answer.take(line))
            .await?;
        answer.finish(output.exit_code, &output.lines)
    }
}

impl Run {
    /// Inspects `image` for this run's app, forward or back to `targets`.
    pub(crate) async fn inspect(
        &self,
        migrations: &MigrationsConfig,
        image: &str,
        env: &AppEnv,
        targets: Option<&[(String, String)]>,
        id: &str,
    ) -> Result<MigrationPlan, Failure> {
        let inspection = Inspection {
            app: &self.app,
            cfg: &self.cfg,
            migrations,
            image,
            env,
            targets,
            id,
        };
        self.ctx.inspect_migrations(inspection).await
    }

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
            let inspected = self
                .inspect(migrations, &image.pinned, env, None, &plan.id)
                .await?;
            for line in describe(&inspected) {
                self.emit(EventKind::Output {
                    step: "plan".into(),
                    line,
                });
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
            self.emit(EventKind::Output {
                step: "plan".into(),
                line: format!("holds to the reviewed plan {}", reviewed.id),
            });
        }
        let breaking = plan.migrations.as_ref().map(breaking).unwrap_or_default();
        let Some(migrations) = migrations.filter(|_| !breaking.is_empty()) else {
            return Ok(());
        };
        let Some(running) = &self.previous else {
            self.emit(EventKind::Output {
                step: "plan".into(),
                line: "no release runs yet: nothing for these migrations to break".into(),
            });
            return Ok(());
        };
        let running = running.sha.as_str().chars().take(12).collect::<String>();
        let what = format!(
            "{} would break release {running} while it still runs: {}",
            if breaking.len() == 1 {
                "a migration"
            } else {
                "migrations"
            },
            breaking.join("; ")
        );
        let line = |line: String| {
            self.emit(EventKind::Output {
                step: "plan".into(),
                line,
            })
        };
        match migrations.unsafe_migrations {
            UnsafeMigrations::Refuse if self.allow_unsafe_migrations => {
                line(format!(
                    "allowed for this deployment (--allow-unsafe-migrations): {what}"
                ));
                Ok(())
            }
            UnsafeMigrations::Refuse => Err(Failure(format!(
                "refused: {what}. Ship such a change in steps (expand, then contract): first \
                 what the new code needs, nullable or with a database default; the drop or \
                 rename once no release reads the old, allowed then for that deployment with \
                 --allow-unsafe-migrations --reason (admin scope), since deployd judges the \
                 migration, not the code"
            ))),
            UnsafeMigrations::Warn => {
                line(format!("warning: {what} ([migrations] unsafe = \"warn\")"));
                Ok(())
            }
            UnsafeMigrations::Allow => Ok(()),
        }
    }
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
        self.ctx.store.put_plan(&plan)?;
        self.ctx.planning().insert(plan.id.clone());
        tokio::spawn(Arc::clone(&self.ctx).make_plan(cfg, plan.clone()));
        Ok(plan)
    }

    /// A plan by id. One still `planning` that no task makes any more (deployd
    /// restarted meanwhile) is told as failed.
    pub fn plan_by_id(&self, id: &str) -> Result<Plan, EngineError> {
        let mut plan = self
            .ctx
            .store
            .plan(id)?
            .ok_or_else(|| EngineError::UnknownPlan(id.to_owned()))?;
        if plan.state == PlanState::Planning && !self.ctx.planning().contains(id) {
            plan.state = PlanState::Failed;
            plan.error = Some("deployd restarted while the plan was being made".into());
        }
        Ok(plan)
    }
}

impl Ctx {
    /// Removes inspection containers a stop or crash left behind: no plan
    /// outlives a restart (it reads as failed).
    pub(super) async fn remove_plan_leftovers(&self, apps: impl Iterator<Item = &String>) {
        for app in apps {
            let labels = [(label::APP, app.as_str()), (label::TASK, "plan")];
            let found = match self.docker.containers(&labels).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(%app, error = %e, "cannot list leftover plan containers");
                    continue;
                }
            };
            for c in found {
                if let Err(e) = self.docker.remove(&c.id).await {
                    tracing::warn!(%app, container = %c.name, error = %e, "leftover plan container not removed");
                }
            }
        }
    }

    fn planning(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.planning.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pulls and inspects a plan's release; records how it ended.
    async fn make_plan(self: Arc<Self>, cfg: Arc<AppConfig>, mut plan: Plan) {
        let made = async {
            let env = AppEnv::read(&cfg)?;
            let auth = match &cfg.registry_auth_file {
                Some(path) => Some(RegistryAuth::from_file(path)?),
                None => None,
            };
            let image = ImageRef::new(cfg.image.clone(), plan.sha.clone());
            let image = self.docker.pull(&image, auth.as_ref()).await?;
            // Pruned with the app's other unused images.
            self.store
                .prepared(&plan.app, plan.sha.as_str(), &image.digest)?;
            plan.digest = Some(image.digest.clone());
            if let Some(migrations) = &cfg.migrations {
                let inspected = self
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
        if let Err(e) = self.store.put_plan(&plan) {
            tracing::error!(plan = %plan.id, error = %e, "cannot record the plan");
        }
        self.planning().remove(&plan.id);
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
            .map_or(UnsafeMigrations::Allow, |m| m.unsafe_migrations)
            .as_str()
            .to_owned(),
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
    let short = |sha: &CommitSha| sha.as_str().chars().take(12).collect::<String>();
    let live = |p: &Plan| {
        p.live
            .as_ref()
            .map_or_else(|| "none".to_owned(), |(sha, _)| short(sha))
    };
    let mut changes = Vec::new();
    if reviewed.app != fresh.app || reviewed.sha != fresh.sha {
        return Some(format!(
            "plan {} is of {} {}, not of this deployment",
            reviewed.id,
            reviewed.app,
            short(&reviewed.sha)
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
            short(&fresh.sha)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use deployd_proto::PlannedOperation;

    fn migration(name: &str, verdict: Verdict) -> PlannedMigration {
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
            }],
            sql: vec!["ALTER TABLE ...".into()],
        }
    }

    fn lines(output: &[&str]) -> Answer {
        let mut answer = Answer::default();
        for line in output {
            answer.take(line);
        }
        answer
    }

    #[test]
    fn reads_the_inspectors_answer_among_the_apps_own_output() {
        let m = serde_json::to_string(&migration("0003_x", Verdict::Breaks)).unwrap();
        let header = r#"deployd-migration-plan: {"django": "5.2", "vendor": "postgresql", "leaves": [["shop", "0003_x"]], "count": 1}"#;
        let output = [
            "5 objects imported automatically (use -v 2 for details).",
            header,
            &format!("deployd-migration: {m}"),
            "deployd-migration-plan-end",
        ];
        let plan = lines(&output).finish(0, &[]).unwrap();
        assert_eq!(plan.leaves, [("shop".to_owned(), "0003_x".to_owned())]);
        assert_eq!(plan.labels(), ["shop.0003_x"]);
        assert_eq!(
            breaking(&plan),
            ["shop.0003_x RemoveField (drops column heartbeat.queue)"]
        );
    }

    #[test]
    fn an_unfinished_or_failed_inspection_says_why() {
        let error = lines(&[r#"deployd-migration-plan: {"error": "OperationalError: no db"}"#]);
        let why = error.finish(0, &[]).unwrap_err().0;
        assert_eq!(why, "the migration plan failed: OperationalError: no db");
        // Cut short: a migration line is missing.
        let header = r#"deployd-migration-plan: {"django": "5.2", "vendor": "sqlite", "leaves": [], "count": 1}"#;
        let cut = lines(&[header, "deployd-migration-plan-end"]);
        let why = cut
            .finish(1, &["Traceback".into(), "ImportError: x".into()])
            .unwrap_err()
            .0;
        assert_eq!(
            why,
            "the migration plan did not finish (manage.py shell exited with 1): Traceback | ImportError: x"
        );
        let none = lines(&["Unknown command: 'shell'"]);
        assert!(none.finish(1, &[]).unwrap_err().0.ends_with(": no output"));
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
}
