//! `deployctl logs <deployment-id> [--follow]`.

use clap::Args;
use deployd_proto::Deployment;

use super::Ctx;
use crate::exit::{CliError, Exit};
use crate::follow::{Style, follow};

/// A deployment's log: every step with its timing, task output, the
/// outcome. With --follow, until it ends, exiting with its outcome's code.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  deployctl logs 019abc...def\n  deployctl logs 019abc...def --follow --json"
)]
pub struct Logs {
    /// The deployment id (`deployctl history` lists them).
    pub id: String,
    /// Keep following until the deployment ends.
    #[arg(long, short)]
    pub follow: bool,
}

impl Logs {
    pub async fn run(self, ctx: &Ctx) -> Result<Exit, CliError> {
        let style = Style::pick(ctx.json);
        let current: Deployment = ctx
            .client
            .get(&format!("/v1/deployments/{}", self.id))
            .await?;
        if !self.follow && !current.state.is_terminal() {
            // What is recorded so far, then return.
            crate::follow::replay(&ctx.client, &self.id, style).await?;
            return Ok(Exit::Success);
        }
        if self.follow {
            return super::deploy::follow_until_interrupted(ctx, &self.id, style).await;
        }
        follow(&ctx.client, &self.id, style).await?;
        Ok(Exit::Success)
    }
}
