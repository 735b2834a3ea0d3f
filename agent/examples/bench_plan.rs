//! What the migration plan costs a deployment with no migrations to apply,
//! side by side in one run on one test bed. Run through
//! `scripts/bench/plan.sh`.
//!
//! One engine deploys cached releases 1 and 2 in turn (migrations applied
//! during a warm-up, so neither has any left to apply), in blocks of two:
//! a block without `[migrations]`, then the engine is restarted on the same
//! state with `[migrations]` (the example config's `unsafe = "refuse"`) for
//! a block, and so on. Each deployment starts on a quiet machine: 10 s
//! after the previous one ended (its old worker drained, its new
//! containers booted). Prints the median deployment of each side, their
//! difference, and the median of the `plan` step itself.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use deployd::config::Config;
use deployd::engine::EngineHandle;
use deployd::store::Store;
use deployd_proto::DeploymentState;
use deployd_testkit::{Scope, Tuning, app_config, deploy_request, scoped};

/// Between a deployment's end and the next one's start.
const SETTLE: Duration = Duration::from_secs(10);

/// One web replica and no verify window, as the deploy benchmark; with or
/// without the plan.
fn config(scope: &Scope, state: &Path, planned: bool) -> Config {
    let tuning = Tuning {
        verify: "0s",
        web_replicas: 1,
        check: false,
        migrations: planned.then_some("refuse"),
        swarm: false,
    };
    let section = app_config(scope, &scope.app(), scope.bed.var("REPOSITORY"), tuning);
    Config::from_toml(&format!("state_dir = \"{}\"\n{section}", state.display())).unwrap()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn secs(samples: &[Duration]) -> Vec<String> {
    samples
        .iter()
        .map(|d| format!("{:.2}", d.as_secs_f64()))
        .collect()
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(6);
    scoped(move |scope| async move {
        scope.start_db().await;
        scope.start_redis().await;
        let state = tempfile::tempdir().unwrap();
        let releases = ["release-1", "release-2"];
        let (mut plain, mut planned, mut steps) = (Vec::new(), Vec::new(), Vec::new());
        // Each step's durations, by step name: [without, with].
        let mut by_step: BTreeMap<String, [Vec<Duration>; 2]> = BTreeMap::new();
        // Block 0 is the warm-up (pulls, migrations, the static volume);
        // then blocks alternate: plain, planned, plain, ...
        let blocks = 1 + 2 * runs.div_ceil(2);
        for block in 0..blocks {
            let with_plan = block > 0 && block % 2 == 0;
            let engine = EngineHandle::start(
                &config(&scope, state.path(), with_plan),
                scope.docker.clone(),
                Store::open(state.path()).unwrap(),
            )
            .await
            .unwrap();
            for variant in releases {
                let request = deploy_request(&scope.app(), scope.bed.sha(variant), "bench");
                tokio::time::sleep(SETTLE).await;
                let started = Instant::now();
                let id = engine.deploy(request).await.unwrap().id;
                let d = engine.wait(&id).await.unwrap();
                let took = started.elapsed();
                assert_eq!(d.state, DeploymentState::Succeeded, "{d:#?}");
                let plan = d.steps.iter().find(|s| s.name == "plan");
                assert_eq!(plan.is_some(), with_plan, "{d:#?}");
                if block > 0 {
                    for step in &d.steps {
                        let took = Duration::from_millis(step.duration_ms.unwrap_or_default());
                        by_step.entry(step.name.clone()).or_default()[usize::from(with_plan)]
                            .push(took);
                    }
                }
                match plan {
                    _ if block == 0 => {}
                    Some(step) => {
                        planned.push(took);
                        steps.push(Duration::from_millis(step.duration_ms.unwrap()));
                    }
                    None => plain.push(took),
                }
            }
            engine.stop();
            drop(engine);
        }

        let (a, b) = (median(plain.clone()), median(planned.clone()));
        println!(
            "deploy of a cached release with no migrations to apply, alternating release 1 \
             and 2, {} runs each",
            plain.len()
        );
        println!(
            "  without [migrations] : median {:.2} s  runs {:?}",
            a.as_secs_f64(),
            secs(&plain)
        );
        println!(
            "  with [migrations]    : median {:.2} s  runs {:?}",
            b.as_secs_f64(),
            secs(&planned)
        );
        println!(
            "  the plan step        : median {:.2} s  runs {:?}",
            median(steps.clone()).as_secs_f64(),
            secs(&steps)
        );
        println!(
            "  difference of medians: {:+.2} s (floor: at most 2 s)",
            b.as_secs_f64() - a.as_secs_f64()
        );
        println!("  each step's median, without and with [migrations]:");
        for (name, [without, with]) in by_step {
            let m = |v: Vec<Duration>| {
                if v.is_empty() {
                    "-".to_owned()
                } else {
                    format!("{:.2} s", median(v).as_secs_f64())
                }
            };
            println!("    {name:20} {:>8}  {:>8}", m(without), m(with));
        }
    })
    .await;
}
