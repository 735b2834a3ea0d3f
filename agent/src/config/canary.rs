//! `[apps.NAME.canary]`: a deployment that gives the new release a share of
//! real traffic first, step by step, and goes on only while the switch's
//! own figures for it hold up against the running release's.

use std::time::Duration;

use serde::Deserialize;

use super::Problems;

/// How a canary deployment goes. Present, `deployctl deploy --canary` (or
/// every deployment, with `default = true`) runs one.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// The share of clients the new release gets at each step, in percent,
    /// rising; after the last step it gets them all. Default: 5, 25, 50.
    #[serde(default = "default_steps")]
    pub steps: Vec<f64>,
    /// How long each step lasts before its figures are judged. Default: 60 s.
    #[serde(default = "default_step_time", with = "humantime_serde")]
    pub step_time: Duration,
    /// Requests the new release must answer in a step for its figures to
    /// mean anything; fewer, and the canary is aborted: too little traffic
    /// to judge. Default: 20.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// How much the new release's error rate (5xx answers, the switch's own
    /// 502 and 504 included) may exceed the running release's in the same
    /// step, as a fraction: 0.01 is one percentage point. With the running
    /// release error-free, it is the new release's own bar. Default: 0.01.
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
    /// The new release's p95 latency over the running release's in the same
    /// step, at most. Default: 1.5.
    #[serde(default = "default_max_latency_ratio")]
    pub max_latency_ratio: f64,
    /// Every deployment of the app is a canary unless it asks otherwise
    /// (`deployctl deploy --no-canary`). Default: false.
    #[serde(default, rename = "default")]
    pub by_default: bool,
}

fn default_steps() -> Vec<f64> {
    vec![5.0, 25.0, 50.0]
}
fn default_step_time() -> Duration {
    Duration::from_secs(60)
}
fn default_min_requests() -> u64 {
    20
}
fn default_max_error_rate() -> f64 {
    0.01
}
fn default_max_latency_ratio() -> f64 {
    1.5
}

impl CanaryConfig {
    pub(super) fn validate(&self, at: &str, problems: &mut Problems) {
        if self.steps.is_empty() {
            problems.add(format!("{at}.steps"), "needs at least one step");
        }
        for (i, step) in self.steps.iter().enumerate() {
            if !(*step >= 0.01 && *step < 100.0) {
                problems.add(
                    format!("{at}.steps[{i}]"),
                    "a share of clients in percent, from 0.01 and less than 100",
                );
            } else if i > 0 && *step <= self.steps[i - 1] {
                problems.add(format!("{at}.steps[{i}]"), "steps must rise");
            }
        }
        if self.min_requests == 0 {
            problems.add(
                format!("{at}.min_requests"),
                "at least 1: a step with no answer from the new release says nothing of it",
            );
        }
        if self.step_time.is_zero() {
            problems.add(format!("{at}.step_time"), "must be more than 0 s");
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            problems.add(
                format!("{at}.max_error_rate"),
                "a fraction from 0 to 1 (0.01 is one percentage point)",
            );
        }
        if !(self.max_latency_ratio >= 1.0 && self.max_latency_ratio.is_finite()) {
            problems.add(
                format!("{at}.max_latency_ratio"),
                "a ratio of at least 1 (1.5: the new release's p95 at most 1.5 times the running one's)",
            );
        }
    }
}
