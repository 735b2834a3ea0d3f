//! Canary deployments: the new release's web containers, once healthy, get
//! a share of the clients step by step, next to the running release's. At
//! each step's end the switch's own figures for both, over the same window,
//! decide: the next step, or an abort (the share goes to 0 at once and the
//! new containers drain). After the last step the new release gets every
//! client and the deployment goes on as any other. `deployctl promote` and
//! `abort` decide by hand at any time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deployd_proto::{
    CanaryDecision, CanaryWindow, CommitSha, DeploymentId, EventKind, ReleaseWindow,
};
use tokio::sync::mpsc;

use super::common::Failure;
use super::run::Run;
use crate::config::CanaryConfig;
use crate::switch::{Figures, Route, Upstream};

/// A decision by hand on a running canary.
#[derive(Debug, Clone)]
pub struct Order {
    /// Promote (`true`) or abort (`false`).
    pub promote: bool,
    /// Who asked.
    pub by: String,
    pub reason: Option<String>,
    /// Only for the canary of this release (what the caller's token was
    /// checked against); any running canary when `None`.
    pub sha: Option<CommitSha>,
}

/// The canaries running now, by app: where an order goes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Canaries(Arc<Mutex<HashMap<String, Running>>>);

#[derive(Debug)]
struct Running {
    deployment: DeploymentId,
    /// The release it deploys.
    sha: CommitSha,
    orders: mpsc::UnboundedSender<Order>,
}

impl Canaries {
    /// Opens `app`'s canary to orders for as long as the returned
    /// receiver lives.
    fn open(&self, app: &str, deployment: &DeploymentId, sha: &CommitSha) -> Orders {
        let (orders, rx) = mpsc::unbounded_channel();
        let running = Running {
            deployment: deployment.clone(),
            sha: sha.clone(),
            orders,
        };
        crate::sync::lock(&self.0).insert(app.to_owned(), running);
        Orders {
            rx,
            app: app.to_owned(),
            canaries: self.clone(),
        }
    }

    /// The release `app`'s running canary deploys, if one runs.
    pub fn sha(&self, app: &str) -> Option<CommitSha> {
        crate::sync::lock(&self.0).get(app).map(|r| r.sha.clone())
    }

    /// Hands `order` to `app`'s running canary; its deployment, or `None`
    /// when no canary of the app takes orders.
    pub fn order(&self, app: &str, order: Order) -> Option<DeploymentId> {
        let canaries = crate::sync::lock(&self.0);
        let running = canaries.get(app)?;
        if order.sha.as_ref().is_some_and(|sha| *sha != running.sha) {
            return None;
        }
        running.orders.send(order).ok()?;
        Some(running.deployment.clone())
    }
}

/// Orders to one canary; dropping it closes the canary to them.
#[derive(Debug)]
struct Orders {
    rx: mpsc::UnboundedReceiver<Order>,
    app: String,
    canaries: Canaries,
}

impl Drop for Orders {
    fn drop(&mut self) {
        crate::sync::lock(&self.canaries.0).remove(&self.app);
    }
}

/// What a step's figures say.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Verdict {
    pub pass: bool,
    /// The figures that decided, in words.
    pub why: String,
}

/// Who decides by the figures, in the record.
const DEPLOYD: &str = "deployd";

/// How often a step's figures so far are told while it runs.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Latency differences smaller than this are noise, whatever their ratio.
const LATENCY_NOISE_MS: f64 = 5.0;

/// Judges a step: enough requests, an error rate at most `max_error_rate`
/// above the running release's, and a p95 at most `max_latency_ratio`
/// times the running release's (and more than [`LATENCY_NOISE_MS`] above
/// it).
pub(crate) fn judge(cfg: &CanaryConfig, window: &CanaryWindow) -> Verdict {
    let (canary, stable) = (&window.canary, &window.stable);
    if canary.requests < cfg.min_requests {
        return Verdict {
            pass: false,
            why: format!(
                "only {} request(s) reached the new release in this step, and min_requests is \
                 {}: too little traffic to judge it",
                canary.requests, cfg.min_requests
            ),
        };
    }
    let rate = |w: &ReleaseWindow| w.error_rate().unwrap_or(0.0);
    let errors = format!(
        "error rate {} ({} of {}) against {} ({} of {}) for the running release",
        percent(rate(canary)),
        canary.errors,
        canary.requests,
        percent(rate(stable)),
        stable.errors,
        stable.requests
    );
    if rate(canary) > rate(stable) + cfg.max_error_rate {
        return Verdict {
            pass: false,
            why: format!(
                "{errors}: more than {} point(s) above it (max_error_rate {})",
                (cfg.max_error_rate * 1000.0).round() / 10.0,
                cfg.max_error_rate
            ),
        };
    }
    let latency = match (canary.p95_ms, stable.p95_ms) {
        (Some(c), Some(s)) => {
            let ratio = c / s.max(0.001);
            let slower = ratio > cfg.max_latency_ratio && c - s > LATENCY_NOISE_MS;
            let said = format!(
                "p95 latency {} against {} ({ratio:.2}x)",
                millis(c),
                millis(s)
            );
            if slower {
                return Verdict {
                    pass: false,
                    why: format!(
                        "{said}: more than max_latency_ratio {}; {errors}",
                        cfg.max_latency_ratio
                    ),
                };
            }
            said
        }
        (Some(_), None) => "no latency of the running release to compare with".to_owned(),
        (None, _) => "no latency of the new release".to_owned(),
    };
    Verdict {
        pass: true,
        why: format!("{errors}; {latency}"),
    }
}

fn percent(rate: f64) -> String {
    format!("{:.1}%", rate * 100.0)
}

fn millis(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// One release's figures over a window.
fn window_of(sha: &CommitSha, figures: &Figures) -> ReleaseWindow {
    let ms = |q| {
        figures
            .quantile(q)
            .map(|d: Duration| d.as_secs_f64() * 1000.0)
    };
    ReleaseWindow {
        sha: sha.clone(),
        requests: figures.requests(),
        errors: figures.errors(),
        abandoned: figures.abandoned,
        p50_ms: ms(0.5),
        p95_ms: ms(0.95),
    }
}

/// How a canary ended when it did not fail.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Every step passed.
    Passed,
    /// Promoted by hand.
    Promoted,
}

/// A canary in the switch of `route`: `canary`'s containers (the release
/// `run` deploys) next to `stable`'s (the release `old` that runs), step by
/// step. Returns once the new release may have every client; an abort (by
/// the figures or by hand) sends every client back to `stable`, drains the
/// canary's containers within `drain`, and fails with why.
pub(crate) async fn run(
    run: &Run,
    cfg: &CanaryConfig,
    route: &Route,
    (stable, canary, old): (&[Upstream], &[Upstream], &CommitSha),
    drain: Duration,
) -> Result<Ended, Failure> {
    let mut orders = run.ctx.traffic.canaries.open(&run.app, &run.id, &run.sha);
    let (new_sha, old_sha) = (&run.sha, old);
    let event =
        |n: usize, percent: f64, decision: CanaryDecision, by: &str, why: String, window| {
            tracing::info!(
                step = n,
                percent,
                decision = decision.as_str(),
                by,
                why,
                "canary"
            );
            run.emit(EventKind::Canary {
                step: n,
                percent,
                decision,
                by: by.to_owned(),
                why,
                window,
            });
        };
    for (i, &percent) in cfg.steps.iter().enumerate() {
        let n = i + 1;
        let _unchanged = route.split(stable, canary, percent);
        let figures = || {
            let of = |sha: &CommitSha| {
                route
                    .release(sha.as_str())
                    .map(|r| r.figures())
                    .unwrap_or_default()
            };
            (of(new_sha), of(old_sha))
        };
        let (new_before, old_before) = figures();
        let began = tokio::time::Instant::now();
        let window = || {
            let (new_now, old_now) = figures();
            CanaryWindow {
                seconds: began.elapsed().as_secs_f64(),
                canary: window_of(new_sha, &new_now.since(&new_before)),
                stable: window_of(old_sha, &old_now.since(&old_before)),
            }
        };
        event(
            n,
            percent,
            CanaryDecision::Step,
            DEPLOYD,
            format!(
                "step {n} of {}: {percent}% of clients to the new release for {}",
                cfg.steps.len(),
                humantime::format_duration(cfg.step_time)
            ),
            None,
        );
        // The figures so far, every PROGRESS_EVERY, for whoever watches
        // (and may decide by hand); the step's end decides.
        let ends = began + cfg.step_time;
        let mut order = loop {
            let now = tokio::time::Instant::now();
            // No tick in a step's last second: its end tells the figures.
            let next = match ends.saturating_duration_since(now) {
                left if left <= PROGRESS_EVERY + Duration::from_secs(1) => ends,
                _ => now + PROGRESS_EVERY,
            };
            tokio::select! {
                () = tokio::time::sleep_until(next) => {
                    if next >= ends || tokio::time::Instant::now() >= ends {
                        break None;
                    }
                    let so_far = window();
                    let verdict = judge(cfg, &so_far);
                    let why = format!(
                        "step {n} ({percent}%), {} of {} so far, would {}: {}",
                        humantime::format_duration(Duration::from_secs(so_far.seconds.round() as u64)),
                        humantime::format_duration(cfg.step_time),
                        if verdict.pass { "pass" } else { "abort" },
                        verdict.why
                    );
                    event(n, percent, CanaryDecision::Progress, DEPLOYD, why, Some(so_far));
                }
                order = orders.rx.recv() => break order,
            }
        };
        if order.is_none() {
            // After the last step, no order is taken any more (it would be
            // refused: no canary runs); one that came while the step ended
            // still decides.
            if n == cfg.steps.len() {
                orders.rx.close();
            }
            order = orders.rx.try_recv().ok();
        }
        let window = window();
        let (pass, by, why) = match order {
            Some(order) => {
                let reason = order.reason.map_or_else(String::new, |r| format!(" ({r})"));
                let said = format!("by hand{reason}");
                (order.promote, Some(order.by), said)
            }
            None => {
                let verdict = judge(cfg, &window);
                (verdict.pass, None, verdict.why)
            }
        };
        let decided_by = by.as_deref().unwrap_or(DEPLOYD);
        if !pass {
            // Decided: later orders are refused (no canary runs), not lost.
            orders.rx.close();
            let draining = route.switch_to(stable);
            let why = format!("at step {n} ({percent}%): {why}");
            let aborted = CanaryDecision::Aborted;
            event(n, 0.0, aborted, decided_by, why.clone(), Some(window));
            let _drained = draining.finish(drain).await;
            return Err(Failure(format!("canary aborted {why}")));
        }
        if by.is_some() {
            let promoted = CanaryDecision::Promoted;
            event(n, 100.0, promoted, decided_by, why, Some(window));
            return Ok(Ended::Promoted);
        }
        event(
            n,
            percent,
            CanaryDecision::Passed,
            DEPLOYD,
            why,
            Some(window),
        );
    }
    let why = format!("all {} step(s) passed", cfg.steps.len());
    event(
        cfg.steps.len() + 1,
        100.0,
        CanaryDecision::Promoted,
        DEPLOYD,
        why,
        None,
    );
    Ok(Ended::Passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CanaryConfig {
        serde_json::from_value(serde_json::json!({})).unwrap()
    }

    fn release(requests: u64, errors: u64, p95_ms: f64) -> ReleaseWindow {
        ReleaseWindow {
            sha: "0123456789abcdef0123456789abcdef01234567".parse().unwrap(),
            requests,
            errors,
            abandoned: 0,
            p50_ms: Some(p95_ms / 2.0),
            p95_ms: (requests > 0).then_some(p95_ms),
        }
    }

    fn window(canary: ReleaseWindow, stable: ReleaseWindow) -> CanaryWindow {
        CanaryWindow {
            seconds: 60.0,
            canary,
            stable,
        }
    }

    #[test]
    fn orders_reach_only_the_canary_they_were_checked_for() {
        let canaries = Canaries::default();
        let (one, two): (CommitSha, CommitSha) =
            ("aaaaaaa".parse().unwrap(), "bbbbbbb".parse().unwrap());
        let id = DeploymentId("d1".into());
        let order = |sha: Option<&CommitSha>| Order {
            promote: true,
            by: "ops".into(),
            reason: None,
            sha: sha.cloned(),
        };
        assert_eq!(canaries.order("shop", order(None)), None);
        let mut orders = canaries.open("shop", &id, &one);
        assert_eq!(canaries.sha("shop"), Some(one.clone()));
        assert_eq!(canaries.order("shop", order(Some(&two))), None);
        assert_eq!(canaries.order("shop", order(Some(&one))), Some(id.clone()));
        assert!(orders.rx.try_recv().is_ok());
        // Decided: closed to orders, which are refused rather than lost.
        orders.rx.close();
        assert_eq!(canaries.order("shop", order(None)), None);
        drop(orders);
        assert_eq!(canaries.sha("shop"), None);
    }

    #[test]
    fn a_step_passes_on_enough_requests_few_errors_and_a_close_latency() {
        let verdict = judge(
            &cfg(),
            &window(release(300, 1, 40.0), release(5000, 5, 38.0)),
        );
        assert!(verdict.pass, "{verdict:?}");
        assert_eq!(
            verdict.why,
            "error rate 0.3% (1 of 300) against 0.1% (5 of 5000) for the running release; \
             p95 latency 40 ms against 38 ms (1.05x)"
        );
    }

    #[test]
    fn too_few_requests_fail_the_step() {
        let verdict = judge(&cfg(), &window(release(3, 0, 40.0), release(5000, 0, 38.0)));
        assert!(!verdict.pass);
        assert!(
            verdict.why.starts_with("only 3 request(s)"),
            "{}",
            verdict.why
        );
    }

    #[test]
    fn errors_count_above_the_running_release_s_own() {
        // 10% errors against none: aborted.
        let verdict = judge(
            &cfg(),
            &window(release(300, 30, 40.0), release(5000, 0, 38.0)),
        );
        assert!(!verdict.pass);
        assert!(
            verdict.why.contains("error rate 10.0% (30 of 300)"),
            "{}",
            verdict.why
        );
        // 10% against 9.5% (say, a database both depend on is failing):
        // within one point of it.
        let verdict = judge(
            &cfg(),
            &window(release(300, 30, 40.0), release(2000, 190, 38.0)),
        );
        assert!(verdict.pass, "{verdict:?}");
    }

    #[test]
    fn a_slower_p95_fails_past_the_ratio_and_the_noise() {
        let verdict = judge(
            &cfg(),
            &window(release(300, 0, 120.0), release(5000, 0, 40.0)),
        );
        assert!(!verdict.pass);
        assert!(
            verdict
                .why
                .starts_with("p95 latency 120 ms against 40 ms (3.00x)"),
            "{}",
            verdict.why
        );
        // Three times slower, but by 2 ms: noise.
        let verdict = judge(&cfg(), &window(release(300, 0, 3.0), release(5000, 0, 1.0)));
        assert!(verdict.pass, "{verdict:?}");
        // No running release's figures to compare with: errors alone.
        let verdict = judge(&cfg(), &window(release(300, 0, 120.0), release(0, 0, 0.0)));
        assert!(verdict.pass, "{verdict:?}");
        assert!(
            verdict
                .why
                .ends_with("no latency of the running release to compare with")
        );
    }
}
