//! What the switch counts: per app (every answer, every refusal), and per
//! release (answers, upstream errors, abandoned requests and a latency
//! histogram), so that two releases serving side by side can be compared
//! by what their users got.
//!
//! Every count is a relaxed atomic add on the request's path: no lock, no
//! allocation. Readers take [`Figures`] snapshots and subtract them to get
//! a window.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a request got no answer from a web container.
#[derive(Debug, Clone, Copy)]
pub enum UpstreamError {
    /// The container refused the connection (the next one was tried).
    Refused,
    /// The connection failed under the request: 502.
    Failed,
    /// No answer within `upstream_timeout`: 504.
    Timeout,
    /// Its release's drain gave up on it: 504.
    Drained,
}

impl UpstreamError {
    pub const ALL: [Self; 4] = [Self::Refused, Self::Failed, Self::Timeout, Self::Drained];

    pub fn label(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Drained => "drained",
        }
    }
}

/// Why the switch refused a client before any container saw its request.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    /// A request line or header past `max_header_line`/`max_header_size`.
    HeadTooLarge,
    /// A body past `max_body`: 413.
    BodyTooLarge,
    /// A body not whole within `body_timeout`: 408.
    BodyTimeout,
    /// A body the client broke off.
    BodyBroken,
    /// A body that could not be spooled to a temporary file: 503.
    BodySpool,
    /// A connection past `max_connections`, closed at once.
    Connections,
    /// A connection past `max_connections_per_address`, closed at once.
    ConnectionsPerAddress,
}

impl Refusal {
    pub const ALL: [Self; 7] = [
        Self::HeadTooLarge,
        Self::BodyTooLarge,
        Self::BodyTimeout,
        Self::BodyBroken,
        Self::BodySpool,
        Self::Connections,
        Self::ConnectionsPerAddress,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::HeadTooLarge => "head_too_large",
            Self::BodyTooLarge => "body_too_large",
            Self::BodyTimeout => "body_timeout",
            Self::BodyBroken => "body_broken",
            Self::BodySpool => "body_spool",
            Self::Connections => "max_connections",
            Self::ConnectionsPerAddress => "max_connections_per_address",
        }
    }
}

/// When buffering fell back because `buffer_memory` was short.
#[derive(Debug, Clone, Copy)]
pub enum Shortfall {
    /// A request body spooled to disk although it fit `max_buffered_body`.
    Spooled,
    /// An answer passed at its client's pace, not read ahead.
    Unbuffered,
}

impl Shortfall {
    pub const ALL: [Self; 2] = [Self::Spooled, Self::Unbuffered];

    pub fn label(self) -> &'static str {
        match self {
            Self::Spooled => "spooled",
            Self::Unbuffered => "unbuffered",
        }
    }
}

/// A route's request counts: one relaxed atomic add per request.
#[derive(Debug, Default)]
pub struct SwitchStats {
    /// Answers by status class: 1xx to 5xx.
    answers: [AtomicU64; 5],
    upstream_errors: [AtomicU64; 4],
    refusals: [AtomicU64; 7],
    shortfalls: [AtomicU64; 2],
}

impl SwitchStats {
    pub(crate) fn answered(&self, status: http::StatusCode) {
        self.answers[status_class(status)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn upstream_error(&self, error: UpstreamError) {
        self.upstream_errors[error as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refused(&self, refusal: Refusal) {
        self.refusals[refusal as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn short(&self, shortfall: Shortfall) {
        self.shortfalls[shortfall as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `("spooled", n)` and `("unbuffered", n)`.
    pub fn shortfalls(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Shortfall::ALL
            .into_iter()
            .zip(&self.shortfalls)
            .map(|(s, n)| (s.label(), n.load(Ordering::Relaxed)))
    }

    /// `("body_timeout", n)`, ... for every refusal.
    pub fn refusals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Refusal::ALL
            .into_iter()
            .zip(&self.refusals)
            .map(|(r, n)| (r.label(), n.load(Ordering::Relaxed)))
    }

    /// `("2xx", n)`, ... for every class.
    pub fn answers(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        CLASSES
            .into_iter()
            .zip(&self.answers)
            .map(|(class, n)| (class, n.load(Ordering::Relaxed)))
    }

    pub fn upstream_errors(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        UpstreamError::ALL
            .into_iter()
            .zip(&self.upstream_errors)
            .map(|(e, n)| (e.label(), n.load(Ordering::Relaxed)))
    }
}

/// Upper bounds of the latency buckets, in microseconds: 1, 1.5, 2, 3, 5
/// and 7.5 per decade from 1 ms to 60 s (about 1.5x apart, so a quantile
/// read from them is within a step of the truth), then everything slower.
pub const LATENCY_BOUNDS_US: [u64; 29] = [
    1_000, 1_500, 2_000, 3_000, 5_000, 7_500, //
    10_000, 15_000, 20_000, 30_000, 50_000, 75_000, //
    100_000, 150_000, 200_000, 300_000, 500_000, 750_000, //
    1_000_000, 1_500_000, 2_000_000, 3_000_000, 5_000_000, 7_500_000, //
    10_000_000, 15_000_000, 20_000_000, 30_000_000, 60_000_000,
];

const BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// The traffic one release served through the switch, since this deployd
/// started.
#[derive(Debug)]
pub struct ReleaseStats {
    release: Arc<str>,
    /// Answers by status class, 1xx to 5xx, the switch's own 502/504 for
    /// this release's failures included.
    answers: [AtomicU64; 5],
    upstream_errors: [AtomicU64; 4],
    /// Requests whose client left before the answer's head.
    abandoned: AtomicU64,
    /// Time from the request being whole to the answer's head, per bucket.
    buckets: [AtomicU64; BUCKETS],
    latency_sum_us: AtomicU64,
}

impl ReleaseStats {
    pub(crate) fn new(release: Arc<str>) -> Self {
        Self {
            release,
            answers: Default::default(),
            upstream_errors: Default::default(),
            abandoned: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_us: AtomicU64::new(0),
        }
    }

    /// The release (commit sha) these figures are of.
    pub fn release(&self) -> &str {
        &self.release
    }

    pub(crate) fn answered(&self, status: http::StatusCode, latency: Duration) {
        self.answers[status_class(status)].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_US.partition_point(|&bound| bound < us);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub(crate) fn upstream_error(&self, error: UpstreamError) {
        self.upstream_errors[error as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn abandoned(&self) {
        self.abandoned.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn figures(&self) -> Figures {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        Figures {
            answers: self.answers.each_ref().map(load),
            upstream_errors: self.upstream_errors.each_ref().map(load),
            abandoned: load(&self.abandoned),
            buckets: self.buckets.each_ref().map(load),
            latency_sum_us: load(&self.latency_sum_us),
        }
    }
}

fn status_class(status: http::StatusCode) -> usize {
    usize::from(status.as_u16() / 100).clamp(1, 5) - 1
}

/// A release's counts at one moment, or between two ([`Figures::since`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Figures {
    pub answers: [u64; 5],
    pub upstream_errors: [u64; 4],
    pub abandoned: u64,
    pub buckets: [u64; BUCKETS],
    pub latency_sum_us: u64,
}

impl Figures {
    /// What happened between `earlier` and these figures.
    pub fn since(&self, earlier: &Self) -> Self {
        let minus = |now: &[u64], then: &[u64], out: &mut [u64]| {
            for ((o, n), t) in out.iter_mut().zip(now).zip(then) {
                *o = n.saturating_sub(*t);
            }
        };
        let mut window = Self::default();
        minus(&self.answers, &earlier.answers, &mut window.answers);
        minus(
            &self.upstream_errors,
            &earlier.upstream_errors,
            &mut window.upstream_errors,
        );
        minus(&self.buckets, &earlier.buckets, &mut window.buckets);
        window.abandoned = self.abandoned.saturating_sub(earlier.abandoned);
        window.latency_sum_us = self.latency_sum_us.saturating_sub(earlier.latency_sum_us);
        window
    }

    /// Requests answered.
    pub fn requests(&self) -> u64 {
        self.answers.iter().sum()
    }

    /// Answers with a 5xx status: the app's own and the switch's 502/504
    /// for this release's failures.
    pub fn errors(&self) -> u64 {
        self.answers[4]
    }

    /// The share of answers that were errors; `None` with no answers.
    pub fn error_rate(&self) -> Option<f64> {
        let requests = self.requests();
        (requests > 0).then(|| self.errors() as f64 / requests as f64)
    }

    /// The `q` quantile (0 to 1) of the latency, interpolated within its
    /// bucket as Prometheus' `histogram_quantile` does; `None` with no
    /// answers. Past the last bound it is that bound.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let Some(&upper) = LATENCY_BOUNDS_US.get(i) else {
                    return Some(Duration::from_micros(LATENCY_BOUNDS_US[BUCKETS - 2]));
                };
                let lower = if i == 0 { 0 } else { LATENCY_BOUNDS_US[i - 1] };
                let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
                let us = lower as f64 + within * (upper - lower) as f64;
                return Some(Duration::from_micros(us as u64));
            }
            below += n;
        }
        None
    }

    /// `("2xx", n)`, ... for every class.
    pub fn answers_by_class(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        CLASSES.into_iter().zip(self.answers)
    }

    pub fn upstream_errors_by_kind(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        UpstreamError::ALL
            .into_iter()
            .map(UpstreamError::label)
            .zip(self.upstream_errors)
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_window_counts_only_what_happened_in_it() {
        let stats = ReleaseStats::new("abc".into());
        stats.answered(http::StatusCode::OK, ms(4));
        let before = stats.figures();
        stats.answered(http::StatusCode::OK, ms(4));
        stats.answered(http::StatusCode::INTERNAL_SERVER_ERROR, ms(4));
        stats.upstream_error(UpstreamError::Timeout);
        stats.abandoned();
        let window = stats.figures().since(&before);
        assert_eq!(window.requests(), 2);
        assert_eq!(window.errors(), 1);
        assert_eq!(window.error_rate(), Some(0.5));
        assert_eq!(window.abandoned, 1);
        assert_eq!(
            window.upstream_errors_by_kind().collect::<Vec<_>>(),
            [
                ("refused", 0),
                ("failed", 0),
                ("timeout", 1),
                ("drained", 0)
            ]
        );
        assert_eq!(window.latency_sum_us, 8_000);
        assert_eq!(Figures::default().error_rate(), None);
    }

    #[test]
    fn quantiles_come_from_the_buckets_within_a_step() {
        let stats = ReleaseStats::new("abc".into());
        assert_eq!(stats.figures().quantile(0.95), None);
        // 95 fast answers (4 ms) and 5 slow ones (400 ms).
        for _ in 0..95 {
            stats.answered(http::StatusCode::OK, ms(4));
        }
        for _ in 0..5 {
            stats.answered(http::StatusCode::OK, ms(400));
        }
        let figures = stats.figures();
        // The 95th is the last fast one: in the 3-5 ms bucket.
        let p95 = figures.quantile(0.95).unwrap();
        assert!(p95 > ms(3) && p95 <= ms(5), "{p95:?}");
        // The 99th is a slow one: in the 300-500 ms bucket.
        let p99 = figures.quantile(0.99).unwrap();
        assert!(p99 > ms(300) && p99 <= ms(500), "{p99:?}");
        // Past the last bound: that bound.
        stats.answered(http::StatusCode::OK, Duration::from_secs(600));
        for _ in 0..1000 {
            stats.answered(http::StatusCode::OK, Duration::from_secs(600));
        }
        assert_eq!(
            stats.figures().quantile(0.99),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn status_classes_are_bounded() {
        let stats = ReleaseStats::new("abc".into());
        stats.answered(http::StatusCode::from_u16(599).unwrap(), ms(1));
        stats.answered(http::StatusCode::from_u16(101).unwrap(), ms(1));
        let figures = stats.figures();
        assert_eq!(figures.answers, [1, 0, 0, 0, 1]);
        // 1 ms is the first bucket's bound, inclusive.
        assert_eq!(figures.buckets[0], 2);
    }
}
