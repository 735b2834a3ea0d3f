//! The public listeners: where they come from (systemd socket activation or
//! a bind of our own) and how client connections are served and closed.
//!
//! At shutdown no connection is refused if systemd holds the socket: deployd
//! stops accepting (new connections wait in the socket's queue for the next
//! deployd), answers each keep-alive client's next request with
//! `Connection: close`, closes connections idle past a short grace, and
//! waits for requests in flight.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::proxy::Proxy;
use super::stats::Refusal;
use crate::limit::{Admission, Admitted, Full};

/// How long a keep-alive connection may stay idle once shutdown began: a
/// client mid-loop sends its next request within it and gets a clean close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Listening sockets handed over by systemd (`LISTEN_FDS`), by address.
pub(crate) fn inherited() -> Vec<std::net::TcpListener> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut found = Vec::new();
    for index in 0..fds.len() {
        match fds.take_tcp_listener(index) {
            Ok(Some(listener)) => found.push(listener),
            Ok(None) => {}
            Err(e) => tracing::warn!(index, error = %e, "passed socket is not a TCP listener"),
        }
    }
    found
}

/// One app's public listener: how its connections are served.
#[derive(Debug)]
pub(crate) struct Site {
    pub proxy: Arc<Proxy>,
    pub idle_timeout: Duration,
    /// Client connections open at once, in all and per address.
    pub admission: Arc<Admission>,
    /// hyper's read buffer per connection: the longest request head.
    pub read_buffer: usize,
}

/// An accepted client connection, on its way to a switch thread.
#[derive(Debug)]
pub(crate) struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    site: Arc<Site>,
    admitted: Admitted,
}

/// The switch threads, fed accepted connections in turn: the kernel would
/// otherwise give most of a burst of connections to whichever thread woke
/// first.
#[derive(Debug)]
pub(crate) struct Workers {
    queues: Vec<mpsc::UnboundedSender<Accepted>>,
    next: AtomicUsize,
}

impl Workers {
    pub fn new(queues: Vec<mpsc::UnboundedSender<Accepted>>) -> Self {
        Self {
            queues,
            next: AtomicUsize::new(0),
        }
    }

    fn hand_over(&self, accepted: Accepted) {
        let n = self.queues.len().max(1);
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut accepted = Some(accepted);
        // A queue whose thread ended is skipped.
        for i in 0..n {
            let Some(a) = accepted.take() else { return };
            match self.queues.get((first + i) % n).map(|q| q.send(a)) {
                Some(Ok(())) => return,
                Some(Err(mpsc::error::SendError(a))) => accepted = Some(a),
                None => return,
            }
        }
    }
}

/// The first pause after a failed accept; doubled while accepting keeps
/// failing, up to [`MAX_ACCEPT_PAUSE`].
const ACCEPT_PAUSE: Duration = Duration::from_millis(10);
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// Accepts on one app's public listener until `closing` fires, handing each
/// connection to a switch thread. A connection past a cap is closed at
/// once. When accepting fails (out of file descriptors: EMFILE) the loop
/// pauses, longer while it keeps failing, instead of spinning on a socket
/// that stays readable.
pub(crate) async fn accept(listener: TcpListener, site: Arc<Site>, workers: Arc<Workers>) {
    let closing = site.proxy.closing.clone();
    let app = site.proxy.route.app().to_owned();
    let mut pause = ACCEPT_PAUSE;
    let mut failures: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            () = closing.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    failures += 1;
                    // Logged once per run of failures, not per attempt.
                    if failures == 1 {
                        tracing::warn!(%app, error = %e, "accepting connections fails; backing off");
                    }
                    tokio::select! {
                        () = closing.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(MAX_ACCEPT_PAUSE);
                    continue;
                }
            },
        };
        if failures > 0 {
            tracing::info!(%app, failures, "accepting connections again");
            failures = 0;
            pause = ACCEPT_PAUSE;
        }
        let admitted = match site.admission.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(full) => {
                site.proxy.route.stats.refused(match full {
                    Full::Total => Refusal::Connections,
                    Full::Address => Refusal::ConnectionsPerAddress,
                });
                // Closed at once: the file descriptor is free again.
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match stream.into_std() {
            Ok(stream) => workers.hand_over(Accepted {
                stream,
                peer,
                site: site.clone(),
                admitted,
            }),
            Err(e) => tracing::warn!(error = %e, "accepted connection lost"),
        }
    }
}

/// One switch thread's work: serves the connections handed to it until no
/// more can come, then waits for them to end.
pub(crate) async fn work(mut queue: mpsc::UnboundedReceiver<Accepted>) {
    let connections = TaskTracker::new();
    while let Some(accepted) = queue.recv().await {
        match tokio::net::TcpStream::from_std(accepted.stream) {
            Ok(stream) => {
                connections.spawn(connection(
                    stream,
                    accepted.peer,
                    accepted.site,
                    accepted.admitted,
                ));
            }
            Err(e) => tracing::warn!(error = %e, "accepted connection lost"),
        }
    }
    connections.close();
    connections.wait().await;
}

/// A client connection's requests, watched for its idle timeout: one timer
/// per connection that wakes once per timeout, rather than one per request.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    /// When the last request ended (or the connection opened), as
    /// milliseconds since `opened`.
    idle_since: AtomicU64,
    /// Requests whose answer is not yet written out.
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            idle_since: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        })
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A request starts; it ends when the guard drops.
    fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    fn in_progress(&self) -> bool {
        self.busy.load(Ordering::Acquire) > 0
    }

    /// How long until the connection has been idle for `timeout`: `None`
    /// once it has, or a wait before looking again.
    fn idle_for(&self, timeout: Duration) -> Option<Duration> {
        if self.in_progress() {
            return Some(timeout);
        }
        let idle = self
            .elapsed_ms()
            .saturating_sub(self.idle_since.load(Ordering::Acquire));
        timeout
            .checked_sub(Duration::from_millis(idle))
            .filter(|left| !left.is_zero())
    }
}

/// A request in progress on a client connection.
#[derive(Debug)]
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .idle_since
            .store(activity.elapsed_ms(), Ordering::Release);
        activity.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    site: Arc<Site>,
    admitted: Admitted,
) {
    // Counted until the connection ends, or the tunnel it became does.
    let admitted = Arc::new(admitted);
    let proxy = site.proxy.clone();
    let idle_timeout = site.idle_timeout;
    let closing = proxy.closing.clone();
    let peer = match http::HeaderValue::from_str(&peer.ip().to_string()) {
        Ok(peer) => peer,
        Err(_) => http::HeaderValue::from_static("unknown"),
    };
    let activity = Activity::new();
    let watched = activity.clone();
    let service = service_fn(move |req| {
        let proxy = proxy.clone();
        let peer = peer.clone();
        let admitted = admitted.clone();
        let busy = watched.begin();
        async move {
            let response = proxy.forward(&peer, &admitted, req).await;
            // The request stays busy until its answer's body is dropped:
            // written out, or the connection gone.
            Ok::<_, Infallible>(response.map(|body| {
                body.map_frame(move |frame| {
                    let _busy = &busy;
                    frame
                })
            }))
        }
    });
    // No per-request header timer in hyper: the idle watch below also ends
    // a connection whose request headers do not arrive in time.
    let conn = http1::Builder::new()
        .keep_alive(true)
        .max_buf_size(site.read_buffer)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    // Serving, the connection is closed once idle for `idle_timeout`. When
    // deployd shuts down, a keep-alive client gets a short grace to send its
    // next request (answered with `Connection: close`). Either way hyper then
    // closes it once its request in progress is answered; one with nothing in
    // progress (idle, or still sending a request's headers) is cut.
    let mut wait = idle_timeout;
    let mut shutdown = false;
    let mut closing_down = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            () = closing.cancelled(), if !shutdown => {
                shutdown = true;
                if !closing_down {
                    wait = CLOSE_GRACE;
                }
            }
            () = tokio::time::sleep(wait) => {
                if closing_down {
                    if !activity.in_progress() {
                        return;
                    }
                    wait = CLOSE_GRACE;
                    continue;
                }
                let left = if shutdown { None } else { activity.idle_for(idle_timeout) };
                match left {
                    Some(left) => wait = left,
                    None => {
                        conn.as_mut().graceful_shutdown();
                        closing_down = true;
                        wait = CLOSE_GRACE;
                    }
                }
            }
        }
    }
}
