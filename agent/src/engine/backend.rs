//! Where an app's services run, behind one interface: a deployment's steps,
//! records, events and locks are the same whichever backend rolls them.
//!
//! - [`Containers`]: containers on this host's engine, rolled by deployd
//!   (start-first behind the switch, drained workers, stop-first beat).
//! - [`Services`]: services of the Swarm cluster this host manages; Swarm
//!   places and replaces the tasks by the spec deployd writes.

use super::common::Failure;
use super::roll::Containers;
use super::run::Run;
use super::swarm::Services;
use crate::config::Backend;
use crate::docker::RegistryAuth;
use crate::env_file::AppEnv;
use crate::store::Release;

/// One deployment's roll of the app's services, on its backend.
pub(crate) enum Rollout<'a> {
    Containers(Containers<'a>),
    Services(Services<'a>),
}

/// Calls the same method on whichever backend rolls.
macro_rules! each {
    ($self:expr, $r:ident => $call:expr) => {
        match $self {
            Rollout::Containers($r) => $call,
            Rollout::Services($r) => $call,
        }
    };
}

impl<'a> Rollout<'a> {
    /// The roll of `release`, the one this deployment pulled.
    pub fn new(run: &'a Run, release: Release, env: AppEnv, auth: Option<RegistryAuth>) -> Self {
        match run.cfg.backend {
            Backend::Docker => Self::Containers(Containers::new(run, release, env)),
            Backend::Swarm => Self::Services(Services::new(run, release, env, auth)),
        }
    }

    /// Services no longer configured that still run, and whether each was
    /// a singleton.
    pub async fn unconfigured(&self) -> Result<Vec<(String, bool)>, Failure> {
        each!(self, r => r.unconfigured().await)
    }

    /// Stops and removes what runs of a service no longer configured.
    pub async fn remove(&mut self, service: &str) -> Result<(), Failure> {
        each!(self, r => r.remove(service).await)
    }

    /// What was removed of services that left the config, a line each.
    pub fn removed(&self) -> &[String] {
        each!(self, r => r.removed())
    }

    /// Replaces what runs of `service` with the new release.
    pub async fn roll(&mut self, service: &str) -> Result<(), Failure> {
        each!(self, r => r.roll(service).await)
    }

    /// Watches the new release for the verify window.
    pub async fn verify(&self) -> Result<(), Failure> {
        each!(self, r => r.verify().await)
    }

    /// Whether anything that ran before was changed (a rollback is due).
    pub fn touched_running(&self) -> bool {
        each!(self, r => r.touched_running())
    }

    /// After success: removes what was kept for a rollback.
    pub async fn retire_old(&self) -> Result<(), Failure> {
        match self {
            Self::Containers(r) => r.retire_old().await,
            // Swarm has removed the old tasks itself.
            Self::Services(_) => Ok(()),
        }
    }

    /// After a failure that changed nothing that ran: removes what started.
    pub async fn discard(&mut self) -> Result<(), Failure> {
        each!(self, r => r.discard().await)
    }

    /// Puts every changed service back on what it ran.
    pub async fn restore(self) -> Result<String, Failure> {
        each!(self, r => r.restore().await)
    }

    /// The release an aborted canary sent every client back to.
    pub fn canary_aborted(&self) -> Option<&deployd_proto::CommitSha> {
        match self {
            Self::Containers(r) => r.canary_aborted(),
            Self::Services(_) => None,
        }
    }

    /// Whether a discard left the app's public address answering 503.
    pub fn traffic_stopped(&self) -> bool {
        match self {
            Self::Containers(r) => r.traffic_stopped(),
            Self::Services(_) => false,
        }
    }
}
