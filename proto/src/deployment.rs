//! Deployments: what was asked, what happened, step by step.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::CommitSha;

/// Identifies a deployment; time-ordered (UUID v7), so ids sort by creation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct DeploymentId(pub String);

impl fmt::Display for DeploymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a deployment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    /// Accepted, not started.
    Queued,
    /// Pulling, running release tasks, rolling or verifying.
    Running,
    /// Every service runs the new release and passed verification.
    Succeeded,
    /// Failed before any running service was touched.
    Failed,
    /// Failed after services changed; the previous release runs again.
    RolledBack,
    /// Failed, and restoring the previous release failed too: see the error.
    RollbackFailed,
    /// deployd stopped while it ran; at restart every service was converged.
    Interrupted,
}

impl DeploymentState {
    /// The name the API writes: `queued`, `running`, `succeeded`, `failed`,
    /// `rolled_back`, `rollback_failed`, `interrupted`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
            Self::RollbackFailed => "rollback_failed",
            Self::Interrupted => "interrupted",
        }
    }

    /// True once the deployment can no longer change.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }
}

impl fmt::Display for DeploymentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a deployment was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeploymentKind {
    /// Ship a new release.
    Deploy,
    /// Go back to an earlier release.
    Rollback,
}

impl DeploymentKind {
    /// The name the API writes: `deploy`, `rollback`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deploy => "deploy",
            Self::Rollback => "rollback",
        }
    }
}

impl fmt::Display for DeploymentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One host's part of a fleet deployment (several hosts deployed as one by
/// deployctl).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FleetPart {
    /// The fleet deployment's id, the same on every host (1 to 64 of
    /// a-z, A-Z, 0-9, `-`, `_`, `.`, `:`).
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 64))]
    pub id: String,
    /// This host's name in the fleet (the same characters).
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 64))]
    pub host: String,
    /// Whether this host runs the release tasks marked `once` (migrate):
    /// the fleet's first host does, the others skip them.
    pub once_tasks: bool,
}

/// One deployment of one app, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Deployment {
    pub id: DeploymentId,
    pub app: String,
    pub kind: DeploymentKind,
    /// The release being deployed.
    pub sha: CommitSha,
    /// Its image digest, once pulled.
    pub digest: Option<String>,
    /// The release that ran before, if any: what a rollback restores.
    pub previous_sha: Option<CommitSha>,
    /// Who asked (token subject, or `local` for the agent's own tooling).
    pub requested_by: String,
    pub reason: Option<String>,
    /// Deploy even if this sha is already live.
    pub force: bool,
    pub state: DeploymentState,
    /// Why it did not succeed, in one sentence.
    pub error: Option<String>,
    /// Migrations this release applied (`app.0002_name`): rollback does not
    /// reverse them, so they are reported.
    pub migrations: Vec<String>,
    /// Rollbacks: migrations applied since the release rolled back to; they
    /// stay applied (deployd never reverses a migration). Older agents do
    /// not send it.
    #[serde(default)]
    pub migrations_kept: Vec<String>,
    /// Rollbacks: release tasks were skipped (`--skip-tasks`). Older agents
    /// do not send it.
    #[serde(default)]
    pub skip_tasks: bool,
    /// The fleet deployment this is one host's part of, if any. Older
    /// agents do not send it.
    #[serde(default)]
    pub fleet: Option<FleetPart>,
    /// The migration plan its `plan` step made (`GET /v1/plans/{id}`), if
    /// the app makes plans. Older agents do not send it.
    #[serde(default)]
    pub plan: Option<String>,
    /// The plan it was asked to hold to (`deployctl deploy --plan`): it
    /// failed if the release, the live release or the pending migrations
    /// had changed since. Older agents do not send it.
    #[serde(default)]
    pub reviewed_plan: Option<String>,
    /// Migrations that break the running release were allowed for this
    /// deployment (`--allow-unsafe-migrations`). Older agents do not send
    /// it.
    #[serde(default)]
    pub allow_unsafe_migrations: bool,
    /// Rollbacks: what it did about migrations applied since its release
    /// last ran. Older agents do not send it.
    #[serde(default)]
    pub schema: crate::SchemaRollback,
    /// Asked to run as a canary: the new release gets a share of the
    /// clients first. Its `canary` events say how that went; without any,
    /// no canary ran (a first deployment, or the live release again: its
    /// log says why). Older agents do not send it, nor this one when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canary: bool,
    pub steps: Vec<Step>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Running,
    Succeeded,
    Failed,
}

/// One step of a deployment (`pull`, `task:migrate`, `roll:web`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Step {
    pub name: String,
    pub state: StepState,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// Set once the step ended.
    pub duration_ms: Option<u64>,
    /// What the step did or why it failed, in one line.
    pub detail: Option<String>,
}

/// Something that happened during a deployment, numbered from 1 in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeploymentEvent {
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The kinds of [`DeploymentEvent`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    StepStarted {
        step: String,
    },
    StepFinished {
        step: String,
        state: StepState,
        duration_ms: u64,
        detail: Option<String>,
    },
    /// A line a release task printed.
    Output {
        step: String,
        line: String,
    },
    /// A fleet part that runs the fleet's `once` release tasks has run
    /// them all: the fleet's schema is the release's, and the fleet's other
    /// hosts may start. Clients that do not know it skip it.
    OnceTasksDone,
    /// A canary's share of clients changed, or a step was judged. Clients
    /// that do not know it skip it.
    Canary {
        /// Which step, from 1; past the last once promoted.
        step: usize,
        /// The new release's share of clients now, in percent.
        percent: f64,
        decision: crate::CanaryDecision,
        /// Who decided: `deployd` (by the figures) or who asked.
        by: String,
        /// Why, in words, with the figures that decided.
        why: String,
        /// Both releases' figures over the step, once it was judged.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<crate::CanaryWindow>,
    },
    /// The deployment reached `state`.
    State {
        state: DeploymentState,
        error: Option<String>,
    },
}

impl EventKind {
    /// Every kind's wire name, as [`EventKind::kind`] gives them.
    pub const KINDS: [&'static str; 6] = [
        "step_started",
        "step_finished",
        "output",
        "once_tasks_done",
        "canary",
        "state",
    ];

    /// Its `type` on the wire (also the SSE event name).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::StepStarted { .. } => "step_started",
            Self::StepFinished { .. } => "step_finished",
            Self::Output { .. } => "output",
            Self::OnceTasksDone => "once_tasks_done",
            Self::Canary { .. } => "canary",
            Self::State { .. } => "state",
        }
    }

    /// Whether it is a deployment's final state.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::State { state, .. } if state.is_terminal())
    }
}

/// What an app runs now, service by service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AppStatus {
    pub app: String,
    /// The release that last went live, if any.
    pub live_sha: Option<CommitSha>,
    pub live_digest: Option<String>,
    /// The deployment in flight, if one runs.
    pub running_deployment: Option<DeploymentId>,
    /// Why the app is locked, if it is.
    pub lock: Option<AppLock>,
    pub services: Vec<ServiceStatus>,
}

/// A lock refusing deployments of an app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AppLock {
    pub reason: String,
    pub locked_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub locked_at: OffsetDateTime,
    /// The fleet deployment the app is locked for, if it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::FleetLock>,
}

/// One service's containers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServiceStatus {
    pub name: String,
    /// At most one container ever runs (celery beat); a fleet runs it on
    /// one host only. Older agents do not send it.
    #[serde(default)]
    pub singleton: bool,
    /// No longer in the app's config, yet its containers remain: the next
    /// deployment stops and removes them (a singleton before it rolls
    /// anything, others once the release is verified). Older agents do not
    /// send it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
    pub containers: Vec<ContainerStatus>,
}

/// One container of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ContainerStatus {
    pub name: String,
    pub sha: Option<CommitSha>,
    pub state: ContainerPhase,
    /// Docker's own words, e.g. `Up 3 minutes` or `Restarting (1) 2 seconds
    /// ago`. Older agents do not send it.
    #[serde(default)]
    pub status: Option<String>,
    /// `healthy`, `starting`, or `unhealthy: <why>`: the service's HTTP
    /// health check for web, the image's HEALTHCHECK otherwise; absent when
    /// neither applies or the container is not running. Older agents do
    /// not send it.
    #[serde(default)]
    pub health: Option<String>,
    /// The cluster node it runs on (the swarm backend's tasks); absent for
    /// this host's own containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Where a service container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ContainerPhase {
    /// Runs the live release (or the one being deployed).
    Running,
    /// Runs an older release and is finishing its work after SIGTERM
    /// (workers drain in the background after a roll).
    Draining,
    /// Stopped, kept for a quick rollback until the deployment ends.
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_wire_names() {
        use DeploymentState::*;
        for state in [
            Queued,
            Running,
            Succeeded,
            Failed,
            RolledBack,
            RollbackFailed,
            Interrupted,
        ] {
            let wire = serde_json::to_string(&state).unwrap();
            assert_eq!(wire, format!("\"{state}\""));
        }
        for kind in [DeploymentKind::Deploy, DeploymentKind::Rollback] {
            let wire = serde_json::to_string(&kind).unwrap();
            assert_eq!(wire, format!("\"{kind}\""));
        }
    }

    #[test]
    fn event_kinds_are_the_wire_tags() {
        let step = || "migrate".to_owned();
        let kinds = [
            EventKind::StepStarted { step: step() },
            EventKind::StepFinished {
                step: step(),
                state: StepState::Succeeded,
                duration_ms: 1,
                detail: None,
            },
            EventKind::Output {
                step: step(),
                line: "l".into(),
            },
            EventKind::OnceTasksDone,
            EventKind::Canary {
                step: 1,
                percent: 5.0,
                decision: crate::CanaryDecision::Step,
                by: "deployd".into(),
                why: "w".into(),
                window: None,
            },
            EventKind::State {
                state: DeploymentState::Succeeded,
                error: None,
            },
        ];
        for (kind, name) in kinds.iter().zip(EventKind::KINDS) {
            let wire = serde_json::to_value(kind).unwrap();
            assert_eq!(wire["type"], kind.kind());
            assert_eq!(kind.kind(), name);
        }
    }
}
