//! Authentication and policy through the real API: an attack corpus against
//! static keys and a local OIDC issuer that serves its JWKS over HTTPS and
//! rotates its key.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use deployd_proto::{DeploymentPage, ErrorBody, ErrorCode, WhoAmI};
use deployd_testkit::agent::TestAgent;
use deployd_testkit::oidc::{Issuer, RSA_A, RSA_A_PUBLIC, RSA_B, now, sign};
use deployd_testkit::scoped;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The agent's own token claims (issuer `deployd`), with `overrides`.
fn own_claims(app: &str, overrides: Value) -> Value {
    let mut claims = json!({
        "iss": "deployd",
        "aud": "deployd",
        "sub": "attacker",
        "iat": now(),
        "nbf": now(),
        "exp": now() + 300,
        "jti": uuid::Uuid::new_v4().to_string(),
        "scope": "read deploy rollback admin",
        "apps": [app],
    });
    for (k, v) in overrides.as_object().unwrap() {
        claims[k] = v.clone();
    }
    claims
}

async fn start(scope: &deployd_testkit::Scope, issuer: &Issuer) -> TestAgent {
    let rsa_public = std::env::temp_dir().join(format!("deployd-{}-rsa-a.pub", scope.id));
    std::fs::write(&rsa_public, RSA_A_PUBLIC).unwrap();
    let auth = format!(
        r#"
        [[auth.keys]]
        id = "rsa"
        algorithm = "RS256"
        public_key = "{rsa}"
        {oidc}
        "#,
        rsa = rsa_public.display(),
        oidc = issuer.config(&scope.app()),
    );
    TestAgent::start_with(scope, scope.bed.var("REPOSITORY"), "", &auth).await
}

#[tokio::test]
async fn the_attack_corpus_is_refused_recorded_and_changes_nothing() {
    scoped(|scope| async move {
        let issuer = Issuer::start().await;
        issuer.publish(&[("a", RSA_A)]);
        let agent = start(&scope, &issuer).await;
        let app = scope.app();
        let http = agent.client();
        let ops_key =
            EncodingKey::from_ed_pem(&std::fs::read(agent.pki.dir.path().join("ops.key")).unwrap())
                .unwrap();
        let own = |overrides: Value| {
            sign(
                Algorithm::EdDSA,
                "ops",
                &ops_key,
                &own_claims(&app, overrides),
            )
        };
        let sha = scope.bed.sha("release-1").to_string();

        // alg: none, unsigned.
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"ops","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(own_claims(&app, json!({})).to_string());
        let alg_none = format!("{header}.{payload}.");
        // HS256 "signed" with the RS256 key's public PEM as the secret.
        let hs256 = sign(
            Algorithm::HS256,
            "rsa",
            &EncodingKey::from_secret(RSA_A_PUBLIC.as_bytes()),
            &own_claims(&app, json!({})),
        );
        // A valid token whose payload is then edited to claim more.
        let valid = own(json!({"scope": "read"}));
        let parts: Vec<&str> = valid.split('.').collect();
        let edited = URL_SAFE_NO_PAD.encode(own_claims(&app, json!({})).to_string());
        let tampered = format!("{}.{edited}.{}", parts[0], parts[2]);

        let unauthenticated = [
            ("alg none", alg_none),
            ("HS256 with the RSA public key", hs256),
            (
                "expired",
                own(json!({"exp": now() - 3600, "iat": now() - 3700, "nbf": now() - 3700})),
            ),
            ("nbf in the future", own(json!({"nbf": now() + 3600}))),
            (
                "iat too old",
                own(json!({"iat": now() - 3 * 3600, "nbf": now() - 3 * 3600})),
            ),
            ("wrong aud", own(json!({"aud": "someone-else"}))),
            ("wrong iss", own(json!({"iss": "https://evil.example"}))),
            (
                "unknown kid",
                sign(
                    Algorithm::EdDSA,
                    "nope",
                    &ops_key,
                    &own_claims(&app, json!({})),
                ),
            ),
            ("tampered payload", tampered),
            (
                "OIDC token from a key the issuer does not publish",
                issuer.token("a", RSA_B, json!({})),
            ),
        ];
        let forbidden = [
            ("missing scope", own(json!({"scope": "read"}))),
            ("wrong app", own(json!({"apps": ["blog"]}))),
            ("sha claim mismatch", own(json!({"sha": "abcdef1"}))),
            (
                "GitHub token without environment=production",
                issuer.token("a", RSA_A, json!({"environment": "staging"})),
            ),
            (
                "GitHub token from another branch",
                issuer.token("a", RSA_A, json!({"ref": "refs/heads/feature"})),
            ),
        ];
        let store = agent.engine.store();
        let deploy = |token: String| {
            http.post(agent.at(&format!("/v1/apps/{app}/deployments")))
                .bearer_auth(token)
                .json(&json!({"sha": sha}))
                .send()
        };
        // Unauthenticated: 401 each; the address's first refusal is an
        // audit record, the rest are counted into its minute's summary.
        let before = store.audit_tail(1).unwrap().last().map_or(0, |e| e.seq);
        for (name, token) in unauthenticated {
            let r = deploy(token).await.unwrap();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{name}");
            let body: ErrorBody = r.json().await.unwrap();
            assert!(
                body.code != ErrorCode::Unknown && !body.message.is_empty(),
                "{name}"
            );
        }
        let recorded: Vec<_> = store
            .audit_tail(100)
            .unwrap()
            .into_iter()
            .filter(|e| e.seq > before)
            .collect();
        assert_eq!(recorded.len(), 1, "{recorded:#?}");
        let first = &recorded[0].record;
        assert_eq!(first.action, format!("POST /v1/apps/{app}/deployments"));
        assert_eq!(first.outcome, "refused");
        assert!(first.subject.is_none());
        assert!(
            first.detail.as_deref().unwrap().starts_with("401"),
            "{first:?}"
        );
        // Authenticated but not allowed: a record each, with who it was.
        for (name, token) in forbidden {
            let before = store.audit_tail(1).unwrap().last().map_or(0, |e| e.seq);
            let r = deploy(token).await.unwrap();
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{name}");
            let body: ErrorBody = r.json().await.unwrap();
            assert!(
                body.code != ErrorCode::Unknown && !body.message.is_empty(),
                "{name}"
            );
            let last = store.audit_tail(1).unwrap().pop().unwrap();
            assert!(last.seq > before, "{name}: not audited");
            assert_eq!(last.record.outcome, "refused", "{name}");
            assert!(last.record.subject.is_some(), "{name}");
            let detail = last.record.detail.unwrap();
            assert!(detail.starts_with("403"), "{name}: {detail}");
        }

        // A token bound to a sha cannot roll back to anything else.
        let r = http
            .post(agent.at(&format!("/v1/apps/{app}/rollback")))
            .bearer_auth(own(json!({"sha": "abcdef1"})))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);

        // A replayed token: its first change goes through, the copy does not.
        let token = own(json!({}));
        let lock = |token: &str, reason: &str| {
            http.put(agent.at(&format!("/v1/apps/{app}/lock")))
                .bearer_auth(token)
                .json(&json!({"reason": reason}))
                .send()
        };
        assert_eq!(
            lock(&token, "first").await.unwrap().status(),
            StatusCode::OK
        );
        let replay = lock(&token, "replayed").await.unwrap();
        assert_eq!(replay.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            replay.json::<ErrorBody>().await.unwrap().code,
            ErrorCode::TokenReplayed
        );
        assert_eq!(store.lock_of(&app).unwrap().unwrap().reason, "first");

        // Nothing was deployed by any of it.
        let page: DeploymentPage = agent
            .get_json(&format!("/v1/apps/{app}/deployments"), &own(json!({})))
            .await;
        assert!(page.deployments.is_empty(), "{page:#?}");
        assert!(matches!(
            store.verify_audit().unwrap(),
            deployd::store::ChainCheck::Intact(_)
        ));
        // Raw tokens never reach the audit log; claims that say where a
        // job came from do.
        let log = store.audit_tail(1000).unwrap();
        let text =
            serde_json::to_string(&log.iter().map(|e| &e.record).collect::<Vec<_>>()).unwrap();
        assert!(!text.contains(&token), "a token was logged");
        assert!(text.contains("refs/heads/feature"), "claims missing");

        // Failed authentications from one address: past the limit (20 a
        // minute), its unauthenticated requests get 429, whatever the path
        // or method; a token that verifies still gets through (a CI runner
        // behind the same NAT); and the flood is one summary record.
        let before = store.audit_tail(1).unwrap().last().map_or(0, |e| e.seq);
        let mut statuses = Vec::new();
        for i in 0..30 {
            let request = if i % 2 == 0 {
                http.get(agent.at("/v1/whoami"))
            } else {
                http.patch(agent.at(&format!("/v1/{}", "x".repeat(5000))))
            };
            let r = request.bearer_auth("not-a-token").send().await.unwrap();
            statuses.push(r.status());
        }
        assert!(statuses.contains(&StatusCode::UNAUTHORIZED));
        assert_eq!(statuses.last(), Some(&StatusCode::TOO_MANY_REQUESTS));
        let r = http.get(agent.at("/v1/whoami")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()["retry-after"], "60");
        assert_eq!(
            r.json::<ErrorBody>().await.unwrap().code,
            ErrorCode::TooManyFailures
        );
        let r = http
            .get(agent.at("/v1/whoami"))
            .bearer_auth(own(json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        agent.api.write_refusal_summaries(true);
        let flood: Vec<_> = store
            .audit_tail(100)
            .unwrap()
            .into_iter()
            .filter(|e| e.seq > before)
            .collect();
        assert_eq!(flood.len(), 1, "{flood:#?}");
        let summary = &flood[0].record;
        assert_eq!(summary.action, "refused_requests");
        assert_eq!(summary.source.as_deref(), Some("127.0.0.1"));
        let detail = summary.detail.as_deref().unwrap();
        assert!(detail.starts_with("40 unauthenticated"), "{detail}");
        assert!(detail.contains("429 too_many_failures x"), "{detail}");
        assert!(detail.contains("401 invalid_token x"), "{detail}");
        assert!(matches!(
            store.verify_audit().unwrap(),
            deployd::store::ChainCheck::Intact(_)
        ));
    })
    .await;
}

#[tokio::test]
async fn an_oidc_issuer_key_rotation_is_followed() {
    scoped(|scope| async move {
        let issuer = Issuer::start().await;
        issuer.publish(&[("a", RSA_A)]);
        let agent = start(&scope, &issuer).await;
        let http = agent.client();
        let whoami = |token: String| http.get(agent.at("/v1/whoami")).bearer_auth(token).send();

        // A production job's token: the rule grants it deploy and read.
        let r = whoami(issuer.token("a", RSA_A, json!({"user_email": "octo@example.com"})))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let me: WhoAmI = r.json().await.unwrap();
        assert_eq!(me.subject, "repo:acme/shop:environment:production");
        assert_eq!(me.grants.len(), 1);
        assert_eq!(me.grants[0].apps, [scope.app()]);

        // A token without kid is refused outright.
        let key = EncodingKey::from_rsa_pem(RSA_A.as_bytes()).unwrap();
        let claims: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(
                    issuer
                        .token("a", RSA_A, json!({}))
                        .split('.')
                        .nth(1)
                        .unwrap(),
                )
                .unwrap(),
        )
        .unwrap();
        let no_kid = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap();
        assert_eq!(
            whoami(no_kid).await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );

        // The issuer rotates to key b: the first token naming b makes the
        // agent fetch the keys again; a is then gone.
        issuer.publish(&[("b", RSA_B)]);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let r = whoami(issuer.token("b", RSA_B, json!({}))).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = whoami(issuer.token("a", RSA_A, json!({}))).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

        // A refused change is audited with the token's origin claims, but
        // never with an e-mail address (GitLab's user_email).
        let token = issuer.token("b", RSA_B, json!({"user_email": "octo@example.com"}));
        let r = http
            .put(agent.at(&format!("/v1/apps/{}/lock", scope.app())))
            .bearer_auth(token)
            .json(&json!({"reason": "not allowed"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let log = agent.engine.store().audit_tail(1000).unwrap();
        let text =
            serde_json::to_string(&log.iter().map(|e| &e.record).collect::<Vec<_>>()).unwrap();
        assert!(!text.contains("octo@example.com"), "{text}");
        assert!(text.contains("octocat"), "{text}");
    })
    .await;
}
