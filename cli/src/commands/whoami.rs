//! `deployctl whoami`.

use clap::Args;
use deployd_proto::WhoAmI;

use super::Ctx;
use crate::exit::{CliError, Exit};

/// The token as the agent sees it: subject, issuer, what it may do where,
/// and when it expires.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  DEPLOYCTL_TOKEN_FILE=~/.deployd-token deployctl whoami")]
pub struct Whoami {}

impl Whoami {
    pub async fn run(self, ctx: &Ctx) -> Result<Exit, CliError> {
        let me: WhoAmI = ctx.client.get("/v1/whoami").await?;
        if ctx.json {
            return ctx.out_json(&me);
        }
        ctx.out(&format!("subject  {}", me.subject));
        ctx.out(&format!("issuer   {}", me.issuer));
        let expires = me
            .expires_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        ctx.out(&format!("expires  {expires}"));
        if me.grants.is_empty() {
            ctx.out("may      nothing (no rule of the agent matches this token)");
        }
        for grant in &me.grants {
            let scopes: Vec<&str> = grant.scopes.iter().map(|s| s.as_str()).collect();
            ctx.out(&format!(
                "may      {} on {}",
                scopes.join(", "),
                grant.apps.join(", ")
            ));
        }
        Ok(Exit::Success)
    }
}
