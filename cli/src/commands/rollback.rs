//! `deployctl rollback [--to SHA]`.

use std::time::Duration;

use clap::Args;
use deployd_proto::{CommitSha, RollbackRequest, SchemaRollback};

use super::Ctx;
use super::deploy::{start_following, submit};
use crate::exit::{CliError, Exit};
use crate::fleet::MaybeFleet;
use crate::fleet::{Which, execute};
use crate::settings::Global;

/// Roll back to the release before the live one, or to a kept one, and
/// follow it until it ends.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  deployctl rollback --app shop --reason \"checkout errors\"\n  deployctl rollback --to 4f2a9c1\n  deployctl rollback --skip-tasks --reason \"collectstatic hangs\""
)]
pub struct Rollback {
    /// A kept release to go back to (default: the one before the live one).
    #[arg(long)]
    pub to: Option<CommitSha>,
    /// Why, for the history.
    #[arg(long)]
    pub reason: Option<String>,
    /// If a deployment runs or the app is locked, wait up to this long.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with_all = ["fleet", "fleet_file"])]
    pub wait_lock: Option<Duration>,
    /// Print the deployment id and return; do not follow.
    #[arg(long, conflicts_with_all = ["fleet", "fleet_file"])]
    pub no_follow: bool,
    /// Run no release task, not even those marked for rollbacks: for an
    /// emergency, when the tasks themselves are the trouble.
    #[arg(long, conflicts_with_all = ["fleet", "fleet_file"])]
    pub skip_tasks: bool,
    /// First reverse the migrations applied since the release last ran
    /// (newest first), in the live release's image; refused if one cannot
    /// be reversed. For apps that make migration plans.
    #[arg(long, conflicts_with_all = ["fleet", "fleet_file", "force"])]
    pub migrate_back: bool,
    /// Roll back even though migrations applied since break the release
    /// (they stay applied). Needs the admin scope.
    #[arg(long, conflicts_with_all = ["fleet", "fleet_file"])]
    pub force: bool,
    #[command(flatten)]
    pub fleet: MaybeFleet,
}

impl Rollback {
    /// Rolls back every host of the fleet `which` names.
    pub async fn run_fleet(
        self,
        which: Which,
        global: &Global,
        json: bool,
    ) -> Result<Exit, CliError> {
        let fleet = which.load(global)?;
        execute::rollback(global, &fleet, self.to, self.reason, json).await
    }

    pub async fn run(self, ctx: &Ctx) -> Result<Exit, CliError> {
        let app = ctx.client.settings().app()?.to_owned();
        let body = RollbackRequest {
            to: self.to,
            reason: self.reason,
            skip_tasks: self.skip_tasks,
            fleet: None,
            schema: match (self.migrate_back, self.force) {
                (true, _) => SchemaRollback::MigrateBack,
                (_, true) => SchemaRollback::Force,
                _ => SchemaRollback::Check,
            },
        };
        let path = format!("/v1/apps/{app}/rollback");
        let deployment = submit(ctx, &path, &body, self.wait_lock).await?;
        let mut what = format!("{app} back to {}", deployment.sha);
        if deployment.skip_tasks {
            what.push_str(", release tasks skipped");
        }
        start_following(ctx, deployment, self.no_follow, &what).await
    }
}
