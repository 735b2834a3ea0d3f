//! `health`: the HTTP check a web container must pass before it takes
//! traffic, and keeps passing while it runs.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::Problems;

/// Headers the HTTP client sets itself, for the request's framing and its
/// connection: a health check may not send its own.
const NOT_SENT: [&str; 8] = [
    "connection",
    "content-length",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The HTTP check a web container must pass.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Path to GET, e.g. `/healthz/`. Redirects are never followed: a
    /// status outside `expect` is reported as it is.
    pub path: String,
    /// Host header to send (Django's ALLOWED_HOSTS refuses others).
    pub host: String,
    /// More headers to send, to look like what the proxy in front
    /// forwards, e.g. `{ "X-Forwarded-Proto" = "https" }` for an app that
    /// redirects plain HTTP (`SECURE_SSL_REDIRECT`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Statuses that mean healthy. Default: `[200]`.
    #[serde(default = "default_expect")]
    pub expect: Vec<u16>,
    /// How long a new container may take to become healthy. Default: 60 s.
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl HealthConfig {
    pub(super) fn validate(&self, at: &str, problems: &mut Problems) {
        if !self.path.starts_with('/') {
            problems.add(format!("{at}.path"), "must start with /");
        }
        if self.host.is_empty() || self.host.contains(['/', ' ']) {
            problems.add(format!("{at}.host"), "must be a host name");
        }
        let mut seen = Vec::new();
        for (name, value) in &self.headers {
            let at = format!("{at}.headers.{name}");
            let header = match http::HeaderName::from_bytes(name.as_bytes()) {
                Ok(header) => header,
                Err(_) => {
                    problems.add(at, "is not a header name");
                    continue;
                }
            };
            if header == http::header::HOST {
                problems.add(at, "the Host header is set by health.host");
            } else if NOT_SENT.contains(&header.as_str()) {
                problems.add(at, "framing and connection headers are the client's own");
            } else if seen.contains(&header) {
                problems.add(at, "names a header already given (names ignore case)");
            } else if http::HeaderValue::from_str(value).is_err() {
                problems.add(at, "is not a header value");
            }
            seen.push(header);
        }
        if self.expect.is_empty() {
            problems.add(format!("{at}.expect"), "name at least one status");
        }
        for status in &self.expect {
            if !(100..=599).contains(status) {
                problems.add(
                    format!("{at}.expect"),
                    format!("{status} is not an HTTP status"),
                );
            }
        }
    }

    /// Whether an answer with this status means healthy.
    pub fn accepts(&self, status: u16) -> bool {
        self.expect.contains(&status)
    }
}

/// Header values may be credentials: `Debug` names the headers only.
impl fmt::Debug for HealthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthConfig")
            .field("path", &self.path)
            .field("host", &self.host)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("expect", &self.expect)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn default_health_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_expect() -> Vec<u16> {
    vec![200]
}
