//! Which web containers an app's traffic goes to, and the draining of those
//! it no longer goes to.
//!
//! A [`Route`] holds the live set of backends behind an `RwLock<Arc<_>>`:
//! each request takes a snapshot, so a switch is atomic and per request.
//! Every request holds an [`InFlight`] guard on its backend until its
//! response body (or upgraded connection) ends; a drain waits for those
//! guards, then cancels the stragglers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::pool::Pool;

/// A web container traffic can go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub container: String,
    /// The container's address on its network, and its web port.
    pub addr: SocketAddr,
}

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
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.answers[class].fetch_add(1, Ordering::Relaxed);
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
        ["1xx", "2xx", "3xx", "4xx", "5xx"]
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

/// One web container, with its idle connections and requests in flight.
#[derive(Debug)]
pub(crate) struct Backend {
    pub upstream: Upstream,
    pub pool: Pool,
    in_flight: AtomicUsize,
    idle: Notify,
    /// Fires when a drain gives up waiting: every connection to the
    /// container closes, which ends the requests still running on it.
    pub cancel: CancellationToken,
    /// After a failed connect, skipped until then (unless all are), as
    /// milliseconds since [`epoch`]; 0 when up.
    down_until: AtomicU64,
}

/// A fixed instant that backend timestamps count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// How long a backend that refused a connection is skipped.
const DOWN_FOR: Duration = Duration::from_secs(2);

impl Backend {
    fn new(upstream: Upstream) -> Self {
        Self {
            upstream,
            pool: Pool::default(),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            cancel: CancellationToken::new(),
            down_until: AtomicU64::new(0),
        }
    }

    pub fn mark_down(&self) {
        let until = now_ms().saturating_add(u64::try_from(DOWN_FOR.as_millis()).unwrap_or(0));
        self.down_until.store(until, Ordering::Relaxed);
    }

    pub fn mark_up(&self) {
        if self.down_until.load(Ordering::Relaxed) != 0 {
            self.down_until.store(0, Ordering::Relaxed);
        }
    }

    fn is_down(&self) -> bool {
        let until = self.down_until.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Resolves once no request is in flight on this backend.
    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A request running on a backend; dropping it ends the request.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Backend>);

impl InFlight {
    pub fn new(backend: Arc<Backend>) -> Self {
        backend.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(backend)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The traffic of one app: where new requests go.
#[derive(Debug)]
pub struct Route {
    app: String,
    /// Counted per request, read by `/metrics`.
    pub(crate) stats: SwitchStats,
    live: RwLock<Arc<Vec<Arc<Backend>>>>,
    next: AtomicUsize,
    /// Set once the live containers are known (at start, from Docker);
    /// requests wait for it rather than being refused.
    known: watch::Sender<bool>,
}

impl Route {
    pub fn new(app: &str) -> Self {
        Self {
            app: app.to_owned(),
            stats: SwitchStats::default(),
            live: RwLock::new(Arc::new(Vec::new())),
            next: AtomicUsize::new(0),
            known: watch::Sender::new(false),
        }
    }

    pub fn app(&self) -> &str {
        &self.app
    }

    /// Sends every new request to `upstreams` from now on. Backends that are
    /// no longer live are returned, to be drained; one that stays (same
    /// container and address) keeps its connections and requests.
    pub fn switch_to(&self, upstreams: &[Upstream]) -> Draining {
        let Ok(mut live) = self.live.write() else {
            return Draining::default();
        };
        let old = live.clone();
        let new: Vec<Arc<Backend>> = upstreams
            .iter()
            .map(|u| {
                old.iter()
                    .find(|b| &b.upstream == u)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Backend::new(u.clone())))
            })
            .collect();
        let gone = old
            .iter()
            .filter(|b| !upstreams.contains(&b.upstream))
            .cloned()
            .collect();
        *live = Arc::new(new);
        drop(live);
        self.known.send_replace(true);
        tracing::info!(
            app = %self.app,
            containers = ?upstreams.iter().map(|u| short(&u.container)).collect::<Vec<_>>(),
            "traffic switched"
        );
        Draining { backends: gone }
    }

    /// Requests in flight on the live containers now (sent to one and not
    /// yet answered to its end).
    pub fn in_flight(&self) -> usize {
        self.snapshot().iter().map(|b| b.in_flight()).sum()
    }

    /// The live containers, as a snapshot.
    pub fn upstreams(&self) -> Vec<Upstream> {
        self.snapshot().iter().map(|b| b.upstream.clone()).collect()
    }

    /// Waits until the live containers are known, up to `wait`.
    pub(crate) async fn known(&self, wait: Duration) -> bool {
        if *self.known.borrow() {
            return true;
        }
        let mut rx = self.known.subscribe();
        tokio::time::timeout(wait, rx.wait_for(|known| *known))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn snapshot(&self) -> Arc<Vec<Arc<Backend>>> {
        match self.live.read() {
            Ok(live) => live.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The backends to try for one request: round-robin, those recently
    /// refusing connections last.
    pub(crate) fn candidates(&self) -> Candidates {
        let live = self.snapshot();
        let start = match live.len() {
            0 => 0,
            n => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        let order = live.iter().any(|b| b.is_down()).then(|| {
            let mut order: Vec<usize> = (0..live.len()).map(|i| (start + i) % live.len()).collect();
            order.sort_by_key(|&i| live[i].is_down());
            order
        });
        Candidates { live, start, order }
    }
}

/// The backends one request may try, in order; a snapshot, so a switch
/// during the request does not change them.
#[derive(Debug)]
pub(crate) struct Candidates {
    live: Arc<Vec<Arc<Backend>>>,
    start: usize,
    /// Set only when some backend is down (rare): the order with those last.
    order: Option<Vec<usize>>,
}

impl Candidates {
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn get(&self, attempt: usize) -> Option<&Arc<Backend>> {
        if attempt >= self.live.len() {
            return None;
        }
        let index = match &self.order {
            Some(order) => order[attempt],
            None => (self.start + attempt) % self.live.len(),
        };
        self.live.get(index)
    }
}

/// Backends taken out of a route, whose requests may still be running.
#[derive(Debug, Default)]
#[must_use = "old containers must be drained before they stop"]
pub struct Draining {
    backends: Vec<Arc<Backend>>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Requests that were still running at the drain timeout and were ended.
    pub cut: usize,
}

impl Draining {
    /// Waits for requests in flight to finish, up to `timeout`; then ends
    /// the rest (a request still waiting for its answer gets 504).
    pub async fn finish(self, timeout: Duration) -> Drained {
        let all_idle = futures_util::future::join_all(self.backends.iter().map(|b| b.idle()));
        if tokio::time::timeout(timeout, all_idle).await.is_ok() {
            self.close_pools();
            return Drained { cut: 0 };
        }
        let cut = self.backends.iter().map(|b| b.in_flight()).sum();
        for b in &self.backends {
            b.cancel.cancel();
            b.pool.close_all();
        }
        // Cancelled requests answer at once; this only bounds a stuck one.
        let all_idle = futures_util::future::join_all(self.backends.iter().map(|b| b.idle()));
        let _ = tokio::time::timeout(Duration::from_secs(5), all_idle).await;
        self.close_pools();
        Drained { cut }
    }

    /// The containers being drained.
    pub fn containers(&self) -> Vec<String> {
        self.backends
            .iter()
            .map(|b| b.upstream.container.clone())
            .collect()
    }

    fn close_pools(&self) {
        for b in &self.backends {
            b.pool.clear();
        }
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(n: u8) -> Upstream {
        Upstream {
            container: format!("c{n}"),
            addr: SocketAddr::from(([10, 0, 0, n], 8000)),
        }
    }

    #[test]
    fn candidates_go_round_robin_and_skip_refusing_backends() {
        let route = Route::new("shop");
        let _ = route.switch_to(&[upstream(1), upstream(2), upstream(3)]);
        let firsts: Vec<String> = (0..3)
            .map(|_| {
                route
                    .candidates()
                    .get(0)
                    .unwrap()
                    .upstream
                    .container
                    .clone()
            })
            .collect();
        assert_eq!(firsts, ["c1", "c2", "c3"]);
        route.candidates().get(1).unwrap().mark_down();
        // c1's turn to go first; c2 was marked down and goes last.
        let candidates = route.candidates();
        let order: Vec<String> = (0..candidates.len())
            .map(|i| candidates.get(i).unwrap().upstream.container.clone())
            .collect();
        assert_eq!(order, ["c3", "c1", "c2"]);
    }

    #[test]
    fn a_switch_returns_only_the_backends_that_left() {
        let route = Route::new("shop");
        let _ = route.switch_to(&[upstream(1), upstream(2)]);
        let draining = route.switch_to(&[upstream(2), upstream(3)]);
        assert_eq!(draining.containers(), ["c1"]);
        assert_eq!(route.upstreams(), [upstream(2), upstream(3)]);
    }

    #[tokio::test]
    async fn a_drain_waits_for_requests_then_cuts_the_stragglers() {
        let route = Route::new("shop");
        let _ = route.switch_to(&[upstream(1)]);
        let backend = route.candidates().get(0).unwrap().clone();
        let quick = InFlight::new(backend.clone());
        let draining = route.switch_to(&[upstream(2)]);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(quick);
        });
        assert_eq!(draining.finish(Duration::from_secs(5)).await.cut, 0);

        let _ = route.switch_to(&[upstream(1)]);
        let backend = route.candidates().get(0).unwrap().clone();
        let stuck = InFlight::new(backend.clone());
        let cancel = backend.cancel.clone();
        tokio::spawn(async move {
            cancel.cancelled().await;
            drop(stuck);
        });
        let draining = route.switch_to(&[upstream(2)]);
        let drained = draining.finish(Duration::from_millis(100)).await;
        assert_eq!(drained.cut, 1);
        assert_eq!(backend.in_flight(), 0);
    }
}
