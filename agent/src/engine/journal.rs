//! What a deployment leaves behind as it runs: every event recorded in the
//! store before live followers hear of it, its start and end told to the
//! app's webhooks, and its end put in the audit log. Also the test-only
//! crash hook, which stops deployments dead at a named point as a kill
//! would.

use std::sync::Mutex;

use deployd_proto::{DeploymentEvent, DeploymentId, DeploymentState, EventKind};
use tokio::sync::{broadcast, oneshot};

use crate::notify::Notifier;
use crate::store::{AuditRecord, Store, StoreError};

/// How many events a slow follower may fall behind before it must catch up
/// from the store.
const LIVE_BUFFER: usize = 4096;

/// Deployments' events, webhooks and audit records.
#[derive(Debug)]
pub(crate) struct Journal {
    store: Store,
    events: broadcast::Sender<(DeploymentId, DeploymentEvent)>,
    notifier: Notifier,
    freeze: Option<Freeze>,
}

/// Test-only crash hook: deployments stop dead at a point, as if the
/// process had been killed there (the test then drops the whole runtime).
#[derive(Debug)]
pub(crate) struct Freeze {
    at: String,
    reached: Mutex<Option<oneshot::Sender<()>>>,
}

impl Freeze {
    /// Freezes deployments at `at` (a step's name, or a point within one
    /// such as `roll:web:written`); the receiver fires when one got there.
    #[cfg(feature = "testkit")]
    pub fn at(at: &str) -> (Self, oneshot::Receiver<()>) {
        let (reached, fired) = oneshot::channel();
        let freeze = Self {
            at: at.to_owned(),
            reached: Mutex::new(Some(reached)),
        };
        (freeze, fired)
    }
}

impl Journal {
    pub fn new(store: Store, notifier: Notifier, freeze: Option<Freeze>) -> Self {
        let (events, _) = broadcast::channel(LIVE_BUFFER);
        Self {
            store,
            events,
            notifier,
            freeze,
        }
    }

    /// Live events of every deployment, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<(DeploymentId, DeploymentEvent)> {
        self.events.subscribe()
    }

    /// Records an event, then tells live subscribers.
    pub fn record(&self, id: &DeploymentId, kind: EventKind) -> Result<(), StoreError> {
        let event = self.store.append_event(id, kind)?;
        let _ = self.events.send((id.clone(), event));
        Ok(())
    }

    /// Like [`Journal::record`], for events progress must not stop for (an
    /// output line, the record of an undo): a store failure is logged.
    pub fn emit(&self, id: &DeploymentId, kind: EventKind) {
        if let Err(e) = self.record(id, kind) {
            tracing::error!(deployment.id = %id, error = %e, "cannot record event");
        }
    }

    /// Tells the app's webhooks that a deployment started.
    pub fn started(&self, id: &DeploymentId) {
        match self.store.get(id) {
            Ok(Some(deployment)) => self.notifier.tell(&deployment, "started"),
            _ => tracing::warn!("cannot read the deployment to notify its start"),
        }
    }

    /// A deployment's end: told to the app's webhooks, and put in the audit
    /// log with what was deployed, by digest, and how it went.
    pub fn ended(&self, id: &DeploymentId, state: DeploymentState, error: Option<&str>) {
        let deployment = match self.store.get(id) {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(deployment.id = %id, error = %e, "cannot audit the deployment's end");
                return;
            }
        };
        self.notifier.tell(&deployment, state.as_str());
        let mut record = AuditRecord::new("deployment_finished", state.as_str());
        record.subject = Some("deployd".into());
        record.app = Some(deployment.app);
        record.sha = Some(deployment.sha.to_string());
        record.digest = deployment.digest;
        record.deployment = Some(id.0.clone());
        record.detail = Some(match error {
            Some(error) => format!("requested by {}; {error}", deployment.requested_by),
            None => format!("requested by {}", deployment.requested_by),
        });
        if let Err(e) = self.store.append_audit(&record) {
            tracing::error!(deployment.id = %id, error = %e, "cannot audit the deployment's end");
        }
    }

    /// The crash hook: never returns if deployments freeze at `point` (a
    /// step's name, or a point within one such as `roll:web:written`).
    pub async fn freeze_point(&self, point: &str) {
        let Some(freeze) = &self.freeze else { return };
        if freeze.at != point {
            return;
        }
        let reached = crate::sync::lock(&freeze.reached).take();
        if let Some(reached) = reached {
            let _ = reached.send(());
        }
        std::future::pending::<()>().await;
    }
}
