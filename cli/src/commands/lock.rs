//! `deployctl lock --reason TEXT` and `deployctl unlock`.

use clap::Args;
use deployd_proto::{AppLock, LockRequest};
use reqwest::Method;
use serde_json::json;

use super::Ctx;
use crate::exit::{CliError, Exit};

/// Lock the app: deployments and rollbacks are refused until unlocked.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  deployctl lock --app shop --reason \"incident 42: DB failover\""
)]
pub struct Lock {
    /// Why; shown to whoever tries to deploy.
    #[arg(long)]
    pub reason: String,
}

/// Lift the app's lock.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  deployctl unlock --app shop")]
pub struct Unlock {}

impl Lock {
    pub async fn run(self, ctx: &Ctx) -> Result<Exit, CliError> {
        let app = ctx.client.settings().app()?.to_owned();
        if self.reason.trim().is_empty() {
            return Err(CliError::usage("a lock needs a reason"));
        }
        let lock: AppLock = ctx
            .client
            .call(
                Method::PUT,
                &format!("/v1/apps/{app}/lock"),
                &LockRequest {
                    reason: self.reason.clone(),
                    fleet: None,
                },
            )
            .await?;
        if ctx.json {
            return ctx.out_json(&lock);
        }
        ctx.out(&format!(
            "{app} locked by {}: {}",
            lock.locked_by, lock.reason
        ));
        Ok(Exit::Success)
    }
}

impl Unlock {
    pub async fn run(self, ctx: &Ctx) -> Result<Exit, CliError> {
        let app = ctx.client.settings().app()?.to_owned();
        ctx.client
            .call_empty(Method::DELETE, &format!("/v1/apps/{app}/lock"))
            .await?;
        if ctx.json {
            return ctx.out_json(&json!({"app": app, "locked": false}));
        }
        ctx.out(&format!("{app} unlocked"));
        Ok(Exit::Success)
    }
}
