//! The HTTPS API through real TLS with real signed tokens, against the
//! real engine and the test bed.

use std::time::Duration;

use deployd::auth::TokenRequest;
use deployd_proto::{
    AppStatus, Deployment, DeploymentEvent, DeploymentPage, DeploymentState, ErrorBody, EventKind,
    Plan, PlanState, Scope as S, UnsafeMigrations, Verdict, WhoAmI,
};
use deployd_testkit::agent::TestAgent;
use deployd_testkit::scoped;
use reqwest::StatusCode;

/// Asserts the status and the error shape; returns the body.
async fn refused(response: reqwest::Response, status: StatusCode, code: &str) -> ErrorBody {
    assert_eq!(response.status(), status, "{:?}", response.url().path());
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let body: ErrorBody = response.json().await.unwrap();
    assert_eq!(body.code.as_str(), code, "{body:?}");
    assert!(!body.message.is_empty());
    body
}

#[tokio::test]
async fn every_refusal_has_the_json_error_shape_and_changes_nothing() {
    scoped(|scope| async move {
        let agent = TestAgent::start(&scope, scope.bed.var("REPOSITORY"), "").await;
        let app = scope.app();
        let http = agent.client();
        let all = [S::Read, S::Deploy, S::Rollback, S::Admin];
        let admin = agent.token("ops", &all, &[]);
        let deploy_url = agent.at(&format!("/v1/apps/{app}/deployments"));
        let sha = scope.bed.sha("release-1").to_string();

        // Unauthenticated probes say nothing but whether the agent works.
        let health = http.get(agent.at("/healthz")).send().await.unwrap();
        assert_eq!(health.status(), StatusCode::OK);
        let ready = http.get(agent.at("/readiness")).send().await.unwrap();
        assert_eq!(ready.status(), StatusCode::OK);
        assert_eq!(
            ready.json::<serde_json::Value>().await.unwrap(),
            serde_json::json!({"status": "ok", "failing": []})
        );

        // No token, a token that is no JWT, a Basic header.
        let none = http.get(agent.at("/v1/whoami")).send().await.unwrap();
        assert!(none.headers().contains_key("www-authenticate"));
        refused(none, StatusCode::UNAUTHORIZED, "unauthenticated").await;
        for header in ["Bearer nonsense", "Basic b3BzOm9wcw=="] {
            let r = http
                .get(agent.at("/v1/whoami"))
                .header("authorization", header)
                .send()
                .await
                .unwrap();
            refused(r, StatusCode::UNAUTHORIZED, "invalid_token").await;
        }

        // Bad requests with a valid token.
        let post = |body: &'static str| {
            http.post(&deploy_url)
                .bearer_auth(&admin)
                .header("content-type", "application/json")
                .body(body)
        };
        refused(
            post("{").send().await.unwrap(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        )
        .await;
        let bad_sha = refused(
            post(r#"{"sha": "HEAD"}"#).send().await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        )
        .await;
        assert!(bad_sha.message.contains("lowercase hex"), "{bad_sha:?}");
        refused(
            post(r#"{"sha": "abc1234", "colour": "red"}"#)
                .send()
                .await
                .unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        )
        .await;
        let no_type = http
            .post(&deploy_url)
            .bearer_auth(&admin)
            .body(format!(r#"{{"sha": "{sha}"}}"#))
            .send()
            .await
            .unwrap();
        refused(
            no_type,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .await;
        let huge = format!(r#"{{"sha": "{sha}", "reason": "{}"}}"#, "x".repeat(20_000));
        let r = http
            .post(&deploy_url)
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body(huge)
            .send()
            .await
            .unwrap();
        refused(r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
        let long_reason = format!(r#"{{"sha": "{sha}", "reason": "{}"}}"#, "x".repeat(600));
        let r = http
            .post(&deploy_url)
            .bearer_auth(&admin)
            .json(&serde_json::from_str::<serde_json::Value>(&long_reason).unwrap())
            .send()
            .await
            .unwrap();
        refused(r, StatusCode::BAD_REQUEST, "invalid_reason").await;
        for (body, code) in [
            (
                serde_json::json!({"sha": sha, "digest": "sha256:ABC"}),
                "invalid_digest",
            ),
            (
                serde_json::json!({"sha": sha, "fleet": {"id": "f 1", "host": "web-1", "once_tasks": true}}),
                "invalid_fleet",
            ),
        ] {
            let r = http
                .post(&deploy_url)
                .bearer_auth(&admin)
                .json(&body)
                .send()
                .await
                .unwrap();
            refused(r, StatusCode::BAD_REQUEST, code).await;
        }
        let r = http
            .post(agent.at("/v1/apps/nope/deployments"))
            .bearer_auth(&admin)
            .json(&serde_json::json!({"sha": sha}))
            .send()
            .await
            .unwrap();
        refused(r, StatusCode::NOT_FOUND, "unknown_app").await;
        for (method, url, status, code) in [
            (
                "GET",
                agent.at("/v1/nothing"),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                "DELETE",
                deploy_url.clone(),
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
            ),
            (
                "GET",
                format!("{deploy_url}?limit=0"),
                StatusCode::BAD_REQUEST,
                "invalid_query",
            ),
            (
                "GET",
                agent.at("/v1/deployments/nope"),
                StatusCode::NOT_FOUND,
                "unknown_deployment",
            ),
        ] {
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let r = http
                .request(method, url)
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap();
            refused(r, status, code).await;
        }

        // Scopes, apps and the sha claim bound what a valid token may do.
        let reader = agent.token("viewer", &[S::Read], &[]);
        let r = http
            .post(&deploy_url)
            .bearer_auth(&reader)
            .json(&serde_json::json!({"sha": sha}))
            .send()
            .await
            .unwrap();
        refused(r, StatusCode::FORBIDDEN, "forbidden").await;
        let other_app = agent.token("ci-blog", &all, &["blog"]);
        let r = http
            .get(agent.at(&format!("/v1/apps/{app}/status")))
            .bearer_auth(&other_app)
            .send()
            .await
            .unwrap();
        refused(r, StatusCode::FORBIDDEN, "forbidden").await;
        let bound = agent.token_for(TokenRequest {
            key: None,
            subject: "ci".into(),
            scopes: vec![S::Deploy],
            apps: vec![app.clone()],
            sha: Some("abcdef1".into()),
            ttl: Duration::from_secs(60),
        });
        let r = http
            .post(&deploy_url)
            .bearer_auth(&bound)
            .json(&serde_json::json!({"sha": sha}))
            .send()
            .await
            .unwrap();
        let body = refused(r, StatusCode::FORBIDDEN, "forbidden").await;
        assert!(body.message.contains("abcdef1"), "{body:?}");

        // None of that recorded a deployment.
        let page: DeploymentPage = agent
            .get_json(&format!("/v1/apps/{app}/deployments"), &admin)
            .await;
        assert!(page.deployments.is_empty(), "{page:?}");

        // whoami reflects the token.
        let me: WhoAmI = agent.get_json("/v1/whoami", &reader).await;
        assert_eq!(
            (me.subject.as_str(), me.issuer.as_str()),
            ("viewer", "deployd")
        );
        assert_eq!(me.grants[0].scopes, [S::Read]);

        // The audit log fails closed: when its records cannot be written,
        // a change is refused and nothing is deployed.
        let db = rusqlite::Connection::open(agent.state.path().join("deployd.sqlite3")).unwrap();
        db.execute_batch(
            "CREATE TRIGGER no_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(FAIL, 'off'); END;",
        )
        .unwrap();
        let r = http
            .post(&deploy_url)
            .bearer_auth(agent.token("ci", &[S::Deploy], &[]))
            .json(&serde_json::json!({"sha": sha}))
            .send()
            .await
            .unwrap();
        refused(r, StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable").await;
        db.execute_batch("DROP TRIGGER no_audit;").unwrap();
        let history = agent.engine.store().history(&app, 10, None).unwrap();
        assert!(history.is_empty(), "{history:?}");

        // `deployd audit verify` checks the chain and names an edited record.
        let config = agent.state.path().join("audit.toml");
        std::fs::write(
            &config,
            format!("state_dir = \"{}\"\n", agent.state.path().display()),
        )
        .unwrap();
        let verify = || {
            std::process::Command::new(env!("CARGO_BIN_EXE_deployd"))
                .args(["audit", "verify", "--config"])
                .arg(&config)
                .output()
                .unwrap()
        };
        let intact = verify();
        let said = String::from_utf8_lossy(&intact.stdout).into_owned();
        assert!(intact.status.success() && said.contains("intact"), "{said}");
        db.execute_batch(
            "UPDATE audit SET body = replace(body, 'refused', 'refuses') WHERE seq = 3;",
        )
        .unwrap();
        let broken = verify();
        let said = String::from_utf8_lossy(&broken.stdout).into_owned();
        assert_eq!(broken.status.code(), Some(1), "{said}");
        assert!(said.contains("broken at record 3"), "{said}");

        // The OpenAPI document describes the routes served.
        let doc: serde_json::Value = http
            .get(agent.at("/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for path in [
            "/v1/apps/{app}/deployments",
            "/v1/apps/{app}/rollback",
            "/v1/apps/{app}/status",
            "/v1/apps/{app}/lock",
            "/v1/apps/{app}/prepare",
            "/v1/apps/{app}/canary/{order}",
            "/v1/deployments/{id}",
            "/v1/deployments/{id}/events",
            "/v1/whoami",
            "/healthz",
            "/readiness",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} not documented");
        }

        // Orders to a canary when none runs, a canary asked of an app
        // without one, and an order without the scope: refused.
        let before = agent.engine.store().history(&app, 100, None).unwrap().len();
        for what in ["promote", "abort"] {
            let r = http
                .post(agent.at(&format!("/v1/apps/{app}/canary/{what}")))
                .bearer_auth(agent.token("ops", &all, &[]))
                .json(&serde_json::json!({"reason": "by hand"}))
                .send()
                .await
                .unwrap();
            let body = refused(r, StatusCode::CONFLICT, "no_canary").await;
            assert_eq!(body.message, format!("no canary of {app} is running"));
        }
        let reader = agent.token("viewer", &[S::Read], &[]);
        let r = http
            .post(agent.at(&format!("/v1/apps/{app}/canary/promote")))
            .bearer_auth(&reader)
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap();
        refused(r, StatusCode::FORBIDDEN, "forbidden").await;
        let r = http
            .post(&deploy_url)
            .bearer_auth(agent.token("ops", &all, &[]))
            .json(&serde_json::json!({"sha": sha, "canary": true}))
            .send()
            .await
            .unwrap();
        let body = refused(r, StatusCode::BAD_REQUEST, "canary_not_configured").await;
        assert!(body.message.contains("canary"), "{body:?}");
        assert_eq!(agent.engine.store().history(&app, 100, None).unwrap().len(), before);
    })
    .await;
}

/// A request is answered only once its body has arrived, so refusing it
/// (wrong method, no token) leaves the keep-alive connection usable; a body
/// too large is answered with `Connection: close`. Over one raw TLS
/// connection whose client sends the body after the headers, as Python's
/// http.client does, and reuses the connection without retrying.
#[tokio::test]
async fn refusals_leave_keep_alive_connections_usable() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;

    scoped(|scope| async move {
        let agent = TestAgent::start(&scope, scope.bed.var("REPOSITORY"), "").await;
        let mut roots = rustls::RootCertStore::empty();
        let pem = agent.pki.ca_pem();
        for cert in <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(agent.server.addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut conn, driver) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(driver);
        let mut send = async |method: &str, path: &str, body: String| {
            conn.ready().await.expect("the agent closed the connection");
            let length = body.len();
            // The body follows the headers a moment later.
            let late = futures_util::stream::once(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok::<_, std::convert::Infallible>(Frame::data(bytes::Bytes::from(body)))
            });
            let request = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("host", "localhost")
                .header("content-type", "application/json")
                .header("content-length", length)
                .body(StreamBody::new(Box::pin(late)))
                .unwrap();
            let response = conn.send_request(request).await.unwrap();
            let status = response.status().as_u16();
            let close = response.headers().get("connection").cloned();
            response.into_body().collect().await.unwrap();
            (status, close)
        };
        let body = r#"{"reason": "fuzzed"}"#;
        for (method, path, status) in [
            // Without a token no route is looked at: the method is not judged.
            ("TRACE", "/v1/apps/shop/rollback", 401),
            ("PATCH", "/v1/apps/shop/lock", 401),
            ("POST", "/v1/apps/shop/rollback", 401),
            ("PUT", "/v1/apps/shop/lock", 401),
            ("POST", "/nowhere", 404),
        ] {
            let answer = send(method, path, body.to_owned()).await;
            assert_eq!(answer, (status, None), "{method} {path}");
        }
        let huge = format!(r#"{{"reason": "{}"}}"#, "x".repeat(20_000));
        let (status, close) = send("POST", "/v1/apps/shop/rollback", huge).await;
        assert_eq!(status, 413);
        assert_eq!(close.unwrap(), "close");
    })
    .await;
}

#[tokio::test]
async fn plaintext_gets_nothing_and_client_certificates_are_enforced() {
    scoped(|scope| async move {
        let plain = TestAgent::start(&scope, scope.bed.var("REPOSITORY"), "").await;
        // HTTP on the TLS port: no HTTP answer at all.
        let port = plain.server.addr().port();
        let r = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .timeout(Duration::from_secs(15))
            .send()
            .await;
        assert!(r.is_err(), "{r:?}");

        // With client_ca set, a client without a certificate fails the
        // handshake; one with a certificate the CA signed gets in.
        let ca = plain.pki.ca_path();
        let extra = format!("client_ca = \"{}\"", ca.display());
        let mtls = TestAgent::start(&scope, scope.bed.var("REPOSITORY"), &extra).await;
        let r = mtls.client().get(mtls.at("/healthz")).send().await;
        assert!(r.is_err(), "{r:?}");
        // The second agent's own CA signed its server certificate; the
        // client certificate comes from the first agent's CA, which the
        // second one trusts for clients.
        let issued = plain.pki.client("ci");
        let mut identity = std::fs::read(&issued.cert).unwrap();
        identity.extend(std::fs::read(&issued.key).unwrap());
        let server_ca = reqwest::Certificate::from_pem(mtls.pki.ca_pem().as_bytes()).unwrap();
        let client = reqwest::Client::builder()
            .tls_certs_only([server_ca])
            .identity(reqwest::Identity::from_pem(&identity).unwrap())
            .build()
            .unwrap();
        let r = client.get(mtls.at("/healthz")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);

        // A reloaded certificate serves new connections.
        let fresh = plain.pki.server("agent-renewed");
        let mut api = plain.config.api.clone().unwrap();
        api.tls_cert = fresh.cert.clone();
        api.tls_key = fresh.key.clone();
        plain.server.reload_tls(&api).unwrap();
        let r = plain
            .client()
            .get(plain.at("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn connections_past_the_caps_are_closed_and_long_heads_refused() {
    use tokio::io::AsyncReadExt;
    scoped(|scope| async move {
        let agent = TestAgent::start(
            &scope,
            scope.bed.var("REPOSITORY"),
            "max_connections_per_address = 3\nmax_header_line = \"2KiB\"",
        )
        .await;
        let addr = agent.server.addr();
        // Three connections that say nothing hold the address's places...
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // ...the fourth is closed before its handshake...
        let mut fourth = tokio::net::TcpStream::connect(addr).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(10), fourth.read(&mut [0u8; 16]))
            .await
            .expect("the fourth connection was held open");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let r = agent.client().get(agent.at("/healthz")).send().await;
        assert!(r.is_err(), "past the cap: {r:?}");
        // ...until one of them closes.
        drop(idle.pop());
        let r = deployd_testkit::poll(
            "a place for a new connection",
            Duration::from_secs(30),
            || async { agent.client().get(agent.at("/healthz")).send().await.ok() },
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);

        // A header line past max_header_line: 431, in the API's shape,
        // before the token is looked at.
        let token = agent.token("ops", &[deployd_proto::Scope::Read], &[]);
        let r = agent
            .client()
            .get(agent.at("/v1/whoami"))
            .bearer_auth(&token)
            .header("x-padding", "p".repeat(3000))
            .send()
            .await
            .unwrap();
        refused(
            r,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "header_too_large",
        )
        .await;
        let r = agent
            .client()
            .get(agent.at(&format!("/v1/apps/{}", "a".repeat(3000))))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        refused(r, StatusCode::URI_TOO_LONG, "header_too_large").await;
    })
    .await;
}

/// Reads an SSE stream until it ends or `stop_after` events came; returns
/// the events.
async fn read_events(
    response: reqwest::Response,
    stop_after: Option<usize>,
) -> Vec<DeploymentEvent> {
    use futures_util::StreamExt;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    while let Some(chunk) = body.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let mut id = None;
            let mut data = None;
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().parse::<u64>().unwrap());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = Some(v.trim().to_owned());
                }
            }
            if let Some(data) = data {
                let event: DeploymentEvent = serde_json::from_str(&data).unwrap();
                assert_eq!(Some(event.seq), id);
                events.push(event);
                if stop_after.is_some_and(|n| events.len() >= n) {
                    return events;
                }
            }
        }
    }
    events
}

#[tokio::test]
async fn deploy_follow_rollback_and_lock_through_the_api() {
    scoped(|scope| async move {
        let agent = TestAgent::deploying(&scope).await;
        let app = scope.app();
        let http = agent.client();
        // A token's id is spent by the change it makes: each change gets a
        // token of its own, as each CI job does.
        let ci = agent.token("ci-shop", &[S::Read, S::Deploy], &[&app]);
        let ops = || agent.token("ops", &[S::Read, S::Rollback, S::Admin], &[&app]);
        let deploy = |variant: &str| {
            http.post(agent.at(&format!("/v1/apps/{app}/deployments")))
                .bearer_auth(agent.token("ci-shop", &[S::Read, S::Deploy], &[&app]))
                .json(&serde_json::json!({"sha": scope.bed.sha(variant), "reason": variant}))
                .send()
        };
        let events_of = |d: &Deployment, last: Option<u64>| {
            let mut request = http
                .get(agent.at(&format!("/v1/deployments/{}/events", d.id)))
                .bearer_auth(&ci);
            if let Some(last) = last {
                request = request.header("last-event-id", last.to_string());
            }
            request.send()
        };

        // Release 1, followed live to the end.
        let r = deploy("release-1").await.unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let first: Deployment = r.json().await.unwrap();
        assert_eq!(first.requested_by, "ci-shop");
        let events = read_events(events_of(&first, None).await.unwrap(), None).await;
        let last = events.last().unwrap();
        assert!(
            matches!(last.kind, EventKind::State { state: DeploymentState::Succeeded, .. }),
            "{last:?}"
        );
        assert!(events.iter().any(|e| matches!(&e.kind,
            EventKind::Output { step, line } if step == "task:migrate" && line.contains("Applying"))));

        // Release 2: the stream is cut after a few events and resumed with
        // Last-Event-ID; together the parts are the whole log, once.
        let second: Deployment = deploy("release-2").await.unwrap().json().await.unwrap();
        // A second deployment meanwhile: 409 naming the running one.
        let r = deploy("release-1").await.unwrap();
        let conflict = refused_json(r, StatusCode::CONFLICT).await;
        assert_eq!(conflict.deployment.as_deref(), Some(second.id.0.as_str()));
        let head = read_events(events_of(&second, None).await.unwrap(), Some(5)).await;
        let resumed = read_events(
            events_of(&second, Some(head.last().unwrap().seq)).await.unwrap(),
            None,
        )
        .await;
        let seqs: Vec<u64> = head.iter().chain(&resumed).map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        let whole = read_events(events_of(&second, None).await.unwrap(), None).await;
        assert_eq!(whole.len(), seqs.len(), "a finished deployment replays and closes");
        // Resumed past its end, a finished stream answers 204: an
        // EventSource stops reconnecting.
        let past_end = events_of(&second, Some(*seqs.last().unwrap())).await.unwrap();
        assert_eq!(past_end.status(), StatusCode::NO_CONTENT);
        let done: Deployment = agent.get_json(&format!("/v1/deployments/{}", second.id), &ci).await;
        assert_eq!(done.state, DeploymentState::Succeeded, "{done:#?}");

        let status: AppStatus = agent.get_json(&format!("/v1/apps/{app}/status"), &ci).await;
        assert_eq!(status.live_sha, Some(scope.bed.sha("release-2")));

        // A lock refuses deployments, with its reason, until lifted.
        let r = http
            .put(agent.at(&format!("/v1/apps/{app}/lock")))
            .bearer_auth(ops())
            .json(&serde_json::json!({"reason": "incident 42"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let locked = refused_json(deploy("release-1").await.unwrap(), StatusCode::LOCKED).await;
        assert!(locked.message.contains("incident 42"), "{locked:?}");
        let r = http
            .delete(agent.at(&format!("/v1/apps/{app}/lock")))
            .bearer_auth(ops())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);

        // Rollback to the previous release; CI's token may not.
        let rollback = |token: &str| {
            http.post(agent.at(&format!("/v1/apps/{app}/rollback")))
                .bearer_auth(token)
                .json(&serde_json::json!({"reason": "bad release"}))
                .send()
        };
        refused_json(rollback(&ci).await.unwrap(), StatusCode::FORBIDDEN).await;
        let ops_token = ops();
        let r = rollback(&ops_token).await.unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let back: Deployment = r.json().await.unwrap();
        let events = read_events(events_of(&back, None).await.unwrap(), None).await;
        assert!(matches!(
            events.last().unwrap().kind,
            EventKind::State { state: DeploymentState::Succeeded, .. }
        ));
        // Replaying the token that made the rollback changes nothing.
        let replay = refused_json(rollback(&ops_token).await.unwrap(), StatusCode::UNAUTHORIZED).await;
        assert_eq!(replay.code, deployd_proto::ErrorCode::TokenReplayed);

        // History pages, newest first.
        let page: DeploymentPage = agent.get_json(&format!("/v1/apps/{app}/deployments?limit=2"), &ci).await;
        assert_eq!(page.deployments[0].id, back.id);
        assert_eq!(page.deployments[1].id, second.id);
        let next = page.next.unwrap();
        let rest: DeploymentPage = agent.get_json(&format!("/v1/apps/{app}/deployments?before={next}"), &ci).await;
        let ids: Vec<&str> = rest.deployments.iter().map(|d| d.id.0.as_str()).collect();
        assert_eq!(ids, [first.id.0.as_str()]);
        assert!(rest.next.is_none());

        // The audit log holds every change with who asked and how it went,
        // the refusals, and each deployment's end with its digest; its
        // chain holds.
        let store = agent.engine.store();
        assert!(matches!(store.verify_audit().unwrap(), deployd::store::ChainCheck::Intact(_)));
        let log = store.audit_tail(100).unwrap();
        let seen = |action: &str, outcome: &str| {
            log.iter().any(|e| e.record.action == action && e.record.outcome == outcome)
        };
        for (action, outcome) in [
            ("deploy", "requested"),
            ("rollback", "requested"),
            ("lock", "requested"),
            ("unlock", "requested"),
            ("deployment_finished", "succeeded"),
        ] {
            assert!(seen(action, outcome), "{action} {outcome}: {log:#?}");
        }
        let deploy_path = format!("POST /v1/apps/{app}/deployments");
        let conflict = log
            .iter()
            .find(|e| e.record.action == deploy_path && e.record.outcome == "refused")
            .unwrap();
        assert_eq!(conflict.record.detail.as_deref(), Some("409 conflict"));
        assert_eq!(conflict.record.subject.as_deref(), Some("ci-shop"));
        assert_eq!(conflict.record.source.as_deref(), Some("127.0.0.1"));
        let finished = log
            .iter()
            .find(|e| e.record.action == "deployment_finished")
            .unwrap();
        assert_eq!(finished.record.digest, first_done_digest(&agent, &first));
        let rollback_path = format!("POST /v1/apps/{app}/rollback");
        assert!(log.iter().any(|e| e.record.action == rollback_path
            && e.record.detail.as_deref() == Some("401 token_replayed")));

        // /metrics: for a token that may read every app, in Prometheus'
        // text format; what happened above is in it.
        let scrape = |token: Option<String>| {
            let mut request = http.get(agent.at("/metrics"));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            request.send()
        };
        refused_json(scrape(None).await.unwrap(), StatusCode::UNAUTHORIZED).await;
        // Read on this app only: the metrics name every app.
        refused_json(scrape(Some(ci.clone())).await.unwrap(), StatusCode::FORBIDDEN).await;
        let r = scrape(Some(agent.token("prometheus", &[S::Read], &["*"]))).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let text = r.text().await.unwrap();
        let release_1 = scope.bed.sha("release-1");
        for line in [
            format!(r#"deployd_deployments_total{{app="{app}",kind="deploy",outcome="succeeded"}} 2"#),
            format!(r#"deployd_deployments_total{{app="{app}",kind="rollback",outcome="succeeded"}} 1"#),
            format!(r#"deployd_rollbacks_total{{app="{app}",trigger="requested",outcome="succeeded"}} 1"#),
            format!(r#"deployd_deployment_duration_seconds_count{{app="{app}",kind="deploy",outcome="succeeded"}} 2"#),
            format!(r#"deployd_step_duration_seconds_count{{app="{app}",step="task:migrate",outcome="succeeded"}} 3"#),
            format!(r#"deployd_release_info{{app="{app}",service="web",sha="{release_1}"}} 1"#),
            format!(r#"deployd_release_info{{app="{app}",service="beat",sha="{release_1}"}} 1"#),
            r#"deployd_auth_failures_total{code="token_replayed"} 1"#.to_owned(),
            r#"deployd_auth_failures_total{code="unauthenticated"} 1"#.to_owned(),
        ] {
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
        assert_eq!(
            text.matches(&format!(r#"deployd_release_info{{app="{app}""#)).count(),
            agent.config.apps[&app].services.len(),
            "one release per service: {text}"
        );
        assert!(text.contains(&format!(r#"deployd_last_success_timestamp_seconds{{app="{app}"}} "#)));
    })
    .await;
}

fn first_done_digest(agent: &TestAgent, d: &Deployment) -> Option<String> {
    agent.engine.store().get(&d.id).unwrap().unwrap().digest
}

async fn refused_json(response: reqwest::Response, status: StatusCode) -> ErrorBody {
    assert_eq!(response.status(), status);
    response.json().await.unwrap()
}

/// A stand-in audit sink over HTTPS: keeps what it is sent, checks each
/// record's hash against its text and its link to the previous one.
async fn audit_sink(
    pki: &deployd_testkit::pki::Pki,
    listener: std::net::TcpListener,
    received: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) -> axum_server::Handle<std::net::SocketAddr> {
    use axum::routing::post;
    let issued = pki.server("sink");
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(&issued.cert, &issued.key)
        .await
        .unwrap();
    let app = axum::Router::new().route(
        "/records",
        post(
            move |headers: http::HeaderMap, axum::Json(record): axum::Json<serde_json::Value>| {
                let received = received.clone();
                async move {
                    assert_eq!(headers["authorization"], "Bearer sink-token");
                    received.lock().unwrap().push(record);
                    StatusCode::NO_CONTENT
                }
            },
        ),
    );
    let handle = axum_server::Handle::new();
    listener.set_nonblocking(true).unwrap();
    let server = axum_server::from_tcp_rustls(listener, tls)
        .unwrap()
        .handle(handle.clone());
    tokio::spawn(server.serve(app.into_make_service()));
    handle.listening().await.unwrap();
    handle
}

/// A fleet deployment on one host: prepare pins the digest without a
/// token spent; the fleet lock refuses every change not of its fleet
/// deployment, and changes in it from anyone but its holder; the token
/// that took it makes that deployment's deploy and unlock without being
/// spent again, only of its release, and is spent for anything else; a
/// newer token of the holder takes the lock over.
#[tokio::test]
async fn a_fleet_lock_lets_in_its_own_deployment_and_spends_the_token_once() {
    scoped(|scope| async move {
        let agent = TestAgent::deploying(&scope).await;
        let app = scope.app();
        let http = agent.client();
        let ci = || agent.token("ci-shop", &[S::Read, S::Deploy], &[&app]);
        let admin = || agent.token("ops", &[S::Read, S::Admin], &[&app]);
        let sha = scope.bed.sha("release-1");
        let lock_url = agent.at(&format!("/v1/apps/{app}/lock"));
        let fleet = |id: &str| serde_json::json!({"id": id, "name": "prod", "sha": sha});

        // Prepare: pulled and pinned, asked again until ready; the token
        // stays unspent (it then takes the lock).
        let token = ci();
        let prepared: deployd_proto::Prepared =
            deployd_testkit::poll("the prepare to end", Duration::from_secs(180), || async {
                let r = http
                    .post(agent.at(&format!("/v1/apps/{app}/prepare")))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"sha": sha}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status();
                let p: deployd_proto::Prepared = r.json().await.unwrap();
                (status == StatusCode::OK).then_some(p)
            })
            .await;
        assert_eq!(
            prepared.state,
            deployd_proto::PrepareState::Ready,
            "{prepared:?}"
        );
        let digest = prepared.digest.clone().unwrap();
        assert!(digest.starts_with("sha256:"), "{digest}");

        // A plain lock needs admin; a fleet lock needs deploy.
        let plain = http
            .put(&lock_url)
            .bearer_auth(ci())
            .json(&serde_json::json!({"reason": "mine"}))
            .send()
            .await
            .unwrap();
        refused(plain, StatusCode::FORBIDDEN, "forbidden").await;
        let r = http
            .put(&lock_url)
            .bearer_auth(&token)
            .json(&serde_json::json!({"reason": "fleet prod", "fleet": fleet("f-1")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let lock: deployd_proto::AppLock = r.json().await.unwrap();
        assert_eq!(lock.fleet.as_ref().unwrap().id, "f-1");
        assert!(lock.reason.contains("f-1"), "{lock:?}");

        // Another fleet deployment, and a single-host deployment: 423
        // naming the fleet deployment; their tokens stay usable.
        let other = ci();
        let r = http
            .put(&lock_url)
            .bearer_auth(&other)
            .json(&serde_json::json!({"reason": "fleet prod", "fleet": fleet("f-2")}))
            .send()
            .await
            .unwrap();
        let body = refused(r, StatusCode::LOCKED, "locked").await;
        assert!(body.message.contains("f-1"), "{body:?}");
        let deploy_url = agent.at(&format!("/v1/apps/{app}/deployments"));
        let r = http
            .post(&deploy_url)
            .bearer_auth(&other)
            .json(&serde_json::json!({"sha": sha}))
            .send()
            .await
            .unwrap();
        let body = refused(r, StatusCode::LOCKED, "locked").await;
        assert!(body.message.contains("fleet deployment f-1"), "{body:?}");
        let r = http
            .delete(format!("{lock_url}?fleet=f-2"))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap();
        refused(r, StatusCode::LOCKED, "locked").await;

        // The fleet's own deploy passes, with the same token, pinned.
        let part = serde_json::json!({"id": "f-1", "host": "web-1", "once_tasks": true});
        let r = http
            .post(&deploy_url)
            .bearer_auth(&token)
            .json(&serde_json::json!({"sha": sha, "digest": digest, "fleet": part}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let started: Deployment = r.json().await.unwrap();
        let ended: Deployment = deployd_testkit::poll(
            "the fleet deployment to end",
            Duration::from_secs(300),
            || async {
                let d: Deployment = agent
                    .get_json(&format!("/v1/deployments/{}", started.id), &ci())
                    .await;
                d.state.is_terminal().then_some(d)
            },
        )
        .await;
        assert_eq!(ended.state, DeploymentState::Succeeded, "{ended:?}");
        assert_eq!(ended.digest.as_deref(), Some(digest.as_str()));
        assert_eq!(ended.fleet.as_ref().unwrap().host, "web-1");

        // Naming the fleet deployment is not enough: another subject gets
        // 423, and its holder cannot ship another release in it.
        let intruder = agent.token("intruder", &[S::Read, S::Deploy], &[&app]);
        let r = http
            .post(&deploy_url)
            .bearer_auth(&intruder)
            .json(&serde_json::json!({"sha": sha, "force": true, "fleet": part}))
            .send()
            .await
            .unwrap();
        let body = refused(r, StatusCode::LOCKED, "locked").await;
        assert!(body.message.contains("only its own deployctl"), "{body:?}");
        let r = http
            .post(&deploy_url)
            .bearer_auth(&token)
            .json(&serde_json::json!({"sha": scope.bed.sha("release-2"), "fleet": part}))
            .send()
            .await
            .unwrap();
        refused(r, StatusCode::CONFLICT, "fleet_mismatch").await;

        // Anything not naming the fleet is a replay of the spent token.
        let r = http
            .post(&deploy_url)
            .bearer_auth(&token)
            .json(&serde_json::json!({"sha": sha, "force": true}))
            .send()
            .await
            .unwrap();
        refused(r, StatusCode::UNAUTHORIZED, "token_replayed").await;
        // A newer token of the same subject (a CI job token fetched again)
        // is spent once and takes the lock over: the old one is then a
        // replay, the new one unlocks.
        let renewed = ci();
        let r = http
            .put(&lock_url)
            .bearer_auth(&renewed)
            .json(&serde_json::json!({"reason": "fleet prod", "fleet": fleet("f-1")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = http
            .delete(format!("{lock_url}?fleet=f-1"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        refused(r, StatusCode::UNAUTHORIZED, "token_replayed").await;
        let r = http
            .delete(format!("{lock_url}?fleet=f-1"))
            .bearer_auth(&renewed)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let status: AppStatus = agent
            .get_json(&format!("/v1/apps/{app}/status"), &ci())
            .await;
        assert!(status.lock.is_none(), "{status:?}");
        let r = http
            .post(&deploy_url)
            .bearer_auth(&token)
            .json(&serde_json::json!({"sha": sha, "force": true, "fleet": part}))
            .send()
            .await
            .unwrap();
        refused(r, StatusCode::UNAUTHORIZED, "token_replayed").await;
        // An admin's lock replaces a fleet lock (the emergency brake).
        let r = http
            .put(&lock_url)
            .bearer_auth(ci())
            .json(&serde_json::json!({"reason": "fleet prod", "fleet": fleet("f-3")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = http
            .put(&lock_url)
            .bearer_auth(admin())
            .json(&serde_json::json!({"reason": "incident"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let lock: deployd_proto::AppLock = r.json().await.unwrap();
        assert!(lock.fleet.is_none(), "{lock:?}");
    })
    .await;
}

#[tokio::test]
async fn audit_records_reach_the_sink_in_order_and_survive_its_outage() {
    use sha2::Digest;
    use std::sync::{Arc, Mutex};
    deployd::install_crypto_provider();
    let pki = deployd_testkit::pki::Pki::new();
    let state = tempfile::tempdir().unwrap();
    let token_file = state.path().join("sink-token");
    std::fs::write(&token_file, "sink-token\n").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = deployd::config::Config::from_toml(&format!(
        r#"
        state_dir = "{state}"
        [audit]
        forward_url = "https://localhost:{port}/records"
        forward_ca = "{ca}"
        forward_token_file = "{token}"
        "#,
        state = state.path().display(),
        ca = pki.ca_path().display(),
        token = token_file.display(),
    ))
    .unwrap();
    let store = deployd::store::Store::open(state.path()).unwrap();
    let stopping = tokio_util::sync::CancellationToken::new();
    let tasks = deployd::audit::start(&config, &store, &stopping).unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = audit_sink(&pki, listener, received.clone()).await;
    let append = |action: &str| {
        store
            .append_audit(&deployd::store::AuditRecord::new(action, "accepted"))
            .unwrap()
    };
    let count = |n: usize| {
        let received = received.clone();
        async move { (received.lock().unwrap().len() >= n).then_some(()) }
    };
    append("deploy");
    append("lock");
    deployd_testkit::poll("2 records at the sink", Duration::from_secs(30), || {
        count(2)
    })
    .await;

    // The sink goes away: records are kept, and arrive once it is back.
    sink.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    append("unlock");
    append("rollback");
    // Long enough for the forwarder to find the sink gone and back off.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let _sink = audit_sink(&pki, listener, received.clone()).await;
    deployd_testkit::poll("4 records at the sink", Duration::from_secs(60), || {
        count(4)
    })
    .await;

    // In order, each once, and each checkable: its hash covers its link and
    // its text exactly as sent.
    let records = received.lock().unwrap().clone();
    let seqs: Vec<i64> = records.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    let mut previous = "0".repeat(64);
    for r in &records {
        assert_eq!(r["prev_hash"], previous.as_str());
        let text = format!("{previous}\n{}\n{}", r["seq"], r["body"].as_str().unwrap());
        let hash: String = sha2::Sha256::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(r["hash"], hash.as_str(), "{r}");
        previous = hash;
    }
    // The head file names the newest record.
    let head = deployd::store::AuditHead::read(&state.path().join("audit-head")).unwrap();
    assert_eq!((head.seq, head.hash.as_str()), (4, previous.as_str()));
    stopping.cancel();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn plans_are_made_read_and_held_to_and_only_an_admin_allows_unsafe_migrations() {
    scoped(|scope| async move {
        let agent = TestAgent::planning(&scope).await;
        let app = scope.app();
        let http = agent.client();
        let ci = || agent.token("ci-shop", &[S::Read, S::Deploy], &[&app]);
        let admin = || agent.token("ops", &[S::Read, S::Deploy, S::Admin], &[&app]);
        let deploy = |token: String, body: serde_json::Value| {
            http.post(agent.at(&format!("/v1/apps/{app}/deployments")))
                .bearer_auth(token)
                .json(&body)
                .send()
        };
        let ended = async |r: reqwest::Response| {
            assert_eq!(r.status(), StatusCode::ACCEPTED);
            let d: Deployment = r.json().await.unwrap();
            agent.engine.wait(&d.id).await.unwrap()
        };
        let ask = async |variant: &str| {
            http.post(agent.at(&format!("/v1/apps/{app}/plans")))
                .bearer_auth(ci())
                .json(&serde_json::json!({"sha": scope.bed.sha(variant)}))
                .send()
                .await
                .unwrap()
        };
        let plan = async |variant: &str| -> Plan {
            let r = ask(variant).await;
            assert_eq!(r.status(), StatusCode::ACCEPTED);
            let mut plan: Plan = r.json().await.unwrap();
            assert_eq!(plan.requested_by, "ci-shop");
            // One plan at a time per app (each pulls and runs a container).
            let again = ask(variant).await;
            assert_eq!(again.status(), StatusCode::CONFLICT);
            let again: ErrorBody = again.json().await.unwrap();
            assert_eq!(again.code, deployd_proto::ErrorCode::Preparing);
            assert!(again.message.contains(&plan.id), "{}", again.message);
            let token = ci();
            // A pull and an inspection: minutes at most, however slow.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
            while plan.state == PlanState::Planning {
                assert!(tokio::time::Instant::now() < deadline, "plan not made in 5 min");
                tokio::time::sleep(Duration::from_millis(500)).await;
                plan = agent
                    .get_json(&format!("/v1/plans/{}", plan.id), &token)
                    .await;
            }
            assert_eq!(plan.state, PlanState::Ready, "{plan:#?}");
            plan
        };
        let sha = |variant: &str| scope.bed.sha(variant).to_string();

        let two = ended(
            deploy(ci(), serde_json::json!({"sha": sha("release-2")}))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(two.state, DeploymentState::Succeeded, "{:?}", two.error);

        // A plan changes nothing: the live release and its schema stay.
        let reviewed = plan("drop-column").await;
        let live = reviewed.live.clone().unwrap();
        assert_eq!(
            (live.0.to_string(), Some(live.1)),
            (sha("release-2"), two.digest.clone())
        );
        let migrations = reviewed.migrations.clone().unwrap();
        assert_eq!(migrations.labels(), ["shop.0003_remove_heartbeat_queue"]);
        assert_eq!(migrations.migrations[0].verdict(), Verdict::Breaks);
        assert_eq!(reviewed.unsafe_migrations, UnsafeMigrations::Refuse);
        let services: Vec<&str> = reviewed.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(services, ["web", "worker", "beat"]);
        let again = plan("drop-column").await;
        assert_eq!(again.migrations, reviewed.migrations, "nothing was applied");

        // Reading plans: by scope, by id.
        let other = agent.token("ci-other", &[S::Read], &["other"]);
        let r = http
            .get(agent.at(&format!("/v1/plans/{}", reviewed.id)))
            .bearer_auth(other)
            .send();
        refused(r.await.unwrap(), StatusCode::FORBIDDEN, "forbidden").await;
        let unknown = "0193a1b2-0000-7000-8000-000000000001";
        let r = http
            .get(agent.at(&format!("/v1/plans/{unknown}")))
            .bearer_auth(ci())
            .send();
        refused(r.await.unwrap(), StatusCode::NOT_FOUND, "unknown_plan").await;
        let r = http
            .get(agent.at("/v1/plans/..%2Fetc"))
            .bearer_auth(ci())
            .send();
        refused(r.await.unwrap(), StatusCode::BAD_REQUEST, "invalid_body").await;

        // The override is an admin's, with a reason; refused, nothing is
        // recorded.
        let unsafe_body = |reason: Option<&str>| {
            serde_json::json!({
                "sha": sha("drop-column"), "allow_unsafe_migrations": true, "reason": reason,
            })
        };
        let before = agent.engine.store().history(&app, 100, None).unwrap().len();
        let r = deploy(ci(), unsafe_body(Some("drop it"))).await.unwrap();
        refused(r, StatusCode::FORBIDDEN, "forbidden").await;
        let r = deploy(admin(), unsafe_body(None)).await.unwrap();
        refused(r, StatusCode::BAD_REQUEST, "invalid_reason").await;
        assert_eq!(
            agent.engine.store().history(&app, 100, None).unwrap().len(),
            before
        );

        // Held to the reviewed plan, and refused by the app's rule.
        let held = serde_json::json!({"sha": sha("drop-column"), "plan": reviewed.id});
        let refused_deploy = ended(deploy(ci(), held).await.unwrap()).await;
        assert_eq!(refused_deploy.state, DeploymentState::Failed);
        assert_eq!(
            refused_deploy.reviewed_plan.as_deref(),
            Some(reviewed.id.as_str())
        );
        assert!(
            refused_deploy
                .error
                .as_deref()
                .unwrap()
                .starts_with("refused: ")
        );

        // The live release moves on: the reviewed plan is stale.
        let expand = ended(
            deploy(ci(), serde_json::json!({"sha": sha("expand")}))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            expand.state,
            DeploymentState::Succeeded,
            "{:?}",
            expand.error
        );
        let mut body = unsafe_body(Some("column unused since release 2"));
        body["plan"] = serde_json::json!(reviewed.id);
        let stale = ended(deploy(admin(), body.clone()).await.unwrap()).await;
        assert_eq!(stale.state, DeploymentState::Failed);
        let error = stale.error.unwrap();
        assert!(
            error.starts_with(&format!(
                "plan {} is stale: the live release changed ({} then, {} now)",
                reviewed.id,
                &sha("release-2")[..12],
                &sha("expand")[..12]
            )) && error.ends_with("; nothing running was changed"),
            "{error}"
        );

        // A fresh plan, reviewed and allowed: it goes on, audited.
        let fresh = plan("drop-column").await;
        body["plan"] = serde_json::json!(fresh.id);
        let allowed = ended(deploy(admin(), body).await.unwrap()).await;
        assert_eq!(
            allowed.state,
            DeploymentState::Succeeded,
            "{:?}",
            allowed.error
        );
        assert!(allowed.allow_unsafe_migrations);
        let said = agent.engine.store().events(&allowed.id, 0).unwrap();
        assert!(
            said.iter().any(|e| matches!(&e.kind, EventKind::Output { step, line }
                if step == "plan" && line.starts_with(
                    "allowed for this deployment (--allow-unsafe-migrations): a migration would break"
                ))),
            "{said:#?}"
        );
        let log = agent.engine.store().audit_tail(100).unwrap();
        let request = log
            .iter()
            .rev()
            .find(|e| e.record.action == "deploy" && e.record.subject.as_deref() == Some("ops"))
            .unwrap();
        assert_eq!(
            request.record.detail.as_deref(),
            Some(
                format!(
                    "column unused since release 2; holds to plan {}; allows migrations that \
                     break the running release",
                    fresh.id
                )
                .as_str()
            )
        );
    })
    .await;
}
