//! Deploy speed, side by side: deployd's engine against the bare Docker
//! operations the same deployment needs, run by hand in sequence, in one run
//! on one test bed. Run through `scripts/bench/deploy.sh`.
//!
//! Both sides alternate release 1 and release 2 (images cached, migrations
//! applied) with the same work and the same configured waits: migrate and
//! collectstatic in one-off containers, one web container started and polled
//! until `/healthz/` answers 200, the old one stopped; one worker started,
//! up for `min_healthy`, the old one stopped; the old beat stopped, the new
//! one started and up for `min_healthy`. deployd's verify window is set to 0.
//!
//! With `--swarm`, on the engine as a Swarm, the same app on deployd's two
//! backends instead: containers on this engine against Swarm services, one
//! deployment of each in turn, both apps on one overlay network.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use deployd::config::Config;
use deployd::docker::{ContainerSpec, PulledImage};
use deployd::engine::EngineHandle;
use deployd::store::Store;
use deployd_proto::DeploymentState;
use deployd_testkit::{
    BEAT, COLLECTSTATIC, MIGRATE, Scope, Tuning, WORKER, app_config, deploy_request, scoped,
    swarm_scoped,
};
use reqwest::header::HOST;

const MIN_HEALTHY: Duration = Duration::from_secs(3);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// One web replica, no `check` task and no verify window: the same work
/// as the bare sequence. With `swarm`, a second app, the same on the
/// swarm backend.
fn config(scope: &Scope, state: &std::path::Path, swarm: bool) -> Config {
    let tuning = Tuning {
        verify: "0s",
        web_replicas: 1,
        check: false,
        migrations: None,
        swarm: false,
    };
    let repository = scope.bed.var("REPOSITORY");
    let mut text = format!(
        "state_dir = \"{}\"\n{}",
        state.display(),
        app_config(scope, &scope.app(), repository, tuning)
    );
    if swarm {
        let tuning = Tuning {
            swarm: true,
            ..tuning
        };
        text.push_str(&app_config(scope, &scope.second_app(), repository, tuning));
    }
    Config::from_toml(&text).unwrap()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Deploys `variant` to `app` and returns how long it took.
async fn deploy(engine: &EngineHandle, scope: &Scope, app: &str, variant: &str) -> Duration {
    let request = deploy_request(app, scope.bed.sha(variant), "bench");
    let started = Instant::now();
    let id = engine.deploy(request).await.unwrap().id;
    let d = engine.wait(&id).await.unwrap();
    assert_eq!(d.state, DeploymentState::Succeeded, "{d:#?}");
    started.elapsed()
}

const RELEASES: [&str; 2] = ["release-1", "release-2"];

/// `bench_deploy [RUNS] [--swarm]`: without `--swarm`, deployd against the
/// bare sequence; with it, on the engine's Swarm
/// (`scripts/testbed.sh swarm up`), the docker backend against the swarm
/// backend, a deployment of each in turn.
#[tokio::main]
async fn main() {
    let (mut runs, mut swarm) = (5, false);
    for arg in std::env::args().skip(1) {
        match (arg.as_str(), arg.parse::<usize>()) {
            ("--swarm", _) => swarm = true,
            (_, Ok(n)) if n > 0 => runs = n,
            _ => {
                eprintln!("usage: bench_deploy [RUNS, at least 1] [--swarm]");
                std::process::exit(2);
            }
        }
    }
    if swarm {
        swarm_scoped(move |scope| backends(scope, runs)).await;
    } else {
        scoped(move |scope| against_bare(scope, runs)).await;
    }
}

async fn engine(scope: &Scope, state: &std::path::Path, swarm: bool) -> EngineHandle {
    scope.start_db().await;
    scope.start_redis().await;
    let config = config(scope, state, swarm);
    let store = Store::open(state).unwrap();
    EngineHandle::start(&config, scope.docker.clone(), store)
        .await
        .unwrap()
}

async fn against_bare(scope: Arc<Scope>, runs: usize) {
    let state = tempfile::tempdir().unwrap();
    let engine = engine(&scope, state.path(), false).await;
    let app = scope.app();

    // Warm-up: both releases deployed once (pulls, migrations, volume).
    let mut deployd_times = Vec::new();
    for round in 0..runs + 2 {
        let took = deploy(&engine, &scope, &app, RELEASES[round % 2]).await;
        if round >= 2 {
            deployd_times.push(took);
        }
    }
    for c in scope
        .docker
        .containers(&[("deployd.app", app.as_str())])
        .await
        .unwrap()
    {
        scope.docker.remove(&c.id).await.unwrap();
    }

    let images = [scope.pull("release-1").await, scope.pull("release-2").await];
    let mut bare = Bare::start(&scope, &images[1]).await;
    let mut bare_times = Vec::new();
    for round in 0..runs {
        let image = &images[round % 2];
        let started = Instant::now();
        bare.deploy(&scope, image).await;
        bare_times.push(started.elapsed());
    }

    let (d, b) = (median(deployd_times.clone()), median(bare_times.clone()));
    println!("deploy of a cached release, {runs} runs each, alternating release 1 and 2");
    println!(
        "  deployd engine : median {:.2} s  runs {:?}",
        d.as_secs_f64(),
        secs(&deployd_times)
    );
    println!(
        "  bare sequence  : median {:.2} s  runs {:?}",
        b.as_secs_f64(),
        secs(&bare_times)
    );
    println!(
        "  ratio deployd / bare: {:.2} (floor: at most 1.30)",
        d.as_secs_f64() / b.as_secs_f64()
    );
}

/// The same app on both backends, on one overlay network, a deployment of
/// each in turn.
async fn backends(scope: Arc<Scope>, runs: usize) {
    let state = tempfile::tempdir().unwrap();
    let engine = engine(&scope, state.path(), true).await;
    let (docker_app, swarm_app) = (scope.app(), scope.second_app());
    let (mut docker_times, mut swarm_times) = (Vec::new(), Vec::new());
    // Warm-up: both releases deployed once to each (pulls, migrations).
    for round in 0..runs + 2 {
        let variant = RELEASES[round % 2];
        let on_docker = deploy(&engine, &scope, &docker_app, variant).await;
        let on_swarm = deploy(&engine, &scope, &swarm_app, variant).await;
        if round >= 2 {
            docker_times.push(on_docker);
            swarm_times.push(on_swarm);
        }
    }
    let (d, s) = (median(docker_times.clone()), median(swarm_times.clone()));
    println!(
        "deploy of a cached release, {runs} runs each, alternating release 1 and 2, \
         one backend after the other"
    );
    println!(
        "  docker backend : median {:.2} s  runs {:?}",
        d.as_secs_f64(),
        secs(&docker_times)
    );
    println!(
        "  swarm backend  : median {:.2} s  runs {:?}",
        s.as_secs_f64(),
        secs(&swarm_times)
    );
    println!(
        "  ratio swarm / docker: {:.2}",
        s.as_secs_f64() / d.as_secs_f64()
    );
}

fn secs(samples: &[Duration]) -> Vec<String> {
    samples
        .iter()
        .map(|d| format!("{:.2}", d.as_secs_f64()))
        .collect()
}

/// The same deployment by hand: one Docker operation after another.
struct Bare {
    web: String,
    worker: String,
    beat: String,
}

impl Bare {
    async fn start(scope: &Scope, image: &PulledImage) -> Self {
        let web = start_web(scope, image).await.0;
        let worker = start(scope, image, WORKER).await;
        let beat = start(scope, image, BEAT).await;
        Self { web, worker, beat }
    }

    async fn deploy(&mut self, scope: &Scope, image: &PulledImage) {
        let docker = &scope.docker;
        for task in [MIGRATE, COLLECTSTATIC] {
            let spec = with_static(scope, scope.app_container(&image.pinned, task));
            let out = docker
                .run_oneoff(spec, Duration::from_secs(600), |_| {})
                .await
                .unwrap();
            assert_eq!(out.exit_code, 0);
        }
        let (web, port) = start_web(scope, image).await;
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/healthz/");
        loop {
            let answer = http
                .get(&url)
                .header(HOST, scope.bed.app_host())
                .send()
                .await;
            if answer.is_ok_and(|r| r.status() == reqwest::StatusCode::OK) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        docker.stop(&self.web, STOP_TIMEOUT).await.unwrap();
        let worker = start(scope, image, WORKER).await;
        tokio::time::sleep(MIN_HEALTHY).await;
        docker.stop(&self.worker, STOP_TIMEOUT).await.unwrap();
        docker.stop(&self.beat, STOP_TIMEOUT).await.unwrap();
        let beat = start(scope, image, BEAT).await;
        tokio::time::sleep(MIN_HEALTHY).await;
        for old in [&self.web, &self.worker, &self.beat] {
            docker.remove(old).await.unwrap();
        }
        *self = Self { web, worker, beat };
    }
}

fn with_static(scope: &Scope, mut spec: ContainerSpec) -> ContainerSpec {
    spec.volumes = vec![format!("{}:/app/static", scope.static_volume())];
    spec
}

async fn start(scope: &Scope, image: &PulledImage, cmd: &[&str]) -> String {
    let spec = with_static(scope, scope.app_container(&image.pinned, cmd));
    scope.docker.start(spec).await.unwrap()
}

async fn start_web(scope: &Scope, image: &PulledImage) -> (String, u16) {
    let mut spec = with_static(scope, scope.app_container(&image.pinned, &[]));
    spec.publish = Some(8000);
    let id = scope.docker.start(spec).await.unwrap();
    let port = scope.docker.port(&id, 8000).await.unwrap().published;
    (id, port)
}
