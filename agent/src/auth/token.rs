//! `deployd token issue`: tokens signed with a configured key, for ops and
//! for CI systems without an OIDC issuer.

use std::time::Duration;

use deployd_proto::Scope;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;
use time::OffsetDateTime;

use super::{algorithm, read_key_file, read_secret};
use crate::config::{AuthConfig, KeyAlgorithm};

/// What a new token says.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// Key to sign with (`auth.keys[].id`); the first one that can sign
    /// when absent.
    pub key: Option<String>,
    /// Who the token is for, e.g. `ci-shop` or `alice`.
    pub subject: String,
    pub scopes: Vec<Scope>,
    /// Apps it applies to; every app when empty.
    pub apps: Vec<String>,
    /// Deploy only this commit (a `sha` claim).
    pub sha: Option<String>,
    pub ttl: Duration,
}

/// Signs a token; errors say which key or setting is missing.
pub fn issue(cfg: &AuthConfig, request: &TokenRequest) -> Result<String, String> {
    if request.ttl.is_zero() {
        return Err("the token's lifetime must be longer than 0 s".into());
    }
    if request.ttl > cfg.max_token_age {
        return Err(format!(
            "a token may live at most auth.max_token_age ({}); asked for {}",
            humantime::format_duration(cfg.max_token_age),
            humantime::format_duration(request.ttl)
        ));
    }
    if request.scopes.is_empty() {
        return Err("name at least one scope (read, deploy, rollback, admin, run, logs)".into());
    }
    let can_sign =
        |k: &&crate::config::KeyConfig| k.private_key.is_some() || k.algorithm.is_secret();
    let key = match &request.key {
        Some(id) => cfg
            .keys
            .iter()
            .find(|k| &k.id == id)
            .ok_or_else(|| format!("no key {id} in auth.keys"))?,
        None => cfg
            .keys
            .iter()
            .find(can_sign)
            .ok_or("no key in auth.keys has a private_key or secret_file to sign with")?,
    };
    if !can_sign(&key) {
        return Err(format!("key {} has no private_key to sign with", key.id));
    }
    let encoding = match (key.algorithm, &key.private_key, &key.secret_file) {
        (KeyAlgorithm::HS256, _, Some(path)) => EncodingKey::from_secret(&read_secret(path)?),
        (KeyAlgorithm::EdDSA, Some(path), _) => EncodingKey::from_ed_pem(&read_key_file(path)?)
            .map_err(|e| format!("{} is not a PEM Ed25519 private key: {e}", path.display()))?,
        (_, Some(path), _) => EncodingKey::from_rsa_pem(&read_key_file(path)?)
            .map_err(|e| format!("{} is not a PEM RSA private key: {e}", path.display()))?,
        _ => return Err(format!("key {} cannot sign", key.id)),
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let ttl = i64::try_from(request.ttl.as_secs()).unwrap_or(i64::MAX);
    let scope: Vec<&str> = request.scopes.iter().map(|s| s.as_str()).collect();
    let mut claims = json!({
        "iss": cfg.issuer,
        "aud": cfg.audience,
        "sub": request.subject,
        "iat": now,
        "nbf": now,
        "exp": now.saturating_add(ttl),
        "jti": uuid::Uuid::new_v4().to_string(),
        "scope": scope.join(" "),
    });
    if !request.apps.is_empty() {
        claims["apps"] = json!(request.apps);
    }
    if let Some(sha) = &request.sha {
        claims["sha"] = json!(sha);
    }
    let mut header = Header::new(algorithm(key.algorithm));
    header.kid = Some(key.id.clone());
    jsonwebtoken::encode(&header, &claims, &encoding).map_err(|e| format!("signing failed: {e}"))
}
