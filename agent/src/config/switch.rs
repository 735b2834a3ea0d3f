//! `[apps.NAME.switch]`: the built-in traffic switch on an app's public
//! address. Without the table the switch is off for that app.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::Problems;

/// Where an app's public HTTP traffic comes in, and how it is switched.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchConfig {
    /// The public address, e.g. `0.0.0.0:8000`. A listener passed by systemd
    /// socket activation (`LISTEN_FDS`) on this address is used instead of
    /// binding a new one.
    pub listen: SocketAddr,
    /// Longest wait for a web container's response headers; then 504.
    /// Default: 60 s.
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// After a switch, requests still running on the old release get this
    /// long to finish; the rest are ended (504 if nothing was answered yet)
    /// before its containers stop. Default: 30 s.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// An idle client connection is closed after this, and a request's
    /// headers must arrive within it. Default: 60 s.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Keep the `X-Forwarded-Proto`/`-Host` a client sent and add to its
    /// `X-Forwarded-For`: only behind a load balancer or TLS terminator
    /// that sets them, which clients cannot reach around. Default: false
    /// (deployd is the edge; the values are its own).
    #[serde(default)]
    pub trust_forwarded_headers: bool,
}

fn default_upstream_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}

impl SwitchConfig {
    pub(super) fn validate(&self, at: &str, problems: &mut Problems) {
        for (key, value) in [
            ("upstream_timeout", self.upstream_timeout),
            ("drain_timeout", self.drain_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if value.is_zero() {
                problems.add(format!("{at}.{key}"), "must be longer than 0s");
            }
        }
    }
}
