//! Migration plans, kept as JSON: those `deployctl plan` asked for, to be
//! held to by id, and those deployments made, whose `leaves` are the
//! migration state each release left: what a rollback to it plans back to.

use deployd_proto::{DeploymentId, Plan};
use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError, rfc3339};

fn parse(body: &str) -> Result<Plan, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt(format!("a plan: {e}")))
}

impl Store {
    /// Records a plan, or its new state.
    pub fn put_plan(&self, plan: &Plan) -> Result<(), StoreError> {
        let body = serde_json::to_string(plan).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn().execute(
            "INSERT INTO plans (id, app, deployment, created_at, body) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (id) DO UPDATE SET body = excluded.body",
            params![
                plan.id,
                plan.app,
                plan.deployment.as_ref().map(|d| &d.0),
                rfc3339(plan.created_at),
                body
            ],
        )?;
        Ok(())
    }

    /// A plan by id.
    pub fn plan(&self, id: &str) -> Result<Option<Plan>, StoreError> {
        let body: Option<String> = self
            .conn()
            .query_row("SELECT body FROM plans WHERE id = ?1", params![id], |row| {
                row.get(0)
            })
            .optional()?;
        body.as_deref().map(parse).transpose()
    }

    /// The plan the last deployment of this image of the app made: what
    /// its release's migration state is (its `leaves`).
    pub fn plan_of_release(&self, app: &str, digest: &str) -> Result<Option<Plan>, StoreError> {
        let body: Option<String> = self
            .conn()
            .query_row(
                "SELECT p.body FROM plans p JOIN deployments d ON p.deployment = d.id
                 WHERE d.app = ?1 AND d.digest = ?2 AND d.kind = 'deploy'
                   AND json_extract(p.body, '$.migrations') IS NOT NULL
                 ORDER BY p.id DESC LIMIT 1",
                params![app, digest],
                |row| row.get(0),
            )
            .optional()?;
        body.as_deref().map(parse).transpose()
    }

    /// Records the plan a deployment's `plan` step made.
    pub fn set_plan(&self, deployment: &DeploymentId, plan: &str) -> Result<(), StoreError> {
        self.conn_changing().execute(
            "UPDATE deployments SET plan = ?2 WHERE id = ?1",
            params![deployment.0, plan],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

    fn plan(id: &str, deployment: Option<&str>, created_at: OffsetDateTime) -> Plan {
        let mut plan: Plan =
            serde_json::from_str(include_str!("../../../proto/tests/data/plan.json")).unwrap();
        plan.id = id.into();
        plan.deployment = deployment.map(|d| DeploymentId(d.into()));
        plan.created_at = created_at;
        plan
    }

    #[test]
    fn plans_are_kept_by_id_and_a_deployments_own_outlive_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old = OffsetDateTime::now_utc() - time::Duration::days(100);
        let reviewed = plan("p1", None, old);
        store.put_plan(&reviewed).unwrap();
        store.put_plan(&plan("p2", Some("d1"), old)).unwrap();
        // A new state replaces the body, not the record.
        let mut failed = reviewed.clone();
        failed.error = Some("pull failed".into());
        store.put_plan(&failed).unwrap();
        assert_eq!(store.plan("p1").unwrap(), Some(failed));
        let cut = OffsetDateTime::now_utc() - time::Duration::days(90);
        assert_eq!(store.compact(cut, None).unwrap().plans, 1);
        assert_eq!(store.plan("p1").unwrap(), None);
        assert!(store.plan("p2").unwrap().is_some());
    }
}
