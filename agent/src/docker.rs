//! The only module that talks to the Docker engine (through bollard).
//!
//! Everything above it speaks in deployment terms (pull this release, run
//! this task); this module turns that into engine calls and turns engine
//! failures into [`DockerError`]s a user can act on.

mod container;
mod image;
mod network;
mod service;
mod volume;

use std::time::Duration;

pub use container::{
    ContainerInfo, ContainerSpec, ContainerState, HealthCheckRun, LogSource, LogWindow,
    OneOffOutput, PortAddrs,
};
pub use image::{ImageRef, PulledImage, RegistryAuth, RegistryAuthError};
pub use service::{
    HealthCheck, PriorSpec, ServiceInfo, ServiceMode, SwarmServiceSpec, TaskInfo, UpdatePolicy,
    UpdateStatus,
};

/// A connection to the local Docker engine, cheap to clone.
#[derive(Debug, Clone)]
pub struct Docker {
    api: bollard::Docker,
}

/// What the engine reported about itself when we connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineVersion {
    /// The engine's release, e.g. `20.10.24+dfsg1`.
    pub engine: String,
    /// The API version both sides agreed on, e.g. `1.41`.
    pub api: String,
}

/// Why a Docker operation failed, in terms the caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The engine's socket does not answer or speaks no known API version.
    #[error("cannot reach the Docker engine: {0}")]
    Unreachable(String),
    /// The registry refused the credentials (or got none) for this image.
    #[error("the registry refused the credentials for {image}")]
    Unauthorized { image: String },
    /// The registry answered but has no such repository or tag.
    #[error("{image} was not found in the registry")]
    NotFound { image: String },
    /// Any other pull failure, an unreachable registry among them.
    #[error("pulling {image} failed: {reason}")]
    Pull { image: String, reason: String },
    /// A bounded operation ran out of time; whatever it started was removed.
    #[error("{what} did not finish within {} s", timeout.as_secs())]
    Timeout { what: String, timeout: Duration },
    /// Whoever waited for a one-off container left; it was removed.
    #[error("{what} was stopped: its caller left")]
    Abandoned { what: String },
    /// The engine refused or failed an API call.
    #[error("the Docker engine failed to {action}: {reason}")]
    Engine { action: String, reason: String },
}

impl DockerError {
    /// Wraps a bollard error for an engine call described by `action`.
    fn engine(action: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> Self {
        let action = action.into();
        move |e| Self::Engine {
            action,
            reason: engine_message(&e),
        }
    }
}

/// The HTTP status the engine answered with, when the error is an answer.
fn status_code(e: &bollard::errors::Error) -> Option<u16> {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// An engine call whose `benign` answers mean the goal already holds (404
/// on removal: already gone; 304 on stop or start: already so).
fn tolerate<T>(
    result: Result<T, bollard::errors::Error>,
    benign: u16,
    action: impl Into<String>,
) -> Result<(), DockerError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if status_code(&e) == Some(benign) => Ok(()),
        Err(e) => Err(DockerError::engine(action)(e)),
    }
}

/// The engine's own message where there is one, bollard's description otherwise.
fn engine_message(e: &bollard::errors::Error) -> String {
    use bollard::errors::Error;
    match e {
        Error::DockerResponseServerError { message, .. } => message.clone(),
        Error::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

impl Docker {
    /// Connects to the engine named by `DOCKER_HOST`, or the local socket,
    /// and negotiates the API version (hosts run engines as old as API 1.41).
    pub async fn connect() -> Result<Self, DockerError> {
        let api = bollard::Docker::connect_with_defaults()
            .map_err(|e| DockerError::Unreachable(e.to_string()))?
            .negotiate_version()
            .await
            .map_err(|e| DockerError::Unreachable(engine_message(&e)))?;
        Ok(Self { api })
    }

    /// The engine's container events (created, started, died, health
    /// changed, destroyed, ...) for containers carrying `label`, as they
    /// happen. Ends, or yields an error, when the connection to the engine
    /// breaks.
    pub fn container_events(
        &self,
        label: &str,
    ) -> impl futures_util::Stream<Item = Result<(), DockerError>> + use<> {
        use futures_util::StreamExt;
        let filters = std::collections::HashMap::from([
            ("type", vec!["container".to_owned()]),
            ("label", vec![label.to_owned()]),
        ]);
        let options = bollard::query_parameters::EventsOptionsBuilder::new()
            .filters(&filters)
            .build();
        self.api.events(Some(options)).map(|event| {
            event
                .map(|_| ())
                .map_err(DockerError::engine("follow events"))
        })
    }

    /// The engine's version and the negotiated API version.
    pub async fn version(&self) -> Result<EngineVersion, DockerError> {
        let version = self
            .api
            .version()
            .await
            .map_err(|e| DockerError::Unreachable(engine_message(&e)))?;
        Ok(EngineVersion {
            engine: version.version.unwrap_or_default(),
            api: self.api.client_version().to_string(),
        })
    }
}
