//! The traffic switch: deployd's own reverse proxy on each app's public
//! address, so that a deploy or rollback never drops a request.
//!
//! Requests go to the live release's web containers, round-robin. When a
//! roll makes new containers healthy, the engine switches the app's
//! [`Route`] to them: from that instant every new request goes there, also
//! on client connections opened before. The old containers are then drained
//! (see [`Draining`]) and only stopped once their requests have finished.

mod body;
mod headers;
mod listener;
mod pool;
mod proxy;
mod route;
mod stats;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use headers::{HeadLimits, HeadTooLarge, check_head};
pub use route::{Drained, Draining, Route, Upstream};
pub use stats::{Figures, LATENCY_BOUNDS_US, Refusal, ReleaseStats, SwitchStats};

use crate::config::{Config, SwitchConfig};
use crate::limit::{self, Admission};

/// The routes of every app whose switch is on, by app name.
#[derive(Debug, Clone, Default)]
pub struct Routes(HashMap<String, Arc<Route>>);

impl Routes {
    /// An empty route for each app with a `switch` table.
    pub fn for_config(config: &Config) -> Self {
        Self(
            config
                .apps
                .iter()
                .filter(|(_, app)| app.switch.is_some())
                .map(|(name, _)| (name.clone(), Arc::new(Route::new(name))))
                .collect(),
        )
    }

    pub fn get(&self, app: &str) -> Option<&Arc<Route>> {
        self.0.get(app)
    }

    /// Every route, with its app's name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<Route>)> {
        self.0.iter()
    }
}

/// Why the public listeners could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for {app}: {reason}")]
pub struct ListenError {
    pub app: String,
    pub addr: SocketAddr,
    pub reason: String,
}

/// The public listeners, bound (or inherited from systemd) but not yet
/// serving.
#[derive(Debug)]
pub struct Switch {
    listeners: Vec<(Arc<Route>, SwitchConfig, std::net::TcpListener)>,
    threads: usize,
    /// Client connections each app may hold, after the open-file limit.
    connection_caps: HashMap<String, usize>,
}

/// Each switched app's connection cap, lowered where the open-file limit
/// (`open_files`) cannot hold them all: the API's connections and deployd's
/// own files come first, and every client connection may hold two more,
/// one to a container and a spooled body. Apps share what is left in
/// proportion to their caps.
fn connection_caps(config: &Config, open_files: u64) -> HashMap<String, usize> {
    let api = config.api.as_ref().map_or(0, |a| a.max_connections as u64);
    let budget = open_files.saturating_sub(limit::RESERVED_FDS + api) / 3;
    let wanted: u64 = config
        .apps
        .values()
        .filter_map(|app| app.switch.as_ref())
        .map(|s| s.max_connections as u64)
        .sum();
    let mut caps = HashMap::new();
    for (name, app) in &config.apps {
        let Some(switch) = &app.switch else { continue };
        let configured = switch.max_connections as u64;
        let cap = if wanted <= budget {
            configured
        } else {
            (budget * configured / wanted.max(1)).max(1)
        };
        if cap < configured {
            tracing::warn!(
                app = %name,
                max_connections = configured,
                cap,
                open_files,
                "switch.max_connections lowered to fit the open-file limit; raise LimitNOFILE"
            );
        }
        caps.insert(name.clone(), usize::try_from(cap).unwrap_or(usize::MAX));
    }
    caps
}

impl Switch {
    /// Takes each switched app's listener from systemd's `LISTEN_FDS` when
    /// one is on its address, else binds it.
    pub fn bind(config: &Config, routes: &Routes) -> Result<Self, ListenError> {
        let mut inherited = listener::inherited();
        let mut listeners = Vec::new();
        for (app, cfg) in &config.apps {
            let (Some(switch), Some(route)) = (&cfg.switch, routes.get(app)) else {
                continue;
            };
            let fail = |reason: String| ListenError {
                app: app.clone(),
                addr: switch.listen,
                reason,
            };
            let passed = inherited
                .iter()
                .position(|l| l.local_addr().is_ok_and(|a| a == switch.listen));
            let listener = match passed {
                Some(i) => {
                    tracing::info!(%app, addr = %switch.listen, "using the listener systemd passed");
                    inherited.swap_remove(i)
                }
                None => {
                    std::net::TcpListener::bind(switch.listen).map_err(|e| fail(e.to_string()))?
                }
            };
            listener
                .set_nonblocking(true)
                .map_err(|e| fail(e.to_string()))?;
            listeners.push((route.clone(), switch.clone(), listener));
        }
        for unused in inherited {
            tracing::warn!(addr = ?unused.local_addr().ok(), "a passed listener matches no app's switch.listen");
        }
        Ok(Self {
            listeners,
            threads: config.switch_threads.max(1),
            connection_caps: connection_caps(config, limit::open_files()),
        })
    }

    /// Starts serving every listener; requests wait until their app's live
    /// containers are known.
    ///
    /// The switch runs on threads of its own (`switch_threads`), each with
    /// a single-threaded runtime; the first also accepts, and hands the
    /// connections to the threads in turn. A connection, its requests and
    /// the container connections serving them stay on one thread (no
    /// hand-offs between threads per request), as in nginx's worker
    /// processes; the engine and the API keep their own runtime.
    pub fn serve(self) -> Result<Serving, ListenError> {
        let closing = CancellationToken::new();
        let closed = Arc::new(AtomicBool::new(false));
        let threads = TaskTracker::new();
        let mut addrs = HashMap::new();
        let mut drain = Duration::ZERO;
        let mut served = Vec::new();
        for (route, cfg, listener) in self.listeners {
            let fail = |reason: String| ListenError {
                app: route.app().to_owned(),
                addr: cfg.listen,
                reason,
            };
            let addr = listener.local_addr().map_err(|e| fail(e.to_string()))?;
            tracing::info!(app = %route.app(), %addr, "switch listening (HTTP)");
            addrs.insert(route.app().to_owned(), addr);
            drain = drain.max(cfg.drain_timeout);
            let head_limits = HeadLimits {
                line: byte_count(cfg.max_header_line),
                total: byte_count(cfg.max_header_size),
            };
            let proxy = Arc::new(proxy::Proxy {
                route: route.clone(),
                upstream_timeout: cfg.upstream_timeout,
                trust_forwarded: cfg.trust_forwarded_headers,
                closing: closing.clone(),
                closed: closed.clone(),
                bodies: body::BodyLimits {
                    in_memory: cfg.max_buffered_body.as_u64(),
                    max: cfg.max_body.as_u64(),
                    timeout: cfg.body_timeout,
                    read_ahead: byte_count(cfg.max_buffered_response),
                    budget: body::Budget::new(byte_count(cfg.buffer_memory)),
                },
                head_limits,
            });
            let cap = self
                .connection_caps
                .get(route.app())
                .copied()
                .unwrap_or(cfg.max_connections);
            let site = listener::Site {
                proxy,
                idle_timeout: cfg.idle_timeout,
                admission: Admission::new(cap, cfg.connections_per_address()),
                read_buffer: head_limits.read_buffer(),
            };
            served.push((Arc::new(site), listener));
        }
        let threads_wanted = if served.is_empty() { 0 } else { self.threads };
        let (queues, mut receivers): (Vec<_>, Vec<_>) = (0..threads_wanted)
            .map(|_| tokio::sync::mpsc::unbounded_channel())
            .unzip();
        let workers = Arc::new(listener::Workers::new(queues));
        // The first thread also accepts, for every listener.
        let mut acceptors = served;
        for index in 0..threads_wanted {
            let queue = receivers.remove(0);
            let accept = if index == 0 {
                Some((std::mem::take(&mut acceptors), workers.clone()))
            } else {
                None
            };
            let running = threads.token();
            std::thread::Builder::new()
                .name(format!("deployd-switch-{index}"))
                .spawn(move || {
                    worker(queue, accept);
                    drop(running);
                })
                .map_err(|e| ListenError {
                    app: String::new(),
                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                    reason: format!("cannot start a switch thread: {e}"),
                })?;
        }
        threads.close();
        Ok(Serving {
            closing,
            closed,
            threads,
            addrs,
            drain,
        })
    }
}

/// What the accepting thread serves: each listener with its site.
type Acceptors = Vec<(Arc<listener::Site>, std::net::TcpListener)>;

/// A configured size as a byte count in memory.
pub(crate) fn byte_count(size: bytesize::ByteSize) -> usize {
    usize::try_from(size.as_u64()).unwrap_or(usize::MAX)
}

/// One switch thread: serves the connections handed to it; the first also
/// accepts them, until shutdown.
fn worker(
    queue: tokio::sync::mpsc::UnboundedReceiver<listener::Accepted>,
    accept: Option<(Acceptors, Arc<listener::Workers>)>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a switch runtime");
            return;
        }
    };
    runtime.block_on(async move {
        if let Some((acceptors, workers)) = accept {
            let mut accepting = Vec::new();
            for (site, listener) in acceptors {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => {
                        accepting.push(listener::accept(listener, site, workers.clone()))
                    }
                    Err(e) => tracing::error!(error = %e, "cannot serve a switch listener"),
                }
            }
            drop(workers);
            // Accept until shutdown; dropping the last handle to the
            // workers then lets every thread finish its connections.
            tokio::spawn(async move {
                futures_util::future::join_all(accepting).await;
            });
        }
        listener::work(queue).await;
    });
}

/// Public listeners being served.
#[derive(Debug)]
pub struct Serving {
    closing: CancellationToken,
    closed: Arc<AtomicBool>,
    /// One token per switch thread, dropped when the thread ends.
    threads: TaskTracker,
    addrs: HashMap<String, SocketAddr>,
    drain: Duration,
}

impl Serving {
    /// Where an app's switch listens.
    pub fn addr(&self, app: &str) -> Option<SocketAddr> {
        self.addrs.get(app).copied()
    }

    /// Stops accepting and closes client connections cleanly, waiting up to
    /// the longest drain timeout for requests in flight.
    pub async fn shutdown(self) {
        self.closed.store(true, Ordering::Relaxed);
        self.closing.cancel();
        if tokio::time::timeout(self.drain, self.threads.wait())
            .await
            .is_err()
        {
            tracing::warn!("requests still running at shutdown were cut");
        }
    }
}
