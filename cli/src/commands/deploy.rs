//! `deployctl deploy <sha>`.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use deployd_proto::{CommitSha, DeployRequest, Deployment};
use reqwest::Method;
use tokio::time::Instant;

use super::Ctx;
use crate::exit::{CliError, Exit};
use crate::fleet::MaybeFleet;
use crate::fleet::{Which, execute};
use crate::follow::{Style, exit_of, follow};
use crate::settings::Global;

/// Deploy a release and follow it until it ends.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  deployctl deploy 4f2a9c1 --app shop --reason \"release 42\"\n  deployctl deploy $CI_COMMIT_SHA --oidc gitlab --wait-lock 10m"
)]
pub struct Deploy {
    /// The commit to deploy: 7 to 40 lowercase hex digits (the image tag).
    pub sha: CommitSha,
    /// Why, for the history.
    #[arg(long)]
    pub reason: Option<String>,
    /// Deploy even if this sha is already live.
    #[arg(long)]
    pub force: bool,
    /// If another deployment runs or the app is locked, wait up to this
    /// long (e.g. 10m) and try again.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait_lock: Option<Duration>,
    /// Print the deployment id and return; do not follow.
    #[arg(long, conflicts_with_all = ["fleet", "fleet_file"])]
    pub no_follow: bool,
    #[command(flatten)]
    pub fleet: MaybeFleet,
    /// With a fleet: refuse when its hosts run different releases.
    #[arg(long)]
    pub require_same: bool,
    /// With a fleet: finish the fleet deployment of this sha that a
    /// deployctl left behind (the hosts' locks name it).
    #[arg(long)]
    pub resume: bool,
    /// Hold to a reviewed plan (`deployctl plan`): fail, changing nothing,
    /// if the image, the live release or the pending migrations changed.
    #[arg(long, value_name = "ID", conflicts_with_all = ["fleet", "fleet_file"])]
    pub plan: Option<String>,
    /// Go on even if a migration breaks the running release and the app
    /// refuses those (needs the admin scope and --reason; audited).
    #[arg(long, requires = "reason")]
    pub allow_unsafe_migrations: bool,
    /// Run it as a canary: the new release gets a share of clients first,
    /// step by step, judged by the switch's figures (the app needs a
    /// `[canary]` table). Without this flag or --no-canary, the app's
    /// `[canary] default` decides.
    #[arg(long, conflicts_with = "no_canary")]
    pub canary: bool,
    /// Not as a canary, whatever the app's default.
    #[arg(long)]
    pub no_canary: bool,
}

impl Deploy {
    /// Deploys every host of the fleet `which` names.
    pub async fn run_fleet(
        self,
        which: Which,
        global: &Global,
        json: bool,
    ) -> Result<Exit, CliError> {
        if self.force || self.wait_lock.is_some() || self.canary {
            return Err(CliError::usage(
                "--force, --wait-lock and --canary are for one host, not a fleet",
            ));
        }
        let fleet = which.load(global)?;
        let options = execute::DeployOptions {
            sha: self.sha,
            reason: self.reason,
            require_same: self.require_same,
            resume: self.resume,
            allow_unsafe_migrations: self.allow_unsafe_migrations,
            json,
        };
        execute::deploy(global, &fleet, options).await
    }

    pub async fn run(self, ctx: &Ctx) -> Result<Exit, CliError> {
        if self.require_same || self.resume {
            return Err(CliError::usage("--require-same and --resume need --fleet"));
        }
        let app = ctx.client.settings().app()?.to_owned();
        let body = DeployRequest {
            sha: self.sha.clone(),
            force: self.force,
            reason: self.reason,
            digest: None,
            fleet: None,
            plan: self.plan,
            allow_unsafe_migrations: self.allow_unsafe_migrations,
            canary: match (self.canary, self.no_canary) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
        };
        let path = format!("/v1/apps/{app}/deployments");
        let deployment = submit(ctx, &path, &body, self.wait_lock).await?;
        start_following(
            ctx,
            deployment,
            self.no_follow,
            &format!("{app} {}", self.sha),
        )
        .await
    }
}

/// POSTs a deployment or rollback; with `wait`, a conflict or lock is
/// waited out (a refused change keeps the token usable).
pub async fn submit(
    ctx: &Ctx,
    path: &str,
    body: &impl serde::Serialize,
    wait: Option<Duration>,
) -> Result<Deployment, CliError> {
    let deadline = match wait {
        Some(w) => Some(
            Instant::now()
                .checked_add(w)
                .ok_or_else(|| CliError::usage("--wait-lock is too long"))?,
        ),
        None => None,
    };
    loop {
        match ctx
            .client
            .call::<Deployment>(Method::POST, path, body)
            .await
        {
            Ok(deployment) => return Ok(deployment),
            Err(e) if e.exit == Exit::Conflict && deadline.is_some_and(|d| Instant::now() < d) => {
                let deadline = deadline.unwrap_or_else(Instant::now);
                match &e.running {
                    Some(running) => {
                        ctx.note(&format!(
                            "waiting for deployment {running} to end ({})",
                            e.message
                        ));
                        wait_for_end(ctx, running, deadline).await?;
                    }
                    None => {
                        ctx.note(&format!("waiting: {}", e.message));
                        tokio::time::sleep_until(
                            deadline.min(Instant::now() + Duration::from_secs(5)),
                        )
                        .await;
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
}

async fn wait_for_end(ctx: &Ctx, id: &str, deadline: Instant) -> Result<(), CliError> {
    while Instant::now() < deadline {
        let d: Deployment = ctx.client.get(&format!("/v1/deployments/{id}")).await?;
        if d.state.is_terminal() {
            // Its end may not have reached the engine's bookkeeping yet.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Ok(());
        }
        tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_secs(2))).await;
    }
    Ok(())
}

/// Says what started, then follows it (Ctrl-C stops following only).
pub async fn start_following(
    ctx: &Ctx,
    deployment: Deployment,
    no_follow: bool,
    what: &str,
) -> Result<Exit, CliError> {
    let id = deployment.id.0.clone();
    if no_follow {
        if ctx.json {
            return ctx.out_json(&deployment);
        }
        ctx.out(&id);
        return Ok(Exit::Success);
    }
    ctx.note(&format!("deployment {id}: {what}"));
    let style = Style::pick(ctx.json);
    follow_until_interrupted(ctx, &id, style).await
}

/// Follows until the end (its outcome's exit code) or Ctrl-C (130, and
/// how to follow again, on stderr whatever the output style).
pub async fn follow_until_interrupted(ctx: &Ctx, id: &str, style: Style) -> Result<Exit, CliError> {
    tokio::select! {
        followed = follow(&ctx.client, id, style) => Ok(exit_of(followed?)),
        Ok(()) = tokio::signal::ctrl_c() => {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(
                err,
                "stopped following; deployment {id} goes on. Follow it again: deployctl logs {id} --follow"
            );
            Ok(Exit::Stopped)
        }
    }
}
