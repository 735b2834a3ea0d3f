//! The deploy engine against the real engine and the test bed's releases.

use std::collections::HashMap;
use std::time::Duration;

use deployd::config::Config;
use deployd::docker::{ContainerSpec, ImageRef};
use deployd::engine::{DeployRequest, EngineError, EngineHandle, label};
use deployd::store::Store;
use deployd::switch::{Routes, Serving, Switch};
use deployd_proto::{
    CommitSha, ContainerPhase, Deployment, DeploymentId, DeploymentState, EventKind, FleetPart,
    RollbackRequest, Verdict,
};
use deployd_testkit::engine::{Agent, agent_tuned};
use deployd_testkit::{Scope, Tuning, app_config, deploy_request, poll, scoped, settle};
use reqwest::header::HOST;

async fn agent(scope: &Scope) -> Agent {
    agent_tuned(scope, Tuning::TEST).await
}

/// (service, sha) of every running container of the app, sorted.
async fn running(scope: &Scope) -> Vec<(String, String)> {
    running_of(scope, &scope.app()).await
}

async fn running_of(scope: &Scope, app: &str) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = scope
        .docker
        .containers(&[(label::APP, app)])
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.running && c.labels.contains_key(label::SERVICE))
        .map(|c| {
            (
                c.labels[label::SERVICE].clone(),
                c.labels[label::SHA].clone(),
            )
        })
        .collect();
    found.sort();
    found
}

/// Waits until every service of `app` runs `variant` and nothing else:
/// after a deployment ends, old workers still drain in the background (a
/// celery warm shutdown takes its time, longer on a slow machine).
async fn settles_on(scope: &Scope, app: &str, variant: &str) {
    let wanted = all_on(scope, variant);
    poll(
        &format!("{app} to run {variant} alone"),
        Duration::from_secs(90),
        || async { (running_of(scope, app).await == wanted).then_some(()) },
    )
    .await;
}

fn all_on(scope: &Scope, variant: &str) -> Vec<(String, String)> {
    let sha = scope.bed.sha(variant).to_string();
    ["beat", "web", "web", "worker"]
        .map(|s| (s.to_owned(), sha.clone()))
        .into()
}

/// GETs `path` from one running web container of the app.
async fn get(scope: &Scope, path: &str) -> reqwest::Response {
    let app = scope.app();
    let web = scope
        .docker
        .containers(&[(label::APP, app.as_str()), (label::SERVICE, "web")])
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.running)
        .expect("a running web container");
    let port = scope.docker.port(&web.id, 8000).await.unwrap().published;
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .header(HOST, scope.bed.app_host())
        .header("X-Forwarded-Proto", "https")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn release_1_then_release_2_moves_every_service_and_beat_keeps_ticking() {
    scoped(|scope| async move {
        let agent = agent(&scope).await;

        let first = agent.deploy(&scope, "release-1").await;
        assert_eq!(first.state, DeploymentState::Succeeded, "{first:#?}");
        assert!(
            first.migrations.contains(&"shop.0001_initial".to_owned()),
            "{:?}",
            first.migrations
        );
        settles_on(&scope, &scope.app(), "release-1").await;

        // A second deployment while one runs is refused, naming the running one.
        let second = agent
            .engine
            .deploy(agent.request(&scope, "release-2"))
            .await
            .unwrap();
        let conflict = agent
            .engine
            .deploy(agent.request(&scope, "release-1"))
            .await
            .unwrap_err();
        assert!(
            matches!(&conflict, EngineError::Conflict { running, .. } if *running == second.id),
            "{conflict:?}"
        );
        // One that may wait for the lock deploys once the running one ended:
        // release 2 is live by then, so it is a no-op success.
        let (second, queued) = tokio::join!(
            agent.engine.wait(&second.id),
            agent
                .engine
                .deploy_waiting(agent.request(&scope, "release-2"), Duration::from_secs(300)),
        );
        let (second, queued) = (second.unwrap(), queued.unwrap());
        assert_eq!(queued.state, DeploymentState::Succeeded, "{queued:#?}");
        assert!(queued.created_at >= second.finished_at.unwrap());
        assert_eq!(second.state, DeploymentState::Succeeded, "{second:#?}");
        assert_eq!(second.migrations, ["shop.0002_heartbeat_queue"]);
        assert!(
            second
                .digest
                .as_deref()
                .is_some_and(|d| d.starts_with("sha256:"))
        );
        settles_on(&scope, &scope.app(), "release-2").await;
        let steps: Vec<&str> = second.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            steps,
            [
                "prepare",
                "pull",
                "task:check",
                "task:migrate",
                "task:collectstatic",
                "roll:web",
                "roll:worker",
                "roll:beat",
                "verify",
                "cleanup",
                "prune"
            ]
        );

        // Status: release 2 everywhere, or an old worker still draining.
        let status = agent.engine.status(&agent.app).await.unwrap();
        assert_eq!(status.live_sha, Some(scope.bed.sha("release-2")));
        assert!(status.running_deployment.is_none() && status.lock.is_none());
        let names: Vec<&str> = status.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web", "worker", "beat"]);
        for service in &status.services {
            for c in &service.containers {
                let on_r2 = c.sha == Some(scope.bed.sha("release-2"));
                if service.name == "web" && c.state == ContainerPhase::Running {
                    assert_eq!(c.health.as_deref(), Some("healthy"), "{status:#?}");
                }
                assert!(
                    c.status.as_deref().is_some_and(|s| s.starts_with("Up")),
                    "{c:?}"
                );
                let ok = match c.state {
                    ContainerPhase::Running => on_r2,
                    ContainerPhase::Draining => service.name == "worker" && !on_r2,
                    ContainerPhase::Stopped => false,
                };
                assert!(ok, "{status:#?}");
            }
        }

        // Release 2's page, and its beat and worker, at work.
        let page = get(&scope, "/").await.text().await.unwrap();
        assert!(page.contains("heartbeats now record their queue"), "{page}");
        let tick = release_2_ticks(&scope, 0).await;
        assert!(
            tick["run_by"].as_str().unwrap().starts_with("2/good@"),
            "{tick}"
        );
        assert_eq!(tick["queue"], "default");

        // Deploying the live release again changes nothing.
        let again = agent.deploy(&scope, "release-2").await;
        assert_eq!(again.state, DeploymentState::Succeeded);
        assert!(again.steps.is_empty(), "{again:#?}");
    })
    .await;
}

/// The newest heartbeat row once release 2's beat scheduled it (and a
/// worker wrote it) with an id above `after`: beat, worker, database and
/// the page reading them all work together.
async fn release_2_ticks(scope: &Scope, after: i64) -> serde_json::Value {
    poll(
        "a tick scheduled by release 2, written to the database",
        Duration::from_secs(60),
        || async {
            let body: serde_json::Value = get(scope, "/heartbeats/").await.json().await.ok()?;
            let first = body["heartbeats"].as_array()?.first()?.clone();
            (first["scheduled_by"].as_str()?.starts_with("2/good@")
                && first["id"].as_i64()? > after)
                .then_some(first)
        },
    )
    .await
}

/// The id of the newest heartbeat row, 0 when there is none.
async fn newest_tick(scope: &Scope) -> i64 {
    let body: serde_json::Value = get(scope, "/heartbeats/").await.json().await.unwrap();
    body["heartbeats"][0]["id"].as_i64().unwrap_or(0)
}

/// Deploys `variant` on top of release 1 and checks the outcome and that
/// release 1 runs afterwards, healthy.
async fn deploy_broken(
    scope: &Scope,
    agent: &Agent,
    variant: &str,
    expected: DeploymentState,
    cause: &str,
) -> Deployment {
    let d = agent.deploy(scope, variant).await;
    assert_eq!(d.state, expected, "{variant}: {d:#?}");
    let error = d.error.clone().unwrap_or_default();
    assert!(error.contains(cause), "{variant}: {error}");
    settles_on(scope, &scope.app(), "release-1").await;
    let health = get(scope, "/healthz/").await;
    assert_eq!(health.status(), reqwest::StatusCode::OK, "{variant}");
    d
}

/// The output lines a deployment recorded for `step`.
fn outputs(engine: &EngineHandle, id: &DeploymentId, step: &str) -> Vec<String> {
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
async fn failures_before_the_switch_leave_the_running_release_alone() {
    scoped(|scope| async move {
        let agent = agent(&scope).await;
        assert_eq!(
            agent.deploy(&scope, "release-1").await.state,
            DeploymentState::Succeeded
        );

        let missing = DeployRequest {
            sha: "0000000".parse().unwrap(),
            ..agent.request(&scope, "release-1")
        };
        let d = agent
            .engine
            .wait(&agent.engine.deploy(missing).await.unwrap().id)
            .await
            .unwrap();
        assert_eq!(d.state, DeploymentState::Failed);
        assert!(
            d.error
                .as_deref()
                .unwrap()
                .contains("was not found in the registry"),
            "{d:#?}"
        );

        let failed = deploy_broken(
            &scope,
            &agent,
            "migrate-fails",
            DeploymentState::Failed,
            // Migration 0002 applied before 0003 raised: the message says
            // so, and never that nothing was changed.
            "release task migrate exited with 1",
        )
        .await;
        let error = failed.error.unwrap();
        assert!(
            error.contains("migrations applied, which stay applied: shop.0002_heartbeat_queue"),
            "{error}"
        );
        assert!(!error.contains("nothing running was changed"), "{error}");
        deploy_broken(
            &scope,
            &agent,
            "healthz-500",
            DeploymentState::Failed,
            "HTTP 500",
        )
        .await;
        deploy_broken(
            &scope,
            &agent,
            "web-crash",
            DeploymentState::Failed,
            // gunicorn's exit status varies (1 or 3) and Docker may have
            // restarted it already: the cause names the exit either way.
            "new web container: it exited",
        )
        .await;
        deploy_broken(
            &scope,
            &agent,
            "slow-boot",
            DeploymentState::Failed,
            "not healthy within 45 s",
        )
        .await;

        // Success prunes what deployd pulled beyond the kept releases: the
        // failed releases' images go, release 1 (previous) and 2 stay.
        assert_eq!(
            agent.deploy(&scope, "release-2").await.state,
            DeploymentState::Succeeded
        );
        let repository = &agent.config.apps[&agent.app].image;
        for variant in ["healthz-500", "web-crash", "slow-boot", "migrate-fails"] {
            let reference = format!("{repository}:{}", scope.bed.sha(variant));
            assert!(
                !scope.docker.has_image(&reference).await.unwrap(),
                "{variant} kept"
            );
        }
        for variant in ["release-1", "release-2"] {
            let reference = format!("{repository}:{}", scope.bed.sha(variant));
            assert!(
                scope.docker.has_image(&reference).await.unwrap(),
                "{variant} pruned"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn failures_after_the_switch_roll_every_service_back() {
    scoped(|scope| async move {
        let agent = agent(&scope).await;
        let first = agent.deploy(&scope, "release-1").await;
        assert_eq!(first.state, DeploymentState::Succeeded);

        deploy_broken(
            &scope,
            &agent,
            "worker-crash",
            DeploymentState::RolledBack,
            // Caught by the roll's liveness window, or on a slow machine by
            // verification: either way the worker, and a rollback.
            "worker",
        )
        .await;
        deploy_broken(
            &scope,
            &agent,
            "unhealthy-after-5-checks",
            DeploymentState::RolledBack,
            "web failed verification",
        )
        .await;

        // One host's part of a fleet deployment: the fleet's first host
        // runs the `once` tasks (migrate), this one skips them.
        let part = DeployRequest {
            fleet: Some(FleetPart {
                id: "fleet-1".into(),
                host: "web-2".into(),
                once_tasks: false,
            }),
            ..agent.request(&scope, "release-2")
        };
        let part = deployed(&agent.engine, part).await;
        assert_eq!(part.state, DeploymentState::Succeeded, "{part:#?}");
        assert_eq!(
            outputs(&agent.engine, &part.id, "task:migrate"),
            ["skipped: a once task: the fleet deployment runs it on its first host"]
        );
        assert!(part.steps.iter().any(|s| s.name == "task:collectstatic"));
        assert_eq!(part.fleet.as_ref().unwrap().host, "web-2");

        // A manual rollback goes back to the release before the live one,
        // by its digest: moving its tag (a force-push) changes nothing.
        let repository = agent.config.apps[&agent.app].image.clone();
        let moved = ImageRef::new(repository, scope.bed.sha("release-1"));
        let release_2 = scope.bed.image("release-2").to_string();
        let auth = scope.bed.registry_auth();
        scope
            .docker
            .tag_and_push(&release_2, &moved, &auth)
            .await
            .unwrap();
        let back = agent
            .rollback(RollbackRequest {
                reason: Some("test".into()),
                ..Default::default()
            })
            .await;
        assert_eq!(back.state, DeploymentState::Succeeded, "{back:#?}");
        assert_eq!(back.digest, first.digest);
        // `check` runs on deploy only; the rollback says which migrations
        // release 1 never saw and stay applied.
        let steps: Vec<&str> = back.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            steps[..4],
            ["prepare", "pull", "task:migrate", "task:collectstatic"],
            "{back:#?}"
        );
        assert_eq!(back.migrations_kept, ["shop.0002_heartbeat_queue"]);
        let skipped = outputs(&agent.engine, &back.id, "task:check");
        assert_eq!(
            skipped,
            ["skipped: it does not run on rollback (on = [\"deploy\"])"]
        );
        settles_on(&scope, &scope.app(), "release-1").await;
        let app = agent.app.as_str();
        for c in scope.docker.containers(&[(label::APP, app)]).await.unwrap() {
            assert_eq!(c.labels.get(label::DIGEST), first.digest.as_ref(), "{c:?}");
        }

        // An emergency rollback runs no release task at all.
        let forth = agent
            .rollback(RollbackRequest {
                to: Some(scope.bed.sha("release-2")),
                skip_tasks: true,
                ..Default::default()
            })
            .await;
        assert_eq!(forth.state, DeploymentState::Succeeded, "{forth:#?}");
        assert!(forth.skip_tasks);
        assert!(
            forth.steps.iter().all(|s| !s.name.starts_with("task:")),
            "{forth:#?}"
        );
        settles_on(&scope, &scope.app(), "release-2").await;

        // A locked app refuses deployments until unlocked.
        agent
            .engine
            .store()
            .lock(&agent.app, "incident 42", "ops")
            .unwrap();
        let err = agent
            .engine
            .deploy(agent.request(&scope, "release-2"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("incident 42"), "{err}");
    })
    .await;
}

/// The other good release.
fn other(variant: &str) -> &'static str {
    if variant == "release-1" {
        "release-2"
    } else {
        "release-1"
    }
}

// The step boundaries are walked by two tests, so that the two halves run
// side by side.
#[tokio::test]
async fn a_crash_before_beat_rolls_converges_at_restart() {
    crashes_converge_at_restart(["pull", "task:migrate", "roll:web", "roll:worker"]).await;
}

#[tokio::test]
async fn a_crash_from_beat_s_roll_to_the_end_converges_at_restart() {
    crashes_converge_at_restart(["roll:beat", "verify", "cleanup", "finish"]).await;
}

/// Kills the agent at each of `boundaries` in turn, each time in a
/// deployment from the live release to the other, and checks what a restart
/// makes of it: the record says what it found, and the app runs one whole
/// release (the old one before verification, the new one after).
async fn crashes_converge_at_restart(boundaries: [&'static str; 4]) {
    scoped(move |scope| async move {
        let agent = agent(&scope).await;
        assert_eq!(
            agent.deploy(&scope, "release-1").await.state,
            DeploymentState::Succeeded
        );
        let mut live = "release-1";
        for (round, boundary) in boundaries.into_iter().enumerate() {
            let next = other(live);
            let (restarted, crashed) = agent
                .crash_and_restart(&scope, next, boundary, round + 1)
                .await;
            // Past verification the new release stays; before, the old one returns.
            if matches!(boundary, "cleanup" | "finish") {
                live = next;
            }
            let error = crashed.error.as_deref().unwrap();
            assert!(
                error.contains(&format!("every service runs {}", scope.bed.sha(live))),
                "{boundary}: {error}"
            );
            // Old workers drain in the background: wait until they are gone,
            // not only stopped (a drained container is removed after it
            // stops, and Docker lists it until the removal ends).
            let wanted = all_on(&scope, live);
            settle(boundary, Duration::from_secs(60), || async {
                let app = scope
                    .docker
                    .containers(&[(label::APP, agent.app.as_str())])
                    .await
                    .unwrap();
                let only_live = app
                    .iter()
                    .all(|c| c.running && !c.labels.contains_key(label::TASK));
                if only_live && running(&scope).await == wanted {
                    Ok(())
                } else {
                    Err(app)
                }
            })
            .await;
            assert_eq!(
                get(&scope, "/healthz/").await.status(),
                reqwest::StatusCode::OK,
                "{boundary}"
            );
            let live_release = restarted.store().live_release(&agent.app).unwrap().unwrap();
            assert_eq!(live_release.sha, scope.bed.sha(live), "{boundary}");
        }
    })
    .await;
}

async fn deployed(engine: &EngineHandle, request: DeployRequest) -> Deployment {
    let started = engine.deploy(request).await.unwrap();
    engine.wait(&started.id).await.unwrap()
}

#[tokio::test]
async fn apps_share_a_host_and_roll_back_to_a_named_kept_release() {
    scoped(|scope| async move {
        let (a, b) = (scope.app(), scope.second_app());
        let repository_a = scope.publish_releases().await;
        let repository_b = scope.publish_releases_of(&b).await;
        // A third good release of a: release 2's image under another sha.
        let third: CommitSha = "feedc0ffee1".parse().unwrap();
        let auth = scope.bed.registry_auth();
        let release_2 = scope.bed.image("release-2").to_string();
        let target = ImageRef::new(repository_a.clone(), third.clone());
        scope
            .docker
            .tag_and_push(&release_2, &target, &auth)
            .await
            .unwrap();

        // b has its own database and broker on the same network.
        let state = tempfile::tempdir().unwrap();
        let env_b = state.path().join("b.env");
        let env = std::fs::read_to_string(scope.bed.var("APP_ENV")).unwrap();
        let env = env.replace("@db:5432/", "@db-b:5432/");
        std::fs::write(&env_b, env.replace("redis:6379/0", "redis:6379/1")).unwrap();
        let section_a = app_config(&scope, &a, &repository_a, Tuning::TEST).replacen(
            "verify = \"8s\"",
            "verify = \"8s\"\nretain = 2",
            1,
        );
        // b's containers go under a cgroup of their own (`cgroup_parent`),
        // named as the engine's cgroup driver wants it.
        let parent = cgroup_parent();
        let section_b = app_config(&scope, &b, &repository_b, Tuning::TEST)
            .replace(scope.bed.var("APP_ENV"), &env_b.display().to_string())
            .replacen(
                "verify = ",
                &format!("cgroup_parent = \"{parent}\"\n        verify = "),
                1,
            );
        let text = format!(
            "state_dir = \"{}\"\n{section_a}\n{section_b}",
            state.path().display()
        );
        let config = Config::from_toml(&text).unwrap();
        let store = Store::open(state.path()).unwrap();
        let engine = EngineHandle::start(&config, scope.docker.clone(), store)
            .await
            .unwrap();
        scope.start_db().await;
        scope.start_db_as("db-b").await;
        scope.start_redis().await;
        let request = |app: &str, sha: CommitSha| deploy_request(app, sha, "engine-test");
        let (r1, r2) = (scope.bed.sha("release-1"), scope.bed.sha("release-2"));

        // Both apps deploy at once: one app's deployment is no conflict for
        // the other's.
        let (da, db) = tokio::join!(
            deployed(&engine, request(&a, r1.clone())),
            deployed(&engine, request(&b, r1.clone())),
        );
        assert_eq!(da.state, DeploymentState::Succeeded, "{da:#?}");
        assert_eq!(db.state, DeploymentState::Succeeded, "{db:#?}");
        for d in [&da, &db] {
            assert!(d.migrations.contains(&"shop.0001_initial".to_owned()));
        }
        settles_on(&scope, &a, "release-1").await;
        for (app, want) in [(&a, ""), (&b, parent.as_str())] {
            for c in scope.docker.containers(&[(label::APP, app)]).await.unwrap() {
                assert_eq!(container_cgroup_parent(&c.id), want, "{}", c.name);
            }
        }

        for sha in [r2.clone(), third.clone()] {
            let d = deployed(&engine, request(&a, sha)).await;
            assert_eq!(d.state, DeploymentState::Succeeded, "{d:#?}");
        }
        settles_on(&scope, &b, "release-1").await;

        // a keeps 2 releases: the live one and release 2. Release 1 is gone
        // from rollback's reach; a release that never went live never was.
        for sha in [r1.clone(), scope.bed.sha("healthz-500")] {
            let err = engine
                .rollback(
                    &a,
                    "ops",
                    RollbackRequest {
                        to: Some(sha),
                        ..Default::default()
                    },
                )
                .await
                .unwrap_err();
            assert!(matches!(err, EngineError::UnknownRelease { .. }), "{err:?}");
            assert!(err.to_string().contains("kept for rollback"), "{err}");
        }
        let back = engine
            .rollback(
                &a,
                "ops",
                RollbackRequest {
                    to: Some(r2.clone()),
                    reason: Some("named".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let back = engine.wait(&back.id).await.unwrap();
        assert_eq!(back.state, DeploymentState::Succeeded, "{back:#?}");
        assert_eq!(back.sha, r2);
        settles_on(&scope, &a, "release-2").await;
        settles_on(&scope, &b, "release-1").await;

        // Leftovers of other releases found at start are ended: a stopped
        // web container is removed, a running worker drains, the live
        // release is left alone.
        drop(engine);
        let leftover = |service: &str| ContainerSpec {
            image: scope.bed.image("release-1").to_string(),
            // Ends at SIGTERM, as a worker's warm shutdown would.
            cmd: Some(
                ["sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait"]
                    .map(String::from)
                    .into(),
            ),
            labels: HashMap::from([
                (label::APP.to_owned(), a.clone()),
                (label::SERVICE.to_owned(), service.to_owned()),
                (label::SHA.to_owned(), r1.to_string()),
                (label::DIGEST.to_owned(), "sha256:0".to_owned()),
            ]),
            ..Default::default()
        };
        let stopped = scope.docker.start(leftover("web")).await.unwrap();
        scope
            .docker
            .stop(&stopped, Duration::from_secs(1))
            .await
            .unwrap();
        let draining = scope.docker.start(leftover("worker")).await.unwrap();
        let store = Store::open(state.path()).unwrap();
        let _engine = EngineHandle::start(&config, scope.docker.clone(), store)
            .await
            .unwrap();
        poll("leftovers to be ended", Duration::from_secs(60), || async {
            let all = scope.docker.containers(&[(label::APP, &a)]).await.unwrap();
            let ids: Vec<&str> = all.iter().map(|c| c.id.as_str()).collect();
            (!ids.contains(&stopped.as_str()) && !ids.contains(&draining.as_str())).then_some(())
        })
        .await;
        settles_on(&scope, &a, "release-2").await;
    })
    .await;
}

/// The sample app redirects plain HTTP to HTTPS (`SECURE_SSL_REDIRECT`), as
/// real projects do. A health check that does not say it came through the
/// TLS proxy is answered with that redirect: the deployment fails naming
/// the 301 and where it points, never "connection refused". A first
/// deployment that fails after the switch sent it traffic leaves the switch
/// answering 503, not routing to removed containers. Every failure names
/// the migrations it applied. Per-service env reaches that service only.
#[tokio::test]
async fn first_deployments_say_what_they_changed() {
    scoped(|scope| async move {
        let state = tempfile::tempdir().unwrap();
        let repository = scope.publish_releases().await;
        let app = scope.app();
        let section = app_config(&scope, &app, &repository, Tuning::TEST);
        let switched = |section: &str| {
            format!(
                "state_dir = \"{}\"\n{section}\n[apps.{app}.switch]\nlisten = \"127.0.0.1:0\"\ntrust_forwarded_headers = true\n",
                state.path().display()
            )
        };
        // The check waits its whole timeout: a redirect never turns healthy.
        let plain_health =
            section.replace(r#"headers = { "X-Forwarded-Proto" = "https" }, "#, "");
        assert_ne!(plain_health, section);
        let request = |variant: &str| deploy_request(&app, scope.bed.sha(variant), "engine-test");
        let (engine, serving) = switched_engine(&scope, state.path(), &switched(&plain_health)).await;
        scope.start_db().await;
        scope.start_redis().await;

        let d = deployed(&engine, request("release-1")).await;
        assert_eq!(d.state, DeploymentState::Failed, "{d:#?}");
        let error = d.error.unwrap();
        assert!(
            error.contains("not healthy within 45 s: GET /healthz/ (Host: ")
                && error.contains(" answered HTTP 301 Location: https://"),
            "{error}"
        );
        assert!(error.contains(r#"health.headers = { "X-Forwarded-Proto" = "https" }"#));
        assert!(
            error.contains("migrations applied, which stay applied: ")
                && error.contains("shop.0001_initial"),
            "{error}"
        );
        assert!(!error.contains("nothing running was changed"), "{error}");
        assert!(running(&scope).await.is_empty());
        drop((engine, serving));

        // With the header the proxy sets, the same app is healthy; its
        // worker then crashes, after the switch sent traffic to web.
        let (engine, serving) = switched_engine(&scope, state.path(), &switched(&section)).await;
        let public = serving.addr(&app).unwrap();
        let d = deployed(&engine, request("worker-crash")).await;
        assert_eq!(d.state, DeploymentState::Failed, "{d:#?}");
        let error = d.error.unwrap();
        assert!(
            error.contains("the switch now answers 503")
                && error.contains("migrations applied, which stay applied: shop.0002_heartbeat_queue"),
            "{error}"
        );
        let healthy = outputs(&engine, &d.id, "roll:web");
        assert!(
            healthy.iter().any(|l| l.contains("healthy after")
                && l.contains("X-Forwarded-Proto: https")
                && l.contains("answered HTTP 200")),
            "{healthy:?}"
        );
        let discard = outputs(&engine, &d.id, "discard");
        assert!(
            discard.iter().any(|l| l.starts_with("traffic switched to nothing")),
            "{discard:?}"
        );
        assert!(running(&scope).await.is_empty());
        let answer = reqwest::Client::new()
            .get(format!("http://{public}/release/"))
            .header(HOST, scope.bed.app_host())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.text().await.unwrap(), "no web container is live");

        // A good release: the worker's own env reaches the worker alone.
        let d = deployed(&engine, request("release-2")).await;
        assert_eq!(d.state, DeploymentState::Succeeded, "{d:#?}");
        for c in scope
            .docker
            .containers(&[(label::APP, app.as_str())])
            .await
            .unwrap()
            .into_iter()
            .filter(|c| c.running)
        {
            let env = container_env(&c.id);
            let service = &c.labels[label::SERVICE];
            let has = env.iter().any(|e| e == "SHOP_SERVICE_ENV=worker only");
            assert_eq!(has, service == "worker", "{service}: {env:?}");
            // The app's env file reaches every one of them.
            assert!(env.iter().any(|e| e.starts_with("DATABASE_URL=")), "{service}");
        }
        let answer = reqwest::Client::new()
            .get(format!("http://{public}/release/"))
            .header(HOST, scope.bed.app_host())
            .header("X-Forwarded-Proto", "https")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), reqwest::StatusCode::OK);
    })
    .await;
}

/// An engine and its switch for `text`, on the store in `state_dir`.
async fn switched_engine(
    scope: &Scope,
    state_dir: &std::path::Path,
    text: &str,
) -> (EngineHandle, Serving) {
    let config = Config::from_toml(text).unwrap();
    let routes = Routes::for_config(&config);
    let serving = Switch::bind(&config, &routes).unwrap().serve().unwrap();
    let store = Store::open(state_dir).unwrap();
    let engine = EngineHandle::start_routed(&config, scope.docker.clone(), store, routes)
        .await
        .unwrap();
    (engine, serving)
}

/// A cgroup for an app's containers in the form the engine's cgroup
/// driver takes: a path (cgroupfs) or a slice (systemd).
fn cgroup_parent() -> String {
    let out = std::process::Command::new("docker")
        .args(["info", "--format", "{{.CgroupDriver}}"])
        .output()
        .unwrap();
    if String::from_utf8_lossy(&out.stdout).trim() == "systemd" {
        "deployd-test.slice".to_owned()
    } else {
        "/deployd-test".to_owned()
    }
}

/// The cgroup a container was put under (`--cgroup-parent`).
fn container_cgroup_parent(id: &str) -> String {
    let out = std::process::Command::new("docker")
        .args(["inspect", "--format", "{{.HostConfig.CgroupParent}}", id])
        .output()
        .unwrap();
    assert!(out.status.success(), "docker inspect {id}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A container's environment, as Docker holds it.
fn container_env(id: &str) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["inspect", "--format", "{{json .Config.Env}}", id])
        .output()
        .unwrap();
    assert!(out.status.success(), "docker inspect {id}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A service taken out of the config keeps its containers until the next
/// deployment, which removes them: a singleton (beat) before anything
/// rolls, any other once the release is verified. Status lists them as
/// removed meanwhile.
#[tokio::test]
async fn services_taken_out_of_the_config_are_removed_by_the_next_deployment() {
    scoped(|scope| async move {
        let agent = agent(&scope).await;
        let first = agent.deploy(&scope, "release-1").await;
        assert_eq!(first.state, DeploymentState::Succeeded, "{first:#?}");
        settles_on(&scope, &agent.app, "release-1").await;

        // The same host, its config without worker and beat.
        drop(agent.engine);
        let mut config = agent.config.clone();
        let app = config.apps.get_mut(&agent.app).unwrap();
        app.services.remove("worker");
        app.services.remove("beat");
        app.order = None;
        let store = Store::open(agent.state.path()).unwrap();
        let engine = EngineHandle::start(&config, scope.docker.clone(), store)
            .await
            .unwrap();
        let status = engine.status(&agent.app).await.unwrap();
        let removed: Vec<(&str, bool)> = status
            .services
            .iter()
            .filter(|s| s.removed)
            .map(|s| (s.name.as_str(), s.singleton))
            .collect();
        assert_eq!(removed, [("beat", true), ("worker", false)], "{status:#?}");

        let request = deploy_request(&agent.app, scope.bed.sha("release-2"), "engine-test");
        let started = engine.deploy(request).await.unwrap();
        let d = engine.wait(&started.id).await.unwrap();
        assert_eq!(d.state, DeploymentState::Succeeded, "{d:#?}");
        let steps: Vec<&str> = d.steps.iter().map(|s| s.name.as_str()).collect();
        let at = |name: &str| steps.iter().position(|s| *s == name).unwrap_or(usize::MAX);
        assert!(at("remove:beat") < at("roll:web"), "{steps:?}");
        assert!(at("verify") < at("remove:worker"), "{steps:?}");
        assert!(at("remove:worker") < usize::MAX, "{steps:?}");
        let said = outputs(&engine, &d.id, "remove:beat");
        assert!(
            said.iter()
                .any(|l| l.contains("1 of 1 running container(s) stopped")),
            "{said:?}"
        );
        let sha = scope.bed.sha("release-2").to_string();
        poll("only web to run", Duration::from_secs(90), || async {
            let now = running(&scope).await;
            (now == [
                ("web".to_owned(), sha.clone()),
                ("web".to_owned(), sha.clone()),
            ])
            .then_some(())
        })
        .await;
        let left = scope
            .docker
            .containers(&[(label::APP, &agent.app)])
            .await
            .unwrap()
            .into_iter()
            .filter(|c| c.labels.get(label::SERVICE).is_some_and(|s| s != "web"))
            .count();
        assert_eq!(left, 0, "worker and beat containers remain");
        let status = engine.status(&agent.app).await.unwrap();
        assert!(status.services.iter().all(|s| !s.removed), "{status:#?}");
    })
    .await;
}

/// The migrations of `app` the database has applied, as `app.name`,
/// asked of Django in a one-off container of `variant`.
async fn applied_migrations(scope: &Scope, variant: &str) -> Vec<String> {
    let image = scope.pull(variant).await;
    let spec = scope.app_container(
        &image.pinned,
        &["python", "manage.py", "showmigrations", "shop"],
    );
    let output = scope
        .docker
        .run_oneoff(spec, Duration::from_secs(120), |_| {})
        .await
        .unwrap();
    assert_eq!(output.exit_code, 0, "{:?}", output.lines);
    output
        .lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix("[X] "))
        .map(|name| format!("shop.{name}"))
        .collect()
}

#[tokio::test]
async fn migrations_are_planned_and_those_that_break_the_running_release_refused() {
    scoped(|scope| async move {
        let agent = agent_tuned(&scope, Tuning::PLANNED).await;
        let plan_of = |d: &Deployment| {
            let id = d.plan.as_deref().expect("the deployment made a plan");
            agent.engine.store().plan(id).unwrap().unwrap()
        };
        // "app.migration Operation verdict" of each operation on the app.
        let verdicts = |d: &Deployment| -> Vec<String> {
            let plan = plan_of(d).migrations.unwrap();
            plan.migrations
                .iter()
                .filter(|m| m.app == "shop")
                .flat_map(|m| {
                    m.operations
                        .iter()
                        .map(|o| format!("{} {} {}", m.label(), o.operation, o.verdict))
                })
                .collect()
        };

        // A first deployment: every migration is pending, nothing runs.
        let two = agent.deploy(&scope, "release-2").await;
        assert_eq!(two.state, DeploymentState::Succeeded, "{:?}", two.error);
        assert_eq!(
            verdicts(&two),
            [
                "shop.0001_initial CreateModel safe",
                "shop.0002_heartbeat_queue AddField safe"
            ]
        );
        let plan = plan_of(&two);
        assert_eq!(plan.deployment.as_ref(), Some(&two.id));
        assert_eq!(plan.digest, two.digest);
        assert!(plan.live.is_none());
        let schema = plan.migrations.unwrap();
        assert_eq!(schema.vendor, "postgresql");
        assert!(
            schema
                .leaves
                .contains(&("shop".into(), "0002_heartbeat_queue".into()))
        );
        let logged = outputs(&agent.engine, &two.id, "plan");
        assert!(
            logged
                .iter()
                .any(|l| l.contains("shop.0002_heartbeat_queue: safe")),
            "{logged:#?}"
        );
        let steps: Vec<&str> = two.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(&steps[..4], ["prepare", "pull", "plan", "task:check"]);

        // Irreversible, but harmless to release 2: it goes through.
        let data = agent.deploy(&scope, "irreversible-data").await;
        assert_eq!(data.state, DeploymentState::Succeeded, "{:?}", data.error);
        assert_eq!(
            verdicts(&data),
            ["shop.0003_fill_queue RunPython irreversible"]
        );
        let operation = &plan_of(&data).migrations.unwrap().migrations[0].operations[0];
        assert!(!operation.reversible);

        // Refused before anything runs, naming what breaks.
        for (variant, operation, why) in [
            ("drop-column", "RemoveField", "drops column heartbeat.queue"),
            (
                "not-null-no-default",
                "AddField",
                "heartbeat.priority is NOT NULL without a database default",
            ),
        ] {
            let refused = agent.deploy(&scope, variant).await;
            assert_eq!(refused.state, DeploymentState::Failed, "{variant}");
            let error = refused.error.clone().unwrap();
            let live = scope.bed.sha("irreversible-data");
            assert!(
                error.starts_with(&format!(
                    "refused: a migration would break release {} while it still runs",
                    live.short()
                )) && error.contains(operation)
                    && error.contains(why)
                    && error.contains("expand, then contract")
                    && error.ends_with("; nothing running was changed"),
                "{variant}: {error}"
            );
            assert_eq!(
                verdicts(&refused),
                [format!(
                    "{} {operation} breaks",
                    plan_of(&refused).migrations.unwrap().labels()[0]
                )],
                "{variant}"
            );
            let last = refused.steps.last().unwrap();
            assert_eq!(last.name, "plan", "{variant}: no task ran");
            let sql = plan_of(&refused).migrations.unwrap().migrations[0]
                .sql
                .join("\n");
            assert!(
                sql.contains(r#"ALTER TABLE "shop_heartbeat""#),
                "{variant}: {sql}"
            );
            settles_on(&scope, &scope.app(), "irreversible-data").await;
        }
        assert_eq!(
            applied_migrations(&scope, "irreversible-data").await,
            [
                "shop.0001_initial",
                "shop.0002_heartbeat_queue",
                "shop.0003_fill_queue"
            ]
        );

        // Safe: a nullable column.
        let expand = agent.deploy(&scope, "expand").await;
        assert_eq!(
            expand.state,
            DeploymentState::Succeeded,
            "{:?}",
            expand.error
        );
        assert_eq!(
            verdicts(&expand),
            ["shop.0003_heartbeat_note AddField safe"]
        );

        // The contract step: a release whose models no longer use the
        // column, then the migration that drops it, safe while it runs.
        let stopped = agent.deploy(&scope, "stop-reading").await;
        assert_eq!(
            stopped.state,
            DeploymentState::Succeeded,
            "{:?}",
            stopped.error
        );
        let tables = plan_of(&stopped).migrations.unwrap().tables.unwrap();
        assert!(!tables["shop_heartbeat"].contains("queue"), "{tables:?}");
        let contract = agent.deploy(&scope, "drop-column").await;
        assert_eq!(
            contract.state,
            DeploymentState::Succeeded,
            "{:?}",
            contract.error
        );
        assert_eq!(
            verdicts(&contract),
            ["shop.0003_remove_heartbeat_queue RemoveField safe"]
        );
        let operation = &plan_of(&contract).migrations.unwrap().migrations[0].operations[0];
        let stopped = scope.bed.sha("stop-reading");
        assert_eq!(
            operation.why,
            format!(
                "release {} does not use shop_heartbeat.queue (not in its models): no concern of it",
                stopped.short()
            )
        );
        // Back to the release that stopped reading it: the drop stays.
        let back = agent
            .rollback(RollbackRequest {
                to: Some(stopped),
                schema: deployd_proto::SchemaRollback::Check,
                ..Default::default()
            })
            .await;
        assert_eq!(back.state, DeploymentState::Succeeded, "{:?}", back.error);
        assert_eq!(back.migrations_kept, ["shop.0003_remove_heartbeat_queue"]);
        let said = outputs(&agent.engine, &back.id, "schema").join("\n");
        assert!(
            said.contains("does not use shop_heartbeat.queue (not in its models)")
                && said.contains("they stay applied: none breaks release"),
            "{said}"
        );

        drop(agent);
    })
    .await;
}

#[tokio::test]
async fn warn_lets_a_breaking_migration_through_and_says_so() {
    breaking_migration_goes_through("warn").await;
}

#[tokio::test]
async fn allow_lets_a_breaking_migration_through() {
    breaking_migration_goes_through("allow").await;
}

/// With `[migrations] unsafe = policy` (warn or allow), a release that
/// drops a column release 2 reads is deployed; the plan still judges it,
/// and only `warn` says so in the log.
async fn breaking_migration_goes_through(policy: &'static str) {
    scoped(|scope| async move {
        let tuning = Tuning {
            migrations: Some(policy),
            ..Tuning::TEST
        };
        let agent = agent_tuned(&scope, tuning).await;
        let two = agent.deploy(&scope, "release-2").await;
        assert_eq!(two.state, DeploymentState::Succeeded, "{:?}", two.error);
        let dropped = agent.deploy(&scope, "drop-column").await;
        assert_eq!(
            dropped.state,
            DeploymentState::Succeeded,
            "{policy}: {:?}",
            dropped.error
        );
        let id = dropped.plan.as_deref().expect("the deployment made a plan");
        let plan = agent.engine.store().plan(id).unwrap().unwrap();
        assert_eq!(plan.unsafe_migrations.as_str(), policy);
        let judged: Vec<String> = plan
            .migrations
            .unwrap()
            .operations_judged(Verdict::Breaks)
            .map(|(m, o)| format!("{} {}", m.label(), o.operation))
            .collect();
        assert_eq!(judged, ["shop.0003_remove_heartbeat_queue RemoveField"]);
        let warned: Vec<String> = outputs(&agent.engine, &dropped.id, "plan")
            .into_iter()
            .filter(|l| l.starts_with("warning: "))
            .collect();
        let r2 = scope.bed.sha("release-2").to_string();
        match policy {
            "warn" => assert_eq!(
                warned,
                [format!(
                    "warning: a migration would break release {} while it still runs: \
                     shop.0003_remove_heartbeat_queue RemoveField (drops column \
                     heartbeat.queue, which the running release still selects and writes) \
                     ([migrations] unsafe = \"warn\")",
                    &r2[..12]
                )]
            ),
            _ => assert!(warned.is_empty(), "{warned:#?}"),
        }
        assert!(
            applied_migrations(&scope, "drop-column")
                .await
                .contains(&"shop.0003_remove_heartbeat_queue".to_owned())
        );
        settles_on(&scope, &scope.app(), "drop-column").await;
    })
    .await;
}

#[tokio::test]
async fn rollbacks_refuse_or_reverse_migrations_that_break_the_older_release() {
    use deployd_proto::SchemaRollback;
    scoped(|scope| async move {
        let agent = agent_tuned(&scope, Tuning::PLANNED).await;
        let r2 = scope.bed.sha("release-2");
        let rollback = async |schema: SchemaRollback| {
            agent
                .rollback(RollbackRequest {
                    to: Some(r2.clone()),
                    schema,
                    ..Default::default()
                })
                .await
        };
        let succeeded = |d: &Deployment| {
            assert_eq!(d.state, DeploymentState::Succeeded, "{:?}", d.error);
        };
        succeeded(&agent.deploy(&scope, "release-2").await);
        succeeded(&agent.deploy(&scope, "expand").await);

        // Back past a nullable column: it stays applied, said so.
        let back = rollback(SchemaRollback::Check).await;
        succeeded(&back);
        assert_eq!(back.migrations_kept, ["shop.0003_heartbeat_note"]);
        let said = outputs(&agent.engine, &back.id, "schema");
        assert!(
            said.iter().any(|l| l.starts_with(&format!(
                "they stay applied: none breaks release {}",
                r2.short()
            ))),
            "{said:#?}"
        );

        // A NOT NULL column release 2 does not set, allowed in.
        let mut request = agent.request(&scope, "not-null-no-default");
        request.allow_unsafe_migrations = true;
        succeeded(&deployed(&agent.engine, request).await);

        // Back past it: refused, nothing changed.
        let refused = rollback(SchemaRollback::Check).await;
        assert_eq!(refused.state, DeploymentState::Failed);
        let error = refused.error.unwrap();
        assert!(
            error.starts_with(&format!(
                "refused: migrations applied since release {} last ran would break it: \
                 shop.0003_heartbeat_priority AddField",
                r2.short()
            )) && error.ends_with("; nothing running was changed"),
            "{error}"
        );
        assert_eq!(refused.steps.last().unwrap().name, "schema");
        settles_on(&scope, &scope.app(), "not-null-no-default").await;

        // Reversed first, in the live release's image; then release 2 runs,
        // and writes: its beat's ticks insert rows without `priority`.
        let before = newest_tick(&scope).await;
        let back = rollback(SchemaRollback::MigrateBack).await;
        succeeded(&back);
        assert_eq!(back.schema, SchemaRollback::MigrateBack);
        assert!(back.migrations_kept.is_empty(), "{back:#?}");
        let said = outputs(&agent.engine, &back.id, "migrate-back");
        assert!(
            said.iter()
                .any(|l| l.contains("Unapplying shop.0003_heartbeat_priority... OK")),
            "{said:#?}"
        );
        assert_eq!(
            applied_migrations(&scope, "not-null-no-default").await,
            ["shop.0001_initial", "shop.0002_heartbeat_queue"]
        );
        settles_on(&scope, &scope.app(), "release-2").await;
        let tick = release_2_ticks(&scope, before).await;
        assert!(
            tick["run_by"].as_str().unwrap().starts_with("2/good@"),
            "{tick}"
        );

        // A data migration without reverse code cannot be migrated back.
        succeeded(&agent.deploy(&scope, "irreversible-data").await);
        let refused = rollback(SchemaRollback::MigrateBack).await;
        assert_eq!(refused.state, DeploymentState::Failed);
        let error = refused.error.unwrap();
        assert!(
            error.starts_with(
                "cannot migrate back: shop.0003_fill_queue cannot be reversed (no reverse code)"
            ),
            "{error}"
        );
        settles_on(&scope, &scope.app(), "irreversible-data").await;
    })
    .await;
}
