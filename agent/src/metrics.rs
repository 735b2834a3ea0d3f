//! Prometheus metrics, in the Prometheus text format at `/metrics`: on the
//! API (a token with `read` on every app) and, when `[metrics] listen` is
//! set, without a token on that separate address (keep it local).
//!
//! Deployments and their steps are counted as they end; the switch's
//! counters are read from its routes at each scrape.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use deployd_proto::{DeploymentKind, DeploymentState};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::switch::Routes;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    app: String,
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepOutcome {
    app: String,
    step: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RollbackOutcome {
    app: String,
    /// `automatic` (a failed deployment undone) or `requested` (deployctl rollback).
    trigger: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReleaseLabels {
    app: String,
    service: String,
    sha: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabels {
    app: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    check: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthLabels {
    code: String,
}

type Durations = Family<Outcome, Histogram, fn() -> Histogram>;
type StepDurations = Family<StepOutcome, Histogram, fn() -> Histogram>;

/// Every metric deployd exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    deployments: Family<Outcome, Counter>,
    deployment_seconds: Durations,
    step_seconds: StepDurations,
    rollbacks: Family<RollbackOutcome, Counter>,
    release: Family<ReleaseLabels, Gauge>,
    /// The series of `release` set now, by app and service.
    release_shown: Mutex<HashMap<(String, String), ReleaseLabels>>,
    last_success: Family<AppLabels, Gauge<f64, AtomicU64>>,
    auth_failures: Family<AuthLabels, Counter>,
    ready: Family<CheckLabels, Gauge>,
}

fn deployment_histogram() -> Histogram {
    Histogram::new([
        10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
    ])
}

fn step_histogram() -> Histogram {
    Histogram::new([
        0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    ])
}

fn outcome_label(state: DeploymentState) -> &'static str {
    match state {
        DeploymentState::Queued | DeploymentState::Running => "unfinished",
        done => done.as_str(),
    }
}

fn kind_label(kind: DeploymentKind) -> &'static str {
    match kind {
        DeploymentKind::Deploy => "deploy",
        DeploymentKind::Rollback => "rollback",
    }
}

impl Metrics {
    /// The metrics, with the switch counters of `routes`.
    pub fn new(routes: &Routes) -> Self {
        let mut registry = Registry::with_prefix("deployd");
        let deployments = Family::default();
        registry.register(
            "deployments",
            "Deployments (kind deploy or rollback) that ended, by outcome",
            deployments.clone(),
        );
        let deployment_seconds: Durations = Family::new_with_constructor(deployment_histogram);
        registry.register(
            "deployment_duration_seconds",
            "How long deployments took, from start to their outcome",
            deployment_seconds.clone(),
        );
        let step_seconds: StepDurations = Family::new_with_constructor(step_histogram);
        registry.register(
            "step_duration_seconds",
            "How long each step of a deployment took (pull, task:NAME, roll:SERVICE, verify, ...)",
            step_seconds.clone(),
        );
        let rollbacks = Family::default();
        registry.register(
            "rollbacks",
            "Rollbacks: automatic (a failed deployment undone) or requested, by outcome",
            rollbacks.clone(),
        );
        let release = Family::default();
        registry.register(
            "release_info",
            "The release each service of each app runs: 1 for the live sha",
            release.clone(),
        );
        let last_success = Family::default();
        registry.register(
            "last_success_timestamp_seconds",
            "When the app's last successful deployment ended (Unix time)",
            last_success.clone(),
        );
        let auth_failures = Family::default();
        registry.register(
            "auth_failures",
            "API requests refused: 401 (no or bad token), 403 (not allowed), 429 (too many failures)",
            auth_failures.clone(),
        );
        let ready = Family::default();
        registry.register(
            "ready",
            "1 when the check passes: docker (the engine answers), store (takes writes); \
             checked every 15 s and at each GET /readiness",
            ready.clone(),
        );
        registry.register_collector(Box::new(SwitchCollector(routes.clone())));
        Self {
            registry,
            deployments,
            deployment_seconds,
            step_seconds,
            rollbacks,
            release,
            release_shown: Mutex::default(),
            last_success,
            auth_failures,
            ready,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }

    /// Every counter series of each app, at zero: a series first seen at
    /// 1 would hide its first event from `increase()` in alert rules.
    pub fn register_apps<'a>(&self, apps: impl IntoIterator<Item = &'a String>) {
        const OUTCOMES: [DeploymentState; 5] = [
            DeploymentState::Succeeded,
            DeploymentState::Failed,
            DeploymentState::RolledBack,
            DeploymentState::RollbackFailed,
            DeploymentState::Interrupted,
        ];
        for app in apps {
            for kind in [DeploymentKind::Deploy, DeploymentKind::Rollback] {
                for state in OUTCOMES {
                    let _ = self.deployments.get_or_create(&Outcome {
                        app: app.clone(),
                        kind: kind_label(kind),
                        outcome: outcome_label(state),
                    });
                }
            }
            for outcome in ["succeeded", "failed"] {
                let _ = self.rollbacks.get_or_create(&RollbackOutcome {
                    app: app.clone(),
                    trigger: "automatic",
                    outcome,
                });
            }
            for state in OUTCOMES {
                let _ = self.rollbacks.get_or_create(&RollbackOutcome {
                    app: app.clone(),
                    trigger: "requested",
                    outcome: outcome_label(state),
                });
            }
        }
    }

    /// A step ended.
    pub fn step(&self, app: &str, step: &str, succeeded: bool, took: Duration) {
        let labels = StepOutcome {
            app: app.to_owned(),
            step: step.to_owned(),
            outcome: if succeeded { "succeeded" } else { "failed" },
        };
        self.step_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if step == "rollback" {
            self.rollbacks
                .get_or_create(&RollbackOutcome {
                    app: app.to_owned(),
                    trigger: "automatic",
                    outcome: labels.outcome,
                })
                .inc();
        }
    }

    /// A deployment ended with `state` after `took`.
    pub fn deployment(
        &self,
        app: &str,
        kind: DeploymentKind,
        state: DeploymentState,
        took: Duration,
    ) {
        let labels = Outcome {
            app: app.to_owned(),
            kind: kind_label(kind),
            outcome: outcome_label(state),
        };
        self.deployments.get_or_create(&labels).inc();
        self.deployment_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if kind == DeploymentKind::Rollback {
            self.rollbacks
                .get_or_create(&RollbackOutcome {
                    app: app.to_owned(),
                    trigger: "requested",
                    outcome: labels.outcome,
                })
                .inc();
        }
    }

    /// A deployment was interrupted (found unfinished at start).
    pub fn interrupted(&self, app: &str, kind: DeploymentKind) {
        self.deployments
            .get_or_create(&Outcome {
                app: app.to_owned(),
                kind: kind_label(kind),
                outcome: outcome_label(DeploymentState::Interrupted),
            })
            .inc();
    }

    /// `services` of `app` run `sha` now; `at`: when it went live.
    pub fn live<'a>(
        &self,
        app: &str,
        services: impl IntoIterator<Item = &'a String>,
        sha: &str,
        at: Option<SystemTime>,
    ) {
        // Only the live sha of each service is exported: the series of
        // the one before goes.
        let mut shown = crate::sync::lock(&self.release_shown);
        for service in services {
            let labels = ReleaseLabels {
                app: app.to_owned(),
                service: service.clone(),
                sha: sha.to_owned(),
            };
            self.release.get_or_create(&labels).set(1);
            let key = (app.to_owned(), service.clone());
            if let Some(old) = shown.insert(key, labels.clone())
                && old != labels
            {
                self.release.remove(&old);
            }
        }
        if let Some(at) = at {
            let unix = at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            self.last_success
                .get_or_create(&AppLabels {
                    app: app.to_owned(),
                })
                .set(unix);
        }
    }

    /// The outcome of a readiness check: what failed.
    pub fn readiness(&self, failing: &[&str]) {
        for check in ["docker", "store"] {
            let ok = !failing.contains(&check);
            self.ready
                .get_or_create(&CheckLabels { check })
                .set(i64::from(ok));
        }
    }

    /// An API request was refused with `code` (`invalid_token`, `forbidden`, ...).
    pub fn auth_failure(&self, code: &str) {
        self.auth_failures
            .get_or_create(&AuthLabels {
                code: code.to_owned(),
            })
            .inc();
    }
}

/// The switch's per-route counters, read at each scrape.
#[derive(Debug)]
struct SwitchCollector(Routes);

/// One counter family: a counter per label set.
fn counter_family<'a>(
    encoder: &mut DescriptorEncoder,
    (name, help): (&str, &str),
    counters: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (labels, n) in counters {
        ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One counter family of the switch: for each app, a counter per value of
/// `key` (`counts` gives each value and its count).
fn switch_counters(
    encoder: &mut DescriptorEncoder,
    routes: &Routes,
    (name, help, key): (&str, &str, &'static str),
    counts: impl Fn(&crate::switch::SwitchStats) -> Vec<(&'static str, u64)>,
) -> Result<(), std::fmt::Error> {
    let counts = &counts;
    let counters = routes.iter().flat_map(|(app, route)| {
        counts(&route.stats)
            .into_iter()
            .map(move |(value, n)| (vec![("app", app.as_str()), (key, value)], n))
    });
    counter_family(encoder, (name, help), counters)
}

impl Collector for SwitchCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let routes = &self.0;
        switch_counters(
            &mut encoder,
            routes,
            (
                "switch_requests",
                "Requests the traffic switch answered, by status class",
                "code",
            ),
            |stats| stats.answers().collect(),
        )?;
        switch_counters(
            &mut encoder,
            routes,
            (
                "switch_upstream_errors",
                "Web container failures seen by the switch: refused, failed, timeout, drained",
                "error",
            ),
            |stats| stats.upstream_errors().collect(),
        )?;
        switch_counters(
            &mut encoder,
            routes,
            (
                "switch_refusals",
                "Clients the switch turned away before any container saw them: head_too_large, \
                 body_too_large, body_timeout, body_broken, body_spool, max_connections, \
                 max_connections_per_address",
                "reason",
            ),
            |stats| stats.refusals().collect(),
        )?;
        switch_counters(
            &mut encoder,
            routes,
            (
                "switch_buffer_shortfalls",
                "Times the switch's buffer_memory was short: a body spooled that would have \
                 stayed in memory (spooled), an answer not read ahead (unbuffered)",
                "reason",
            ),
            |stats| stats.shortfalls().collect(),
        )?;
        release_figures(&mut encoder, routes)
    }
}

/// The per-release figures of each switched app: answers, upstream errors,
/// abandoned requests and latency, labelled with the release's sha.
fn release_figures(
    encoder: &mut DescriptorEncoder,
    routes: &Routes,
) -> Result<(), std::fmt::Error> {
    let figures: Vec<(&String, String, crate::switch::Figures)> = routes
        .iter()
        .flat_map(|(app, route)| {
            route
                .releases()
                .into_iter()
                .map(move |r| (app, r.release().to_owned(), r.figures()))
        })
        .collect();
    type Counts = fn(&crate::switch::Figures) -> Vec<(&'static str, u64)>;
    let counters: [(&str, &str, Option<&str>, Counts); 3] = [
        (
            "switch_release_requests",
            "Requests answered per release, by status class (the switch's own 502 and 504 \
             for that release's failures included)",
            Some("code"),
            |f| f.answers_by_class().collect(),
        ),
        (
            "switch_release_upstream_errors",
            "Web container failures per release: refused, failed, timeout, drained",
            Some("error"),
            |f| f.upstream_errors_by_kind().collect(),
        ),
        (
            "switch_release_abandoned",
            "Requests per release whose client left before the answer came",
            None,
            |f| vec![("", f.abandoned)],
        ),
    ];
    for (name, help, key, counts) in counters {
        let per_release = figures.iter().flat_map(|(app, sha, f)| {
            counts(f).into_iter().map(move |(value, n)| {
                let mut labels = vec![("app", app.as_str()), ("sha", sha.as_str())];
                labels.extend(key.map(|key| (key, value)));
                (labels, n)
            })
        });
        counter_family(encoder, (name, help), per_release)?;
    }
    let mut metric = encoder.encode_descriptor(
        "switch_release_request_duration_seconds",
        "Per release, from a request being whole at the switch to its answer's head",
        None,
        prometheus_client::metrics::MetricType::Histogram,
    )?;
    for (app, sha, f) in &figures {
        let labels = [("app", app.as_str()), ("sha", sha.as_str())];
        let buckets: Vec<(f64, u64)> = crate::switch::LATENCY_BOUNDS_US
            .iter()
            .map(|&us| us as f64 / 1e6)
            .chain(std::iter::once(f64::INFINITY))
            .zip(f.buckets)
            .collect();
        metric
            .encode_family(&labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                f.latency_sum_us as f64 / 1e6,
                f.buckets.iter().sum(),
                &buckets,
                None,
            )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployments_steps_releases_and_refusals_are_exported() {
        let metrics = Metrics::new(&Routes::default());
        metrics.register_apps([&"shop".to_owned()]);
        let services = ["web".to_owned(), "worker".to_owned()];
        metrics.step("shop", "pull", true, Duration::from_millis(1500));
        metrics.step("shop", "rollback", false, Duration::from_secs(3));
        metrics.deployment(
            "shop",
            DeploymentKind::Deploy,
            DeploymentState::Succeeded,
            Duration::from_secs(42),
        );
        metrics.deployment(
            "shop",
            DeploymentKind::Rollback,
            DeploymentState::Succeeded,
            Duration::from_secs(20),
        );
        metrics.live("shop", &services, "aaa", Some(SystemTime::UNIX_EPOCH));
        metrics.live("shop", &services, "bbb", None);
        metrics.auth_failure("invalid_token");
        metrics.readiness(&["docker"]);
        let text = metrics.render();
        for line in [
            r#"deployd_deployments_total{app="shop",kind="deploy",outcome="succeeded"} 1"#,
            r#"deployd_deployment_duration_seconds_bucket{app="shop",kind="deploy",outcome="succeeded",le="60"} 1"#,
            r#"deployd_step_duration_seconds_count{app="shop",step="pull",outcome="succeeded"} 1"#,
            r#"deployd_rollbacks_total{app="shop",trigger="automatic",outcome="failed"} 1"#,
            r#"deployd_rollbacks_total{app="shop",trigger="requested",outcome="succeeded"} 1"#,
            r#"deployd_release_info{app="shop",service="web",sha="bbb"} 1"#,
            r#"deployd_release_info{app="shop",service="worker",sha="bbb"} 1"#,
            r#"deployd_last_success_timestamp_seconds{app="shop"} 0"#,
            r#"deployd_auth_failures_total{code="invalid_token"} 1"#,
            r#"deployd_ready{check="docker"} 0"#,
            r#"deployd_ready{check="store"} 1"#,
            // Registered at zero, before anything happened.
            r#"deployd_deployments_total{app="shop",kind="deploy",outcome="rollback_failed"} 0"#,
            r#"deployd_rollbacks_total{app="shop",trigger="automatic",outcome="succeeded"} 0"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // The release before is no longer exported.
        assert!(!text.contains(r#"sha="aaa""#), "{text}");
    }

    #[test]
    fn the_switch_figures_of_each_release_are_exported() {
        let config = crate::config::Config::from_toml(
            r#"
            [apps.shop]
            image = "registry.example/shop"
            [apps.shop.services.web]
            port = 8000
            health = { path = "/healthz/", host = "shop.example" }
            [apps.shop.switch]
            listen = "127.0.0.1:0"
            "#,
        )
        .unwrap();
        let routes = Routes::for_config(&config);
        let route = routes.get("shop").unwrap();
        let _ = route.switch_to(&[crate::switch::Upstream {
            container: "c1".into(),
            addr: std::net::SocketAddr::from(([10, 0, 0, 1], 8000)),
            release: "abc".into(),
        }]);
        let stats = route.release("abc").unwrap();
        stats.answered(http::StatusCode::OK, Duration::from_millis(4));
        stats.answered(http::StatusCode::BAD_GATEWAY, Duration::from_millis(40));
        let text = Metrics::new(&routes).render();
        for line in [
            r#"deployd_switch_release_requests_total{app="shop",sha="abc",code="2xx"} 1"#,
            r#"deployd_switch_release_requests_total{app="shop",sha="abc",code="5xx"} 1"#,
            r#"deployd_switch_release_upstream_errors_total{app="shop",sha="abc",error="timeout"} 0"#,
            r#"deployd_switch_release_abandoned_total{app="shop",sha="abc"} 0"#,
            r#"deployd_switch_release_request_duration_seconds_bucket{app="shop",sha="abc",le="0.005"} 1"#,
            r#"deployd_switch_release_request_duration_seconds_bucket{app="shop",sha="abc",le="0.05"} 2"#,
            r#"deployd_switch_release_request_duration_seconds_bucket{app="shop",sha="abc",le="+Inf"} 2"#,
            r#"deployd_switch_release_request_duration_seconds_count{app="shop",sha="abc"} 2"#,
            r#"deployd_switch_release_request_duration_seconds_sum{app="shop",sha="abc"} 0.044"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
