//! Golden JSON fixtures pin the wire format: a change here is a protocol change.

#![allow(clippy::unwrap_used)]

use deployd_proto::{
    CommitSha, DeployRequest, Deployment, DeploymentKind, ErrorBody, ErrorCode, Plan, PlanState,
    RollbackRequest, SchemaRollback, Verdict,
};

#[test]
fn error_body_matches_fixture() {
    let fixture = include_str!("data/error_body.json");
    let body: ErrorBody = serde_json::from_str(fixture).unwrap();
    assert_eq!(
        body,
        ErrorBody::new(
            ErrorCode::InvalidBody,
            "a commit sha has 7 to 40 hex digits, got 3"
        )
    );
    let round_trip: serde_json::Value = serde_json::to_value(&body).unwrap();
    assert_eq!(
        round_trip,
        serde_json::from_str::<serde_json::Value>(fixture).unwrap()
    );
}

#[test]
fn commit_sha_is_a_plain_string_on_the_wire() {
    let sha: CommitSha = serde_json::from_str("\"4f2a9c1\"").unwrap();
    assert_eq!(serde_json::to_string(&sha).unwrap(), "\"4f2a9c1\"");
}

#[test]
fn invalid_sha_is_refused_while_decoding() {
    let err = serde_json::from_str::<CommitSha>("\"HEAD\"").unwrap_err();
    assert!(err.to_string().contains("lowercase hex"), "{err}");
}

/// Decodes a fixture and checks that encoding gives it back.
fn round_trips<T: serde::de::DeserializeOwned + serde::Serialize>(fixture: &str) -> T {
    let value: T = serde_json::from_str(fixture).unwrap();
    assert_eq!(
        serde_json::to_value(&value).unwrap(),
        serde_json::from_str::<serde_json::Value>(fixture).unwrap()
    );
    value
}

#[test]
fn rollback_request_matches_fixture() {
    let request: RollbackRequest = round_trips(include_str!("data/rollback_request.json"));
    assert!(request.skip_tasks);
    // Sent only when set, so that older agents keep accepting rollbacks.
    let plain = RollbackRequest::default();
    assert_eq!(
        serde_json::to_string(&plain).unwrap(),
        r#"{"to":null,"reason":null}"#
    );
}

#[test]
fn rollback_deployment_matches_fixture() {
    let d: Deployment = round_trips(include_str!("data/rollback_deployment.json"));
    assert_eq!(d.kind, DeploymentKind::Rollback);
    assert_eq!(d.schema, SchemaRollback::MigrateBack);
    assert_eq!(d.migrations_kept, ["shop.0002_heartbeat_queue"]);
    // An older agent's record, without the newer fields, still decodes.
    let mut older: serde_json::Value =
        serde_json::from_str(include_str!("data/rollback_deployment.json")).unwrap();
    let fields = older.as_object_mut().unwrap();
    fields.remove("migrations_kept");
    fields.remove("skip_tasks");
    fields.remove("fleet");
    fields.remove("plan");
    fields.remove("reviewed_plan");
    fields.remove("allow_unsafe_migrations");
    fields.remove("schema");
    let d: Deployment = serde_json::from_value(older).unwrap();
    assert!(d.migrations_kept.is_empty() && !d.skip_tasks);
    assert_eq!(d.schema, SchemaRollback::Check);
}

#[test]
fn deploy_request_matches_fixture() {
    let request: DeployRequest = round_trips(include_str!("data/deploy_request.json"));
    let fleet = request.fleet.unwrap();
    assert_eq!((fleet.host.as_str(), fleet.once_tasks), ("web-2", false));
    assert!(request.plan.is_some() && request.allow_unsafe_migrations);
    assert_eq!(request.canary, Some(true));
    // Without digest, fleet, plan, override and canary, the request is what
    // older agents accept.
    let plain = DeployRequest {
        sha: "4f2a9c1".parse().unwrap(),
        force: false,
        reason: None,
        digest: None,
        fleet: None,
        plan: None,
        allow_unsafe_migrations: false,
        canary: None,
    };
    assert_eq!(
        serde_json::to_string(&plain).unwrap(),
        r#"{"sha":"4f2a9c1","force":false,"reason":null}"#
    );
}

#[test]
fn once_tasks_done_is_a_bare_event_type() {
    use deployd_proto::{DeploymentEvent, EventKind};
    let line = r#"{"seq":7,"at":"2026-11-30T12:00:00Z","type":"once_tasks_done"}"#;
    let event: DeploymentEvent = serde_json::from_str(line).unwrap();
    assert_eq!(event.kind, EventKind::OnceTasksDone);
    let back = serde_json::to_value(&event).unwrap();
    assert_eq!(
        back,
        serde_json::from_str::<serde_json::Value>(line).unwrap()
    );
}

#[test]
fn a_canary_event_carries_both_releases_figures() {
    use deployd_proto::{CanaryDecision, DeploymentEvent, EventKind};
    let event: DeploymentEvent = round_trips(include_str!("data/canary_event.json"));
    let EventKind::Canary {
        decision, window, ..
    } = event.kind
    else {
        panic!("not a canary event: {event:?}");
    };
    assert_eq!(decision, CanaryDecision::Aborted);
    let window = window.unwrap();
    assert_eq!(window.canary.error_rate(), Some(0.1));
    assert_eq!(window.stable.p95_ms, Some(41.0));
}

#[test]
fn plan_matches_fixture() {
    let plan: Plan = round_trips(include_str!("data/plan.json"));
    assert_eq!(plan.state, PlanState::Ready);
    let migrations = plan.migrations.unwrap();
    assert_eq!(migrations.labels(), ["shop.0003_remove_heartbeat_queue"]);
    assert_eq!(migrations.migrations[0].verdict(), Verdict::Breaks);
    let touches = migrations.migrations[0].operations[0].touches.as_ref();
    assert_eq!(touches.unwrap().to_string(), "shop_heartbeat.queue");
    assert!(migrations.tables.unwrap()["shop_heartbeat"].contains("queue"));
    // Verdicts order by harm: a migration is as bad as its worst operation.
    assert!(Verdict::Safe < Verdict::Locking && Verdict::Irreversible < Verdict::Breaks);
}
