//! `[[apps.NAME.notify]]`: webhooks told when a deployment starts and how
//! it ended, never in its way.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Problems;

/// What a hook may be told of: a deployment started, or its end.
pub const NOTIFY_EVENTS: [&str; 6] = [
    "started",
    "succeeded",
    "failed",
    "rolled_back",
    "rollback_failed",
    "interrupted",
];

/// The body a hook gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyFormat {
    /// A JSON document of the deployment, signed with `secret_file`.
    #[default]
    Json,
    /// `{"text": ...}`: a Slack (or Mattermost, Rocket.Chat) incoming
    /// webhook.
    Slack,
}

/// One webhook.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Where to POST: https://, or http:// to this host only.
    pub url: String,
    /// Which of started, succeeded, failed, rolled_back, rollback_failed
    /// and interrupted. Default: all.
    #[serde(default = "all_events")]
    pub events: Vec<String>,
    #[serde(default)]
    pub format: NotifyFormat,
    /// File holding the HMAC-SHA256 key (at least 32 bytes) that signs each
    /// delivery: `X-Deployd-Signature: sha256=<hex of HMAC(body)>`.
    /// Required for `json`.
    pub secret_file: Option<PathBuf>,
    /// One attempt's time limit. Default: 10 s.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Failed attempts (no answer, 429, 5xx) are retried, waiting 1 s, 2 s,
    /// 4 s ... up to a minute, for this long. Default: 10 min.
    #[serde(default = "default_retry_for", with = "humantime_serde")]
    pub retry_for: Duration,
}

fn all_events() -> Vec<String> {
    NOTIFY_EVENTS.iter().map(|e| (*e).to_owned()).collect()
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_retry_for() -> Duration {
    Duration::from_secs(600)
}

impl NotifyConfig {
    /// Whether the URL may be used: https, or http to a loopback host (a
    /// relay on the same machine).
    fn url_problem(&self) -> Option<&'static str> {
        let Ok(url) = reqwest::Url::parse(&self.url) else {
            return Some("not a URL");
        };
        match url.scheme() {
            "https" => None,
            "http" => {
                let host = url.host_str().unwrap_or_default();
                let loopback = host == "localhost"
                    || host
                        .trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                (!loopback).then_some("http:// only to this host; use https://")
            }
            _ => Some("must be an https:// URL"),
        }
    }

    pub(super) fn validate(&self, at: &str, problems: &mut Problems) {
        if let Some(problem) = self.url_problem() {
            problems.add(format!("{at}.url"), problem);
        }
        for event in &self.events {
            if !NOTIFY_EVENTS.contains(&event.as_str()) {
                problems.add(
                    format!("{at}.events"),
                    format!("{event}: one of {}", NOTIFY_EVENTS.join(", ")),
                );
            }
        }
        if self.events.is_empty() {
            problems.add(format!("{at}.events"), "name at least one");
        }
        if self.format == NotifyFormat::Json && self.secret_file.is_none() {
            problems.add(
                format!("{at}.secret_file"),
                "a JSON hook's deliveries are signed: name the file of its key",
            );
        }
        if self.timeout.is_zero() || self.retry_for < self.timeout {
            problems.add(
                format!("{at}.timeout"),
                "longer than 0 s and no longer than retry_for",
            );
        }
    }
}
