//! `deployctl history`.

use clap::Args;
use deployd_proto::DeploymentPage;

use super::{Ctx, short_id};
use crate::exit::{CliError, Exit};
use crate::fleet::MaybeFleet;

/// The app's deployments, newest first.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  deployctl history --app shop --limit 5")]
pub struct History {
    /// How many (1 to 100).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub limit: u16,
    #[command(flatten)]
    pub fleet: MaybeFleet,
}

impl History {
    /// Every host of the fleet `which` names.
    pub async fn run_fleet(
        self,
        which: crate::fleet::Which,
        global: &crate::settings::Global,
        json: bool,
    ) -> Result<Exit, CliError> {
        super::fleet::history(&which.load(global)?, global, self.limit, json).await
    }

    pub async fn run(self, ctx: &Ctx) -> Result<Exit, CliError> {
        let app = ctx.client.settings().app()?.to_owned();
        let page: DeploymentPage = ctx
            .client
            .get(&format!("/v1/apps/{app}/deployments?limit={}", self.limit))
            .await?;
        if ctx.json {
            return ctx.out_json(&page);
        }
        ctx.out(&format!(
            "{:<12}  {:<20}  {:<9}  {:<15}  {:<12}  {:>10}  {:<16}  {}",
            "ID", "WHEN (UTC)", "KIND", "STATE", "SHA", "MIGRATIONS", "BY", "REASON / ERROR"
        ));
        for d in &page.deployments {
            let when = d
                .created_at
                .format(time::macros::format_description!(
                    "[year]-[month]-[day] [hour]:[minute]:[second]"
                ))
                .unwrap_or_default();
            let kind = d.kind.as_str();
            let sha = d.sha.as_str();
            let why = d.error.as_deref().or(d.reason.as_deref()).unwrap_or("");
            ctx.out(&format!(
                "{:<12}  {when:<20}  {kind:<9}  {:<15}  {:<12}  {:>10}  {:<16}  {why}",
                short_id(&d.id.0),
                d.state.as_str(),
                &sha[..sha.len().min(12)],
                d.migrations.len(),
                d.requested_by,
            ));
        }
        Ok(Exit::Success)
    }
}
