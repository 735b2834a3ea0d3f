//! Request and response bodies of the `/v1` API that are not deployments
//! themselves.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{CommitSha, Deployment, FleetPart, SchemaRollback};

/// Longest `reason` accepted on a deployment, rollback or lock.
pub const MAX_REASON_CHARS: usize = 500;

/// `POST /v1/apps/{app}/deployments`: ship a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// The commit to deploy: the image tag in the app's repository.
    pub sha: CommitSha,
    /// Deploy even if this sha is already live.
    #[serde(default)]
    pub force: bool,
    /// Why, for the history (at most 500 characters).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 500))]
    pub reason: Option<String>,
    /// Deploy exactly this image digest of the sha (`sha256:` and 64 hex
    /// digits): a fleet deploys the digest every host resolved the tag to.
    /// Sent only when set, so older agents keep accepting the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// This deployment is one host's part of a fleet deployment. Sent only
    /// when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetPart>,
    /// Hold to this plan (`POST /v1/apps/{app}/plans`): fail, changing
    /// nothing, if the release's digest, the live release or the pending
    /// migrations differ from what it showed. Sent only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// Go on even when a migration breaks the running release and the app
    /// refuses those (`admin` scope; needs a reason). Sent only when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_unsafe_migrations: bool,
    /// Run it as a canary (`true`) or not (`false`); absent: as the app's
    /// `[canary] default` says. Sent only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<bool>,
}

/// `POST /v1/apps/{app}/rollback`: go back to an earlier release.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// A kept release to go back to; absent: the one before the live one.
    #[serde(default)]
    pub to: Option<CommitSha>,
    /// Why, for the history (at most 500 characters).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 500))]
    pub reason: Option<String>,
    /// Run no release task, not even those marked for rollbacks: for an
    /// emergency, when the tasks themselves are the trouble. Sent only
    /// when true, so older agents keep accepting the request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_tasks: bool,
    /// This rollback is one host's part of a fleet rollback (or of the
    /// revert of a fleet deployment). Sent only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetPart>,
    /// What to do about migrations applied since the release last ran (for
    /// apps that make migration plans). Sent only when not `check`.
    #[serde(default, skip_serializing_if = "SchemaRollback::is_check")]
    pub schema: SchemaRollback,
}

/// `PUT /v1/apps/{app}/lock`: refuse deployments until unlocked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LockRequest {
    /// Why (shown to whoever tries to deploy; 1 to 500 characters, not
    /// only spaces).
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, max_length = 500, pattern = r"\S")
    )]
    pub reason: String,
    /// Lock the app for a fleet deployment: deployments and rollbacks that
    /// name it pass, every other is refused. Taken with the `deploy` or
    /// `rollback` scope (a plain lock needs `admin`). Sent only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetLock>,
}

/// The fleet deployment an app is locked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FleetLock {
    /// The fleet deployment's id (as in [`FleetPart`]).
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 64))]
    pub id: String,
    /// The fleet's name, as deployctl knows it.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 64))]
    pub name: String,
    /// The release the fleet deployment ships.
    pub sha: CommitSha,
    /// Whether it is a rollback of the fleet rather than a deployment.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollback: bool,
}

/// `POST /v1/apps/{app}/prepare`: pull a release and pin its digest,
/// changing nothing that runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PrepareRequest {
    pub sha: CommitSha,
}

/// `POST /v1/apps/{app}/plans`: plan a deployment of a release (pull it,
/// pin its digest, inspect its migrations), changing nothing that runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    pub sha: CommitSha,
}

/// Where a prepare stands: 202 while `pulling`, 200 once `ready` (with the
/// digest) or `failed` (with the error). Ask again with the same request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Prepared {
    pub sha: CommitSha,
    pub state: PrepareState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// See [`Prepared`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PrepareState {
    Pulling,
    Ready,
    Failed,
}

/// One page of an app's deployments, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeploymentPage {
    pub deployments: Vec<Deployment>,
    /// Pass as `before` for the next (older) page; absent on the last.
    pub next: Option<String>,
}

/// `GET /v1/whoami`: the caller, as the agent sees its token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WhoAmI {
    /// The token's subject.
    pub subject: String,
    /// The token's issuer.
    pub issuer: String,
    /// What the caller may do, by app (`*` for every app).
    pub grants: Vec<Grant>,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Scopes the caller holds on some apps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Grant {
    /// App names, or `*`.
    pub apps: Vec<String>,
    pub scopes: Vec<Scope>,
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Status, history, deployments and their events.
    Read,
    /// Start deployments.
    Deploy,
    /// Roll back.
    Rollback,
    /// Lock and unlock apps.
    Admin,
    /// Run one-off commands (`manage.py ...`) in the live release. Not
    /// implied by deploy: such a command reaches the data directly.
    Run,
    /// Read the app's own container logs, which may hold what its users
    /// sent.
    Logs,
}

impl Scope {
    /// Every scope, in order.
    pub const ALL: [Scope; 6] = [
        Scope::Read,
        Scope::Deploy,
        Scope::Rollback,
        Scope::Admin,
        Scope::Run,
        Scope::Logs,
    ];

    /// The scope's name on the wire and in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Deploy => "deploy",
            Self::Rollback => "rollback",
            Self::Admin => "admin",
            Self::Run => "run",
            Self::Logs => "logs",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| {
                format!("unknown scope {s:?} (known: read, deploy, rollback, admin, run, logs)")
            })
    }
}
