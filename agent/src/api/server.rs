//! The API behind TLS, with handshake and header timeouts, graceful
//! shutdown and certificate reloading.

use std::net::SocketAddr;
use std::time::Duration;

use axum_server::Handle;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use tokio::task::JoinHandle;

use super::{ApiState, Limits, TlsError, router, server_config};
use crate::config::ApiConfig;

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
        let acceptor = RustlsAcceptor::new(tls.clone()).handshake_timeout(api.handshake_timeout);
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
            .header_read_timeout(api.header_timeout);
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
