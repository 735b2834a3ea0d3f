//! `[apps.NAME.switch]`: the built-in traffic switch on an app's public
//! address. Without the table the switch is off for that app.

use std::net::SocketAddr;
use std::time::Duration;

use bytesize::ByteSize;
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
    /// A request body is read whole before it goes to a container, so a
    /// slow client never holds an app server's worker (gunicorn's sync
    /// workers need this). Bodies up to this size are held in memory;
    /// larger ones are spooled to a temporary file. Default: 1 MiB.
    #[serde(default = "default_max_buffered_body")]
    pub max_buffered_body: ByteSize,
    /// Larger request bodies are refused with 413 before they reach a
    /// container. Default: 100 MiB.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// A request body must have arrived whole within this; else 408, and
    /// the container never sees the request. Default: 30 s (raise it for
    /// large uploads over slow links).
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
    /// A container's answer is read ahead of a slow client up to this
    /// much, so the worker that wrote it is free at once; past it, reading
    /// waits for the client. Event streams (`text/event-stream`, or
    /// `X-Accel-Buffering: no`) and upgraded connections pass unbuffered.
    /// Default: 1 MiB.
    #[serde(default = "default_max_buffered_response")]
    pub max_buffered_response: ByteSize,
    /// Memory all buffered request bodies and answers of this switch may
    /// hold together; past it, bodies are spooled to disk and answers are
    /// passed at their clients' pace. Default: 256 MiB.
    #[serde(default = "default_buffer_memory")]
    pub buffer_memory: ByteSize,
    /// Client connections open at once; past it, new ones are closed at
    /// once. Lowered at start to what the open-file limit allows, keeping
    /// room for the API and Docker. Default: 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Client connections open at once from one address (IPv6: one /64);
    /// 0 for no limit. Default: 256, or no limit with
    /// `trust_forwarded_headers` (every connection then comes from the load
    /// balancer).
    pub max_connections_per_address: Option<usize>,
    /// Longest request line or header line (name and value); past it, 414
    /// or 431. Default: 8 KiB, like nginx's `large_client_header_buffers`.
    #[serde(default = "default_max_header_line")]
    pub max_header_line: ByteSize,
    /// Longest request head in all (request line and headers); past it,
    /// 431. Default: 32 KiB.
    #[serde(default = "default_max_header_size")]
    pub max_header_size: ByteSize,
}

/// Header limits shared by the switch and the API, like nginx's.
pub const DEFAULT_MAX_HEADER_LINE: ByteSize = ByteSize::kib(8);
pub const DEFAULT_MAX_HEADER_SIZE: ByteSize = ByteSize::kib(32);

fn default_max_buffered_body() -> ByteSize {
    ByteSize::mib(1)
}
fn default_max_body() -> ByteSize {
    ByteSize::mib(100)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_buffered_response() -> ByteSize {
    ByteSize::mib(1)
}
fn default_buffer_memory() -> ByteSize {
    ByteSize::mib(256)
}
fn default_max_connections() -> usize {
    10_000
}
pub(super) fn default_max_header_line() -> ByteSize {
    DEFAULT_MAX_HEADER_LINE
}
pub(super) fn default_max_header_size() -> ByteSize {
    DEFAULT_MAX_HEADER_SIZE
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
    /// The per-address connection cap in force: unset means 256 at the
    /// edge, none behind a trusted load balancer.
    pub fn connections_per_address(&self) -> Option<usize> {
        match self.max_connections_per_address {
            Some(0) => None,
            Some(n) => Some(n),
            None if self.trust_forwarded_headers => None,
            None => Some(256),
        }
    }

    pub(super) fn validate(&self, at: &str, problems: &mut Problems) {
        for (key, value) in [
            ("upstream_timeout", self.upstream_timeout),
            ("drain_timeout", self.drain_timeout),
            ("idle_timeout", self.idle_timeout),
            ("body_timeout", self.body_timeout),
        ] {
            if value.is_zero() {
                problems.add(format!("{at}.{key}"), "must be longer than 0s");
            }
        }
        if self.max_buffered_body > self.max_body {
            problems.add(
                format!("{at}.max_buffered_body"),
                "must not be larger than max_body",
            );
        }
        if self.max_buffered_response.as_u64() < 4096 {
            problems.add(
                format!("{at}.max_buffered_response"),
                "must be at least 4 KiB",
            );
        }
        if self.max_connections == 0 {
            problems.add(format!("{at}.max_connections"), "must be at least 1");
        }
        check_header_limits(at, self.max_header_line, self.max_header_size, problems);
    }
}

/// `max_header_line` and `max_header_size`, for the switch and the API.
pub(super) fn check_header_limits(
    at: &str,
    line: ByteSize,
    size: ByteSize,
    problems: &mut Problems,
) {
    if line.as_u64() < 1024 {
        problems.add(format!("{at}.max_header_line"), "must be at least 1 KiB");
    }
    if size < line {
        problems.add(
            format!("{at}.max_header_size"),
            "must not be smaller than max_header_line",
        );
    }
    if size > ByteSize::mib(1) {
        problems.add(format!("{at}.max_header_size"), "must be at most 1 MiB");
    }
}
