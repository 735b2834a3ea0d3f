//! OIDC issuers (GitHub Actions, GitLab CI): their keys, fetched from the
//! JWKS URL and cached by `kid`, and their policy rules.
//!
//! A token naming a `kid` the cache lacks triggers a refresh, but at most
//! one at a time (others wait for it) and at most one attempt per
//! `jwks_min_interval`, failed or not; the cache is also refreshed once it
//! is older than `jwks_refresh`, so a key the issuer withdrew stops
//! working. While refreshes fail, the last keys fetched stay in use for one
//! more `jwks_refresh`, then tokens of the issuer are refused until a fetch
//! succeeds.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use deployd_proto::Grant;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use super::{AuthError, algorithm, invalid};
use crate::config::{OidcConfig, RuleConfig};

/// `*` and `?` stop at `/`: `acme/*` is not `acme/subgroup/project`, and
/// `refs/heads/*` not `refs/heads/team/feature`.
const GLOB_OPTIONS: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// Largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// One configured issuer.
pub(super) struct Issuer {
    pub name: String,
    pub issuer: String,
    pub algorithms: Vec<Algorithm>,
    pub max_age: Option<Duration>,
    /// Every audience a rule binds: the token's `aud` must be one.
    pub audiences: Vec<String>,
    rules: Vec<Rule>,
    jwks_url: String,
    refresh: Duration,
    min_interval: Duration,
    http: reqwest::Client,
    cache: Arc<RwLock<Cache>>,
    /// Held by the one request that refreshes; the others wait on it.
    refreshing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Cache {
    keys: HashMap<String, DecodingKey>,
    /// The last successful fetch.
    fetched_at: Option<Instant>,
    /// The last attempt, successful or not.
    attempted_at: Option<Instant>,
}

struct Rule {
    audience: String,
    claims: Vec<(String, glob::Pattern)>,
    grant: Grant,
}

impl Issuer {
    pub fn new(cfg: &OidcConfig) -> Result<Self, String> {
        let http = crate::https_client(cfg.ca_cert.as_deref())
            .map_err(|e| format!("HTTP client for {}: {e}", cfg.jwks_url))?;
        let rules = cfg.rules.iter().map(rule).collect::<Result<Vec<_>, _>>()?;
        let mut audiences: Vec<String> = rules.iter().map(|r| r.audience.clone()).collect();
        audiences.sort();
        audiences.dedup();
        Ok(Self {
            name: cfg.name.clone(),
            issuer: cfg.issuer.clone(),
            algorithms: cfg.algorithms.iter().map(|a| algorithm(*a)).collect(),
            max_age: cfg.max_token_age,
            audiences,
            rules,
            jwks_url: cfg.jwks_url.clone(),
            refresh: cfg.jwks_refresh,
            min_interval: cfg.jwks_min_interval,
            http,
            cache: Arc::default(),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    /// The key `kid` names, fetching the issuer's keys when needed.
    pub async fn key(&self, kid: &str) -> Result<DecodingKey, AuthError> {
        if let (Some(key), true) = self.cached(kid) {
            return Ok(key);
        }
        // One refresh at a time; whoever waited may find it done.
        let _refreshing = self.refreshing.lock().await;
        if let (Some(key), true) = self.cached(kid) {
            return Ok(key);
        }
        let attempted = self.read_cache().attempted_at;
        if attempted.is_none_or(|at| at.elapsed() >= self.min_interval) {
            self.write_cache().attempted_at = Some(Instant::now());
            // A task of its own: a caller that goes away does not cut the
            // refresh short, and its result is kept either way.
            let refresh = tokio::spawn(refresh(
                self.http.clone(),
                self.jwks_url.clone(),
                self.name.clone(),
                self.cache.clone(),
            ));
            if let Err(e) = refresh.await {
                tracing::warn!(issuer = %self.name, error = %e, "key refresh task failed");
            }
        }
        match self.cached(kid) {
            (Some(key), _) if self.usable() => Ok(key),
            (Some(_), _) => Err(invalid(
                "the issuer's keys could not be fetched for too long",
            )),
            (None, _) => Err(invalid(
                "the token's key (kid) is not among the issuer's keys",
            )),
        }
    }

    /// The cached key, and whether the cache is fresh.
    fn cached(&self, kid: &str) -> (Option<DecodingKey>, bool) {
        let cache = self.read_cache();
        let fresh = cache
            .fetched_at
            .is_some_and(|at| at.elapsed() < self.refresh);
        (cache.keys.get(kid).cloned(), fresh)
    }

    /// Stale keys serve one more refresh period while fetching fails.
    fn usable(&self) -> bool {
        self.read_cache()
            .fetched_at
            .is_some_and(|at| at.elapsed() < self.refresh.saturating_mul(2))
    }

    fn read_cache(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        crate::sync::read(&self.cache)
    }

    fn write_cache(&self) -> std::sync::RwLockWriteGuard<'_, Cache> {
        crate::sync::write(&self.cache)
    }

    /// What the token's claims earn under the issuer's rules.
    pub fn grants(&self, claims: &Map<String, Value>) -> Vec<Grant> {
        let audiences = audiences(claims);
        self.rules
            .iter()
            .filter(|r| audiences.contains(&r.audience.as_str()))
            .filter(|r| {
                r.claims.iter().all(|(name, pattern)| {
                    claim_text(claims.get(name))
                        .is_some_and(|text| pattern.matches_with(&text, GLOB_OPTIONS))
                })
            })
            .map(|r| r.grant.clone())
            .collect()
    }
}

/// Fetches the issuer's keys into `cache`; a failure is logged and leaves
/// the cache as it was.
async fn refresh(http: reqwest::Client, url: String, issuer: String, cache: Arc<RwLock<Cache>>) {
    match fetch(&http, &url).await {
        Ok(keys) => {
            tracing::info!(%issuer, keys = keys.len(), "issuer keys fetched");
            let mut cache = crate::sync::write(&cache);
            cache.keys = keys;
            cache.fetched_at = Some(Instant::now());
        }
        Err(e) => tracing::warn!(%issuer, error = %e, "cannot fetch the issuer's keys"),
    }
}

async fn fetch(http: &reqwest::Client, url: &str) -> Result<HashMap<String, DecodingKey>, String> {
    let mut response = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("GET {url}: HTTP {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_JWKS_BYTES {
            return Err(format!("{url} is larger than 1 MiB"));
        }
    }
    let set: JwkSet =
        serde_json::from_slice(&body).map_err(|e| format!("{url} is not a JWKS document: {e}"))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = &jwk.common.key_id else {
            continue;
        };
        match DecodingKey::from_jwk(jwk) {
            Ok(key) => {
                keys.insert(kid.clone(), key);
            }
            Err(e) => tracing::debug!(%kid, error = %e, "key skipped"),
        }
    }
    Ok(keys)
}

fn rule(cfg: &RuleConfig) -> Result<Rule, String> {
    let claims = cfg
        .claims
        .iter()
        .map(|(name, pattern)| {
            glob::Pattern::new(pattern)
                .map(|p| (name.clone(), p))
                .map_err(|e| format!("rule claim {name}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Rule {
        audience: cfg.audience.clone(),
        claims,
        grant: Grant {
            apps: cfg.apps.clone(),
            scopes: cfg.scopes.clone(),
        },
    })
}

/// The token's audiences: `aud` is a string or a list.
fn audiences(claims: &Map<String, Value>) -> Vec<&str> {
    match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud.as_str()],
        Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// A claim as text: strings as they are, booleans and numbers as JSON
/// writes them; lists and objects never match.
pub(super) fn claim_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deployd_proto::Scope;

    fn issuer(rules: &str) -> Issuer {
        let text = format!(
            r#"
            [[auth.oidc]]
            name = "gitlab"
            issuer = "https://gitlab.example.com"
            jwks_url = "https://gitlab.example.com/oauth/discovery/keys"
            {rules}
            "#
        );
        let config = crate::config::Config::from_toml(&text).unwrap();
        Issuer::new(&config.auth.oidc[0]).unwrap()
    }

    #[test]
    fn rules_bind_the_audience_and_every_claim_with_globs() {
        let issuer = issuer(
            r#"
            [[auth.oidc.rules]]
            audience = "deployd-prod"
            claims = { project_path = "acme/shop", ref_protected = "true", environment = "production", ref = "refs/tags/v*" }
            apps = ["shop"]
            scopes = ["deploy", "read"]
            "#,
        );
        let claims = |json: Value| json.as_object().unwrap().clone();
        let good = claims(serde_json::json!({
            "aud": "deployd-prod", "project_path": "acme/shop",
            "ref_protected": "true", "environment": "production", "ref": "refs/tags/v1.2",
        }));
        let grants = issuer.grants(&good);
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].scopes, [Scope::Deploy, Scope::Read]);
        // A JSON boolean compares as its text too.
        let mut boolean = good.clone();
        boolean.insert("ref_protected".into(), true.into());
        assert_eq!(issuer.grants(&boolean).len(), 1);
        for (name, value) in [
            ("aud", serde_json::json!("other")),
            ("aud", serde_json::json!(["other", "x"])),
            ("ref_protected", serde_json::json!("false")),
            ("environment", serde_json::json!("staging")),
            ("project_path", serde_json::json!("evil/shop")),
            ("project_path", serde_json::json!("acme/subgroup/shop")),
            ("ref", serde_json::json!("refs/heads/main")),
            ("environment", serde_json::json!(["production"])),
        ] {
            let mut bad = good.clone();
            bad.insert(name.into(), value.clone());
            assert!(issuer.grants(&bad).is_empty(), "{name}={value}");
        }
        let mut missing = good;
        missing.remove("environment");
        assert!(issuer.grants(&missing).is_empty());
    }
}
