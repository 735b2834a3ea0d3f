//! The API behind TLS, with handshake and header timeouts, connection
//! caps, graceful shutdown and certificate reloading.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::Handle;
use axum_server::accept::Accept;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::{ApiState, Limits, TlsError, router, server_config};
use crate::config::ApiConfig;
use crate::limit::{Admission, Admitted};
use crate::switch::HeadLimits;

/// A running API server.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    handle: Handle<SocketAddr>,
    tls: RustlsConfig,
    task: JoinHandle<std::io::Result<()>>,
}

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
}

impl Server {
    /// Listens on `api.listen` (port 0 picks one) and serves until shut down.
    pub async fn start(state: ApiState, api: &ApiConfig) -> Result<Self, ServeError> {
        let tls = RustlsConfig::from_config(server_config(api)?);
        let limits = Limits {
            request_timeout: api.request_timeout,
            max_concurrent_requests: api.max_concurrent_requests,
            head: HeadLimits {
                line: crate::switch::byte_count(api.max_header_line),
                total: crate::switch::byte_count(api.max_header_size),
            },
            streams_per_token: api.max_streams_per_token,
            streams_per_address: api.max_streams_per_address,
        };
        let app = router(state, limits);
        let handle = Handle::new();
        let listener = std::net::TcpListener::bind(api.listen).map_err(|e| ServeError::Listen {
            addr: api.listen,
            reason: e.to_string(),
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ServeError::Listen {
                addr: api.listen,
                reason: e.to_string(),
            })?;
        let acceptor = Capped {
            inner: RustlsAcceptor::new(tls.clone()).handshake_timeout(api.handshake_timeout),
            admission: Admission::new(api.max_connections, Some(api.max_connections_per_address)),
        };
        let mut server = axum_server::from_tcp(listener)
            .map_err(|e| ServeError::Listen {
                addr: api.listen,
                reason: e.to_string(),
            })?
            .acceptor(acceptor)
            .handle(handle.clone())
            .first_request_timeout(api.header_timeout);
        server
            .http_builder()
            .http1()
            .header_read_timeout(api.header_timeout)
            .max_buf_size(limits.head.read_buffer());
        let task =
            tokio::spawn(server.serve(app.into_make_service_with_connect_info::<SocketAddr>()));
        let addr = handle.listening().await.ok_or_else(|| ServeError::Listen {
            addr: api.listen,
            reason: "the server did not start".into(),
        })?;
        tracing::info!(%addr, "API listening (TLS)");
        Ok(Self {
            addr,
            handle,
            tls,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Reads the certificate and key again; new connections get them.
    pub fn reload_tls(&self, api: &ApiConfig) -> Result<(), TlsError> {
        self.tls.reload_from_config(server_config(api)?);
        Ok(())
    }

    /// Stops accepting, lets requests in flight finish for up to `grace`,
    /// then closes what is left (event streams, say).
    pub async fn shutdown(self, grace: Duration) {
        self.handle.graceful_shutdown(Some(grace));
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "API server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "API server task failed"),
        }
    }
}

/// An acceptor that closes a connection past `api.max_connections` (or its
/// address's share) at once, before its TLS handshake, and counts the rest
/// until they close.
#[derive(Debug, Clone)]
struct Capped<A> {
    inner: A,
    admission: Arc<Admission>,
}

impl<A, S> Accept<TcpStream, S> for Capped<A>
where
    A: Accept<TcpStream, S>,
    A::Future: Send + 'static,
{
    type Stream = CountedStream<A::Stream>;
    type Service = A::Service;
    type Future =
        Pin<Box<dyn Future<Output = std::io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let peer = stream.peer_addr().map(|a| a.ip());
        let admitted = match peer {
            Ok(ip) => self.admission.admit(ip).map_err(|full| {
                tracing::debug!(%ip, ?full, "API connection past its cap, closed");
                std::io::Error::other("connection cap reached")
            }),
            Err(e) => Err(e),
        };
        let accepting = admitted.map(|admitted| (admitted, self.inner.accept(stream, service)));
        Box::pin(async move {
            let (admitted, accepting) = accepting?;
            let (stream, service) = accepting.await?;
            Ok((
                CountedStream {
                    inner: stream,
                    _admitted: admitted,
                },
                service,
            ))
        })
    }
}

/// A connection counted against the API's caps while it is open.
#[derive(Debug)]
struct CountedStream<T> {
    inner: T,
    _admitted: Admitted,
}

impl<T: AsyncRead + Unpin> AsyncRead for CountedStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountedStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
