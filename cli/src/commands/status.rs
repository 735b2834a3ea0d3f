//! `deployctl status`.

use clap::Args;
use deployd_proto::{AppStatus, ContainerPhase};

use super::Ctx;
use crate::exit::{CliError, Exit};
use crate::fleet::MaybeFleet;

/// What the app runs now: live release, each service's containers with
/// their release and health, a deployment in flight, a lock.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  deployctl status --app shop --json")]
pub struct Status {
    #[command(flatten)]
    pub fleet: MaybeFleet,
}

fn phase(p: ContainerPhase) -> &'static str {
    match p {
        ContainerPhase::Running => "running",
        ContainerPhase::Draining => "draining",
        ContainerPhase::Stopped => "stopped",
    }
}

impl Status {
    /// Every host of the fleet `which` names.
    pub async fn run_fleet(
        self,
        which: crate::fleet::Which,
        global: &crate::settings::Global,
        json: bool,
    ) -> Result<Exit, CliError> {
        super::fleet::status(&which.load(global)?, global, json).await
    }

    pub async fn run(self, ctx: &Ctx) -> Result<Exit, CliError> {
        let app = ctx.client.settings().app()?.to_owned();
        let status: AppStatus = ctx.client.get(&format!("/v1/apps/{app}/status")).await?;
        if ctx.json {
            return ctx.out_json(&status);
        }
        let live = match (&status.live_sha, &status.live_digest) {
            (Some(sha), Some(digest)) => format!("{sha} ({digest})"),
            (Some(sha), None) => sha.to_string(),
            _ => "nothing deployed yet".to_owned(),
        };
        ctx.out(&format!("app {}: live {live}", status.app));
        if let Some(id) = &status.running_deployment {
            ctx.out(&format!("deploying: {id} (deployctl logs {id} --follow)"));
        }
        if let Some(lock) = &status.lock {
            ctx.out(&format!("locked by {}: {}", lock.locked_by, lock.reason));
        }
        for service in &status.services {
            if service.removed {
                ctx.out(&format!(
                    "{}: no longer in the config; the next deployment stops and removes it",
                    service.name
                ));
            } else {
                ctx.out(&format!("{}:", service.name));
            }
            if service.containers.is_empty() {
                ctx.out("  (no containers)");
            }
            for c in &service.containers {
                let sha = c.sha.as_ref().map_or("?", |s| s.as_str());
                // A cluster's task: where it runs, before its name.
                let name = match &c.node {
                    Some(node) => format!("{} on {node}", c.name),
                    None => c.name.clone(),
                };
                ctx.out(&format!(
                    "  {:<44} {:<12} {:<9} {:<24} {}",
                    name,
                    &sha[..sha.len().min(12)],
                    phase(c.state),
                    c.health.as_deref().unwrap_or("-"),
                    c.status.as_deref().unwrap_or(""),
                ));
            }
        }
        Ok(Exit::Success)
    }
}
