//! What the API reads of deployments, asked of the engine: records,
//! history, webhook deliveries, the audit log, and a deployment's events
//! (those recorded, then each as it is recorded, in order, none lost or
//! repeated), which `wait` follows too.

use std::time::Duration;

use deployd_proto::{Delivery, Deployment, DeploymentEvent, DeploymentId, DeploymentKind};
use tokio::sync::{broadcast, mpsc};

use super::{EngineError, EngineHandle};
use crate::store::{AuditRecord, StoreError};

/// Events a follower may fall behind by before it waits for room.
const FOLLOW_BUFFER: usize = 64;

impl EngineHandle {
    /// A deployment's record.
    pub fn deployment(&self, id: &DeploymentId) -> Result<Deployment, EngineError> {
        self.ctx
            .store
            .get(id)?
            .ok_or_else(|| EngineError::UnknownDeployment(id.clone()))
    }

    /// An app's deployments, newest first, `limit` of them before `before`.
    pub fn history(
        &self,
        app: &str,
        limit: usize,
        before: Option<&DeploymentId>,
    ) -> Result<Vec<Deployment>, EngineError> {
        Ok(self.ctx.store.history(app, limit, before)?)
    }

    /// The newest deployment of `app` that is its part of fleet deployment
    /// `fleet` and of `kind`, if any.
    pub fn fleet_part(
        &self,
        app: &str,
        fleet: &str,
        kind: DeploymentKind,
    ) -> Result<Option<Deployment>, EngineError> {
        Ok(self.ctx.store.fleet_part(app, fleet, kind)?)
    }

    /// The webhook deliveries of a deployment.
    pub fn deliveries(&self, id: &DeploymentId) -> Result<Vec<Delivery>, EngineError> {
        Ok(self.ctx.store.deliveries(id)?)
    }

    /// Adds a record to the audit log.
    pub fn audit(&self, record: &AuditRecord) -> Result<(), StoreError> {
        self.ctx.store.append_audit(record).map(|_| ())
    }

    /// Records that a token's id was used for a change; false if it had
    /// been already (a replay).
    pub fn spend_token(&self, issuer: &str, jti: &str, expires: i64) -> Result<bool, StoreError> {
        self.ctx.store.spend_token(issuer, jti, expires)
    }

    /// Hands a fleet deployment's lock to a newer token of its holder.
    pub fn pass_fleet_lock(
        &self,
        app: &str,
        fleet: &str,
        holder: (&str, &str),
    ) -> Result<(), StoreError> {
        self.ctx.store.pass_fleet_lock(app, fleet, holder)
    }

    /// Gives back a token id spent on a change that was then refused, so
    /// the same token may try again.
    pub fn unspend_token(&self, issuer: &str, jti: &str) -> Result<(), StoreError> {
        self.ctx.store.unspend_token(issuer, jti)
    }

    /// A deployment's events after `after`: those recorded, then, when
    /// `live`, each as it is recorded, up to its final state. The stream
    /// also ends when deployd stops or the receiver is dropped. `None` when
    /// the deployment is over and nothing after `after` is left to send.
    pub fn follow(
        &self,
        id: &DeploymentId,
        after: u64,
        live: bool,
    ) -> Result<Option<mpsc::Receiver<DeploymentEvent>>, EngineError> {
        // Subscribed before the store is read: nothing falls between the two.
        let subscribed = self.ctx.journal.subscribe();
        let deployment = self.deployment(id)?;
        if deployment.state.is_terminal() && self.ctx.store.events(id, after)?.is_empty() {
            return Ok(None);
        }
        let (tx, rx) = mpsc::channel(FOLLOW_BUFFER);
        let engine = self.clone();
        let id = id.clone();
        tokio::spawn(async move {
            match live {
                true => engine.pump(id, after, subscribed, tx).await,
                false => engine.recorded(&id, after, &tx).await,
            }
        });
        Ok(Some(rx))
    }

    /// Waits until a deployment has ended and returns its record.
    pub async fn wait(&self, id: &DeploymentId) -> Result<Deployment, EngineError> {
        let mut after = 0;
        loop {
            if let Some(mut events) = self.follow(id, after, true)? {
                while let Some(event) = events.recv().await {
                    after = event.seq;
                }
            }
            let deployment = self.deployment(id)?;
            if deployment.state.is_terminal() {
                return Ok(deployment);
            }
            // The stream broke off (deployd stops, the store failed a read).
            if self.ctx.stopping.is_cancelled() {
                return Err(EngineError::Stopped);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Sends events after `last` until the terminal one, or until the
    /// follower has gone.
    async fn pump(
        &self,
        id: DeploymentId,
        mut last: u64,
        mut live: broadcast::Receiver<(DeploymentId, DeploymentEvent)>,
        tx: mpsc::Sender<DeploymentEvent>,
    ) {
        loop {
            // Catch up from the store.
            let recorded = match self.ctx.store.events(&id, last) {
                Ok(events) => events,
                Err(e) => {
                    tracing::error!(deployment.id = %id, error = %e, "cannot read events");
                    return;
                }
            };
            for event in recorded {
                last = event.seq;
                if !send(&tx, event).await {
                    return;
                }
            }
            match self.ctx.store.state(&id) {
                Ok(Some(state)) if !state.is_terminal() => {}
                // Over: its final event is recorded a moment after its
                // state. Wait for it briefly; one whose record failed
                // still ends.
                _ => {
                    self.finish(&id, last, &tx).await;
                    return;
                }
            }
            // Then follow live, until a gap or a lag sends us back to the
            // store, or a quiet second does: a final state whose event
            // could not be recorded (nor so told) still ends the stream.
            loop {
                let received = tokio::select! {
                    received = live.recv() => received,
                    () = tx.closed() => return,
                    // deployd stops: the follower reconnects to the next one.
                    () = self.stopping() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => break,
                };
                match received {
                    Ok((of, event)) if of == id && Some(event.seq) == last.checked_add(1) => {
                        last = event.seq;
                        if !send(&tx, event).await {
                            return;
                        }
                    }
                    Ok((of, event)) if of == id && event.seq > last => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }

    /// Sends the events recorded after `after`, then ends.
    async fn recorded(&self, id: &DeploymentId, after: u64, tx: &mpsc::Sender<DeploymentEvent>) {
        match self.ctx.store.events(id, after) {
            Ok(events) => {
                for event in events {
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => tracing::error!(deployment.id = %id, error = %e, "cannot read events"),
        }
    }

    /// Sends what is left after `last` of a deployment that is over,
    /// waiting up to 2 s for its final event.
    async fn finish(&self, id: &DeploymentId, mut last: u64, tx: &mpsc::Sender<DeploymentEvent>) {
        for _ in 0..20 {
            let Ok(events) = self.ctx.store.events(id, last) else {
                return;
            };
            for event in events {
                last = event.seq;
                if !send(tx, event).await {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Sends one event; false when the follower has gone or this was the
/// deployment's final state.
async fn send(tx: &mpsc::Sender<DeploymentEvent>, event: DeploymentEvent) -> bool {
    let terminal = event.kind.is_terminal();
    tx.send(event).await.is_ok() && !terminal
}
