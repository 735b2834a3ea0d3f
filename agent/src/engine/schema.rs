//! A rollback and the schema. Migrations applied since the release it goes
//! back to last ran stay applied, and the older code runs against them: a
//! rollback past one that breaks that code (a dropped column it reads, a
//! NOT NULL column its inserts do not set) is refused, unless it reverses
//! them first (`--migrate-back`, in the live release's image, which knows
//! them) or is forced (`--force`).
//!
//! Which migrations: the live release's Django plans back to the migration
//! state the older release left, as its deployment's plan recorded it.

use deployd_proto::{DeploymentKind, MigrationPlan, SchemaRollback};

use super::common::Failure;
use super::plan::{breaking, describe, judge_by_models};
use super::release::{OneOff, migration_done};
use super::run::Run;
use crate::config::MigrationsConfig;
use crate::docker::{ImageRef, PulledImage, RegistryAuth};
use crate::env_file::AppEnv;

/// Migrations a rollback reverses before anything else.
pub(crate) struct Reversal {
    /// The live release's image: it has the migrations' files.
    image: PulledImage,
    /// `migrate <app> <target>` for each app, in the order the plan back
    /// unapplies them (`zero`: every migration of an app the older release
    /// did not have).
    targets: Vec<(String, String)>,
}

impl Run {
    /// The `schema` step of a rollback: what migrations applied since its
    /// release last ran do to that release, and whether it may go on. The
    /// migrations to reverse first, with `--migrate-back`.
    pub(crate) async fn check_schema(
        &self,
        env: &AppEnv,
        auth: Option<&RegistryAuth>,
        migrations: &MigrationsConfig,
    ) -> Result<Option<Reversal>, Failure> {
        debug_assert_eq!(self.kind, DeploymentKind::Rollback);
        let (Some(live), Some(digest)) = (&self.previous, &self.pin) else {
            return Ok(None);
        };
        let target = self.sha.short();
        if self.schema == SchemaRollback::Force {
            // Forced: not even the live release's Django must start.
            self.say(
                "schema",
                "not checked (--force): migrations applied since stay applied".into(),
            );
            return Ok(None);
        }
        let recorded = self
            .ctx
            .store
            .plan_of_release(&self.app, digest)?
            .and_then(|p| p.migrations);
        let Some(recorded) = recorded else {
            let why = format!(
                "release {target} was deployed without a migration plan, so the migration \
                 state it left is not known"
            );
            if self.schema == SchemaRollback::MigrateBack {
                return Err(Failure(format!("cannot migrate back: {why}")));
            }
            self.say(
                "schema",
                format!("{why}: migrations applied since stay applied, unchecked"),
            );
            return Ok(None);
        };
        let image = ImageRef::new(self.cfg.image.clone(), live.sha.clone());
        let image = self
            .ctx
            .docker
            .pull_digest(&image, &live.digest, auth)
            .await?;
        let mut back = self
            .inspect(
                migrations,
                &image.pinned,
                env,
                Some(&recorded.leaves),
                &self.id.0,
            )
            .await
            .map_err(|f| {
                Failure(format!(
                    "cannot check the schema: {}; --force rolls back without checking (admin scope)",
                    f.0
                ))
            })?;
        if !self.in_fleet {
            judge_by_models(&mut back, recorded.tables.as_ref(), target);
        }
        if back.migrations.is_empty() {
            self.say(
                "schema",
                format!("the schema is as release {target} left it"),
            );
            return Ok(None);
        }
        self.say(
            "schema",
            format!(
                "applied since release {target} last ran, as the live release {} sees them:",
                live.sha.short()
            ),
        );
        for line in describe(&back) {
            self.say("schema", line);
        }
        self.decide(&back, &recorded, image, target)
    }

    /// Refuses, keeps or reverses, as the rollback asked.
    fn decide(
        &self,
        back: &MigrationPlan,
        recorded: &MigrationPlan,
        image: PulledImage,
        target: &str,
    ) -> Result<Option<Reversal>, Failure> {
        let labels = back.labels();
        let breaking = breaking(back);
        let irreversible: Vec<String> = back
            .migrations
            .iter()
            .filter(|m| !m.reversible())
            .map(|m| m.label())
            .collect();
        match self.schema {
            SchemaRollback::MigrateBack if !irreversible.is_empty() => Err(Failure(format!(
                "cannot migrate back: {} cannot be reversed (no reverse code); roll back \
                 with --force to keep every migration applied",
                irreversible.join(", ")
            ))),
            SchemaRollback::MigrateBack => {
                let mut targets: Vec<(String, String)> = Vec::new();
                for m in &back.migrations {
                    if targets.iter().any(|(app, _)| *app == m.app) {
                        continue;
                    }
                    let to = recorded
                        .leaves
                        .iter()
                        .find(|(app, _)| *app == m.app)
                        .map_or_else(|| "zero".to_owned(), |(_, name)| name.clone());
                    targets.push((m.app.clone(), to));
                }
                Ok(Some(Reversal { image, targets }))
            }
            SchemaRollback::Check if !breaking.is_empty() => Err(Failure(format!(
                "refused: migrations applied since release {target} last ran would break it: \
                 {}. --migrate-back reverses them first{}; --force rolls back and keeps them \
                 applied (admin scope)",
                breaking.join("; "),
                if irreversible.is_empty() {
                    String::new()
                } else {
                    format!(" (but {} cannot be reversed)", irreversible.join(", "))
                }
            ))),
            SchemaRollback::Check => {
                self.say(
                    "schema",
                    format!(
                        "they stay applied: none breaks release {target} ({})",
                        labels.join(", ")
                    ),
                );
                Ok(None)
            }
            // Decided before any inspection.
            SchemaRollback::Force => Ok(None),
        }
    }

    /// The `migrate-back` step: `migrate <app> <target>` for each app, in
    /// the live release's image, before anything else of the rollback.
    pub(crate) async fn migrate_back(
        &self,
        reversal: &Reversal,
        env: &AppEnv,
        migrations: &MigrationsConfig,
    ) -> Result<(), Failure> {
        let task = migrations.env_of_task.as_deref().unwrap_or("migrate");
        let mut kept = self
            .ctx
            .store
            .get(&self.id)?
            .map(|d| d.migrations_kept)
            .unwrap_or_default();
        for (app, to) in &reversal.targets {
            let mut command = migrations.manage.clone();
            command.extend([
                "migrate".into(),
                app.clone(),
                to.clone(),
                "--noinput".into(),
            ]);
            let oneoff = OneOff {
                step: "migrate-back".into(),
                name: "migrate-back",
                command,
                image: &reversal.image.pinned,
                env: env.task(task).to_vec(),
                timeout: migrations.timeout.max(std::time::Duration::from_secs(600)),
                every_node: false,
            };
            let mut unapplied = Vec::new();
            let ended = self
                .run_logged(oneoff, |line| {
                    unapplied.extend(migration_done("Unapplying", line))
                })
                .await;
            // What Django reported reversed is no longer kept, even if the
            // command then failed.
            kept.retain(|m| !unapplied.contains(m));
            self.ctx.store.set_migrations_kept(&self.id, &kept)?;
            self.unapplied_migrations(unapplied);
            let (exit_code, last) = ended?;
            if exit_code != 0 {
                return Err(Failure(format!(
                    "migrate {app} {to} exited with {exit_code}: {last}"
                )));
            }
        }
        Ok(())
    }
}
