//! Forwarding one request to a live web container and its answer back.
//!
//! The request keeps its Host; hop-by-hop headers are dropped and
//! `X-Forwarded-For`/`-Proto`/`-Host` are set: replaced when deployd is the
//! edge, added to when it trusts the load balancer in front of it. Bodies stream both
//! ways. A container that refuses the connection is skipped for the next
//! one; a request the container never got is sent again on a fresh
//! connection, and so is a GET (or another safe method without a body)
//! whose reused connection failed under it. WebSocket (any `Upgrade`) requests become a
//! tunnel once the container answers 101.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use super::pool::{Conn, UpstreamBody};
use super::route::{Backend, InFlight, Route};

/// The 504 of a request still unanswered when its release's drain gave up.
const OUTLIVED_DRAIN: &str = "the request outlived the drain of its release";

/// Any error a response body can end with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the switch answers with: a container's body, or a short one of its
/// own. An enum rather than a boxed body: one allocation less per request.
pub(crate) enum ProxyBody {
    Upstream(Tracked),
    Own(Option<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Upstream(tracked) => Pin::new(tracked).poll_frame(cx),
            Self::Own(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream(tracked) => tracked.is_end_stream(),
            Self::Own(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream(tracked) => tracked.size_hint(),
            Self::Own(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// Forwards requests for one app.
#[derive(Debug)]
pub(crate) struct Proxy {
    pub route: Arc<Route>,
    pub upstream_timeout: Duration,
    /// Whether the client's `X-Forwarded-*` headers are kept (a trusted load
    /// balancer in front) or replaced.
    pub trust_forwarded: bool,
    /// Fires when deployd shuts down: no more accepting.
    pub closing: CancellationToken,
    /// Set at the same time, read per answer (a plain load): answers then
    /// carry `Connection: close`.
    pub closed: Arc<AtomicBool>,
}

/// The request as it goes upstream, kept to build it again for a retry.
struct Head {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    /// No body: the request can be sent again.
    bodiless: bool,
}

/// How one attempt on a connection ended.
enum Sent {
    Answer(Response<Incoming>),
    /// The connection closed before the request went out: here it is back.
    Unsent(Request<UpstreamBody>),
    Failed(hyper::Error),
    TimedOut,
    Cancelled,
}

impl Proxy {
    /// Forwards one request of the client at `peer` (its address as a
    /// header value, made once per connection).
    pub async fn forward(
        &self,
        peer: &HeaderValue,
        mut req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        if req.method() == Method::CONNECT {
            return answer(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not proxied");
        }
        if !self.route.known(self.upstream_timeout).await {
            return answer(StatusCode::SERVICE_UNAVAILABLE, "no release is live yet");
        }
        let upgrade = upgrade_protocol(req.headers());
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let head = Head {
            method: parts.method,
            uri: origin_form(&parts.uri),
            headers: upstream_headers(parts.headers, peer, upgrade, self.trust_forwarded),
            bodiless: body.is_end_stream(),
        };
        let mut body: Option<UpstreamBody> = Some(if head.bodiless {
            Either::Right(Empty::new())
        } else {
            Either::Left(body)
        });
        let candidates = self.route.candidates();
        if candidates.len() == 0 {
            return answer(StatusCode::SERVICE_UNAVAILABLE, "no web container is live");
        }
        let mut index = 0;
        let mut fresh = false;
        // Every container once, plus a fresh connection after a stale one.
        for _ in 0..candidates.len() + 2 {
            let Some(backend) = candidates.get(index) else {
                break;
            };
            let pooled = if fresh { None } else { backend.pool.take() };
            let (conn, reused) = match pooled {
                Some(conn) => (conn, true),
                None if backend.cancel.is_cancelled() => {
                    return answer(StatusCode::GATEWAY_TIMEOUT, OUTLIVED_DRAIN);
                }
                None => match backend.pool.connect(backend.upstream.addr).await {
                    Ok(conn) => (conn, false),
                    Err(e) => {
                        tracing::warn!(app = %self.route.app(), upstream = %backend.upstream.addr,
                            error = %e, "web container refused a connection; trying the next");
                        backend.mark_down();
                        index += 1;
                        fresh = false;
                        continue;
                    }
                },
            };
            backend.mark_up();
            let Some(request_body) = body.take() else {
                break;
            };
            let guard = InFlight::new(backend.clone());
            match self.send(backend, conn, head.build(request_body)).await {
                (Sent::Answer(resp), conn) => {
                    return self.relay(resp, conn, guard, backend, client_upgrade);
                }
                (Sent::Unsent(request), _) => {
                    body = Some(request.into_body());
                    fresh = true;
                }
                (Sent::Failed(e), _) if reused && head.replayable() => {
                    tracing::debug!(error = %e, "reused connection failed; sending again");
                    body = Some(Either::Right(Empty::new()));
                    fresh = true;
                }
                (Sent::Failed(e), _) => {
                    tracing::warn!(app = %self.route.app(), upstream = %backend.upstream.addr,
                        error = %e, "web container failed the request");
                    return answer(
                        StatusCode::BAD_GATEWAY,
                        "the web container failed the request",
                    );
                }
                (Sent::TimedOut, _) => {
                    return answer(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the web container did not answer in time",
                    );
                }
                (Sent::Cancelled, _) => {
                    return answer(StatusCode::GATEWAY_TIMEOUT, OUTLIVED_DRAIN);
                }
            }
        }
        answer(StatusCode::BAD_GATEWAY, "no web container could be reached")
    }

    async fn send(
        &self,
        backend: &Backend,
        mut conn: Conn,
        request: Request<UpstreamBody>,
    ) -> (Sent, Conn) {
        let sent = async {
            if conn.ready().await.is_err() {
                return Sent::Unsent(request);
            }
            match conn.try_send_request(request).await {
                Ok(resp) => Sent::Answer(resp),
                Err(mut e) => match e.take_message() {
                    Some(request) => Sent::Unsent(request),
                    None => Sent::Failed(e.into_error()),
                },
            }
        };
        let outcome = tokio::time::timeout(self.upstream_timeout, sent)
            .await
            .unwrap_or(Sent::TimedOut);
        // A drain that gave up closed the connection under the request.
        let outcome = match outcome {
            Sent::Failed(_) | Sent::Unsent(_) if backend.cancel.is_cancelled() => Sent::Cancelled,
            other => other,
        };
        (outcome, conn)
    }

    /// The container's answer, passed on to the client.
    fn relay(
        &self,
        mut resp: Response<Incoming>,
        conn: Conn,
        guard: InFlight,
        backend: &Arc<Backend>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<ProxyBody> {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client) = client_upgrade else {
                return answer(
                    StatusCode::BAD_GATEWAY,
                    "the web container switched protocols unasked",
                );
            };
            // The connection now belongs to the tunnel.
            drop(conn);
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(tunnel(client, upstream, guard, backend.cancel.clone()));
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, ProxyBody::Own(None));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if self.closed.load(Ordering::Relaxed) {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let body = Tracked {
            inner: body,
            done: Some((conn, guard)),
            backend: backend.clone(),
        };
        Response::from_parts(parts, ProxyBody::Upstream(body))
    }
}

impl Head {
    /// Whether the request may be sent again after it may have reached the
    /// container: no body and a safe method, never a POST, even an empty one.
    fn replayable(&self) -> bool {
        self.bodiless
            && matches!(
                self.method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
            )
    }

    fn build(&self, body: UpstreamBody) -> Request<UpstreamBody> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// A response body from a container: holds its request in flight until it
/// ends, then gives the connection back. A drain that gives up closes the
/// connection, which ends the body with an error (the client's connection
/// is then cut: its answer is incomplete).
pub(crate) struct Tracked {
    inner: Incoming,
    done: Option<(Conn, InFlight)>,
    backend: Arc<Backend>,
}

impl Tracked {
    fn finish(&mut self, reuse: bool) {
        if let Some((conn, guard)) = self.done.take() {
            if reuse {
                self.backend.pool.put(conn);
            }
            drop(guard);
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(None) => {
                self.finish(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.finish(false);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // An empty body may never be polled: its connection is still good.
        let reuse = self.inner.is_end_stream();
        self.finish(reuse);
    }
}

/// A short plain-text answer from the switch itself.
pub(crate) fn answer(status: StatusCode, message: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::Own(Some(Bytes::from_static(message.as_bytes()))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn origin_form(uri: &Uri) -> Uri {
    uri.path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()))
}

/// The protocol a request asks to upgrade to (`Connection: upgrade` with
/// an `Upgrade` header).
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Headers that describe one connection, not the message.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names, no hashing.
    let any = headers
        .keys()
        .any(|name| name == header::UPGRADE || HOP_BY_HOP.contains(name));
    if !any {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

fn upstream_headers(
    mut headers: HeaderMap,
    peer: &HeaderValue,
    upgrade: Option<HeaderValue>,
    trust_forwarded: bool,
) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    // hyper already answered the client's 100-continue when the body was read.
    headers.remove(header::EXPECT);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
    let forwarded_for = HeaderName::from_static("x-forwarded-for");
    let forwarded_proto = HeaderName::from_static("x-forwarded-proto");
    let forwarded_host = HeaderName::from_static("x-forwarded-host");
    let earlier = headers.get(&forwarded_for).and_then(|v| v.to_str().ok());
    match (earlier, peer.to_str()) {
        (Some(earlier), Ok(peer)) if trust_forwarded => {
            if let Ok(chain) = HeaderValue::from_str(&format!("{earlier}, {peer}")) {
                headers.insert(&forwarded_for, chain);
            }
        }
        _ => {
            headers.insert(&forwarded_for, peer.clone());
        }
    }
    if !(trust_forwarded && headers.contains_key(&forwarded_proto)) {
        headers.insert(&forwarded_proto, HeaderValue::from_static("http"));
    }
    if !(trust_forwarded && headers.contains_key(&forwarded_host)) {
        match headers.get(header::HOST).cloned() {
            Some(host) => headers.insert(&forwarded_host, host),
            None => headers.remove(&forwarded_host),
        };
    }
    headers
}

/// Copies bytes both ways between an upgraded client connection and the
/// container until either side closes or a drain gives up.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    guard: InFlight,
    cancel: CancellationToken,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        () = cancel.cancelled() => {}
    }
    drop(guard);
}
