//! The swarm backend against a real Swarm (`scripts/testbed.sh swarm up`):
//! the same deployments, failures and rollbacks as the docker backend's,
//! with services that Swarm places and replaces. Every test's name ends in
//! `_on_swarm`: `scripts/test.sh` runs them apart, once the engine is a
//! Swarm, and skips them by that name in the workspace's run.

use std::time::Duration;

use deployd::engine::{EngineHandle, label};
use deployd_proto::{DeploymentState, EventKind, RollbackRequest, RunEvent};
use deployd_testkit::engine::{Agent, agent_tuned};
use deployd_testkit::{Scope, Tuning, poll, swarm_scoped};

/// An agent of the engine tests' app on the swarm backend, whose verify
/// window (also Swarm's `monitor` of each new task) is `verify`: short
/// where nothing is to fail after the update. Web is not published through
/// the routing mesh: the mesh needs IPVS, which not every test machine's
/// kernel has; requests go to a task's container instead.
async fn agent(scope: &Scope, verify: &'static str) -> Agent {
    let tuning = Tuning {
        verify,
        swarm: true,
        ..Tuning::TEST
    };
    agent_tuned(scope, tuning).await
}

/// The status `/healthz/` answers with, asked from a container on the
/// overlay network of one of the web tasks (`tasks.<service>` in Swarm's
/// DNS: no routing mesh needed).
async fn healthz(agent: &Agent, scope: &Scope) -> u16 {
    let code = "import sys,urllib.request as u\n\
        r=u.Request(sys.argv[1],headers={'Host':sys.argv[2],'X-Forwarded-Proto':'https'})\n\
        print(u.urlopen(r,timeout=20).status)";
    let url = format!("http://tasks.{}_web:8000/healthz/", agent.app);
    let image = scope.bed.var("PYTHON_BASE").to_owned();
    let spec = scope.app_container(&image, &["python3", "-c", code, &url, scope.bed.app_host()]);
    let output = scope
        .docker
        .run_oneoff(spec, Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    assert_eq!(output.exit_code, 0, "{:?}", output.lines);
    output.lines.last().unwrap().parse().unwrap()
}

/// (service, sha) of every running task of the app, sorted.
async fn running(scope: &Scope) -> Vec<(String, String)> {
    let app = scope.app();
    let mut found = Vec::new();
    for service in ["web", "worker", "beat"] {
        for t in scope
            .docker
            .tasks(&format!("{app}_{service}"))
            .await
            .unwrap()
        {
            if t.is_running() {
                found.push((service.to_owned(), t.labels[label::SHA].clone()));
            }
        }
    }
    found.sort();
    found
}

/// Waits until every service runs `variant` alone.
async fn settles_on(scope: &Scope, variant: &str) {
    let sha = scope.bed.sha(variant).to_string();
    let wanted: Vec<(String, String)> = ["beat", "web", "web", "worker"]
        .map(|s| (s.to_owned(), sha.clone()))
        .into();
    poll(
        &format!("the app's services to run {variant} alone"),
        Duration::from_secs(120),
        || async { (running(scope).await == wanted).then_some(()) },
    )
    .await;
}

/// The output lines a deployment recorded for `step`.
fn outputs(engine: &EngineHandle, id: &deployd_proto::DeploymentId, step: &str) -> Vec<String> {
    engine
        .store()
        .events(id, 0)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Output { step: s, line } if s == step => Some(line),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn deploy_fail_rollback_and_crash_on_swarm() {
    swarm_scoped(|scope| async move {
        let agent = agent(&scope, "3s").await;

        let first = agent.deploy(&scope, "release-1").await;
        assert_eq!(first.state, DeploymentState::Succeeded, "{first:#?}");
        assert!(
            first.migrations.contains(&"shop.0001_initial".to_owned()),
            "{:?}",
            first.migrations
        );
        // The release task ran as a Swarm job: its output is the
        // deployment's, and the job is gone.
        let migrate = outputs(&agent.engine, &first.id, "task:migrate");
        assert!(
            migrate
                .iter()
                .any(|l| l.contains("Applying shop.0001_initial")),
            "{migrate:?}"
        );
        // collectstatic (every_node) ran as a global job, once on this
        // one-node Swarm, and is gone too.
        let collectstatic = outputs(&agent.engine, &first.id, "task:collectstatic");
        assert_eq!(
            collectstatic
                .iter()
                .filter(|l| l.contains("copied to '/app/static'"))
                .count(),
            1,
            "{collectstatic:?}"
        );
        for task in ["migrate", "collectstatic"] {
            let jobs = scope
                .docker
                .services(&[(label::APP, &agent.app), (label::TASK, task)])
                .await
                .unwrap();
            assert!(jobs.is_empty(), "{task}: {jobs:?}");
        }
        settles_on(&scope, "release-1").await;
        assert_eq!(healthz(&agent, &scope).await, 200);

        let second = agent.deploy(&scope, "release-2").await;
        assert_eq!(second.state, DeploymentState::Succeeded, "{second:#?}");
        assert_eq!(second.migrations, ["shop.0002_heartbeat_queue"]);
        settles_on(&scope, "release-2").await;
        let rolled = outputs(&agent.engine, &second.id, "roll:web");
        assert!(
            rolled.iter().any(|l| l.contains("start-first")),
            "{rolled:?}"
        );

        // Status lists the tasks, each with its node.
        let status = agent.engine.status(&agent.app).await.unwrap();
        let web = status.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.containers.len(), 2, "{web:#?}");
        for task in &web.containers {
            assert!(task.node.is_some(), "{task:#?}");
            assert_eq!(
                task.state,
                deployd_proto::ContainerPhase::Running,
                "{task:#?}"
            );
            assert_eq!(task.sha, Some(scope.bed.sha("release-2")), "{task:#?}");
            assert_eq!(task.health.as_deref(), Some("healthy"), "{task:#?}");
        }
        let beat = status.services.iter().find(|s| s.name == "beat").unwrap();
        assert!(beat.singleton && beat.containers.len() == 1, "{beat:#?}");

        // A one-off manage.py command runs in a container of the live
        // release on the overlay network (it reaches the database).
        let request = deployd_proto::RunRequest {
            command: ["python", "manage.py", "showmigrations", "shop"]
                .map(String::from)
                .into(),
            service: None,
            timeout_secs: Some(120),
            concurrent: false,
        };
        let mut run = agent
            .engine
            .run_command(&agent.app, request, "ops")
            .unwrap();
        let mut said = Vec::new();
        let code = loop {
            match run.events.recv().await.expect("the command's end") {
                RunEvent::Output { line } => said.push(line),
                RunEvent::Exited { code } => break code,
                RunEvent::Failed { error } => panic!("{error}"),
                RunEvent::Started { .. } => {}
            }
        };
        assert_eq!(code, 0, "{said:?}");
        assert!(
            said.iter().any(|l| l.contains("[X] 0002_heartbeat_queue")),
            "{said:?}"
        );
        // The web tasks' logs, read through the manager (as for a task on
        // any node), each line tagged with its task and node.
        let window = deployd::docker::LogWindow {
            tail: Some(5),
            ..Default::default()
        };
        let mut logs = agent.engine.logs(&agent.app, None, window).unwrap();
        let mut tagged = std::collections::BTreeSet::new();
        while let Some(event) = logs.recv().await {
            if let deployd_proto::LogEvent::Line { container, .. } = event {
                tagged.insert(container);
            }
        }
        let web = format!("{}_web.", agent.app);
        assert!(
            !tagged.is_empty()
                && tagged
                    .iter()
                    .all(|t| t.starts_with(&web) && t.contains(" on ")),
            "{tagged:?}"
        );

        // A failing migration: nothing that runs changes.
        let failed = agent.deploy(&scope, "migrate-fails").await;
        assert_eq!(failed.state, DeploymentState::Failed, "{failed:#?}");
        let error = failed.error.clone().unwrap_or_default();
        assert!(
            error.contains("release task migrate exited with")
                && error.contains("nothing running was changed"),
            "{error}"
        );
        settles_on(&scope, "release-2").await;

        // A manual rollback goes back to release 1 by its digest.
        let back = agent.rollback(RollbackRequest::default()).await;
        assert_eq!(back.state, DeploymentState::Succeeded, "{back:#?}");
        assert_eq!(back.sha, scope.bed.sha("release-1"));
        settles_on(&scope, "release-1").await;
        assert_eq!(healthz(&agent, &scope).await, 200);

        // deployd killed while Swarm replaces web's tasks (the old release
        // returns), then after verification (the new release stays), and
        // started again each time.
        let rounds = [
            ("roll:web:written", "release-1", "web run"),
            ("cleanup", "release-2", "every service runs"),
        ];
        for (round, (boundary, live, account)) in rounds.into_iter().enumerate() {
            let (restarted, crashed) = agent
                .crash_and_restart(&scope, "release-2", boundary, round + 4)
                .await;
            let error = crashed.error.as_deref().unwrap();
            let sha = scope.bed.sha(live);
            assert!(
                error.contains(&format!("{account} {sha}")),
                "{boundary}: {error}"
            );
            settles_on(&scope, live).await;
            let live_release = restarted.store().live_release(&agent.app).unwrap().unwrap();
            assert_eq!(live_release.sha, sha, "{boundary}");
            // No release-task job is left behind.
            let jobs: Vec<_> = scope
                .docker
                .services(&[(label::APP, &agent.app)])
                .await
                .unwrap()
                .into_iter()
                .filter(|s| s.labels.contains_key(label::TASK))
                .collect();
            assert!(jobs.is_empty(), "{boundary}: {jobs:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn failures_after_the_update_roll_every_service_back_on_swarm() {
    swarm_scoped(|scope| async move {
        // Long enough for web's health check to get a bad answer from a
        // task of unhealthy-after-5-checks before the deployment ends.
        let agent = agent(&scope, "8s").await;
        let first = agent.deploy(&scope, "release-1").await;
        assert_eq!(first.state, DeploymentState::Succeeded, "{first:#?}");
        settles_on(&scope, "release-1").await;

        for (variant, cause) in [
            ("unhealthy-after-5-checks", "web"),
            ("worker-crash", "worker"),
        ] {
            let d = agent.deploy(&scope, variant).await;
            assert_eq!(d.state, DeploymentState::RolledBack, "{variant}: {d:#?}");
            let error = d.error.clone().unwrap_or_default();
            assert!(
                error.contains(cause) && error.contains("rolled back"),
                "{variant}: {error}"
            );
            settles_on(&scope, "release-1").await;
            assert_eq!(healthz(&agent, &scope).await, 200, "{variant}");
        }
    })
    .await;
}
