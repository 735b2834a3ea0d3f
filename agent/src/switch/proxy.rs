//! Forwarding one request to a live web container and its answer back.
//!
//! The request keeps its Host; hop-by-hop headers are dropped and the
//! forwarding headers are set (see `headers`). The request body is read
//! whole first and the answer is read ahead of the client (see `body`), so
//! a slow client never holds a container's worker. A container that
//! refuses the connection is skipped for the next one; a request the
//! container never got is sent again on a fresh connection, and so is a
//! GET (or another safe method without a body) whose reused connection
//! failed under it. WebSocket (any `Upgrade`) requests become a tunnel once
//! the container answers 101.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use super::body::{self, BodyLimits, ProxyBody, Refused, RequestBody, Tracked, Whole};
use super::headers::{self, ConnectionHeaders, HeadLimits};
use super::pool::Conn;
use super::route::{Backend, Client, InFlight, Route};
use super::stats::{Refusal, ReleaseStats, Shortfall, UpstreamError};
use crate::limit::Admitted;

/// The 504 of a request still unanswered when its release's drain gave up.
const OUTLIVED_DRAIN: &str = "the request outlived the drain of its release";

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
    pub bodies: BodyLimits,
    pub head_limits: HeadLimits,
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
    Unsent(Request<RequestBody>),
    Failed(hyper::Error),
    TimedOut,
    Cancelled,
}

/// A request in the hands of a release: counted in its figures when the
/// answer's head is back, or as abandoned if the client leaves first (the
/// request's future is dropped with this in it).
struct Timed {
    stats: Arc<ReleaseStats>,
    since: Instant,
    settled: bool,
}

impl Timed {
    /// Counts the request against `backend`'s release from now on (a retry
    /// on another release's container moves it there, uncounted).
    fn on(slot: &mut Option<Self>, backend: &Backend, since: Instant) {
        let since = match slot {
            Some(timed) if Arc::ptr_eq(&timed.stats, &backend.stats) => return,
            // The other release's time is not this one's.
            Some(timed) => {
                timed.settled = true;
                Instant::now()
            }
            None => since,
        };
        *slot = Some(Self {
            stats: backend.stats.clone(),
            since,
            settled: false,
        });
    }

    fn answered(mut self, status: StatusCode) {
        self.settled = true;
        self.stats.answered(status, self.since.elapsed());
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        if !self.settled {
            self.stats.abandoned();
        }
    }
}

impl Proxy {
    /// Forwards one request of the client at `peer` (its address as a
    /// header value, made once per connection).
    pub async fn forward(
        &self,
        peer: &HeaderValue,
        admitted: &Arc<Admitted>,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let mut timed = None;
        let mut pin = None;
        let mut response = self
            .answer(peer, admitted, req, (&mut timed, &mut pin))
            .await;
        self.route.stats.answered(response.status());
        if let Some(timed) = timed {
            timed.answered(response.status());
        }
        // Not on an answer a shared cache may keep: it would hand one
        // client's place to everyone.
        if let Some(pin) = pin
            && !headers::shared_cacheable(response.headers())
        {
            response.headers_mut().append(header::SET_COOKIE, pin);
        }
        response
    }

    /// Counts a failure of `backend` for the app and for its release.
    fn upstream_error(&self, backend: &Backend, error: UpstreamError) {
        self.route.stats.upstream_error(error);
        backend.stats.upstream_error(error);
    }

    async fn answer(
        &self,
        peer: &HeaderValue,
        admitted: &Arc<Admitted>,
        mut req: Request<Incoming>,
        (timed, pin): (&mut Option<Timed>, &mut Option<HeaderValue>),
    ) -> Response<ProxyBody> {
        if req.method() == Method::CONNECT {
            return answer(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not proxied");
        }
        if let Err(too_large) =
            headers::check_head(req.method(), req.uri(), req.headers(), self.head_limits)
        {
            self.route.stats.refused(Refusal::HeadTooLarge);
            return closing(answer(too_large.status(), too_large.message()));
        }
        if !self.route.known(self.upstream_timeout).await {
            return answer(StatusCode::SERVICE_UNAVAILABLE, "no release is live yet");
        }
        let connection = ConnectionHeaders::of(req.headers());
        let upgrade = headers::upgrade_protocol(req.headers(), &connection);
        let upgrading = upgrade.is_some();
        // A tunnel holds the client's connection after hyper lets go of it:
        // it stays counted against the caps until the tunnel ends.
        let client_upgrade = upgrading.then(|| (hyper::upgrade::on(&mut req), admitted.clone()));
        let (parts, incoming) = req.into_parts();
        // Only a safe method without a body may be sent again once it may
        // have reached the container: never a POST, even an empty one.
        let bodiless = incoming.is_end_stream();
        let replayable = bodiless
            && matches!(
                parts.method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
            );
        let client = if self.route.splits() {
            Client::of(&parts.headers, peer, self.trust_forwarded)
        } else {
            Client::unknown()
        };
        let mut sent_headers = headers::upstream_headers(
            parts.headers,
            &connection,
            peer,
            upgrade,
            self.trust_forwarded,
        );
        let body = if bodiless {
            RequestBody::Empty
        } else {
            // Whole before any container is chosen: a switch during the
            // upload sends it to the new release.
            let declared = incoming.size_hint().exact();
            match body::read_request(incoming, declared, &self.bodies).await {
                Ok((body, len, short)) => {
                    if short {
                        self.route.stats.short(Shortfall::Spooled);
                    }
                    headers::frame_buffered(&mut sent_headers, len);
                    body
                }
                Err(refused) => return self.refuse_body(refused),
            }
        };
        let mut request = Some(upstream_request(
            parts.method,
            origin_form(&parts.uri),
            sent_headers,
            body,
        ));
        // The release's latency: from the request being whole to its answer.
        let since = Instant::now();
        let candidates;
        (candidates, *pin) = self.route.candidates(&client);
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
            Timed::on(timed, backend, since);
            let pooled = if fresh { None } else { backend.pool.take() };
            let (conn, reused) = match pooled {
                Some(conn) => (conn, true),
                None if backend.cancel.is_cancelled() => {
                    self.upstream_error(backend, UpstreamError::Drained);
                    return answer(StatusCode::GATEWAY_TIMEOUT, OUTLIVED_DRAIN);
                }
                None => match backend.pool.connect(backend.upstream.addr).await {
                    Ok(conn) => (conn, false),
                    Err(e) => {
                        tracing::warn!(app = %self.route.app(), upstream = %backend.upstream.addr,
                            error = %e, "web container refused a connection; trying the next");
                        self.upstream_error(backend, UpstreamError::Refused);
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
                    self.upstream_error(backend, UpstreamError::Failed);
                    return answer(
                        StatusCode::BAD_GATEWAY,
                        "the web container failed the request",
                    );
                }
                (Sent::TimedOut, _) => {
                    self.upstream_error(backend, UpstreamError::Timeout);
                    return answer(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the web container did not answer in time",
                    );
                }
                (Sent::Cancelled, _) => {
                    self.upstream_error(backend, UpstreamError::Drained);
                    return answer(StatusCode::GATEWAY_TIMEOUT, OUTLIVED_DRAIN);
                }
            }
        }
        answer(StatusCode::BAD_GATEWAY, "no web container could be reached")
    }

    /// A request body that never reaches a container: 413, 408 or 400, and
    /// the connection closes (the rest of the body is not read).
    fn refuse_body(&self, refused: Refused) -> Response<ProxyBody> {
        let (status, message, counted) = match refused {
            Refused::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is larger than this site accepts",
                Refusal::BodyTooLarge,
            ),
            Refused::Timeout => (
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
                Refusal::BodyTimeout,
            ),
            Refused::Broken => (
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
                Refusal::BodyBroken,
            ),
            Refused::Spool => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the request body could not be held for the app; try again later",
                Refusal::BodySpool,
            ),
        };
        self.route.stats.refused(counted);
        closing(answer(status, message))
    }

    async fn send(
        &self,
        backend: &Backend,
        mut conn: Conn,
        request: Request<RequestBody>,
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
        client_upgrade: Option<(hyper::upgrade::OnUpgrade, Arc<Admitted>)>,
    ) -> Response<ProxyBody> {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some((client, admitted)) = client_upgrade else {
                return answer(
                    StatusCode::BAD_GATEWAY,
                    "the web container switched protocols unasked",
                );
            };
            // The connection now belongs to the tunnel.
            drop(conn);
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(tunnel(
                client,
                upstream,
                (guard, admitted),
                backend.cancel.clone(),
            ));
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, ProxyBody::Own(Whole::new(None, None)));
        }
        let (mut parts, body) = resp.into_parts();
        let streams = headers::streams_on_purpose(&parts.headers);
        ConnectionHeaders::of(&parts.headers).strip(&mut parts.headers);
        parts.headers.remove(headers::X_ACCEL_BUFFERING);
        if self.closed.load(Ordering::Relaxed) {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let body = Tracked::new(body, conn, guard, backend.clone());
        if streams {
            return Response::from_parts(parts, ProxyBody::Upstream(body));
        }
        match body::read_ahead(body, self.bodies.read_ahead, &self.bodies.budget) {
            Ok(body) => {
                if matches!(body, ProxyBody::Upstream(_)) {
                    self.route.stats.short(Shortfall::Unbuffered);
                }
                Response::from_parts(parts, body)
            }
            // Nothing went to the client yet: the answer can still be honest.
            Err(_) if backend.cancel.is_cancelled() => {
                self.upstream_error(backend, UpstreamError::Drained);
                answer(StatusCode::GATEWAY_TIMEOUT, OUTLIVED_DRAIN)
            }
            Err(e) => {
                tracing::warn!(app = %self.route.app(), upstream = %backend.upstream.addr,
                    error = %e, "web container broke off its answer");
                self.upstream_error(backend, UpstreamError::Failed);
                answer(
                    StatusCode::BAD_GATEWAY,
                    "the web container broke off its answer",
                )
            }
        }
    }
}

impl Replay {
    fn of(request: &Request<RequestBody>) -> Self {
        Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            headers: request.headers().clone(),
        }
    }

    fn request(self) -> Request<RequestBody> {
        upstream_request(self.method, self.uri, self.headers, RequestBody::Empty)
    }
}

fn upstream_request(
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: RequestBody,
) -> Request<RequestBody> {
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    request
}

/// An answer after which the client's connection closes.
fn closing(mut response: Response<ProxyBody>) -> Response<ProxyBody> {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A short plain-text answer from the switch itself.
pub(crate) fn answer(status: StatusCode, message: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::Own(Whole::new(
        Some(Bytes::from_static(message.as_bytes())),
        None,
    )));
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

/// Copies bytes both ways between an upgraded client connection and the
/// container until either side closes or a drain gives up.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    guard: (InFlight, Arc<Admitted>),
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
