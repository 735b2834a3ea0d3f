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
use super::route::{Backend, InFlight, Route, UpstreamError};

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

/// A copy of a request with a safe method and no body, kept while it goes
/// out on a reused connection: if that connection fails under it, it is
/// sent again on a fresh one.
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
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
    pub async fn forward(&self, peer: &HeaderValue, req: Request<Incoming>) -> Response<ProxyBody> {
        let response = self.answer(peer, req).await;
        self.route.stats.answered(response.status());
        response
    }

    async fn answer(&self, peer: &HeaderValue, mut req: Request<Incoming>) -> Response<ProxyBody> {
        if req.method() == Method::CONNECT {
            return answer(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not proxied");
        }
        if !self.route.known(self.upstream_timeout).await {
            return answer(StatusCode::SERVICE_UNAVAILABLE, "no release is live yet");
        }
        let connection = ConnectionHeaders::of(req.headers());
        let upgrade = upgrade_protocol(req.headers(), &connection);
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        // Only a safe method without a body may be sent again once it may
        // have reached the container: never a POST, even an empty one.
        let bodiless = body.is_end_stream();
        let replayable = bodiless
            && matches!(
                parts.method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
            );
        let body = if bodiless {
            Either::Right(Empty::new())
        } else {
            Either::Left(body)
        };
        let mut request = Some(upstream_request(
            parts.method,
            origin_form(&parts.uri),
            upstream_headers(
                parts.headers,
                &connection,
                peer,
                upgrade,
                self.trust_forwarded,
            ),
            body,
        ));
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
                    self.route.stats.upstream_error(UpstreamError::Drained);
                    return answer(StatusCode::GATEWAY_TIMEOUT, OUTLIVED_DRAIN);
                }
                None => match backend.pool.connect(backend.upstream.addr).await {
                    Ok(conn) => (conn, false),
                    Err(e) => {
                        tracing::warn!(app = %self.route.app(), upstream = %backend.upstream.addr,
                            error = %e, "web container refused a connection; trying the next");
                        self.route.stats.upstream_error(UpstreamError::Refused);
                        backend.mark_down();
                        index += 1;
                        fresh = false;
                        continue;
                    }
                },
            };
            backend.mark_up();
            let Some(sending) = request.take() else {
                break;
            };
            let mut replay = (reused && replayable).then(|| Replay::of(&sending));
            let guard = InFlight::new(backend.clone());
            match self.send(backend, conn, sending).await {
                (Sent::Answer(resp), conn) => {
                    return self.relay(resp, conn, guard, backend, client_upgrade);
                }
                (Sent::Unsent(unsent), _) => {
                    request = Some(unsent);
                    fresh = true;
                }
                (Sent::Failed(e), _) if replay.is_some() => {
                    tracing::debug!(error = %e, "reused connection failed; sending again");
                    request = replay.take().map(Replay::request);
                    fresh = true;
                }
                (Sent::Failed(e), _) => {
                    tracing::warn!(app = %self.route.app(), upstream = %backend.upstream.addr,
                        error = %e, "web container failed the request");
                    self.route.stats.upstream_error(UpstreamError::Failed);
                    return answer(
                        StatusCode::BAD_GATEWAY,
                        "the web container failed the request",
                    );
                }
                (Sent::TimedOut, _) => {
                    self.route.stats.upstream_error(UpstreamError::Timeout);
                    return answer(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the web container did not answer in time",
                    );
                }
                (Sent::Cancelled, _) => {
                    self.route.stats.upstream_error(UpstreamError::Drained);
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
        ConnectionHeaders::of(&parts.headers).strip(&mut parts.headers);
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

impl Replay {
    fn of(request: &Request<UpstreamBody>) -> Self {
        Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            headers: request.headers().clone(),
        }
    }

    fn request(self) -> Request<UpstreamBody> {
        upstream_request(
            self.method,
            self.uri,
            self.headers,
            Either::Right(Empty::new()),
        )
    }
}

fn upstream_request(
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: UpstreamBody,
) -> Request<UpstreamBody> {
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    request
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

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, not the message; `Expect` too,
/// since hyper answers a client's 100-continue itself when the body is read.
static HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::EXPECT,
    KEEP_ALIVE,
    PROXY_CONNECTION,
];

/// The headers of one message that must not be passed on: hop-by-hop ones
/// and those its `Connection` names. Also whether `Connection` asks for an
/// upgrade. Found in one pass over the headers, without hashing or
/// allocating for the usual `Connection: keep-alive` or `close`.
#[derive(Debug, Default, PartialEq, Eq)]
struct ConnectionHeaders {
    /// Which of [`HOP_BY_HOP`] are present, one bit each.
    present: u16,
    /// Other headers `Connection` names.
    named: Vec<HeaderName>,
    upgrade: bool,
}

impl ConnectionHeaders {
    fn of(headers: &HeaderMap) -> Self {
        let mut found = Self::default();
        for (name, value) in headers {
            // Names are lowercase: a match on the string compares lengths
            // first, cheaper than comparing names one by one.
            let index = match name.as_str() {
                "connection" => 0,
                "upgrade" => 1,
                "te" => 2,
                "trailer" => 3,
                "transfer-encoding" => 4,
                "proxy-authenticate" => 5,
                "proxy-authorization" => 6,
                "expect" => 7,
                "keep-alive" => 8,
                "proxy-connection" => 9,
                _ => continue,
            };
            found.present |= 1 << index;
            if index != 0 {
                continue;
            }
            let tokens = value.to_str().unwrap_or_default().split(',');
            for token in tokens.map(str::trim) {
                if token.eq_ignore_ascii_case("upgrade") {
                    found.upgrade = true;
                } else if token.is_empty()
                    || token.eq_ignore_ascii_case("close")
                    || token.eq_ignore_ascii_case("keep-alive")
                {
                    // Not a header, or a hop-by-hop one found by its name.
                } else if let Ok(named) = HeaderName::from_bytes(token.as_bytes())
                    && !found.named.contains(&named)
                {
                    found.named.push(named);
                }
            }
        }
        found
    }

    fn strip(&self, headers: &mut HeaderMap) {
        if self.present == 0 {
            return;
        }
        for (index, name) in HOP_BY_HOP.iter().enumerate() {
            if self.present & (1 << index) != 0 {
                headers.remove(name);
            }
        }
        for name in &self.named {
            headers.remove(name);
        }
    }
}

/// The protocol a request asks to upgrade to: `Connection: upgrade` with
/// an `Upgrade` header.
fn upgrade_protocol(headers: &HeaderMap, connection: &ConnectionHeaders) -> Option<HeaderValue> {
    if connection.upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// The request's headers as they go to the container.
fn upstream_headers(
    mut headers: HeaderMap,
    connection: &ConnectionHeaders,
    peer: &HeaderValue,
    upgrade: Option<HeaderValue>,
    trust_forwarded: bool,
) -> HeaderMap {
    connection.strip(&mut headers);
    headers.reserve(3);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
    let host = headers.get(header::HOST).cloned();
    if !trust_forwarded {
        headers.insert(X_FORWARDED_FOR, peer.clone());
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        match host {
            Some(host) => headers.insert(X_FORWARDED_HOST, host),
            None => headers.remove(X_FORWARDED_HOST),
        };
        return headers;
    }
    let earlier = headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok());
    let chain = match (earlier, peer.to_str()) {
        (Some(earlier), Ok(peer)) => HeaderValue::from_str(&format!("{earlier}, {peer}")).ok(),
        _ => Some(peer.clone()),
    };
    if let Some(chain) = chain {
        headers.insert(X_FORWARDED_FOR, chain);
    }
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if let (false, Some(host)) = (headers.contains_key(X_FORWARDED_HOST), host) {
        headers.insert(X_FORWARDED_HOST, host);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        headers
    }

    fn names(headers: &HeaderMap) -> Vec<&str> {
        headers.keys().map(HeaderName::as_str).collect()
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut headers = map(&[
            ("content-type", "text/plain"),
            ("connection", "keep-alive, X-Internal"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("x-internal", "secret"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic eA=="),
            ("expect", "100-continue"),
            ("etag", "\"1\""),
        ]);
        let found = ConnectionHeaders::of(&headers);
        assert!(!found.upgrade);
        found.strip(&mut headers);
        assert_eq!(names(&headers), ["content-type", "etag"]);
    }

    #[test]
    fn each_hop_by_hop_header_is_found_by_its_own_bit() {
        for (index, name) in HOP_BY_HOP.iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert(name.clone(), HeaderValue::from_static("x"));
            headers.insert(header::HOST, HeaderValue::from_static("shop.test"));
            let found = ConnectionHeaders::of(&headers);
            assert_eq!(found.present, 1 << index, "{name}");
            found.strip(&mut headers);
            assert_eq!(names(&headers), ["host"], "{name}");
        }
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_keeps_every_header() {
        let mut headers = map(&[("host", "shop.test"), ("accept", "*/*")]);
        let found = ConnectionHeaders::of(&headers);
        assert_eq!(found, ConnectionHeaders::default());
        found.strip(&mut headers);
        assert_eq!(names(&headers), ["host", "accept"]);
    }

    #[test]
    fn connection_keep_alive_drops_only_itself() {
        let mut headers = map(&[("connection", "keep-alive"), ("etag", "\"1\"")]);
        let found = ConnectionHeaders::of(&headers);
        assert!(found.named.is_empty());
        found.strip(&mut headers);
        assert_eq!(names(&headers), ["etag"]);
    }

    #[test]
    fn an_upgrade_is_asked_by_connection_and_kept_for_the_container() {
        let headers = map(&[
            ("host", "shop.test"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ]);
        let found = ConnectionHeaders::of(&headers);
        assert!(found.upgrade);
        let upgrade = upgrade_protocol(&headers, &found);
        assert_eq!(upgrade, Some(HeaderValue::from_static("websocket")));
        let peer = HeaderValue::from_static("192.0.2.1");
        let sent = upstream_headers(headers, &found, &peer, upgrade, false);
        assert_eq!(sent[header::CONNECTION], "upgrade");
        assert_eq!(sent[header::UPGRADE], "websocket");

        // An Upgrade header alone asks for nothing, and is not passed on.
        let headers = map(&[("host", "shop.test"), ("upgrade", "websocket")]);
        let found = ConnectionHeaders::of(&headers);
        assert_eq!(upgrade_protocol(&headers, &found), None);
        let sent = upstream_headers(headers, &found, &peer, None, false);
        assert!(!sent.contains_key(header::UPGRADE));
    }

    #[test]
    fn forwarded_headers_are_replaced_unless_trusted() {
        let client = [
            ("host", "shop.test"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example"),
        ];
        let peer = HeaderValue::from_static("192.0.2.1");
        let forwarded = |trust: bool, pairs: &[(&'static str, &'static str)]| {
            let headers = map(pairs);
            let found = ConnectionHeaders::of(&headers);
            let sent = upstream_headers(headers, &found, &peer, None, trust);
            [X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST]
                .map(|name| sent.get(name).map(|v| v.to_str().unwrap().to_owned()))
        };
        let some = |v: &str| Some(v.to_owned());
        assert_eq!(
            forwarded(false, &client),
            [some("192.0.2.1"), some("http"), some("shop.test")]
        );
        assert_eq!(
            forwarded(true, &client),
            [
                some("203.0.113.7, 192.0.2.1"),
                some("https"),
                some("shop.example")
            ]
        );
        // Trusted, but nothing to keep: set as at the edge.
        assert_eq!(
            forwarded(true, &client[..1]),
            [some("192.0.2.1"), some("http"), some("shop.test")]
        );
        // No Host: no X-Forwarded-Host, not even the client's.
        assert_eq!(
            forwarded(false, &client[1..]),
            [some("192.0.2.1"), some("http"), None]
        );
    }
}
