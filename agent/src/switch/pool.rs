//! Keep-alive connections to one web container.
//!
//! A connection goes back to its pool when a response body has been read to
//! the end, and is reused only while fresh: app servers close idle
//! keep-alive connections after a few seconds (gunicorn's gthread workers
//! after 2 s), and reusing one as it closes would fail a request.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

use super::body::RequestBody;

/// A connection to a web container.
pub(crate) type Conn = SendRequest<RequestBody>;

/// Connections idle longer than this are closed rather than reused.
const MAX_IDLE: Duration = Duration::from_secs(1);
/// Idle connections kept per container.
const MAX_KEPT: usize = 128;
/// Longest wait for a container to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Idle connections, newest last, each with the switch thread whose
/// runtime drives it: a thread only reuses its own, so a request never
/// waits on another thread. Also the tasks driving every connection, so a
/// drain that gives up can close them all.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    idle: Mutex<Vec<(Conn, Instant, ThreadId)>>,
    drivers: Mutex<Vec<AbortHandle>>,
}

thread_local! {
    static HERE: ThreadId = std::thread::current().id();
}

fn here() -> ThreadId {
    HERE.with(|id| *id)
}

/// Whether an idle connection may carry another request: still open, and
/// idle for less than [`MAX_IDLE`].
fn reusable(conn: &Conn, since: Instant, now: Instant) -> bool {
    !conn.is_closed() && now.duration_since(since) < MAX_IDLE
}

impl Pool {
    /// The newest idle connection of this thread that is still fresh and open.
    pub fn take(&self) -> Option<Conn> {
        let here = here();
        let mut idle = self.idle.lock().ok()?;
        while let Some(newest) = idle.iter().rposition(|(_, _, thread)| *thread == here) {
            let (conn, since, _) = idle.remove(newest);
            if reusable(&conn, since, Instant::now()) {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps a connection whose last response was read to the end.
    pub fn put(&self, conn: Conn) {
        if conn.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() >= MAX_KEPT {
                let now = Instant::now();
                idle.retain(|(c, since, _)| reusable(c, *since, now));
            }
            if idle.len() < MAX_KEPT {
                idle.push((conn, Instant::now(), here()));
            }
        }
    }

    /// Closes every connection, idle or not: requests on them fail, their
    /// response bodies break off.
    pub fn close_all(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
        if let Ok(mut drivers) = self.drivers.lock() {
            for driver in drivers.drain(..) {
                driver.abort();
            }
        }
    }

    /// Closes the idle connections.
    pub fn clear(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    /// A new connection to `addr`.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        stream.set_nodelay(true)?;
        let (conn, driver) = Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        let task = tokio::spawn(async move {
            // Ends when the connection closes; an upgraded one hands its
            // socket over to the tunnel first.
            if let Err(e) = driver.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "upstream connection ended");
            }
        });
        if let Ok(mut drivers) = self.drivers.lock() {
            drivers.retain(|d| !d.is_finished());
            drivers.push(task.abort_handle());
        }
        Ok(conn)
    }
}
