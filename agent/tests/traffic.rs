//! The switch as the engine drives it, in front of the sample Django app on
//! the real engine: continuous load through the public address across a
//! deploy, a broken release rolled back automatically and a manual
//! rollback, with long requests in flight at every switch.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use deployd::config::Config;
use deployd::engine::EngineHandle;
use deployd::store::Store;
use deployd::switch::{Routes, Switch};
use deployd_proto::{DeploymentState, RollbackRequest};
use reqwest::header::HOST;
use support::{Tuning, app_config, deploy_request, scoped};

/// One answered (or failed) request: when it started and ended, and which
/// release served it (`1/good`, say), or why it failed.
#[derive(Debug, Clone)]
struct Sample {
    started: Instant,
    ended: Instant,
    outcome: Result<String, String>,
}

/// A client looping on `path` until `stop`; `keep_alive` reuses its
/// connection, otherwise every request opens a new one.
fn client_loop(
    addr: SocketAddr,
    host: String,
    path: &'static str,
    keep_alive: bool,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30));
        if !keep_alive {
            builder = builder.pool_max_idle_per_host(0);
        }
        let client = builder.build().unwrap();
        let mut samples = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let outcome = async {
                let response = client
                    .get(format!("http://{addr}{path}"))
                    .header(HOST, &host)
                    // As the TLS-terminating load balancer in front would.
                    .header("x-forwarded-proto", "https")
                    .send()
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                let status = response.status();
                let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
                if !status.is_success() {
                    return Err(format!("{status}: {body}"));
                }
                let served_by = body["served_by"].as_str().unwrap_or_default();
                Ok(served_by.split('@').next().unwrap_or_default().to_owned())
            }
            .await;
            samples.push(Sample {
                started,
                ended: Instant::now(),
                outcome,
            });
        }
        samples
    })
}

#[tokio::test]
async fn no_request_fails_across_deploys_and_rollbacks() {
    scoped(|scope| async move {
        let state = tempfile::tempdir().unwrap();
        let repository = scope.publish_releases().await;
        let app = scope.app();
        let text = format!(
            "state_dir = \"{}\"\n{}\n[apps.{app}.switch]\nlisten = \"127.0.0.1:0\"\ndrain_timeout = \"20s\"\ntrust_forwarded_headers = true\n",
            state.path().display(),
            app_config(&scope, &app, &repository, Tuning::TEST),
        );
        let config = Config::from_toml(&text).unwrap();
        let routes = Routes::for_config(&config);
        let public = Switch::bind(&config, &routes).unwrap().serve().unwrap();
        let addr = public.addr(&app).unwrap();
        let store = Store::open(state.path()).unwrap();
        let engine = EngineHandle::start_routed(&config, scope.docker.clone(), store, routes.clone())
            .await
            .unwrap();
        scope.start_db().await;
        scope.start_redis().await;

        let deploy = async |variant: &str| {
            let request = deploy_request(&app, scope.bed.sha(variant), "traffic-test");
            let started = engine.deploy(request).await.unwrap();
            engine.wait(&started.id).await.unwrap()
        };
        assert_eq!(deploy("release-1").await.state, DeploymentState::Succeeded);

        let stop = Arc::new(AtomicBool::new(false));
        let host = scope.bed.app_host().to_owned();
        let mut clients: Vec<_> = [true, true, false, false]
            .into_iter()
            .map(|keep_alive| client_loop(addr, host.clone(), "/release/", keep_alive, stop.clone()))
            .collect();
        let slow = client_loop(addr, host.clone(), "/slow/?seconds=2", true, stop.clone());
        tokio::time::sleep(Duration::from_secs(2)).await;

        let two = deploy("release-2").await;
        assert_eq!(two.state, DeploymentState::Succeeded, "{:?}", two.error);
        // Never healthy: refused before any traffic reaches it.
        let broken = deploy("healthz-500").await;
        assert_eq!(broken.state, DeploymentState::Failed, "{:?}", broken.error);
        // Healthy for 5 s: traffic switches to it, verification fails, and
        // traffic switches back.
        let broken = deploy("unhealthy-after-5-checks").await;
        assert_eq!(broken.state, DeploymentState::RolledBack, "{:?}", broken.error);
        let back = engine
            .rollback(&app, "ops", RollbackRequest { reason: Some("traffic test".into()), ..Default::default() })
            .await
            .unwrap();
        let back = engine.wait(&back.id).await.unwrap();
        assert_eq!(back.state, DeploymentState::Succeeded, "{:?}", back.error);
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);

        let slow = slow.await.unwrap();
        clients.push(tokio::spawn(async move { slow }));
        let mut all = Vec::new();
        for client in clients {
            all.extend(client.await.unwrap());
        }
        let failed: Vec<&Sample> = all.iter().filter(|s| s.outcome.is_err()).collect();
        assert!(
            failed.is_empty(),
            "{} of {} failed, first: {:?}",
            failed.len(),
            all.len(),
            &failed[..failed.len().min(5)]
        );
        let served = |release: &str| {
            all.iter()
                .filter(|s| s.outcome.as_deref() == Ok(release))
                .count()
        };
        let late_broken = all
            .iter()
            .filter(|s| matches!(&s.outcome, Ok(r) if r.ends_with("/unhealthy-after-5-checks")))
            .count();
        assert!(
            served("1/good") > 0 && served("2/good") > 0 && late_broken > 0,
            "served: release 1 {}, release 2 {}, unhealthy-after-5-checks {late_broken}",
            served("1/good"),
            served("2/good")
        );
        // The release that was never healthy got no traffic.
        assert_eq!(all.len(), served("1/good") + served("2/good") + late_broken);
        // Requests to release 1 were still being answered after release 2
        // had started serving: they were in flight at the switch.
        let first_two = all
            .iter()
            .filter(|s| s.outcome.as_deref() == Ok("2/good"))
            .map(|s| s.started)
            .min()
            .unwrap();
        assert!(
            all.iter()
                .any(|s| s.outcome.as_deref() == Ok("1/good") && s.started < first_two && s.ended > first_two),
            "no request to release 1 spanned the switch"
        );
        // The switch's own figures per release agree with what the clients
        // got, answer for answer.
        let route = routes.get(&app).unwrap();
        for (variant, served_by) in [
            ("release-1", "1/good"),
            ("release-2", "2/good"),
            ("unhealthy-after-5-checks", "2/unhealthy-after-5-checks"),
        ] {
            let figures = route.release(scope.bed.sha(variant).as_str()).unwrap().figures();
            assert_eq!(
                (figures.answers[1], figures.requests(), figures.abandoned),
                (served(served_by) as u64, served(served_by) as u64, 0),
                "{variant}: {figures:?}"
            );
        }
        // And the manual rollback put release 1 back.
        let last = all.iter().max_by_key(|s| s.started).unwrap();
        assert_eq!(last.outcome.as_deref(), Ok("1/good"));
        public.shutdown().await;
    })
    .await;
}
