//! Migration plans: what `migrate` would do to the database, judged by what
//! each operation does to the release that still runs while it is applied.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{CommitSha, DeploymentId};

/// What one migration operation does to the release still running, from
/// harmless to harmful (the order is by harm).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Safe while the old release runs (a new table, a nullable column...).
    Safe,
    /// Safe, but writes to a table wait while it runs (an index built
    /// without `CONCURRENTLY` on PostgreSQL).
    Locking,
    /// deployd cannot tell (raw SQL, an operation it does not know): read
    /// its SQL.
    Review,
    /// Cannot be migrated back (RunPython without reverse code, ...).
    Irreversible,
    /// Breaks the release still running (a dropped or renamed column, a
    /// NOT NULL column without a database default, ...).
    Breaks,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Safe => "safe",
            Self::Locking => "locking",
            Self::Review => "review",
            Self::Irreversible => "irreversible",
            Self::Breaks => "breaks",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a deployment does with a migration that would break the release
/// still running while it runs (a dropped or renamed column, a NOT NULL
/// column without a database default, ...): an app's `[migrations] unsafe`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum UnsafeMigrations {
    /// Fail before anything runs, unless the deployment is explicitly
    /// allowed (`--allow-unsafe-migrations`, admin scope).
    #[default]
    Refuse,
    /// Say so in the deployment's log and go on.
    Warn,
    /// Go on; the plan still lists them.
    Allow,
}

impl UnsafeMigrations {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refuse => "refuse",
            Self::Warn => "warn",
            Self::Allow => "allow",
        }
    }
}

impl std::fmt::Display for UnsafeMigrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One operation of a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlannedOperation {
    /// Its class, such as `RemoveField`.
    pub operation: String,
    /// Django's description of it.
    pub description: String,
    pub verdict: Verdict,
    /// Why, in one sentence.
    pub why: String,
    /// Whether Django can migrate it back.
    pub reversible: bool,
    /// Of an operation that `breaks`: the table (and column) it breaks the
    /// running release through, where the inspector can tell. A release
    /// whose models use neither is not broken by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub touches: Option<Touches>,
}

/// A table, or one column of it, as the database names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Touches {
    pub table: String,
    /// Absent: the table as a whole (dropped, renamed, or inserted into).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
}

impl std::fmt::Display for Touches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.column {
            Some(column) => write!(f, "{}.{column}", self.table),
            None => f.write_str(&self.table),
        }
    }
}

/// One migration `migrate` would apply (or, going back, unapply).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlannedMigration {
    pub app: String,
    pub name: String,
    /// Unapplied rather than applied (a plan back to an earlier state).
    pub backwards: bool,
    pub operations: Vec<PlannedOperation>,
    /// The SQL `sqlmigrate` prints for it, one statement or comment a line.
    pub sql: Vec<String>,
}

impl PlannedMigration {
    /// `app.name`, as Django prints it.
    pub fn label(&self) -> String {
        format!("{}.{}", self.app, self.name)
    }

    /// Its most harmful operation's verdict.
    pub fn verdict(&self) -> Verdict {
        self.operations
            .iter()
            .map(|o| o.verdict)
            .max()
            .unwrap_or(Verdict::Safe)
    }

    /// Whether every operation can be migrated back.
    pub fn reversible(&self) -> bool {
        self.operations.iter().all(|o| o.reversible)
    }
}

/// What Django would do from the database's migration state, as a release
/// sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MigrationPlan {
    /// Django's version in the release.
    pub django: String,
    /// The database backend (`postgresql`, `sqlite`, ...).
    pub vendor: String,
    /// The release's last migration of each app (`[app, name]`): the
    /// migration state it leaves once migrated.
    pub leaves: Vec<(String, String)>,
    /// In the order `migrate` runs them; empty when nothing is pending.
    pub migrations: Vec<PlannedMigration>,
    /// The tables the release's own models use, each with its columns:
    /// what a later release's migrations must leave alone while this one
    /// runs. Absent from plans made before deployd recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<BTreeMap<String, BTreeSet<String>>>,
}

impl MigrationPlan {
    /// The migrations, as `app.name`.
    pub fn labels(&self) -> Vec<String> {
        self.migrations
            .iter()
            .map(PlannedMigration::label)
            .collect()
    }

    /// Every operation with the verdict `verdict`, with its migration.
    pub fn operations_judged(
        &self,
        verdict: Verdict,
    ) -> impl Iterator<Item = (&PlannedMigration, &PlannedOperation)> {
        self.migrations.iter().flat_map(move |m| {
            m.operations
                .iter()
                .filter(move |o| o.verdict == verdict)
                .map(move |o| (m, o))
        })
    }
}

/// Where the making of a plan stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PlanState {
    /// Pulling the release or inspecting it.
    Planning,
    Ready,
    Failed,
}

/// A release task as a deployment of the planned release would run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlannedTask {
    pub name: String,
    pub command: Vec<String>,
    /// Runs on the first host of a fleet deployment only.
    pub once: bool,
}

/// A service as a deployment of the planned release would roll it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlannedService {
    pub name: String,
    /// `web`, `worker` or `beat`.
    pub role: String,
    pub replicas: u32,
}

/// A plan of a release's deployment: made by `POST /v1/apps/{app}/plans`
/// or by a deployment's `plan` step, read by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Plan {
    pub id: String,
    pub app: String,
    pub sha: CommitSha,
    pub state: PlanState,
    /// Why it failed.
    pub error: Option<String>,
    /// The image digest the tag resolved to.
    pub digest: Option<String>,
    /// The release live when it was made, and its digest.
    pub live: Option<(CommitSha, String)>,
    /// What the app does with a migration that breaks the running release.
    pub unsafe_migrations: UnsafeMigrations,
    /// Absent until inspected.
    pub migrations: Option<MigrationPlan>,
    /// Services in the order they roll.
    pub services: Vec<PlannedService>,
    /// Release tasks of a deployment, in order.
    pub tasks: Vec<PlannedTask>,
    /// The deployment whose `plan` step made it, if one did.
    pub deployment: Option<DeploymentId>,
    pub requested_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// What a rollback does about migrations applied since the release it goes
/// back to last ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SchemaRollback {
    /// Keep them applied, unless one breaks the older release: then refuse.
    #[default]
    Check,
    /// Reverse them first (`migrate <app> <migration>`, newest first);
    /// refused if one cannot be reversed.
    MigrateBack,
    /// Keep them applied, whatever they do to the older release.
    Force,
}

impl SchemaRollback {
    pub fn is_check(&self) -> bool {
        *self == Self::Check
    }
}
