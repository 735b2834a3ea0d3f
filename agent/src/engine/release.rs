//! Release tasks (`check`, `migrate`, `collectstatic`, ...) in one-off
//! containers of the new image, before any service changes.

use std::collections::HashMap;

use deployd_proto::EventKind;

use super::common::{Failure, short_id};
use super::label;
use super::prepare::registry_auth;
use super::run::Run;
use crate::config::{Backend, TaskConfig};
use crate::docker::{ContainerSpec, PulledImage, ServiceMode, SwarmServiceSpec};
use crate::env_file::AppEnv;

impl Run {
    /// Runs one task to completion; its output goes to the deployment log.
    pub(crate) async fn run_task(
        &self,
        task: &TaskConfig,
        image: &PulledImage,
        env: &AppEnv,
    ) -> Result<(), Failure> {
        let mut applied = Vec::new();
        let oneoff = OneOff {
            step: format!("task:{}", task.name),
            name: &task.name,
            command: task.command.clone(),
            image: &image.pinned,
            env: env.task(&task.name).to_vec(),
            timeout: task.timeout,
            every_node: task.every_node,
        };
        let ended = self
            .run_logged(oneoff, |line| {
                applied.extend(migration_done("Applying", line))
            })
            .await;
        self.applied_migrations(applied)?;
        let (exit_code, last) = ended?;
        if exit_code != 0 {
            return Err(Failure(format!(
                "release task {} exited with {exit_code}: {last}",
                task.name
            )));
        }
        Ok(())
    }

    /// Runs a one-off container of the app to its end, its output in the
    /// log under `step`, each line also to `on_line`; its exit code and
    /// last output line.
    pub(crate) async fn run_logged(
        &self,
        o: OneOff<'_>,
        mut on_line: impl FnMut(&str) + Send,
    ) -> Result<(i64, String), Failure> {
        let spec = ContainerSpec {
            name: Some(format!(
                "{}-task-{}-{}",
                self.app,
                o.name,
                short_id(&self.id.0)
            )),
            image: o.image.to_owned(),
            cmd: Some(o.command),
            env: o.env,
            network: self.cfg.network.clone(),
            volumes: self.cfg.volumes.clone(),
            labels: HashMap::from([
                (label::APP.to_owned(), self.app.clone()),
                (label::DEPLOYMENT.to_owned(), self.id.0.clone()),
                (label::TASK.to_owned(), o.name.to_owned()),
                (label::SHA.to_owned(), self.sha.to_string()),
            ]),
            cgroup_parent: self.cfg.cgroup_parent.clone(),
            ..Default::default()
        };
        let step = o.step;
        let output_line = |line: String| EventKind::Output {
            step: step.clone(),
            line,
        };
        // The log keeps a task's first lines as they come and, when it says
        // more, a note and its last lines at the end: where a cause is.
        let mut seen = 0usize;
        let live = |line: &str| {
            seen += 1;
            if seen <= LOGGED_HEAD {
                self.emit(output_line(line.to_owned()));
            }
            on_line(line);
        };
        let output = match self.cfg.backend {
            Backend::Docker => self.ctx.docker.run_oneoff(spec, o.timeout, live).await?,
            // A job of one task, placed by Swarm on any node, or of one
            // task on every node.
            Backend::Swarm => {
                let job = SwarmServiceSpec {
                    name: format!("{}_task-{}-{}", self.app, o.name, short_id(&self.id.0)),
                    image: spec.image,
                    cmd: spec.cmd,
                    env: spec.env,
                    network: spec.network,
                    volumes: spec.volumes,
                    labels: spec.labels,
                    mode: ServiceMode::Job,
                    ..Default::default()
                };
                let auth = registry_auth(&self.cfg)?;
                let docker = &self.ctx.docker;
                docker
                    .run_job(job, o.every_node, auth.as_ref(), o.timeout, live)
                    .await?
            }
        };
        let (omitted, tail) = unlogged_tail(seen, &output.lines);
        if omitted > 0 {
            let note = format!("[deployd: {omitted} lines of output not kept]");
            self.emit(output_line(note));
        }
        for line in tail {
            self.emit(output_line(line.clone()));
        }
        let last = output
            .lines
            .last()
            .map_or_else(|| "no output".to_owned(), Clone::clone);
        Ok((output.exit_code, last))
    }
}

/// A one-off container of a deployment: a release task, or a migration
/// reversed before a rollback.
pub(crate) struct OneOff<'a> {
    /// The step its output is logged under.
    pub step: String,
    /// Names the container and labels it.
    pub name: &'a str,
    pub command: Vec<String>,
    /// Pinned by digest.
    pub image: &'a str,
    pub env: Vec<(String, String)>,
    pub timeout: std::time::Duration,
    /// On the swarm backend, one task on every node (see
    /// [`TaskConfig::every_node`]).
    pub every_node: bool,
}

/// Output lines of a task kept in the deployment log from its start...
const LOGGED_HEAD: usize = 1000;
/// ...and from its end, when it printed more.
const LOGGED_TAIL: usize = 200;

/// Of a task that printed `seen` lines, ending with `last`: how many lines
/// the log leaves out, and the last ones it adds at the end.
fn unlogged_tail(seen: usize, last: &[String]) -> (usize, &[String]) {
    let unlogged = seen.saturating_sub(LOGGED_HEAD);
    let tail = &last[last.len().saturating_sub(unlogged.min(LOGGED_TAIL))..];
    (unlogged - tail.len(), tail)
}

/// A migration `manage.py migrate` reports done, by its `verb`:
/// `Applying shop.0002_x... OK` or, migrating back, `Unapplying ...`.
pub(crate) fn migration_done(verb: &str, line: &str) -> Option<String> {
    let rest = line.trim().strip_prefix(verb)?.strip_prefix(' ')?;
    let name = rest.strip_suffix("... OK")?;
    Some(name.trim().to_owned())
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
        let applied: Vec<String> = lines
            .iter()
            .filter_map(|l| migration_done("Applying", l))
            .collect();
        assert_eq!(applied, ["shop.0002_heartbeat_queue"]);
        assert_eq!(
            migration_done(
                "Unapplying",
                "  Unapplying shop.0003_heartbeat_priority... OK"
            ),
            Some("shop.0003_heartbeat_priority".into())
        );
        assert_eq!(
            migration_done("Unapplying", "  Applying shop.0003_x... OK"),
            None
        );
    }

    #[test]
    fn a_chatty_task_logs_its_head_and_tail() {
        let lines = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>();
        assert_eq!(unlogged_tail(10, &lines(10)), (0, &[][..]));
        let last = lines(LOGGED_HEAD + 5);
        let (omitted, tail) = unlogged_tail(LOGGED_HEAD + 5, &last);
        assert_eq!((omitted, tail.len()), (0, 5));
        assert_eq!(tail[0], LOGGED_HEAD.to_string());
        // The runner keeps only its last lines; the count says how many came.
        let seen = LOGGED_HEAD + LOGGED_TAIL + 1700;
        let last: Vec<String> = lines(seen)[seen - 2000..].to_vec();
        let (omitted, tail) = unlogged_tail(seen, &last);
        assert_eq!((omitted, tail.len()), (1700, LOGGED_TAIL));
        assert_eq!(tail.last().unwrap(), &(seen - 1).to_string());
    }
}
