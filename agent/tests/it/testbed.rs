//! Proves the test bed through bollard, the way the engine will use it:
//! authenticated pulls from the local registry, release tasks in one-off
//! containers, and the sample app's web, worker and beat on a real network.

use std::time::Duration;

use deployd::docker::{ContainerSpec, Docker, DockerError, ImageRef, RegistryAuth};
use deployd_testkit::{BEAT, MIGRATE, Testbed, WORKER, poll, scoped};
use reqwest::StatusCode;
use reqwest::header::HOST;

const TASK_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn pull_with_credentials_pins_a_digest_per_release() {
    let bed = Testbed::load();
    let docker = Docker::connect().await.unwrap();
    let auth = bed.registry_auth();

    let first = docker
        .pull(&bed.image("release-1"), Some(&auth))
        .await
        .unwrap();
    let second = docker
        .pull(&bed.image("release-2"), Some(&auth))
        .await
        .unwrap();

    for pulled in [&first, &second] {
        assert!(
            pulled.digest.starts_with("sha256:") && pulled.digest.len() == 71,
            "{pulled:?}"
        );
        assert_eq!(
            pulled.pinned,
            format!("{}@{}", bed.var("REPOSITORY"), pulled.digest)
        );
    }
    assert_ne!(
        first.digest, second.digest,
        "each release tag holds its own image"
    );
}

#[tokio::test]
async fn pull_with_wrong_or_missing_credentials_is_refused() {
    let bed = Testbed::load();
    let docker = Docker::connect().await.unwrap();
    let image = bed.image("release-1");
    let wrong = RegistryAuth {
        username: bed.registry_auth().username,
        password: "not-the-password".into(),
    };

    let err = docker.pull(&image, Some(&wrong)).await.unwrap_err();
    assert!(matches!(err, DockerError::Unauthorized { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("refused the credentials"), "{message}");
    assert!(!message.contains("not-the-password"), "{message}");

    let err = docker.pull(&image, None).await.unwrap_err();
    assert!(matches!(err, DockerError::Unauthorized { .. }), "{err:?}");
}

#[tokio::test]
async fn pull_of_a_missing_tag_says_not_found() {
    let bed = Testbed::load();
    let docker = Docker::connect().await.unwrap();
    let missing = ImageRef::new(bed.var("REPOSITORY"), "0000000".parse().unwrap());

    let err = docker
        .pull(&missing, Some(&bed.registry_auth()))
        .await
        .unwrap_err();

    assert!(matches!(err, DockerError::NotFound { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("{missing} was not found in the registry")
    );
}

#[tokio::test]
async fn pull_from_an_unreachable_registry_fails_with_the_cause() {
    let bed = Testbed::load();
    let docker = Docker::connect().await.unwrap();
    // Port 9 (discard) has no registry on loopback.
    let image = ImageRef::new("127.0.0.1:9/shop", bed.sha("release-1"));

    let err = docker
        .pull(&image, Some(&bed.registry_auth()))
        .await
        .unwrap_err();

    assert!(matches!(err, DockerError::Pull { .. }), "{err:?}");
    assert!(err.to_string().contains("connection refused"), "{err}");
}

#[tokio::test]
async fn migrate_runs_in_one_off_containers_that_are_always_removed() {
    scoped(|scope| async move {
        let good = scope.pull("release-1").await;
        let broken = scope.pull("migrate-fails").await;
        scope.start_db().await;

        let task = |image: &str| one_off(&scope.app_container(image, MIGRATE), &scope.id);
        let mut live = Vec::new();
        let ok = scope
            .docker
            .run_oneoff(task(&good.pinned), TASK_TIMEOUT, |line| {
                live.push(line.to_owned())
            })
            .await
            .unwrap();
        assert_eq!(ok.exit_code, 0, "{:#?}", ok.lines);
        // Lines are seen as they arrive, and all of them.
        assert_eq!(live, ok.lines);
        assert!(
            ok.lines
                .iter()
                .any(|l| l.contains("Applying shop.0001_initial... OK")),
            "{:#?}",
            ok.lines
        );

        let failed = scope
            .docker
            .run_oneoff(task(&broken.pinned), TASK_TIMEOUT, |_| {})
            .await
            .unwrap();
        assert_ne!(failed.exit_code, 0);
        // stderr is captured too: the traceback names the failing migration.
        assert!(
            failed
                .lines
                .iter()
                .any(|l| l.contains("Applying shop.0002_heartbeat_queue... OK"))
        );
        assert!(
            failed
                .lines
                .iter()
                .any(|l| l.contains("migrate-fails build: this migration always fails")),
            "{:#?}",
            failed.lines
        );

        let left = scope
            .docker
            .containers_labelled("deployd.test.oneoff", &scope.id)
            .await
            .unwrap();
        assert!(left.is_empty(), "one-off containers left behind: {left:?}");
    })
    .await;
}

#[tokio::test]
async fn one_off_timeout_kills_and_removes_the_container() {
    scoped(|scope| async move {
        let pulled = scope.pull("release-1").await;
        let spec = one_off(
            &scope.app_container(&pulled.pinned, &["sleep", "60"]),
            &scope.id,
        );

        let err = scope
            .docker
            .run_oneoff(spec, Duration::from_secs(2), |_| {})
            .await
            .unwrap_err();

        assert!(matches!(err, DockerError::Timeout { .. }), "{err:?}");
        assert_eq!(err.to_string(), "sleep 60 did not finish within 2 s");
        let left = scope
            .docker
            .containers_labelled("deployd.test.oneoff", &scope.id)
            .await
            .unwrap();
        assert!(left.is_empty(), "timed-out container left behind: {left:?}");
    })
    .await;
}

#[tokio::test]
async fn web_answers_healthz_only_for_its_own_host_over_https() {
    scoped(|scope| async move {
        let pulled = scope.pull("release-1").await;
        scope.start_db().await;
        scope.start_redis().await;
        let base = start_web(&scope, &pulled.pinned).await;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let healthz = format!("{base}/healthz/");

        // As the TLS proxy in front forwards it: the database and the broker
        // are checked.
        let body = poll(
            "web to answer /healthz/",
            Duration::from_secs(60),
            || async {
                let response = http
                    .get(&healthz)
                    .header(HOST, scope.bed.app_host())
                    .header("X-Forwarded-Proto", "https")
                    .send()
                    .await
                    .ok()?;
                (response.status() == StatusCode::OK).then_some(response.text().await.ok()?)
            },
        )
        .await;
        assert_eq!(
            body,
            r#"{"status": "ok", "database": "ok", "broker": "ok"}"#
        );

        // Plain HTTP is redirected to HTTPS (SECURE_SSL_REDIRECT), nothing exempted.
        let response = http
            .get(&healthz)
            .header(HOST, scope.bed.app_host())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
        let location = response.headers()["location"].to_str().unwrap();
        assert_eq!(
            location,
            format!("https://{}/healthz/", scope.bed.app_host())
        );

        // Without the app's Host header Django refuses: DJANGO_ALLOWED_HOSTS is strict.
        let response = http.get(&healthz).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    })
    .await;
}

#[tokio::test]
async fn worker_runs_what_beat_schedules() {
    scoped(|scope| async move {
        let pulled = scope.pull("release-1").await;
        let image = pulled.pinned.as_str();
        scope.start_db().await;
        scope.start_redis().await;
        let migrate = scope.app_container(image, MIGRATE);
        let migrated = scope
            .docker
            .run_oneoff(migrate, TASK_TIMEOUT, |_| {})
            .await
            .unwrap();
        assert_eq!(migrated.exit_code, 0, "{:#?}", migrated.lines);

        let base = start_web(&scope, image).await;
        scope
            .docker
            .start(scope.app_container(image, WORKER))
            .await
            .unwrap();
        scope
            .docker
            .start(scope.app_container(image, BEAT))
            .await
            .unwrap();

        let http = reqwest::Client::new();
        let url = format!("{base}/heartbeats/");
        let beat = poll(
            "a heartbeat scheduled by beat and run by the worker",
            Duration::from_secs(90),
            || async {
                let response = http
                    .get(&url)
                    .header(HOST, scope.bed.app_host())
                    .header("X-Forwarded-Proto", "https")
                    .send()
                    .await
                    .ok()?;
                let body: serde_json::Value = response.json().await.ok()?;
                body["heartbeats"].as_array()?.first().cloned()
            },
        )
        .await;
        assert!(
            beat["scheduled_by"]
                .as_str()
                .unwrap()
                .starts_with("1/good@"),
            "{beat}"
        );
        assert!(
            beat["run_by"].as_str().unwrap().starts_with("1/good@"),
            "{beat}"
        );
    })
    .await;
}

/// Marks a task container so a test can check that none is left behind.
fn one_off(spec: &ContainerSpec, scope_id: &str) -> ContainerSpec {
    let mut spec = spec.clone();
    spec.labels
        .insert("deployd.test.oneoff".into(), scope_id.into());
    spec
}

/// Starts gunicorn published on an ephemeral loopback port; returns its base URL.
async fn start_web(scope: &deployd_testkit::Scope, image: &str) -> String {
    let mut spec = scope.app_container(image, &[]);
    spec.publish = Some(8000);
    let id = scope.docker.start(spec).await.unwrap();
    let port = scope.docker.port(&id, 8000).await.unwrap().published;
    format!("http://127.0.0.1:{port}")
}
