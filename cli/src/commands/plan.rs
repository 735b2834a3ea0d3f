//! `deployctl plan <sha>`: what a deployment of a release would do, for
//! review before it runs.

use std::time::Duration;

use clap::Args;
use deployd_proto::{CommitSha, Plan, PlanRequest, PlanState, UnsafeMigrations, Verdict};
use reqwest::Method;
use tokio::time::Instant;

use super::Ctx;
use crate::exit::{CliError, Exit};

/// How long a plan may take (a pull, then the inspection).
const PLAN_WAIT: Duration = Duration::from_secs(15 * 60);
/// SQL lines shown per migration; `--json` has them all.
const SQL_LINES: usize = 12;

/// Plan a deployment: pull and pin the release, and judge the migrations it
/// would apply against the live database (read-only), changing nothing.
#[derive(Debug, Args)]
#[command(
    after_help = "Deploy exactly what was reviewed with `deployctl deploy <sha> --plan <id>`: it \
                  fails, changing nothing, if the image, the live release or the pending \
                  migrations changed since.\n\nExits 0 when a deployment of the plan would go \
                  on, 3 when the app would refuse its migrations, 1 when the plan failed, 7 \
                  when another plan of the app is being made.\n\nExamples:\n  deployctl plan 4f2a9c1 --app shop\n  \
                  deployctl plan $CI_COMMIT_SHA --json"
)]
pub struct PlanCommand {
    /// The commit to plan: 7 to 40 lowercase hex digits (the image tag).
    #[arg(required_unless_present = "show")]
    pub sha: Option<CommitSha>,
    /// Show a plan made before, by id, instead of making one.
    #[arg(long, value_name = "ID")]
    pub show: Option<String>,
}

impl PlanCommand {
    pub async fn run(self, ctx: &Ctx) -> Result<Exit, CliError> {
        let app = ctx.client.settings().app()?.to_owned();
        let mut plan: Plan = match (&self.show, self.sha) {
            (Some(id), _) => get(ctx, id).await?,
            (None, None) => return Err(CliError::usage("name the sha to plan, or --show ID")),
            (None, Some(sha)) => {
                let path = format!("/v1/apps/{app}/plans");
                ctx.client
                    .call(Method::POST, &path, &PlanRequest { sha })
                    .await?
            }
        };
        ctx.note(&format!("plan {}: {} {}", plan.id, plan.app, plan.sha));
        let deadline = Instant::now() + PLAN_WAIT;
        while plan.state == PlanState::Planning {
            if Instant::now() >= deadline {
                return Err(CliError::new(
                    Exit::Other,
                    format!(
                        "plan {} was not ready after {} min; see it later with --show {}",
                        plan.id,
                        PLAN_WAIT.as_secs() / 60,
                        plan.id
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            plan = get(ctx, &plan.id).await?;
        }
        if ctx.json {
            ctx.out_json(&plan)?;
        } else {
            for line in render(&plan) {
                ctx.out(&line);
            }
        }
        match plan.state {
            PlanState::Ready if refused(&plan) => Ok(Exit::Failed),
            PlanState::Failed => Err(CliError::new(
                Exit::Other,
                format!(
                    "plan {} failed: {}",
                    plan.id,
                    plan.error.as_deref().unwrap_or("no reason given")
                ),
            )),
            _ => Ok(Exit::Success),
        }
    }
}

async fn get(ctx: &Ctx, id: &str) -> Result<Plan, CliError> {
    ctx.client.get(&format!("/v1/plans/{id}")).await
}

/// Whether a deployment of the plan would be refused for its migrations.
fn refused(plan: &Plan) -> bool {
    plan.live.is_some()
        && plan.unsafe_migrations == UnsafeMigrations::Refuse
        && plan
            .migrations
            .iter()
            .any(|m| m.operations_judged(Verdict::Breaks).next().is_some())
}

/// The plan for humans: the release, each migration with its operations,
/// verdicts and SQL, what rolls and runs, and what a deployment would do.
pub fn render(plan: &Plan) -> Vec<String> {
    let mut lines = vec![format!(
        "release   {} {}",
        plan.sha,
        plan.digest.as_deref().unwrap_or("(not pulled)")
    )];
    lines.push(match &plan.live {
        Some((sha, digest)) => format!("live      {sha} {digest}"),
        None => "live      none (a first deployment)".to_owned(),
    });
    if plan.state == PlanState::Failed {
        return lines;
    }
    match &plan.migrations {
        None => lines.push("migrations  not planned ([migrations] is not configured)".into()),
        Some(m) if m.migrations.is_empty() => lines.push(format!(
            "migrations  none to apply (Django {}, {})",
            m.django, m.vendor
        )),
        Some(m) => {
            lines.push(format!(
                "migrations  {} to apply (Django {}, {}):",
                m.migrations.len(),
                m.django,
                m.vendor
            ));
            for migration in &m.migrations {
                lines.push(format!(
                    "  {}  [{}]",
                    migration.label(),
                    migration.verdict()
                ));
                for o in &migration.operations {
                    lines.push(format!("    {}: {}", o.operation, o.description));
                    lines.push(format!(
                        "      {}: {}",
                        o.verdict.as_str().to_uppercase(),
                        o.why
                    ));
                }
                let sql: Vec<&String> = migration
                    .sql
                    .iter()
                    .filter(|l| !l.trim().is_empty() && l.trim() != "--")
                    .collect();
                for line in sql.iter().take(SQL_LINES) {
                    lines.push(format!("      | {line}"));
                }
                if sql.len() > SQL_LINES {
                    lines.push(format!(
                        "      | ... {} more (--json)",
                        sql.len() - SQL_LINES
                    ));
                }
            }
        }
    }
    let services: Vec<String> = plan
        .services
        .iter()
        .map(|s| format!("{} ({} x{})", s.name, s.role, s.replicas))
        .collect();
    lines.push(format!("rolls     {}", services.join(", ")));
    let tasks: Vec<String> = plan
        .tasks
        .iter()
        .map(|t| {
            let once = if t.once { " (once)" } else { "" };
            format!("{}{once}", t.name)
        })
        .collect();
    lines.push(format!(
        "runs      {}",
        if tasks.is_empty() {
            "no release task".to_owned()
        } else {
            tasks.join(", ")
        }
    ));
    let breaking = plan
        .migrations
        .iter()
        .flat_map(|m| m.operations_judged(Verdict::Breaks))
        .count();
    lines.push(match (breaking, plan.live.is_some(), plan.unsafe_migrations) {
        (0, _, _) => "verdict   nothing breaks the running release".to_owned(),
        (_, false, _) => "verdict   no release runs yet: nothing for these to break".to_owned(),
        (n, true, _) if refused(plan) => format!(
            "verdict   REFUSED: {n} operation(s) break the running release; ship them in \
             steps (expand, then contract), or --allow-unsafe-migrations --reason (admin)"
        ),
        (n, true, policy) => format!(
            "verdict   {n} operation(s) break the running release ([migrations] unsafe = \"{policy}\": it goes on)"
        ),
    });
    lines.push(format!(
        "deploy it as reviewed: deployctl deploy {} --plan {}",
        plan.sha.short(),
        plan.id
    ));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_says_what_breaks_and_how_to_deploy_it_as_reviewed() {
        let mut plan: Plan =
            serde_json::from_str(include_str!("../../../proto/tests/data/plan.json")).unwrap();
        plan.sha = "a".repeat(40).parse().unwrap();
        let lines = render(&plan);
        let text = lines.join("\n");
        assert!(
            text.contains("migrations  1 to apply (Django 5.2.19, postgresql):"),
            "{text}"
        );
        assert!(
            text.contains("  shop.0003_remove_heartbeat_queue  [breaks]"),
            "{text}"
        );
        assert!(
            text.contains("      BREAKS: drops column heartbeat.queue"),
            "{text}"
        );
        assert!(
            text.contains(r#"      | ALTER TABLE "shop_heartbeat" DROP COLUMN "queue" CASCADE;"#)
        );
        assert!(
            text.contains("rolls     web (web x2)\nruns      migrate (once)"),
            "{text}"
        );
        assert!(text.contains("verdict   REFUSED: 1 operation(s) break the running release"));
        assert_eq!(
            lines.last().unwrap(),
            "deploy it as reviewed: deployctl deploy aaaaaaaaaaaa --plan 019abc00-0000-7000-8000-00000000000a"
        );
    }
}
