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
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use super::proxy::Proxy;

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

/// Serves one app's public listener until `closing` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    idle_timeout: Duration,
    connections: TaskTracker,
) {
    let closing = proxy.closing.clone();
    loop {
        let (stream, peer) = tokio::select! {
            () = closing.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: back off, keep serving.
                    tracing::warn!(app = %proxy.route.app(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(connection(stream, peer, proxy.clone(), idle_timeout));
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    idle_timeout: Duration,
) {
    let closing = proxy.closing.clone();
    let service = service_fn(move |req| {
        let proxy = proxy.clone();
        async move { Ok::<_, Infallible>(proxy.forward(peer, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(idle_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = closing.cancelled() => {}
    }
    tokio::select! {
        _ = conn.as_mut() => return,
        () = tokio::time::sleep(CLOSE_GRACE) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}
