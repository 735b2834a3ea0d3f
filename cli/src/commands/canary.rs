//! `deployctl promote` and `deployctl abort`: decide a running canary by
//! hand.

use clap::Args;
use deployd_proto::{CanaryOrder, Deployment};
use reqwest::Method;

use super::Ctx;
use crate::exit::{CliError, Exit};

/// Promote the app's running canary: the new release takes every client
/// now, and the deployment goes on to its other services.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  deployctl promote --app shop --reason \"figures look right\"")]
pub struct Promote {
    /// Why, for the deployment's record and the audit log.
    #[arg(long)]
    pub reason: Option<String>,
}

/// Abort the app's running canary: every client goes back to the running
/// release at once, and the deployment ends rolled back.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  deployctl abort --app shop --reason \"checkout errors\"")]
pub struct Abort {
    /// Why, for the deployment's record and the audit log.
    #[arg(long)]
    pub reason: Option<String>,
}

impl Promote {
    pub async fn run(self, ctx: &Ctx) -> Result<Exit, CliError> {
        order(ctx, "promote", self.reason).await
    }
}

impl Abort {
    pub async fn run(self, ctx: &Ctx) -> Result<Exit, CliError> {
        order(ctx, "abort", self.reason).await
    }
}

async fn order(ctx: &Ctx, what: &str, reason: Option<String>) -> Result<Exit, CliError> {
    let app = ctx.client.settings().app()?.to_owned();
    let deployment: Deployment = ctx
        .client
        .call(
            Method::POST,
            &format!("/v1/apps/{app}/canary/{what}"),
            &CanaryOrder { reason },
        )
        .await?;
    if ctx.json {
        return ctx.out_json(&deployment);
    }
    ctx.out(&format!(
        "{what} handed to the canary of {app} (deployment {}); follow it: deployctl logs {} --follow",
        deployment.id.0, deployment.id.0
    ));
    Ok(Exit::Success)
}
