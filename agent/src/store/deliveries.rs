//! Webhook deliveries: each attempt's result, kept with the deployment
//! that set them off (and compacted with its events).

use deployd_proto::{Delivery, DeliveryState, DeploymentId};
use rusqlite::params;

use super::{Store, StoreError, rfc3339};

impl Store {
    /// Records a delivery's latest attempt (or that it is about to start).
    pub fn put_delivery(&self, id: &DeploymentId, d: &Delivery) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO deliveries (deployment, hook, event, state, attempts, detail, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (deployment, hook, event) DO UPDATE SET state = excluded.state,
               attempts = excluded.attempts, detail = excluded.detail, at = excluded.at",
            params![
                id.0,
                d.hook,
                d.event,
                d.state.as_str(),
                d.attempts,
                d.detail,
                rfc3339(d.at)
            ],
        )?;
        Ok(())
    }

    /// At start: deliveries a stop or crash cut off are given up, and say
    /// so (their tasks went with the process). Returns how many.
    pub fn give_up_deliveries(&self, at: time::OffsetDateTime) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "UPDATE deliveries SET state = 'failed',
               detail = detail || '; given up: deployd stopped before it was delivered', at = ?1
             WHERE state = 'retrying'",
            params![rfc3339(at)],
        )?)
    }

    /// A deployment's deliveries, in the order they began.
    pub fn deliveries(&self, id: &DeploymentId) -> Result<Vec<Delivery>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT hook, event, state, attempts, detail, at FROM deliveries
             WHERE deployment = ?1 ORDER BY rowid",
        )?;
        let rows = stmt
            .query_map(params![id.0], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, u32>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, String>(5)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(hook, event, state, attempts, detail, at)| {
                let state = match state.as_str() {
                    "retrying" => DeliveryState::Retrying,
                    "delivered" => DeliveryState::Delivered,
                    "failed" => DeliveryState::Failed,
                    other => {
                        return Err(StoreError::Corrupt(format!("a delivery in state {other}")));
                    }
                };
                Ok(Delivery {
                    hook,
                    event,
                    state,
                    attempts,
                    detail,
                    at: super::parse_time(&at)?,
                })
            })
            .collect()
    }
}
