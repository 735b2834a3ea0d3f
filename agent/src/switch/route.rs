//! Which web containers an app's traffic goes to, and the draining of those
//! it no longer goes to.
//!
//! A [`Route`] holds the live set of backends behind an `RwLock<Arc<_>>`:
//! each request takes a snapshot, so a switch is atomic and per request.
//! Every request holds an [`InFlight`] guard on its backend until its
//! response body (or upgraded connection) ends; a drain waits for those
//! guards, then cancels the stragglers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, header};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::pool::Pool;
use super::stats::{ReleaseStats, SwitchStats};

/// A web container traffic can go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub container: String,
    /// The container's address on its network, and its web port.
    pub addr: SocketAddr,
    /// The release (commit sha) it runs: its traffic is counted under it.
    pub release: Arc<str>,
}

/// One web container, with its idle connections and requests in flight.
#[derive(Debug)]
pub(crate) struct Backend {
    pub upstream: Upstream,
    /// Its release's figures.
    pub stats: Arc<ReleaseStats>,
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
    fn new(upstream: Upstream, stats: Arc<ReleaseStats>) -> Self {
        Self {
            upstream,
            stats,
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

/// The containers an app's traffic goes to: the live release's, and
/// during a canary the new release's too, with the share of clients sent
/// there.
#[derive(Debug, Default)]
struct Live {
    stable: Vec<Arc<Backend>>,
    canary: Option<Canary>,
}

#[derive(Debug)]
struct Canary {
    backends: Vec<Arc<Backend>>,
    /// The share of clients that go to it, in basis points: those whose
    /// point (0 to 9999) is below it.
    share: u32,
    /// Random, one per canary: a cookie of another canary counts for
    /// nothing.
    id: String,
}

/// The name of the cookie that keeps a client on its release during a
/// canary.
pub const PIN_COOKIE: &str = "deployd_release";

/// Which client a request comes from, as far as a canary cares: the
/// values of its `deployd_release` cookie (a stale one may come next to the
/// current one), and its address.
#[derive(Debug)]
pub(crate) struct Client {
    pins: Vec<String>,
    /// `None`: not read ([`Client::unknown`]).
    addr: Option<HeaderValue>,
}

impl Client {
    /// A client not told apart from others: while no canary runs, who sent
    /// a request does not matter, and its headers are not read. A canary
    /// that begins meanwhile sends it to the stable release, without a
    /// cookie.
    pub fn unknown() -> Self {
        Self {
            pins: Vec::new(),
            addr: None,
        }
    }

    /// The client of a request from `peer`; behind a trusted load balancer,
    /// the address it put last in `X-Forwarded-For`.
    pub fn of(headers: &HeaderMap, peer: &HeaderValue, trust_forwarded: bool) -> Self {
        let pins = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| {
                let (name, value) = pair.trim().split_once('=')?;
                // A value may come quoted (RFC 6265).
                let value = value.trim().trim_matches('"');
                (name.trim() == PIN_COOKIE).then(|| value.to_owned())
            })
            .collect();
        let forwarded = trust_forwarded
            .then(|| {
                headers
                    .get_all(super::headers::X_FORWARDED_FOR)
                    .iter()
                    .next_back()
            })
            .flatten()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim)
            .filter(|last| !last.is_empty())
            .and_then(|last| HeaderValue::from_str(last).ok());
        Self {
            pins,
            addr: Some(forwarded.unwrap_or_else(|| peer.clone())),
        }
    }
}

/// The traffic of one app: where new requests go.
#[derive(Debug)]
pub struct Route {
    app: String,
    /// Counted per request, read by `/metrics`.
    pub(crate) stats: SwitchStats,
    live: RwLock<Arc<Live>>,
    /// The figures of the releases served lately, oldest first: the live
    /// ones and up to [`KEPT_RELEASES`] before them.
    releases: Mutex<Vec<Arc<ReleaseStats>>>,
    next: AtomicUsize,
    /// Whether a canary splits the traffic now: only then is a request's
    /// client read from its headers.
    splitting: AtomicBool,
    /// Set once the live containers are known (at start, from Docker);
    /// requests wait for it rather than being refused.
    known: watch::Sender<bool>,
}

impl Route {
    pub fn new(app: &str) -> Self {
        Self {
            app: app.to_owned(),
            stats: SwitchStats::default(),
            live: RwLock::new(Arc::new(Live::default())),
            releases: Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
            splitting: AtomicBool::new(false),
            known: watch::Sender::new(false),
        }
    }

    pub fn app(&self) -> &str {
        &self.app
    }

    /// Sends every new request to `upstreams` from now on (a canary, if
    /// any, ends). Backends that are no longer live are returned, to be
    /// drained; one that stays (same container and address) keeps its
    /// connections and requests.
    pub fn switch_to(&self, upstreams: &[Upstream]) -> Draining {
        self.split(upstreams, &[], 0.0)
    }

    /// Sends `percent` of the clients to `canary` and the rest to `stable`
    /// from now on. Each client has a point from 0 to 9999 for the whole
    /// canary, in a cookie the switch sets (else a hash of its address) and
    /// goes to the canary while its point is below the share: as the share
    /// grows, clients move onto the canary once and never back. With no
    /// `canary`, this is [`Route::switch_to`].
    pub fn split(&self, stable: &[Upstream], canary: &[Upstream], percent: f64) -> Draining {
        let mut live = crate::sync::write(&self.live);
        let old = live.clone();
        let backends = |upstreams: &[Upstream]| -> Vec<Arc<Backend>> {
            upstreams
                .iter()
                .map(|u| {
                    old.backends()
                        .find(|b| &b.upstream == u)
                        .cloned()
                        .unwrap_or_else(|| {
                            Arc::new(Backend::new(u.clone(), self.stats_of(&u.release)))
                        })
                })
                .collect()
        };
        let new = Live {
            stable: backends(stable),
            canary: (!canary.is_empty()).then(|| Canary {
                backends: backends(canary),
                share: (percent.clamp(0.0, 100.0) * 100.0).round() as u32,
                // The same canary from step to step keeps its id.
                id: match &old.canary {
                    Some(c) if c.backends.iter().map(|b| &b.upstream).eq(canary.iter()) => {
                        c.id.clone()
                    }
                    _ => uuid::Uuid::new_v4().simple().to_string()[..16].to_owned(),
                },
            }),
        };
        let gone = old
            .backends()
            .filter(|b| !stable.contains(&b.upstream) && !canary.contains(&b.upstream))
            .cloned()
            .collect();
        let kept: Vec<Arc<Backend>> = new.backends().cloned().collect();
        self.forget_releases(&kept);
        self.splitting
            .store(new.canary.is_some(), Ordering::Relaxed);
        *live = Arc::new(new);
        drop(live);
        self.known.send_replace(true);
        fn containers(u: &[Upstream]) -> Vec<&str> {
            u.iter().map(|u| short(&u.container)).collect()
        }
        if canary.is_empty() {
            tracing::info!(app = %self.app, containers = ?containers(stable), "traffic switched");
        } else {
            tracing::info!(app = %self.app, percent, canary = ?containers(canary),
                stable = ?containers(stable), "traffic split");
        }
        Draining { backends: gone }
    }

    /// Whether a canary splits the traffic now, so that who sends a request
    /// matters ([`Client::of`]); else [`Client::unknown`] will do.
    pub(crate) fn splits(&self) -> bool {
        self.splitting.load(Ordering::Relaxed)
    }

    /// The share of clients a canary gets now, in percent; `None` without
    /// one.
    pub fn canary_share(&self) -> Option<f64> {
        let live = self.snapshot();
        live.canary.as_ref().map(|c| f64::from(c.share) / 100.0)
    }

    /// The figures of `release`, created empty if it has none yet.
    fn stats_of(&self, release: &Arc<str>) -> Arc<ReleaseStats> {
        let mut releases = crate::sync::lock(&self.releases);
        let stats = match releases.iter().position(|r| r.release() == &**release) {
            Some(i) => releases.remove(i),
            None => Arc::new(ReleaseStats::new(release.clone())),
        };
        releases.push(stats.clone());
        stats
    }

    /// Drops the figures of releases neither live nor among the
    /// [`KEPT_RELEASES`] served last.
    fn forget_releases(&self, live: &[Arc<Backend>]) {
        let mut releases = crate::sync::lock(&self.releases);
        let is_live = |r: &ReleaseStats| live.iter().any(|b| b.stats.release() == r.release());
        let mut others = releases.iter().filter(|r| !is_live(r)).count();
        releases.retain(|r| {
            if others <= KEPT_RELEASES || is_live(r) {
                return true;
            }
            others -= 1;
            false
        });
    }

    /// The figures of `release` (a commit sha), if the switch sent it
    /// traffic lately.
    pub fn release(&self, release: &str) -> Option<Arc<ReleaseStats>> {
        crate::sync::lock(&self.releases)
            .iter()
            .find(|r| r.release() == release)
            .cloned()
    }

    /// The figures of every release served lately, oldest first.
    pub fn releases(&self) -> Vec<Arc<ReleaseStats>> {
        crate::sync::lock(&self.releases).clone()
    }

    /// Requests in flight on the live containers now (sent to one and not
    /// yet answered to its end).
    pub fn in_flight(&self) -> usize {
        self.snapshot().backends().map(|b| b.in_flight()).sum()
    }

    /// The live containers, as a snapshot: the stable ones, then a
    /// canary's.
    pub fn upstreams(&self) -> Vec<Upstream> {
        self.snapshot()
            .backends()
            .map(|b| b.upstream.clone())
            .collect()
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

    fn snapshot(&self) -> Arc<Live> {
        crate::sync::read(&self.live).clone()
    }

    /// The backends to try for one request of `client`: those of its
    /// release (during a canary), round-robin, those recently refusing
    /// connections last. During a canary, a client not yet pinned to a
    /// release also gets the cookie that pins it (a `Set-Cookie` value).
    pub(crate) fn candidates(&self, client: &Client) -> (Candidates, Option<HeaderValue>) {
        let live = self.snapshot();
        let (canary, pin) = match &live.canary {
            None => (false, None),
            // A canary has containers; the stable release may have none.
            Some(c) => {
                let (canary, pin) = c.assign(client);
                (canary || live.stable.is_empty(), pin)
            }
        };
        let group = Candidates::group_of(&live, canary);
        let start = match group.len() {
            0 => 0,
            n => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        let order = group.iter().any(|b| b.is_down()).then(|| {
            let mut order: Vec<usize> = (0..group.len())
                .map(|i| (start + i) % group.len())
                .collect();
            order.sort_by_key(|&i| group[i].is_down());
            order
        });
        (
            Candidates {
                live,
                canary,
                start,
                order,
            },
            pin,
        )
    }
}

impl Live {
    fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.stable
            .iter()
            .chain(self.canary.iter().flat_map(|c| &c.backends))
    }
}

impl Canary {
    /// Whether `client` goes to the canary, and the cookie that keeps it
    /// where it is if it has none for this canary yet. A client's point
    /// (0 to 9999) comes from its cookie, else from a hash of its address;
    /// it goes to the canary while its point is below the share, so a
    /// growing share moves clients onto the canary once and never back.
    fn assign(&self, client: &Client) -> (bool, Option<HeaderValue>) {
        let pinned = client
            .pins
            .iter()
            .filter_map(|pin| pin.split_once('.'))
            .filter(|(id, _)| *id == self.id)
            .find_map(|(_, point)| point.parse::<u32>().ok().filter(|p| *p < 10_000));
        if let Some(point) = pinned {
            return (point < self.share, None);
        }
        // Not read: the request came as the split began.
        let Some(addr) = &client.addr else {
            return (false, None);
        };
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(addr.as_bytes(), &mut hasher);
        std::hash::Hash::hash(self.id.as_bytes(), &mut hasher);
        let point = std::hash::Hasher::finish(&hasher) % 10_000;
        let cookie = format!(
            "{PIN_COOKIE}={}.{point}; Path=/; HttpOnly; SameSite=Lax",
            self.id
        );
        (
            point < u64::from(self.share),
            HeaderValue::from_str(&cookie).ok(),
        )
    }
}

/// The backends one request may try, in order; a snapshot, so a switch
/// during the request does not change them.
#[derive(Debug)]
pub(crate) struct Candidates {
    live: Arc<Live>,
    /// Whether they are the canary's.
    canary: bool,
    start: usize,
    /// Set only when some backend is down (rare): the order with those last.
    order: Option<Vec<usize>>,
}

impl Candidates {
    fn group_of(live: &Live, canary: bool) -> &[Arc<Backend>] {
        match &live.canary {
            Some(c) if canary => &c.backends,
            _ => &live.stable,
        }
    }

    fn group(&self) -> &[Arc<Backend>] {
        Self::group_of(&self.live, self.canary)
    }

    pub fn len(&self) -> usize {
        self.group().len()
    }

    pub fn get(&self, attempt: usize) -> Option<&Arc<Backend>> {
        let group = self.group();
        if attempt >= group.len() {
            return None;
        }
        let index = match &self.order {
            Some(order) => order[attempt],
            None => (self.start + attempt) % group.len(),
        };
        group.get(index)
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

/// Releases no longer live whose figures are kept (for a rollback to look
/// back on, and for `/metrics`).
const KEPT_RELEASES: usize = 3;

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
            release: format!("r{n}").into(),
        }
    }

    fn client(addr: &str, pin: Option<&str>) -> Client {
        Client {
            pins: pin.map(str::to_owned).into_iter().collect(),
            addr: Some(HeaderValue::from_str(addr).unwrap()),
        }
    }

    fn anyone() -> Client {
        client("192.0.2.1", None)
    }

    /// Where a request of `client` goes: its release and the cookie set.
    fn goes(route: &Route, client: &Client) -> (String, Option<String>) {
        let (candidates, pin) = route.candidates(client);
        let release = candidates.get(0).unwrap().upstream.release.to_string();
        let pin = pin.map(|p| p.to_str().unwrap().to_owned());
        (release, pin)
    }

    /// The cookie's value in a `Set-Cookie`.
    fn pin_of(set_cookie: &str) -> &str {
        let (pair, _) = set_cookie.split_once(';').unwrap();
        pair.strip_prefix("deployd_release=").unwrap()
    }

    #[test]
    fn a_canary_gets_its_share_of_clients_and_keeps_them() {
        let route = Route::new("shop");
        let (stable, canary) = ([upstream(1)], [upstream(3)]);
        let _ = route.switch_to(&stable);
        assert_eq!(goes(&route, &anyone()), ("r1".into(), None));
        assert_eq!(route.canary_share(), None);
        assert!(!route.splits());

        let draining = route.split(&stable, &canary, 25.0);
        assert!(draining.containers().is_empty());
        assert_eq!(route.canary_share(), Some(25.0));
        assert!(route.splits());
        // A request read before the split began: stable, and no cookie.
        assert_eq!(goes(&route, &Client::unknown()), ("r1".into(), None));
        let clients: Vec<Client> = (0..2000)
            .map(|n| client(&format!("10.{}.{}.1", n / 256, n % 256), None))
            .collect();
        let on_canary = |route: &Route| -> Vec<bool> {
            clients.iter().map(|c| goes(route, c).0 == "r3").collect()
        };
        let at_25 = on_canary(&route);
        let share = at_25.iter().filter(|&&c| c).count();
        assert!(
            (400..600).contains(&share),
            "{share} of 2000 on the canary at 25%"
        );
        // By address: the same client, the same release, and a growing
        // share only moves clients onto the canary.
        assert_eq!(on_canary(&route), at_25);
        let _ = route.split(&stable, &canary, 50.0);
        let at_50 = on_canary(&route);
        assert!(at_25.iter().zip(&at_50).all(|(&then, &now)| !then || now));
        let share = at_50.iter().filter(|&&c| c).count();
        assert!(
            (900..1100).contains(&share),
            "{share} of 2000 on the canary at 50%"
        );

        // A client's first answer sets its cookie; with it, the client keeps
        // its point from any address, gets no new cookie, and as the share
        // grows it moves to the canary once and never back.
        let (release, cookie) = goes(&route, &clients[0]);
        let cookie = cookie.unwrap();
        assert!(
            cookie.ends_with("; Path=/; HttpOnly; SameSite=Lax"),
            "{cookie}"
        );
        let pin = pin_of(&cookie).to_owned();
        assert!(
            !pin.contains("r3") && !pin.contains("r1"),
            "the cookie names no release: {pin}"
        );
        let pinned = client("203.0.113.9", Some(&pin));
        assert_eq!(goes(&route, &pinned), (release.clone(), None));
        let unread_address = Client {
            pins: vec![pin.clone()],
            addr: None,
        };
        assert_eq!(goes(&route, &unread_address), (release.clone(), None));
        let mut on = release == "r3";
        for percent in [60.0, 80.0, 100.0] {
            let _ = route.split(&stable, &canary, percent);
            let (now, set) = goes(&route, &pinned);
            assert!(set.is_none());
            assert!(
                !on || now == "r3",
                "back to the stable release at {percent}%"
            );
            on = now == "r3";
        }
        // At 100% every client goes to the canary.
        assert!(on && on_canary(&route).iter().all(|&c| c));

        // Another canary: another id, so earlier cookies count for nothing.
        let _ = route.split(&stable, &[upstream(4)], 100.0);
        let (release, cookie) = goes(&route, &pinned);
        assert_eq!(release, "r4");
        assert_ne!(pin_of(cookie.as_deref().unwrap()), pin);

        // The end of a canary (promoted or aborted) drains what is left.
        let draining = route.switch_to(&[upstream(4)]);
        assert_eq!(draining.containers(), ["c1"]);
        assert_eq!(route.canary_share(), None);
        assert!(!route.splits());
        assert_eq!(goes(&route, &pinned), ("r4".into(), None));
    }

    #[test]
    fn behind_a_trusted_balancer_the_client_is_the_address_it_forwarded() {
        let mut headers = HeaderMap::new();
        headers.append(
            "x-forwarded-for",
            HeaderValue::from_static("198.51.100.7, 10.0.0.1"),
        );
        headers.append(
            "cookie",
            HeaderValue::from_static("a=b; deployd_release=abc; c=d"),
        );
        headers.append(
            "cookie",
            HeaderValue::from_static("deployd_release=\"def.12\""),
        );
        let peer = HeaderValue::from_static("127.0.0.1");
        let trusted = Client::of(&headers, &peer, true);
        assert_eq!(trusted.addr.unwrap(), "10.0.0.1");
        assert_eq!(trusted.pins, ["abc", "def.12"]);
        let addr = |headers: &HeaderMap, trusted| Client::of(headers, &peer, trusted).addr.unwrap();
        assert_eq!(addr(&headers, false), "127.0.0.1");
        assert_eq!(addr(&HeaderMap::new(), true), "127.0.0.1");
        // An empty last entry names no one: the peer counts.
        let mut empty = HeaderMap::new();
        empty.append("x-forwarded-for", HeaderValue::from_static("198.51.100.7,"));
        assert_eq!(addr(&empty, true), "127.0.0.1");
    }

    #[test]
    fn candidates_go_round_robin_and_skip_refusing_backends() {
        let route = Route::new("shop");
        let _ = route.switch_to(&[upstream(1), upstream(2), upstream(3)]);
        let firsts: Vec<String> = (0..3)
            .map(|_| {
                route
                    .candidates(&anyone())
                    .0
                    .get(0)
                    .unwrap()
                    .upstream
                    .container
                    .clone()
            })
            .collect();
        assert_eq!(firsts, ["c1", "c2", "c3"]);
        route.candidates(&anyone()).0.get(1).unwrap().mark_down();
        // c1's turn to go first; c2 was marked down and goes last.
        let (candidates, _) = route.candidates(&anyone());
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

    #[test]
    fn figures_are_kept_per_release_for_the_live_ones_and_the_last_few() {
        let route = Route::new("shop");
        for n in 1..=6 {
            let _ = route.switch_to(&[upstream(n)]);
            route
                .candidates(&anyone())
                .0
                .get(0)
                .unwrap()
                .stats
                .abandoned();
        }
        let kept = |route: &Route| -> Vec<String> {
            route
                .releases()
                .iter()
                .map(|r| r.release().to_owned())
                .collect()
        };
        assert_eq!(kept(&route), ["r3", "r4", "r5", "r6"]);
        // Back to an earlier release: the same figures, now the newest.
        let _ = route.switch_to(&[upstream(4), upstream(6)]);
        assert_eq!(kept(&route), ["r3", "r5", "r6", "r4"]);
        assert_eq!(route.release("r4").unwrap().figures().abandoned, 1);
        assert!(route.release("r1").is_none());
    }

    #[tokio::test]
    async fn a_drain_waits_for_requests_then_cuts_the_stragglers() {
        let route = Route::new("shop");
        let _ = route.switch_to(&[upstream(1)]);
        let backend = route.candidates(&anyone()).0.get(0).unwrap().clone();
        let quick = InFlight::new(backend.clone());
        let draining = route.switch_to(&[upstream(2)]);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(quick);
        });
        assert_eq!(draining.finish(Duration::from_secs(5)).await.cut, 0);

        let _ = route.switch_to(&[upstream(1)]);
        let backend = route.candidates(&anyone()).0.get(0).unwrap().clone();
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
