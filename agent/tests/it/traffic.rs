//! The switch as the engine drives it, in front of the sample Django app on
//! the real engine: continuous load through the public address across a
//! deploy, a broken release rolled back automatically and a manual
//! rollback, with long requests in flight at every switch.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use deployd::config::Config;
use deployd::engine::EngineHandle;
use deployd::store::Store;
use deployd::switch::{Routes, Switch};
use deployd_proto::{DeploymentState, RollbackRequest};
use deployd_testkit::{Tuning, app_config, deploy_request, scoped};
use reqwest::header::HOST;

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

/// The scope's app, its engine and its switch (the public address), on a
/// state directory of its own, with PostgreSQL and Redis up; `canary` is
/// the app's `[canary]` table when not empty.
type Switched = (
    String,
    EngineHandle,
    Routes,
    deployd::switch::Serving,
    SocketAddr,
    tempfile::TempDir,
);

async fn switched(scope: &deployd_testkit::Scope, canary: &str) -> Switched {
    let state = tempfile::tempdir().unwrap();
    let repository = scope.publish_releases().await;
    let app = scope.app();
    let mut text = format!(
        "state_dir = \"{}\"\n{}\n[apps.{app}.switch]\nlisten = \"127.0.0.1:0\"\ndrain_timeout = \"20s\"\ntrust_forwarded_headers = true\n",
        state.path().display(),
        app_config(scope, &app, &repository, Tuning::TEST),
    );
    if !canary.is_empty() {
        text.push_str(&format!("[apps.{app}.canary]\n{canary}\n"));
    }
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
    (app, engine, routes, public, addr, state)
}

#[tokio::test]
async fn no_request_fails_across_deploys_and_rollbacks() {
    scoped(|scope| async move {
        let (app, engine, routes, public, addr, _state) = switched(&scope, "").await;

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
            .map(|keep_alive| {
                client_loop(addr, host.clone(), "/release/", keep_alive, stop.clone())
            })
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
        assert_eq!(
            broken.state,
            DeploymentState::RolledBack,
            "{:?}",
            broken.error
        );
        let back = engine
            .rollback(
                &app,
                "ops",
                RollbackRequest {
                    reason: Some("traffic test".into()),
                    ..Default::default()
                },
            )
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
            all.iter().any(|s| s.outcome.as_deref() == Ok("1/good")
                && s.started < first_two
                && s.ended > first_two),
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
            let figures = route
                .release(scope.bed.sha(variant).as_str())
                .unwrap()
                .figures();
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

/// One request of a simulated user: who, the status (0 when no answer
/// came), which release answered (`2/good`, or the variant of an injected
/// error), or why it failed.
#[derive(Debug, Clone)]
struct Hit {
    user: usize,
    status: u16,
    release: Option<String>,
    failure: Option<String>,
}

/// A client taking turns as the users `users`: each request comes from the
/// user's own address (`X-Forwarded-For`, which the switch trusts here), so
/// the switch splits them by address. With `cookies`, it also keeps the
/// cookie the switch sets for each user.
fn users_loop(
    addr: SocketAddr,
    host: String,
    users: std::ops::Range<usize>,
    cookies: bool,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Hit>> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let mut jar: std::collections::HashMap<usize, String> = std::collections::HashMap::new();
        let mut hits = Vec::new();
        for user in users.clone().cycle() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let mut request = client
                .get(format!("http://{addr}/heartbeats/"))
                .header(HOST, &host)
                .header("x-forwarded-proto", "https")
                .header(
                    "x-forwarded-for",
                    format!("10.{}.{}.1", user / 256, user % 256),
                );
            if let Some(cookie) = jar.get(&user) {
                request = request.header("cookie", cookie);
            }
            let hit = match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    if cookies && let Some(set) = response.headers().get("set-cookie") {
                        let pair = set.to_str().unwrap().split(';').next().unwrap();
                        jar.insert(user, pair.to_owned());
                    }
                    match response.json::<serde_json::Value>().await {
                        Ok(body) => {
                            let release = body["served_by"]
                                .as_str()
                                .map(|s| s.split('@').next().unwrap_or_default().to_owned())
                                .or_else(|| body["variant"].as_str().map(|v| format!("2/{v}")));
                            Hit {
                                user,
                                status,
                                release,
                                failure: None,
                            }
                        }
                        Err(e) => Hit {
                            user,
                            status,
                            release: None,
                            failure: Some(e.to_string()),
                        },
                    }
                }
                Err(e) => Hit {
                    user,
                    status: 0,
                    release: None,
                    failure: Some(format!("{e:?}")),
                },
            };
            hits.push(hit);
        }
        hits
    })
}

/// Users, as many as the switch would see on a small site.
const USERS: usize = 240;

/// Load from [`USERS`] users over four clients (one keeping cookies),
/// until the returned stop is set; the hits come back from the handles.
fn load(addr: SocketAddr, host: &str) -> (Arc<AtomicBool>, Vec<tokio::task::JoinHandle<Vec<Hit>>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let quarter = USERS / 4;
    let clients = (0..4)
        .map(|i| {
            users_loop(
                addr,
                host.to_owned(),
                i * quarter..(i + 1) * quarter,
                i == 0,
                stop.clone(),
            )
        })
        .collect();
    (stop, clients)
}

async fn hits_of(
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Vec<Hit>>>,
) -> Vec<Hit> {
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for client in clients {
        all.extend(client.await.unwrap());
    }
    all
}

/// The canary events of a deployment, in order.
fn canary_events(
    engine: &EngineHandle,
    id: &deployd_proto::DeploymentId,
) -> Vec<deployd_proto::EventKind> {
    engine
        .store()
        .events(id, 0)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .filter(|k| matches!(k, deployd_proto::EventKind::Canary { .. }))
        .collect()
}

#[tokio::test]
async fn canaries_are_judged_by_what_the_switch_measures() {
    use deployd_proto::{CanaryDecision, EventKind};
    scoped(|scope| async move {
        let canary =
            "steps = [25, 50]\nstep_time = \"12s\"\nmin_requests = 10\nmax_error_rate = 0.02\n\
             max_latency_ratio = 2.0";
        let (app, engine, routes, public, addr, _state) = switched(&scope, canary).await;
        let host = scope.bed.app_host().to_owned();
        let deploy = async |variant: &str, canary: bool| {
            let mut request = deploy_request(&app, scope.bed.sha(variant), "canary-test");
            request.canary = Some(canary);
            engine.deploy(request).await.unwrap()
        };
        let first = deploy("release-1", false).await;
        assert_eq!(
            engine.wait(&first.id).await.unwrap().state,
            DeploymentState::Succeeded
        );

        // 10% of page requests fail: aborted at the first step, by the
        // error rate; only the users it had saw the errors.
        let (stop, clients) = load(addr, &host);
        let errors = deploy("errors-10pct", true).await;
        let errors = engine.wait(&errors.id).await.unwrap();
        let hits = hits_of(stop, clients).await;
        assert_eq!(
            errors.state,
            DeploymentState::RolledBack,
            "{:?}",
            errors.error
        );
        let said = errors.error.clone().unwrap();
        assert!(
            said.contains("canary aborted at step 1 (25%): error rate"),
            "{said}"
        );
        let events = canary_events(&engine, &errors.id);
        assert!(
            matches!(
                events.last(),
                Some(EventKind::Canary {
                    decision: CanaryDecision::Aborted,
                    window: Some(_),
                    ..
                })
            ),
            "{events:?}"
        );
        let failed: Vec<&Hit> = hits
            .iter()
            .filter(|h| {
                h.failure.is_some()
                    || (h.status != 200 && h.release.as_deref() != Some("2/errors-10pct"))
            })
            .collect();
        assert!(
            failed.is_empty(),
            "{} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        let users_of = |release: &str| -> std::collections::BTreeSet<usize> {
            hits.iter()
                .filter(|h| h.release.as_deref() == Some(release))
                .map(|h| h.user)
                .collect()
        };
        let on_canary = users_of("2/errors-10pct");
        let saw_errors: std::collections::BTreeSet<usize> = hits
            .iter()
            .filter(|h| h.status == 500)
            .map(|h| h.user)
            .collect();
        assert!(!saw_errors.is_empty(), "the canary never answered an error");
        assert!(saw_errors.is_subset(&on_canary));
        println!(
            "errors-10pct: {said}; {} of {USERS} users reached it, {} saw an error; {} requests",
            on_canary.len(),
            saw_errors.len(),
            hits.len()
        );
        // Its share was 25%: allow for how a hash spreads 240 users.
        assert!(
            on_canary.len() * 100 <= USERS * 40,
            "{} of {USERS} users reached the canary at 25%: {saw_errors:?} saw errors",
            on_canary.len()
        );

        // Three times slower: aborted on latency.
        let (stop, clients) = load(addr, &host);
        let slow = deploy("slow-3x", true).await;
        let slow = engine.wait(&slow.id).await.unwrap();
        let hits = hits_of(stop, clients).await;
        assert_eq!(slow.state, DeploymentState::RolledBack, "{:?}", slow.error);
        let said = slow.error.clone().unwrap();
        assert!(said.contains("p95 latency"), "{said}");
        println!("slow-3x: {said}; {} requests", hits.len());
        assert!(
            hits.iter().all(|h| h.status == 200),
            "a request failed during the slow canary"
        );

        // A good release promotes through every step: no request fails, and
        // a user with the switch's cookie never goes back once on it.
        let (stop, clients) = load(addr, &host);
        let good = deploy("release-2", true).await;
        let good = engine.wait(&good.id).await.unwrap();
        let hits = hits_of(stop, clients).await;
        assert_eq!(good.state, DeploymentState::Succeeded, "{:?}", good.error);
        assert!(good.canary);
        let decisions: Vec<CanaryDecision> = canary_events(&engine, &good.id)
            .into_iter()
            .map(|k| match k {
                EventKind::Canary { decision, .. } => decision,
                _ => unreachable!(),
            })
            .collect();
        use CanaryDecision::{Passed, Progress, Promoted, Step};
        // Each 12 s step tells its figures so far once, at 10 s.
        assert_eq!(
            decisions,
            [Step, Progress, Passed, Step, Progress, Passed, Promoted]
        );
        let failed: Vec<&Hit> = hits.iter().filter(|h| h.status != 200).collect();
        assert!(
            failed.is_empty(),
            "{} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        println!(
            "release-2: promoted through every step; {} requests, 0 failed",
            hits.len()
        );
        for event in canary_events(&engine, &good.id) {
            if let EventKind::Canary { why, .. } = event {
                println!("  {why}");
            }
        }
        for user in 0..USERS / 4 {
            let seen: Vec<&str> = hits
                .iter()
                .filter(|h| h.user == user)
                .filter_map(|h| h.release.as_deref())
                .collect();
            let first_new = seen
                .iter()
                .position(|r| *r == "2/good")
                .unwrap_or(seen.len());
            assert!(
                seen[first_new..].iter().all(|r| *r == "2/good"),
                "user {user} went back to the old release: {seen:?}"
            );
        }
        let route = routes.get(&app).unwrap();
        let served = route
            .release(scope.bed.sha("release-2").as_str())
            .unwrap()
            .figures();
        assert_eq!(served.errors(), 0);

        // By hand: abort, then promote, each as soon as the first step
        // began (its event), long before the step's end.
        let mut events = engine.subscribe();
        for (promote, state) in [
            (false, DeploymentState::RolledBack),
            (true, DeploymentState::Succeeded),
        ] {
            let started = deploy("release-1", true).await;
            loop {
                let (id, event) = events.recv().await.unwrap();
                if id == started.id
                    && matches!(event.kind, EventKind::Canary { decision: Step, .. })
                {
                    break;
                }
            }
            let order = deployd::engine::CanaryOrder {
                promote,
                by: "ops".into(),
                reason: Some("by hand".into()),
                sha: Some(scope.bed.sha("release-1")),
            };
            assert_eq!(engine.canary_order(&app, order).unwrap(), started.id);
            let ended = engine.wait(&started.id).await.unwrap();
            assert_eq!(ended.state, state, "{:?}", ended.error);
            let last = canary_events(&engine, &started.id).pop().unwrap();
            let EventKind::Canary {
                decision, by, step, ..
            } = last
            else {
                unreachable!()
            };
            assert_eq!(
                (decision, by.as_str(), step),
                (
                    if promote {
                        Promoted
                    } else {
                        CanaryDecision::Aborted
                    },
                    "ops",
                    1
                )
            );
        }
        let no_canary = deployd::engine::CanaryOrder {
            promote: true,
            by: "ops".into(),
            reason: None,
            sha: None,
        };
        assert!(matches!(
            engine.canary_order(&app, no_canary),
            Err(deployd::engine::EngineError::NoCanary(_))
        ));
        public.shutdown().await;
    })
    .await;
}
