//! Header rules of the switch: what of a message stays on its hop, which
//! forwarding headers a container gets, how a buffered body is framed, and
//! how long a request head may be.
//!
//! Kept apart from forwarding itself, as linkerd2-proxy keeps its
//! `strip_header`: these are pure functions over a `HeaderMap`, tested
//! without sockets. The API applies the same head limits.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// An answer carrying `X-Accel-Buffering: no` streams on purpose (nginx's
/// convention); the header itself is for the proxy and is not passed on.
pub(crate) const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

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
pub(crate) struct ConnectionHeaders {
    /// Which of [`HOP_BY_HOP`] are present, one bit each.
    present: u16,
    /// Other headers `Connection` names.
    named: Vec<HeaderName>,
    pub upgrade: bool,
}

impl ConnectionHeaders {
    pub fn of(headers: &HeaderMap) -> Self {
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

    pub fn strip(&self, headers: &mut HeaderMap) {
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
pub(crate) fn upgrade_protocol(
    headers: &HeaderMap,
    connection: &ConnectionHeaders,
) -> Option<HeaderValue> {
    if connection.upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Whether a header says where a request came from: `Forwarded`,
/// `X-Real-IP` or any `X-Forwarded-*`. At the edge a client's are lies.
fn is_forwarding(name: &HeaderName) -> bool {
    let name = name.as_str();
    name == "forwarded" || name == "x-real-ip" || name.starts_with("x-forwarded-")
}

/// The request's headers as they go to the container.
///
/// At the edge (`trust_forwarded` off) every forwarding header the client
/// sent is removed and the switch sets its own. Behind a trusted load
/// balancer they are kept, and the peer is appended to the whole
/// `X-Forwarded-For` list, every line of it.
pub(crate) fn upstream_headers(
    mut headers: HeaderMap,
    connection: &ConnectionHeaders,
    peer: &HeaderValue,
    upgrade: Option<HeaderValue>,
    trust_forwarded: bool,
) -> HeaderMap {
    connection.strip(&mut headers);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
    let host = headers.get(header::HOST).cloned();
    if !trust_forwarded {
        // Almost no client sends one: look before paying for the removal.
        if headers.keys().any(is_forwarding) {
            let names: Vec<HeaderName> = headers
                .keys()
                .filter(|n| is_forwarding(n))
                .cloned()
                .collect();
            for name in names {
                headers.remove(name);
            }
        }
        headers.reserve(3);
        headers.insert(X_FORWARDED_FOR, peer.clone());
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        if let Some(host) = host {
            headers.insert(X_FORWARDED_HOST, host);
        }
        return headers;
    }
    let earlier: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let chain = match (earlier.is_empty(), peer.to_str()) {
        (false, Ok(peer)) => HeaderValue::from_str(&format!("{}, {peer}", earlier.join(", "))).ok(),
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

/// Frames a body the switch read whole: exactly one `Content-Length`, no
/// `Transfer-Encoding`. hyper already ignores a client's `Content-Length`
/// next to `Transfer-Encoding` (RFC 9112 §6.3) and closes that connection
/// after the answer; the container only ever sees the length that arrived.
pub(crate) fn frame_buffered(headers: &mut HeaderMap, len: u64) {
    headers.remove(header::TRANSFER_ENCODING);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
}

/// Whether an answer streams on purpose and must pass unbuffered: Server-
/// Sent Events, or a container that says `X-Accel-Buffering: no`.
pub(crate) fn streams_on_purpose(headers: &HeaderMap) -> bool {
    let sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .get(..17)
                .is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"))
        });
    let unbuffered = headers
        .get(X_ACCEL_BUFFERING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"no"));
    sse || unbuffered
}

/// How long a request head may be, like nginx's
/// `large_client_header_buffers` (4 buffers of 8 KiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// The request line, or one header line (name and value).
    pub line: usize,
    /// The request line and every header line together.
    pub total: usize,
}

impl HeadLimits {
    /// hyper's own read buffer for a connection: past it hyper answers 431
    /// itself. Larger than `total`, so that the limits here are the ones
    /// that answer (and can be counted).
    pub fn read_buffer(self) -> usize {
        (self.total * 2).max(8192)
    }
}

impl Default for HeadLimits {
    fn default() -> Self {
        Self {
            line: 8 * 1024,
            total: 32 * 1024,
        }
    }
}

/// A request head over the limits: 414 for the request line, else 431.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadTooLarge {
    RequestLine,
    HeaderLine,
    Total,
}

impl HeadTooLarge {
    pub fn status(self) -> StatusCode {
        match self {
            Self::RequestLine => StatusCode::URI_TOO_LONG,
            Self::HeaderLine | Self::Total => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::RequestLine => "the request line is too long",
            Self::HeaderLine => "a request header line is too long",
            Self::Total => "the request headers are too large",
        }
    }
}

/// Checks a request head against `limits`, counting each line as sent on
/// the wire (`name: value` and its line end).
pub fn check_head(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    limits: HeadLimits,
) -> Result<(), HeadTooLarge> {
    // "GET /path HTTP/1.1\r\n"
    let uri_len = uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    let request_line = method.as_str().len() + 1 + uri_len + 11;
    if request_line > limits.line {
        return Err(HeadTooLarge::RequestLine);
    }
    let mut total = request_line;
    for (name, value) in headers {
        let line = name.as_str().len() + 2 + value.len() + 2;
        if line > limits.line {
            return Err(HeadTooLarge::HeaderLine);
        }
        total += line;
    }
    if total > limits.total {
        return Err(HeadTooLarge::Total);
    }
    Ok(())
}

/// Whether a shared cache (a CDN in front) may keep this answer: marked
/// `public`, `s-maxage` or a `max-age` above 0, or with `Expires`, unless
/// `private` or `no-store` says otherwise.
pub(crate) fn shared_cacheable(headers: &HeaderMap) -> bool {
    let directives: Vec<String> = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .collect();
    let has = |name: &str| {
        directives
            .iter()
            .any(|d| d == name || d.starts_with(&format!("{name}=")))
    };
    if has("private") || has("no-store") {
        return false;
    }
    let max_age = directives
        .iter()
        .filter_map(|d| d.strip_prefix("max-age="))
        .any(|age| {
            age.trim_matches('"')
                .parse::<u64>()
                .is_ok_and(|age| age > 0)
        });
    has("public") || has("s-maxage") || max_age || headers.contains_key(header::EXPIRES)
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

    /// What a container gets of the forwarding headers, for a client's
    /// `pairs`, as `name=value` lines (every line of a repeated header).
    fn forwarded(trust: bool, pairs: &[(&'static str, &'static str)]) -> Vec<String> {
        let headers = map(pairs);
        let found = ConnectionHeaders::of(&headers);
        let peer = HeaderValue::from_static("192.0.2.1");
        let sent = upstream_headers(headers, &found, &peer, None, trust);
        let mut seen: Vec<String> = sent
            .iter()
            .filter(|(name, _)| *name != header::HOST)
            .map(|(name, value)| format!("{name}={}", value.to_str().unwrap()))
            .collect();
        seen.sort();
        seen
    }

    #[test]
    fn at_the_edge_every_forwarding_header_of_the_client_is_replaced() {
        let client = [
            ("host", "shop.test"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example"),
            ("x-forwarded-port", "443"),
            ("x-forwarded-prefix", "/admin"),
            ("forwarded", "for=203.0.113.7;proto=https"),
            ("x-real-ip", "203.0.113.7"),
        ];
        assert_eq!(
            forwarded(false, &client),
            [
                "x-forwarded-for=192.0.2.1",
                "x-forwarded-host=shop.test",
                "x-forwarded-proto=http"
            ]
        );
        // No Host: no X-Forwarded-Host, not even the client's.
        assert_eq!(
            forwarded(false, &client[1..]),
            ["x-forwarded-for=192.0.2.1", "x-forwarded-proto=http"]
        );
    }

    #[test]
    fn behind_a_trusted_balancer_the_peer_is_appended_to_the_whole_list() {
        let client = [
            ("host", "shop.test"),
            ("x-forwarded-for", "203.0.113.7, 10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example"),
            ("x-real-ip", "203.0.113.7"),
        ];
        assert_eq!(
            forwarded(true, &client),
            [
                "x-forwarded-for=203.0.113.7, 10.0.0.1, 10.0.0.2, 192.0.2.1",
                "x-forwarded-host=shop.example",
                "x-forwarded-proto=https",
                "x-real-ip=203.0.113.7",
            ]
        );
        // Trusted, but nothing to keep: set as at the edge.
        assert_eq!(
            forwarded(true, &client[..1]),
            [
                "x-forwarded-for=192.0.2.1",
                "x-forwarded-host=shop.test",
                "x-forwarded-proto=http"
            ]
        );
    }

    #[test]
    fn a_buffered_body_has_one_length_and_no_transfer_encoding() {
        let mut headers = map(&[
            ("content-length", "5"),
            ("content-length", "5"),
            ("transfer-encoding", "chunked"),
            ("content-type", "application/json"),
        ]);
        frame_buffered(&mut headers, 11);
        assert_eq!(names(&headers), ["content-length", "content-type"]);
        assert_eq!(
            headers.get_all(header::CONTENT_LENGTH).iter().count(),
            1,
            "{headers:?}"
        );
        assert_eq!(headers[header::CONTENT_LENGTH], "11");
    }

    #[test]
    fn answers_that_stream_on_purpose_are_told_apart() {
        for (pairs, streams) in [
            (&[("content-type", "text/event-stream")][..], true),
            (
                &[("content-type", "Text/Event-Stream; charset=utf-8")][..],
                true,
            ),
            (&[("x-accel-buffering", "no")][..], true),
            (&[("x-accel-buffering", "yes")][..], false),
            (&[("content-type", "text/html")][..], false),
            (&[("content-type", "text")][..], false),
            (&[][..], false),
        ] {
            assert_eq!(streams_on_purpose(&map(pairs)), streams, "{pairs:?}");
        }
    }

    #[test]
    fn request_heads_are_limited_per_line_and_in_all() {
        let limits = HeadLimits {
            line: 1024,
            total: 4096,
        };
        let check = |uri: &str, headers: &HeaderMap| {
            check_head(&Method::GET, &uri.parse().unwrap(), headers, limits)
        };
        let none = HeaderMap::new();
        assert_eq!(check("/", &none), Ok(()));
        let long_path = format!("/{}", "a".repeat(1024));
        assert_eq!(check(&long_path, &none), Err(HeadTooLarge::RequestLine));
        assert_eq!(HeadTooLarge::RequestLine.status(), 414);

        let mut one_long = HeaderMap::new();
        one_long.insert("x-big", HeaderValue::from_str(&"v".repeat(1020)).unwrap());
        assert_eq!(check("/", &one_long), Err(HeadTooLarge::HeaderLine));
        assert_eq!(HeadTooLarge::HeaderLine.status(), 431);

        // Each line fits; together they do not.
        let mut many = HeaderMap::new();
        for i in 0..8 {
            many.append(
                HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                HeaderValue::from_str(&"v".repeat(600)).unwrap(),
            );
        }
        assert_eq!(check("/", &many), Err(HeadTooLarge::Total));
        many.remove("x-h7");
        many.remove("x-h6");
        assert_eq!(check("/", &many), Ok(()));
    }

    #[test]
    fn answers_a_shared_cache_may_keep_are_told_apart() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static(v));
            h
        };
        assert!(shared_cacheable(&with("public, max-age=600")));
        assert!(shared_cacheable(&with("max-age=0, S-MAXAGE=60")));
        assert!(shared_cacheable(&with("max-age=600")));
        assert!(!shared_cacheable(&with("max-age=0")));
        assert!(!shared_cacheable(&with("private, max-age=600")));
        assert!(!shared_cacheable(&with("public, no-store")));
        assert!(!shared_cacheable(&HeaderMap::new()));
        let mut expires = HeaderMap::new();
        expires.insert(
            header::EXPIRES,
            HeaderValue::from_static("Wed, 21 Oct 2026 07:28:00 GMT"),
        );
        assert!(shared_cacheable(&expires));
    }
}
