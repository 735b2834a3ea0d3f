//! A local OIDC issuer for tests: its JWKS over HTTPS (rotatable), and
//! GitHub-like job tokens signed with test-only RSA keys.

use std::sync::{Arc, Mutex};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::pki::Pki;

pub const RSA_A: &str = include_str!("../data/test-only-rsa-a.key");
pub const RSA_A_PUBLIC: &str = include_str!("../data/test-only-rsa-a.pub");
pub const RSA_B: &str = include_str!("../data/test-only-rsa-b.key");
pub const AUDIENCE: &str = "deployd-production";

pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// A local OIDC issuer: its JWKS over HTTPS, replaceable to rotate keys.
#[derive(Debug)]
pub struct Issuer {
    pub url: String,
    jwks: Arc<Mutex<JwkSet>>,
    pub pki: Pki,
}

impl Issuer {
    pub async fn start() -> Self {
        let pki = Pki::new();
        let tls = pki.server("issuer");
        let jwks = Arc::new(Mutex::new(JwkSet { keys: Vec::new() }));
        let served = jwks.clone();
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let set = served.lock().unwrap().clone();
                async move { axum::Json(set) }
            }),
        );
        let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key)
            .await
            .unwrap();
        let handle = axum_server::Handle::<std::net::SocketAddr>::new();
        let server =
            axum_server::bind_rustls("127.0.0.1:0".parse().unwrap(), config).handle(handle.clone());
        tokio::spawn(server.serve(app.into_make_service()));
        let addr = handle.listening().await.unwrap();
        Self {
            url: format!("https://localhost:{}", addr.port()),
            jwks,
            pki,
        }
    }

    /// Publishes exactly these (kid, private key PEM) pairs.
    pub fn publish(&self, keys: &[(&str, &str)]) {
        let keys = keys
            .iter()
            .map(|(kid, pem)| {
                let key = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
                let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
                jwk.common.key_id = Some((*kid).to_owned());
                jwk
            })
            .collect();
        *self.jwks.lock().unwrap() = JwkSet { keys };
    }

    /// A GitHub-like job token, signed with `pem` under `kid`.
    pub fn token(&self, kid: &str, pem: &str, overrides: Value) -> String {
        let mut claims = json!({
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "repo:acme/shop:environment:production",
            "iat": now(),
            "nbf": now(),
            "exp": now() + 300,
            "jti": uuid::Uuid::new_v4().to_string(),
            "repository": "acme/shop",
            "environment": "production",
            "ref": "refs/heads/main",
            "actor": "octocat",
        });
        for (k, v) in overrides.as_object().unwrap() {
            claims[k] = v.clone();
        }
        let key = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
        sign(Algorithm::RS256, kid, &key, &claims)
    }
}

impl Issuer {
    /// The `[[auth.oidc]]` section trusting this issuer: production deploys
    /// of `app` from `acme/shop`'s main branch in environment production.
    pub fn config(&self, app: &str) -> String {
        format!(
            r#"
            [[auth.oidc]]
            name = "github"
            issuer = "{url}"
            jwks_url = "{url}/jwks"
            ca_cert = "{ca}"
            max_token_age = "15m"
            jwks_min_interval = "1s"
            [[auth.oidc.rules]]
            audience = "{AUDIENCE}"
            claims = {{ repository = "acme/shop", environment = "production", ref = "refs/heads/main" }}
            apps = ["{app}"]
            scopes = ["deploy", "read"]
            "#,
            url = self.url,
            ca = self.pki.ca_path().display(),
        )
    }
}
