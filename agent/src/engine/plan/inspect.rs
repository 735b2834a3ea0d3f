//! The inspector: deployd's Python program run by the release's own Django
//! in a one-off container, and its answer read from the container's
//! output among whatever the app itself prints.

use std::collections::{BTreeSet, HashMap};

use deployd_proto::{MigrationPlan, PlannedMigration};
use serde::Deserialize;

use crate::config::{AppConfig, MigrationsConfig};
use crate::docker::ContainerSpec;
use crate::engine::Ctx;
use crate::engine::common::{Failure, short_id};
use crate::engine::label;
use crate::engine::run::Run;
use crate::env_file::AppEnv;

const INSPECTOR: &str = include_str!("inspect_migrations.py");
const HEADER: &str = "deployd-migration-plan: ";
const MIGRATION: &str = "deployd-migration: ";
const TABLE: &str = "deployd-table: ";
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
        tables: usize,
    },
}

/// A table the release's models use, and its columns.
#[derive(Deserialize)]
struct Table {
    table: String,
    columns: BTreeSet<String>,
}

/// What the inspector printed, taken line by line.
#[derive(Default)]
struct Answer {
    header: Option<Header>,
    migrations: Vec<PlannedMigration>,
    tables: Vec<Table>,
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
        } else if let Some(json) = line.strip_prefix(TABLE) {
            serde_json::from_str(json).map(|t| self.tables.push(t))
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
                tables,
            }) if self.ended
                && self.migrations.len() == count
                && self.tables.len() == tables
                && self.unreadable.is_none() =>
            {
                Ok(MigrationPlan {
                    django,
                    vendor,
                    leaves,
                    migrations: self.migrations,
                    tables: Some(
                        self.tables
                            .into_iter()
                            .map(|t| (t.table, t.columns))
                            .collect(),
                    ),
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
}

#[cfg(test)]
mod tests {
    use super::super::breaking;
    use super::super::tests::migration;
    use super::*;
    use deployd_proto::Verdict;

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
        let header = r#"deployd-migration-plan: {"django": "5.2", "vendor": "postgresql", "leaves": [["shop", "0003_x"]], "count": 1, "tables": 1}"#;
        let output = [
            "5 objects imported automatically (use -v 2 for details).",
            header,
            &format!("deployd-migration: {m}"),
            r#"deployd-table: {"table": "shop_heartbeat", "columns": ["id", "queue"]}"#,
            "deployd-migration-plan-end",
        ];
        let plan = lines(&output).finish(0, &[]).unwrap();
        assert_eq!(plan.leaves, [("shop".to_owned(), "0003_x".to_owned())]);
        let tables = plan.tables.as_ref().unwrap();
        assert_eq!(tables["shop_heartbeat"].len(), 2);
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
        let header = r#"deployd-migration-plan: {"django": "5.2", "vendor": "sqlite", "leaves": [], "count": 1, "tables": 0}"#;
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
}
