//! Release tasks (`check`, `migrate`, `collectstatic`, ...) in one-off
//! containers of the new image, before any service changes.

use std::collections::HashMap;

use deployd_proto::EventKind;

use super::label;
use super::run::{Failure, Run};
use crate::config::TaskConfig;
use crate::docker::{ContainerSpec, PulledImage};

impl Run {
    /// Runs one task to completion; its output goes to the deployment log.
    pub(crate) async fn run_task(
        &self,
        task: &TaskConfig,
        image: &PulledImage,
        env: &[(String, String)],
    ) -> Result<(), Failure> {
        let spec = ContainerSpec {
            name: Some(format!(
                "{}-task-{}-{}",
                self.app,
                task.name,
                short_id(&self.id.0)
            )),
            image: image.pinned.clone(),
            cmd: Some(task.command.clone()),
            env: env.to_vec(),
            network: self.cfg.network.clone(),
            volumes: self.cfg.volumes.clone(),
            labels: HashMap::from([
                (label::APP.to_owned(), self.app.clone()),
                (label::DEPLOYMENT.to_owned(), self.id.0.clone()),
                (label::TASK.to_owned(), task.name.clone()),
                (label::SHA.to_owned(), self.sha.to_string()),
            ]),
            ..Default::default()
        };
        let step = format!("task:{}", task.name);
        let live = |line: &str| {
            self.emit(EventKind::Output {
                step: step.clone(),
                line: line.to_owned(),
            })
        };
        let output = self.ctx.docker.run_oneoff(spec, task.timeout, live).await?;
        let applied = applied_migrations(&output.lines);
        if !applied.is_empty() {
            self.ctx.store.set_migrations(&self.id, &applied)?;
        }
        if output.exit_code != 0 {
            let last = output
                .lines
                .last()
                .map(String::as_str)
                .unwrap_or("no output");
            return Err(Failure(format!(
                "release task {} exited with {}: {last}",
                task.name, output.exit_code
            )));
        }
        Ok(())
    }
}

/// The last characters of a deployment id: enough to keep names unique.
pub(crate) fn short_id(id: &str) -> &str {
    &id[id.len().saturating_sub(8)..]
}

/// Migrations Django reports as applied (`Applying shop.0002_x... OK`).
fn applied_migrations(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("Applying ")?;
            let name = rest.strip_suffix("... OK")?;
            Some(name.trim().to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_applied_migrations_in_django_output() {
        let lines: Vec<String> = [
            "Operations to perform:",
            "  Apply all migrations: auth, contenttypes, shop",
            "Running migrations:",
            "  Applying shop.0002_heartbeat_queue... OK",
            "  Applying shop.0003_broken...Traceback (most recent call last):",
        ]
        .map(String::from)
        .into();
        assert_eq!(applied_migrations(&lines), ["shop.0002_heartbeat_queue"]);
    }
}
