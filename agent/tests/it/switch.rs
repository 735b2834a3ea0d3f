//! The traffic switch on real sockets: a real `Switch` listener in front of
//! small HTTP and WebSocket servers on loopback, standing in for two
//! releases' web containers. The engine-driven switch against the sample
//! Django app is tested in `engine.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::routing;
use bytes::Bytes;
use deployd::config::Config;
use deployd::switch::{Routes, Serving, Switch, Upstream};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// A stand-in web container: answers with its name.
async fn backend(name: &'static str) -> Upstream {
    #[derive(serde::Deserialize)]
    struct Slow {
        ms: u64,
    }
    let app = Router::new()
        .route(
            "/name",
            routing::get(|State(name): State<&'static str>| async move { name }),
        )
        .route(
            "/slow",
            routing::get(
                |State(name): State<&'static str>, Query(slow): Query<Slow>| async move {
                    tokio::time::sleep(Duration::from_millis(slow.ms)).await;
                    name
                },
            ),
        )
        .route(
            "/headers",
            routing::get(|headers: HeaderMap| async move {
                let pick = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned()
                };
                format!(
                    "host={} xff={} proto={} xhost={}",
                    pick("host"),
                    pick("x-forwarded-for"),
                    pick("x-forwarded-proto"),
                    pick("x-forwarded-host")
                )
            }),
        )
        .route(
            "/drip",
            routing::get(|Query(slow): Query<Slow>| async move {
                // Headers and a first byte at once, the last byte later.
                let chunks = futures_util::stream::unfold(0, move |sent| async move {
                    match sent {
                        0 => {}
                        1 => tokio::time::sleep(Duration::from_millis(slow.ms)).await,
                        _ => return None,
                    }
                    Some((
                        Ok::<_, std::convert::Infallible>(Bytes::from("a")),
                        sent + 1,
                    ))
                });
                axum::body::Body::from_stream(chunks)
            }),
        )
        .route(
            "/hop",
            routing::get(|headers: HeaderMap| async move {
                let mut names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
                names.sort_unstable();
                (
                    [
                        ("connection", "x-internal"),
                        ("x-internal", "1"),
                        ("keep-alive", "timeout=5"),
                        ("x-kept", "1"),
                    ],
                    names.join(" "),
                )
            }),
        )
        .with_state(name);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Upstream {
        container: name.to_owned(),
        addr,
        release: name.into(),
    }
}

/// A stand-in web container speaking WebSocket: echoes `name:text`.
async fn ws_backend(name: &'static str) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(Message::Text(text))) = ws.next().await {
                    let reply = format!("{name}:{text}");
                    if ws.send(Message::text(reply)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Upstream {
        container: name.to_owned(),
        addr,
        release: name.into(),
    }
}

/// A switch for the app `shop` on an ephemeral port.
fn switch(extra: &str) -> (Routes, Serving, SocketAddr) {
    let text = format!(
        r#"
        [apps.shop]
        image = "registry.test/shop"
        [apps.shop.switch]
        listen = "127.0.0.1:0"
        {extra}
        [apps.shop.services.web]
        port = 8000
        health = {{ path = "/healthz/", host = "shop.test" }}
        "#
    );
    let config = Config::from_toml(&text).unwrap();
    let routes = Routes::for_config(&config);
    let serving = Switch::bind(&config, &routes).unwrap().serve().unwrap();
    let addr = serving.addr("shop").unwrap();
    (routes, serving, addr)
}

/// One client connection, kept alive across requests.
async fn connect(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get_on(sender: &mut SendRequest<Empty<Bytes>>, path: &str) -> (u16, String) {
    sender.ready().await.unwrap();
    let request = hyper::Request::get(path)
        .header("host", "shop.test")
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    get_on(&mut connect(addr).await, path).await
}

/// Waits until `n` requests are in flight on the route's containers: an
/// event, not a guess at how long sending them takes.
async fn in_flight(route: &deployd::switch::Route, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while route.in_flight() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{n} requests never reached the container"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn in_flight_requests_finish_on_the_old_release_and_new_ones_go_to_the_new() {
    let (routes, _serving, addr) = switch("");
    let (a, b) = (backend("a").await, backend("b").await);
    let route = routes.get("shop").unwrap();
    let _ = route.switch_to(std::slice::from_ref(&a));
    assert_eq!(get(addr, "/name").await, (200, "a".into()));

    let slow: Vec<_> = (0..4)
        .map(|_| tokio::spawn(async move { get(addr, "/slow?ms=1500").await }))
        .collect();
    in_flight(route, 4).await;
    let draining = route.switch_to(std::slice::from_ref(&b));
    let drain = tokio::spawn(draining.finish(Duration::from_secs(30)));
    for _ in 0..10 {
        assert_eq!(get(addr, "/name").await, (200, "b".into()));
    }
    for request in slow {
        assert_eq!(request.await.unwrap(), (200, "a".into()));
    }
    assert_eq!(drain.await.unwrap().cut, 0);
}

#[tokio::test]
async fn a_keep_alive_client_moves_to_the_new_release_at_the_switch() {
    let (routes, _serving, addr) = switch("");
    let (a, b) = (backend("a").await, backend("b").await);
    let route = routes.get("shop").unwrap();
    let _ = route.switch_to(&[a]);
    let mut client = connect(addr).await;
    assert_eq!(get_on(&mut client, "/name").await.1, "a");
    assert_eq!(get_on(&mut client, "/name").await.1, "a");
    let draining = route.switch_to(&[b]);
    // The same connection, opened before the switch.
    assert_eq!(get_on(&mut client, "/name").await.1, "b");
    assert_eq!(draining.finish(Duration::from_secs(5)).await.cut, 0);
}

#[tokio::test]
async fn the_drain_timeout_ends_a_stuck_request_with_504() {
    let (routes, _serving, addr) = switch("");
    let (a, b) = (backend("a").await, backend("b").await);
    let route = routes.get("shop").unwrap();
    let _ = route.switch_to(&[a]);
    let stuck = tokio::spawn(async move { get(addr, "/slow?ms=60000").await });
    in_flight(route, 1).await;
    let drained = route
        .switch_to(&[b])
        .finish(Duration::from_millis(500))
        .await;
    assert_eq!(drained.cut, 1);
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 504, "{body}");
    // Held against the release it was sent to.
    let figures = route.release("a").unwrap().figures();
    assert_eq!(figures.upstream_errors, [0, 0, 0, 1], "{figures:?}");
    assert_eq!(figures.errors(), 1);
}

#[tokio::test]
async fn the_upstream_timeout_answers_504() {
    let (routes, _serving, addr) = switch(r#"upstream_timeout = "1s""#);
    let _ = routes.get("shop").unwrap().switch_to(&[backend("a").await]);
    assert_eq!(get(addr, "/slow?ms=10000").await.0, 504);
    assert_eq!(get(addr, "/name").await, (200, "a".into()));
    // Both answers and the timeout are counted for /metrics.
    let text = deployd::metrics::Metrics::new(&routes).render();
    for line in [
        r#"deployd_switch_requests_total{app="shop",code="2xx"} 1"#,
        r#"deployd_switch_requests_total{app="shop",code="5xx"} 1"#,
        r#"deployd_switch_upstream_errors_total{app="shop",error="timeout"} 1"#,
        r#"deployd_switch_upstream_errors_total{app="shop",error="refused"} 0"#,
        r#"deployd_switch_release_requests_total{app="shop",sha="a",code="5xx"} 1"#,
        r#"deployd_switch_release_upstream_errors_total{app="shop",sha="a",error="timeout"} 1"#,
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}

/// A GET with `cookie`, if any: the status, the body and the `Set-Cookie`.
async fn get_with_cookie(
    addr: SocketAddr,
    path: &str,
    cookie: Option<&str>,
) -> (u16, String, Option<String>) {
    let mut sender = connect(addr).await;
    sender.ready().await.unwrap();
    let mut request = hyper::Request::get(path).header("host", "shop.test");
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let response = sender
        .send_request(request.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let set_cookie = response
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        String::from_utf8_lossy(&body).into_owned(),
        set_cookie,
    )
}

#[tokio::test]
async fn a_canary_client_keeps_its_release_by_the_cookie_the_switch_sets() {
    let (routes, _serving, addr) = switch("");
    let route = routes.get("shop").unwrap();
    let (stable, canary) = (backend("old").await, backend("new").await);
    let _ = route.switch_to(std::slice::from_ref(&stable));
    assert_eq!(
        get_with_cookie(addr, "/name", None).await,
        (200, "old".into(), None)
    );

    let _ = route.split(
        std::slice::from_ref(&stable),
        std::slice::from_ref(&canary),
        50.0,
    );
    // Every connection comes from 127.0.0.1: by address, all go one way;
    // the cookie keeps a client's place, and as the share grows it moves
    // onto the canary once, never back.
    let (_, first, set_cookie) = get_with_cookie(addr, "/name", None).await;
    let set_cookie = set_cookie.expect("a client without the cookie gets it");
    assert!(set_cookie.starts_with("deployd_release="), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let cookies = format!("theme=dark; {cookie}");
    let mut seen = vec![first];
    for percent in [50.0, 75.0, 100.0] {
        let _ = route.split(
            std::slice::from_ref(&stable),
            std::slice::from_ref(&canary),
            percent,
        );
        for _ in 0..3 {
            let (status, name, set) = get_with_cookie(addr, "/name", Some(&cookies)).await;
            assert_eq!((status, set), (200, None), "at {percent}%");
            seen.push(name);
        }
    }
    let moved = seen.iter().position(|n| n == "new").unwrap();
    assert!(seen[moved..].iter().all(|n| n == "new"), "{seen:?}");
    assert_eq!(seen.last().unwrap(), "new", "at 100%");
    // Promoted: everyone on the new release, and no more cookies.
    let draining = route.switch_to(std::slice::from_ref(&canary));
    assert_eq!(draining.finish(Duration::from_secs(5)).await.cut, 0);
    assert_eq!(
        get_with_cookie(addr, "/name", Some(&cookie)).await,
        (200, "new".into(), None)
    );
    let old = route.release("old").unwrap().figures().requests();
    let new = route.release("new").unwrap().figures().requests();
    assert_eq!(old + new, 12, "old {old}, new {new}");
}

#[tokio::test]
async fn each_release_has_its_own_answers_latency_and_abandoned_requests() {
    let (routes, _serving, addr) = switch("");
    let route = routes.get("shop").unwrap();
    let (mut one, mut two) = (backend("one").await, backend("two").await);
    (one.release, two.release) = ("r1".into(), "r2".into());
    // Both releases live side by side: round-robin sends each every other
    // request.
    let _ = route.switch_to(&[one, two]);
    let mut client = connect(addr).await;
    for _ in 0..10 {
        assert_eq!(get_on(&mut client, "/slow?ms=1").await.0, 200);
    }
    // Release r2 also gets a slow request (200 ms) and one its client gives
    // up on.
    let _ = route.switch_to(&[route.upstreams()[1].clone()]);
    assert_eq!(get_on(&mut client, "/slow?ms=200").await.0, 200);
    let given_up = tokio::spawn(async move { get(addr, "/slow?ms=60000").await });
    in_flight(route, 1).await;
    given_up.abort();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while route.release("r2").unwrap().figures().abandoned == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned request was never counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let r1 = route.release("r1").unwrap().figures();
    let r2 = route.release("r2").unwrap().figures();
    assert_eq!((r1.requests(), r2.requests()), (5, 6), "{r1:?} {r2:?}");
    assert_eq!((r1.errors(), r2.errors()), (0, 0));
    assert_eq!(r2.abandoned, 1);
    // Latency is at least what the container took: a lower bound only, as a
    // busy machine adds to it.
    assert!(
        r2.quantile(1.0).unwrap() >= Duration::from_millis(150),
        "{r2:?}"
    );
    assert!(
        r1.quantile(0.5).unwrap() >= Duration::from_micros(500),
        "{r1:?}"
    );
}

#[tokio::test]
async fn websocket_connections_pass_through_and_stay_until_drained() {
    let (routes, _serving, addr) = switch("");
    let (a, b) = (ws_backend("a").await, ws_backend("b").await);
    let route = routes.get("shop").unwrap();
    let _ = route.switch_to(&[a]);
    let url = format!("ws://{addr}/socket");
    let (mut old, response) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert_eq!(response.status(), 101);
    old.send(Message::text("hello")).await.unwrap();
    assert_eq!(old.next().await.unwrap().unwrap(), Message::text("a:hello"));

    let draining = route.switch_to(&[b]);
    let (mut new, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    new.send(Message::text("hi")).await.unwrap();
    assert_eq!(new.next().await.unwrap().unwrap(), Message::text("b:hi"));
    // The old socket keeps its container until the drain gives up on it.
    old.send(Message::text("still")).await.unwrap();
    assert_eq!(old.next().await.unwrap().unwrap(), Message::text("a:still"));
    assert_eq!(draining.finish(Duration::from_millis(300)).await.cut, 1);
    let closed = tokio::time::timeout(Duration::from_secs(5), old.next())
        .await
        .unwrap();
    assert!(!matches!(closed, Some(Ok(Message::Text(_)))), "{closed:?}");
}

#[tokio::test]
async fn a_container_refusing_connections_is_skipped() {
    let (routes, _serving, addr) = switch("");
    // A port nothing listens on: bound, then closed.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = Upstream {
        container: "dead".into(),
        addr: closed.local_addr().unwrap(),
        release: "b".into(),
    };
    drop(closed);
    let _ = routes
        .get("shop")
        .unwrap()
        .switch_to(&[dead, backend("b").await]);
    for _ in 0..6 {
        assert_eq!(get(addr, "/name").await, (200, "b".into()));
    }
    let text = deployd::metrics::Metrics::new(&routes).render();
    assert!(
        text.contains(r#"deployd_switch_upstream_errors_total{app="shop",error="refused"} "#),
        "{text}"
    );
    assert!(
        text.contains(r#"deployd_switch_requests_total{app="shop",code="2xx"} 6"#),
        "{text}"
    );
}

/// What the backend saw of Host and the forwarded headers, for a request
/// to `/headers` carrying `headers`.
async fn headers_seen(addr: SocketAddr, headers: &[(&str, &str)]) -> String {
    let mut client = connect(addr).await;
    client.ready().await.unwrap();
    let mut request = hyper::Request::get("/headers").header("host", "shop.test");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client
        .send_request(request.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::test]
async fn host_is_kept_and_forwarded_headers_are_set_by_the_switch() {
    let (routes, _serving, addr) = switch("");
    let _ = routes.get("shop").unwrap().switch_to(&[backend("a").await]);
    let seen = headers_seen(
        addr,
        &[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
        ],
    )
    .await;
    assert_eq!(
        seen,
        "host=shop.test xff=127.0.0.1 proto=http xhost=shop.test"
    );
}

#[tokio::test]
async fn forwarded_headers_from_a_trusted_load_balancer_are_kept() {
    let (routes, _serving, addr) = switch("trust_forwarded_headers = true");
    let _ = routes.get("shop").unwrap().switch_to(&[backend("a").await]);
    let seen = headers_seen(
        addr,
        &[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example"),
        ],
    )
    .await;
    assert_eq!(
        seen,
        "host=shop.test xff=203.0.113.7, 127.0.0.1 proto=https xhost=shop.example"
    );
}

/// Sends raw bytes on a new connection and reads until the switch closes
/// it, for at most `within`: the bytes read, and whether it closed.
async fn raw_exchange(addr: SocketAddr, sent: &[u8], within: Duration) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(sent).await.unwrap();
    let mut read = Vec::new();
    let closed = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&read).into_owned(), closed)
}

#[tokio::test]
async fn hop_by_hop_headers_stop_at_the_switch_both_ways() {
    let (routes, _serving, addr) = switch("");
    let _ = routes.get("shop").unwrap().switch_to(&[backend("a").await]);
    let request = b"GET /hop HTTP/1.1\r\nHost: shop.test\r\nConnection: close, X-Secret\r\n\
        X-Secret: 1\r\nKeep-Alive: timeout=9\r\nProxy-Authorization: Basic eA==\r\n\
        TE: trailers\r\nX-Kept: 1\r\n\r\n";
    let (answer, closed) = raw_exchange(addr, request, Duration::from_secs(5)).await;
    assert!(closed, "Connection: close was not honoured: {answer}");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    // What the container saw.
    assert_eq!(
        body,
        "host x-forwarded-for x-forwarded-host x-forwarded-proto x-kept"
    );
    // What the client saw of the container's answer.
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("\r\nx-kept: 1"), "{head}");
    for dropped in ["x-internal", "keep-alive"] {
        assert!(
            !head.contains(&format!("\r\n{dropped}:")),
            "{dropped} passed: {head}"
        );
    }
}

#[tokio::test]
async fn idle_connections_and_slow_request_headers_are_closed_but_slow_answers_are_not() {
    let (routes, _serving, addr) = switch(r#"idle_timeout = "1s""#);
    let _ = routes.get("shop").unwrap().switch_to(&[backend("a").await]);
    let started = std::time::Instant::now();
    let idle = raw_exchange(
        addr,
        b"GET /name HTTP/1.1\r\nHost: shop.test\r\n\r\n",
        Duration::from_secs(5),
    );
    let slow_headers = raw_exchange(
        addr,
        b"GET /name HTTP/1.1\r\nHost: shop.test\r\n",
        Duration::from_secs(5),
    );
    let slow_answer = raw_exchange(
        addr,
        b"GET /slow?ms=2500 HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    let slow_body = raw_exchange(
        addr,
        b"GET /drip?ms=2500 HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    let ((idle, idle_closed), (partial, partial_closed), (slow, slow_closed), (drip, drip_closed)) =
        tokio::join!(idle, slow_headers, slow_answer, slow_body);
    // A keep-alive connection answered once, then closed once idle.
    assert!(
        idle_closed && idle.starts_with("HTTP/1.1 200") && idle.ends_with('a'),
        "{idle}"
    );
    // Headers that never end: closed without an answer.
    assert!(partial_closed && partial.is_empty(), "{partial}");
    // A request slower than the idle timeout is answered whole, and so is
    // an answer whose body takes longer than it.
    assert!(
        slow_closed && slow.starts_with("HTTP/1.1 200") && slow.ends_with('a'),
        "{slow}"
    );
    assert!(drip_closed && drip.starts_with("HTTP/1.1 200"), "{drip}");
    assert!(
        drip.ends_with("1\r\na\r\n0\r\n\r\n"),
        "the body was cut: {drip}"
    );
    // None of them at the 5 s limit.
    assert!(
        started.elapsed() < Duration::from_millis(4800),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn no_live_container_is_a_503_and_shutdown_lets_requests_finish_but_not_wait_on_headers() {
    let (routes, serving, addr) = switch("");
    let route = routes.get("shop").unwrap();
    let _ = route.switch_to(&[]);
    assert_eq!(get(addr, "/name").await.0, 503);

    let _ = route.switch_to(&[backend("a").await]);
    let mut keep_alive = connect(addr).await;
    assert_eq!(get_on(&mut keep_alive, "/name").await.1, "a");
    let slow = tokio::spawn(async move { get(addr, "/slow?ms=1000").await });
    let mut unfinished = TcpStream::connect(addr).await.unwrap();
    unfinished
        .write_all(b"GET /name HTTP/1.1\r\nHost: shop.test\r\n")
        .await
        .unwrap();
    in_flight(route, 1).await;
    let started = std::time::Instant::now();
    let shutdown = tokio::spawn(serving.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The keep-alive client's next request is answered, then closed cleanly.
    keep_alive.ready().await.unwrap();
    let response = keep_alive
        .send_request(
            hyper::Request::get("/name")
                .header("host", "shop.test")
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.headers()["connection"], "close");
    assert_eq!(slow.await.unwrap(), (200, "a".into()));
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .unwrap()
        .unwrap();
    // Not the 30 s drain: the unfinished headers were cut after the grace.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(
        unfinished.read(&mut [0u8; 64]).await,
        Ok(0) | Err(_)
    ));
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}

/// What a stand-in container saw of request bodies and answers.
#[derive(Default)]
struct Seen {
    /// Requests that reached it.
    requests: std::sync::atomic::AtomicUsize,
    /// Set once its last answer was read from it to the end.
    answered: tokio::sync::Notify,
}

/// A stand-in container for body tests: `/echo` reads the body and says
/// its length, its SHA-256, how long the body took to arrive after the
/// head and which `content-length` it came with; `/big?kib=` answers that
/// many KiB and tells `Seen::answered` once the switch read them all.
async fn body_backend() -> (Upstream, std::sync::Arc<Seen>) {
    use sha2::Digest;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    #[derive(serde::Deserialize)]
    struct Big {
        kib: usize,
    }
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route(
            "/echo",
            routing::post(
                |State(seen): State<Arc<Seen>>, request: axum::extract::Request| async move {
                    seen.requests.fetch_add(1, Ordering::SeqCst);
                    let length = request
                        .headers()
                        .get_all("content-length")
                        .iter()
                        .map(|v| v.to_str().unwrap().to_owned())
                        .collect::<Vec<_>>()
                        .join(",");
                    let chunked = request.headers().contains_key("transfer-encoding");
                    let head = std::time::Instant::now();
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    let waited = head.elapsed().as_millis();
                    let digest = hex(&sha2::Sha256::digest(&body));
                    format!(
                        "len={} sha256={digest} waited_ms={waited} content-length={length} chunked={chunked}",
                        body.len()
                    )
                },
            ),
        )
        .route(
            "/big",
            routing::get(
                |State(seen): State<Arc<Seen>>, Query(big): Query<Big>| async move {
                    seen.requests.fetch_add(1, Ordering::SeqCst);
                    let chunks = futures_util::stream::unfold(0, move |sent| {
                        let seen = seen.clone();
                        async move {
                            if sent == big.kib {
                                seen.answered.notify_one();
                                return None;
                            }
                            let chunk = Bytes::from(vec![b'x'; 1024]);
                            Some((Ok::<_, std::convert::Infallible>(chunk), sent + 1))
                        }
                    });
                    axum::body::Body::from_stream(chunks)
                },
            ),
        )
        .route(
            "/events",
            routing::get(|| async {
                let events = futures_util::stream::unfold(0, |sent| async move {
                    if sent > 0 {
                        // The stream stays open: only an unbuffered switch
                        // lets the first event through before the end.
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return None;
                    }
                    let event = Bytes::from_static(b"data: one\n\n");
                    Some((Ok::<_, std::convert::Infallible>(event), sent + 1))
                });
                (
                    [("content-type", "text/event-stream"), ("x-accel-buffering", "no")],
                    axum::body::Body::from_stream(events),
                )
            }),
        )
        .with_state(seen.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (
        Upstream {
            container: "bodies".into(),
            addr,
            release: "bodies".into(),
        },
        seen,
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A raw request head for `/echo` with `headers`, then `body` sent in
/// `pieces` with `gap` between them.
async fn trickle(
    addr: SocketAddr,
    headers: &str,
    body: &[u8],
    pieces: usize,
    gap: Duration,
    within: Duration,
) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head =
        format!("POST /echo HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n{headers}\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let size = body.len().div_ceil(pieces.max(1)).max(1);
    for piece in body.chunks(size) {
        tokio::time::sleep(gap).await;
        if stream.write_all(piece).await.is_err() {
            break;
        }
    }
    let mut read = Vec::new();
    let closed = tokio::time::timeout(within, stream.read_to_end(&mut read))
        .await
        .is_ok();
    (String::from_utf8_lossy(&read).into_owned(), closed)
}

fn field<'a>(answer: &'a str, name: &str) -> &'a str {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix(name).and_then(|w| w.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {name} in {answer}"))
}

#[tokio::test]
async fn a_trickled_request_body_reaches_the_container_whole_and_at_once() {
    use sha2::Digest;
    let (routes, _serving, addr) = switch("");
    let (upstream, _) = body_backend().await;
    let _ = routes.get("shop").unwrap().switch_to(&[upstream]);
    let body = br#"{"order": [1, 2, 3], "note": "trickled"}"#;
    let headers = format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    // Eight pieces 150 ms apart: over a second from head to last byte.
    let started = std::time::Instant::now();
    let (answer, _) = trickle(
        addr,
        &headers,
        body,
        8,
        Duration::from_millis(150),
        Duration::from_secs(30),
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(1000));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(field(&answer, "len"), body.len().to_string());
    assert_eq!(field(&answer, "sha256"), hex(&sha2::Sha256::digest(body)));
    // The container got the head only once the body had arrived: it never
    // waited on the client.
    let waited: u64 = field(&answer, "waited_ms").parse().unwrap();
    assert!(
        waited < 500,
        "the container waited {waited} ms for the body"
    );

    // Chunked from the client: the container gets one Content-Length.
    let (answer, _) = trickle(
        addr,
        "Transfer-Encoding: chunked\r\n",
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        3,
        Duration::from_millis(100),
        Duration::from_secs(30),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(field(&answer, "len"), "11");
    assert_eq!(field(&answer, "content-length"), "11");
    assert_eq!(field(&answer, "chunked"), "false");
}

#[tokio::test]
async fn content_length_next_to_transfer_encoding_never_reaches_the_container() {
    let (routes, _serving, addr) = switch("");
    let (upstream, _) = body_backend().await;
    let _ = routes.get("shop").unwrap().switch_to(&[upstream]);
    // A smuggling attempt: the length says 4, the chunks say 11.
    let (answer, closed) = trickle(
        addr,
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        1,
        Duration::ZERO,
        Duration::from_secs(10),
    )
    .await;
    assert!(closed);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The chunked framing won; the container saw its length only.
    assert_eq!(field(&answer, "len"), "11");
    assert_eq!(field(&answer, "content-length"), "11");
    assert_eq!(field(&answer, "chunked"), "false");
}

#[tokio::test]
async fn a_body_too_slow_or_too_large_is_refused_and_never_reaches_the_container() {
    use std::sync::atomic::Ordering;
    let (routes, _serving, addr) = switch(
        r#"body_timeout = "1s"
        max_body = "64KiB"
        max_buffered_body = "4KiB""#,
    );
    let (upstream, seen) = body_backend().await;
    let _ = routes.get("shop").unwrap().switch_to(&[upstream]);

    // Two bytes of ten, then nothing: 408 after the body timeout.
    let started = std::time::Instant::now();
    let (answer, closed) = trickle(
        addr,
        "Content-Length: 10\r\n",
        b"{}",
        1,
        Duration::ZERO,
        Duration::from_secs(20),
    )
    .await;
    assert!(closed && answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(15));

    // Declared too large: 413 before a byte of the body is read.
    let (answer, _) = trickle(
        addr,
        "Content-Length: 1048576\r\n",
        b"",
        1,
        Duration::ZERO,
        Duration::from_secs(20),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Chunked, found too large on the way: 413 too.
    let chunk = format!("{:x}\r\n{}\r\n", 40 * 1024, "x".repeat(40 * 1024));
    let chunked = format!("{chunk}{chunk}0\r\n\r\n");
    let (answer, _) = trickle(
        addr,
        "Transfer-Encoding: chunked\r\n",
        chunked.as_bytes(),
        1,
        Duration::ZERO,
        Duration::from_secs(20),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(seen.requests.load(Ordering::SeqCst), 0);

    // Past max_buffered_body but within max_body: spooled, and whole.
    let body = vec![b'7'; 48 * 1024];
    let (answer, _) = trickle(
        addr,
        &format!("Content-Length: {}\r\n", body.len()),
        &body,
        4,
        Duration::from_millis(20),
        Duration::from_secs(20),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(field(&answer, "len"), body.len().to_string());
    assert_eq!(seen.requests.load(Ordering::SeqCst), 1);

    let text = deployd::metrics::Metrics::new(&routes).render();
    for line in [
        r#"deployd_switch_refusals_total{app="shop",reason="body_timeout"} 1"#,
        r#"deployd_switch_refusals_total{app="shop",reason="body_too_large"} 2"#,
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}

#[tokio::test]
async fn an_answer_is_read_ahead_of_a_slow_client_and_event_streams_pass_at_once() {
    let (routes, _serving, addr) = switch(r#"max_buffered_response = "16MiB""#);
    let (upstream, seen) = body_backend().await;
    let _ = routes.get("shop").unwrap().switch_to(&[upstream]);
    // A client that reads nothing for now, with a small receive buffer:
    // 12 MiB are more than the sockets between them can hold.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(b"GET /big?kib=12288 HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // The container is done with it anyway: the switch read it all.
    tokio::time::timeout(Duration::from_secs(20), seen.answered.notified())
        .await
        .expect("the container was held by a client that does not read");
    let mut read = Vec::new();
    stream.read_to_end(&mut read).await.unwrap();
    let answer = String::from_utf8_lossy(&read);
    assert!(answer.starts_with("HTTP/1.1 200"), "{}", &answer[..100]);
    let body = answer.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(body.matches('x').count(), 12 * 1024 * 1024);

    // An event stream's first event arrives while the stream goes on, and
    // the proxy's own header does not reach the client.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /events HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        .await
        .unwrap();
    let mut seen_so_far = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen_so_far).contains("data: one") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early");
            seen_so_far.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the first event did not pass");
    let head = String::from_utf8_lossy(&seen_so_far).to_ascii_lowercase();
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(!head.contains("x-accel-buffering"), "{head}");
}

#[tokio::test]
async fn request_heads_past_the_limits_get_414_or_431() {
    let (routes, _serving, addr) = switch(
        r#"max_header_line = "2KiB"
        max_header_size = "8KiB""#,
    );
    let _ = routes.get("shop").unwrap().switch_to(&[backend("a").await]);
    // The status line of the answer to a request for `target` with `headers`.
    let status = async |target: &str, headers: &str| {
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n{headers}\r\n"
        );
        let (answer, _) = raw_exchange(addr, request.as_bytes(), Duration::from_secs(5)).await;
        answer.lines().next().unwrap_or_default().to_owned()
    };
    let lines = |n: usize, size: usize| -> String {
        (0..n)
            .map(|i| format!("X-H{i}: {}\r\n", "v".repeat(size)))
            .collect()
    };
    let long_path = format!("/name?{}", "q".repeat(3000));
    assert!(status(&long_path, "").await.starts_with("HTTP/1.1 414"));
    assert!(
        status("/name", &lines(1, 3000))
            .await
            .starts_with("HTTP/1.1 431")
    );
    // Each line fits, together they do not.
    assert!(
        status("/name", &lines(6, 1800))
            .await
            .starts_with("HTTP/1.1 431")
    );
    // Far past it: hyper's own buffer ends it, with 431 too.
    assert!(
        status("/name", &lines(40, 1800))
            .await
            .starts_with("HTTP/1.1 431")
    );
    assert_eq!(get(addr, "/name").await, (200, "a".into()));
}

#[tokio::test]
async fn connections_past_the_per_address_cap_are_closed_at_once() {
    let (routes, _serving, addr) = switch("max_connections_per_address = 2");
    let _ = routes.get("shop").unwrap().switch_to(&[backend("a").await]);
    let mut first = connect(addr).await;
    let second = connect(addr).await;
    assert_eq!(get_on(&mut first, "/name").await.1, "a");
    // The third from the same address is closed without an answer.
    let (answer, closed) = raw_exchange(
        addr,
        b"GET /name HTTP/1.1\r\nHost: shop.test\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(closed && answer.is_empty(), "{answer}");
    // Another address is not held back by this one's.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = socket.connect(addr).await.unwrap();
    other
        .write_all(b"GET /name HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut read = String::new();
    other.read_to_string(&mut read).await.unwrap();
    assert!(read.starts_with("HTTP/1.1 200"), "{read}");
    // One closes: its place is free again.
    drop(second);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (answer, _) = raw_exchange(
            addr,
            b"GET /name HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = deployd::metrics::Metrics::new(&routes).render();
    assert!(
        text.contains(
            r#"deployd_switch_refusals_total{app="shop",reason="max_connections_per_address"} "#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn buffer_memory_bounds_every_buffer_together() {
    use sha2::Digest;
    let (routes, _serving, addr) = switch(
        r#"max_buffered_body = "1MiB"
        max_buffered_response = "64KiB"
        buffer_memory = "64KiB""#,
    );
    let (upstream, seen) = body_backend().await;
    let route = routes.get("shop").unwrap();
    let _ = route.switch_to(&[upstream]);
    let shortfall = |kind: &str| {
        let text = deployd::metrics::Metrics::new(&routes).render();
        let line =
            format!(r#"deployd_switch_buffer_shortfalls_total{{app="shop",reason="{kind}"}} "#);
        text.lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .map(|n| n.parse::<u64>().unwrap())
            .unwrap_or_else(|| panic!("no {kind} in {text}"))
    };
    // A body within max_buffered_body but past what the budget holds is
    // spooled, and arrives whole.
    let body = vec![b'5'; 100 * 1024];
    let (answer, _) = trickle(
        addr,
        &format!("Content-Length: {}\r\n", body.len()),
        &body,
        1,
        Duration::ZERO,
        Duration::from_secs(20),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(field(&answer, "sha256"), hex(&sha2::Sha256::digest(&body)));
    assert_eq!(shortfall("spooled"), 1);

    // A client that reads nothing holds the budget with what was read
    // ahead for it...
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut hog = socket.connect(addr).await.unwrap();
    hog.write_all(b"GET /big?kib=8192 HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    in_flight(route, 1).await;
    // ...so the next answer is passed at its client's pace, not buffered,
    // and still arrives whole.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while shortfall("unbuffered") == 0 {
        assert!(std::time::Instant::now() < deadline, "never unbuffered");
        let (status, body) = get(addr, "/big?kib=256").await;
        assert_eq!((status, body.len()), (200, 256 * 1024));
    }
    // The hog reads at last: all of it.
    let mut read = Vec::new();
    hog.read_to_end(&mut read).await.unwrap();
    let answer = String::from_utf8_lossy(&read);
    assert_eq!(
        answer
            .split_once("\r\n\r\n")
            .unwrap()
            .1
            .matches('x')
            .count(),
        8192 * 1024
    );
    drop(seen);
}
