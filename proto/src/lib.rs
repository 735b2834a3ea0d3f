//! Plain data exchanged between `deployd` and `deployctl`.
//!
//! Nothing here does I/O: the crate holds the request, response and error
//! shapes of the versioned HTTP API, with the validation that both sides must
//! agree on (what a commit sha looks like, for instance).

mod api;
mod canary;
mod deployment;
mod error;
mod logs;
mod name;
mod notify;
mod operator;
mod plan;
mod run;
mod sha;

pub use api::{
    DeployRequest, DeploymentPage, FleetLock, Grant, LockRequest, MAX_REASON_CHARS, PlanRequest,
    PrepareRequest, PrepareState, Prepared, RollbackRequest, Scope, WhoAmI,
};
pub use canary::{CanaryDecision, CanaryOrder, CanaryWindow, ReleaseWindow};
pub use deployment::{
    AppLock, AppStatus, ContainerPhase, ContainerStatus, Deployment, DeploymentEvent, DeploymentId,
    DeploymentKind, DeploymentState, EventKind, FleetPart, ServiceStatus, Step, StepState,
};
pub use error::{ErrorBody, ErrorCode};
pub use logs::LogEvent;
pub use name::is_plain_name;
pub use notify::{Delivery, DeliveryState};
pub use operator::{MAX_OPERATOR_TOKEN_SECS, OPERATOR_ISSUER, OperatorClaims};
pub use plan::{
    MigrationPlan, Plan, PlanState, PlannedMigration, PlannedOperation, PlannedService,
    PlannedTask, SchemaRollback, Touches, UnsafeMigrations, Verdict,
};
pub use run::{DEFAULT_RUN_SECS, MAX_COMMAND_BYTES, MAX_RUN_SECS, RunEvent, RunRequest};
pub use sha::{CommitSha, InvalidSha, short_sha};
