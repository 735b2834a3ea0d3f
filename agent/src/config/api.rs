//! The `[api]` and `[auth]` sections: where the HTTPS API listens, its TLS
//! material and limits, and which tokens it accepts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{Problems, is_plain_name};

/// The HTTPS API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address and port to listen on. Default: `127.0.0.1:8443`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// PEM certificate chain the API presents, leaf first.
    pub tls_cert: PathBuf,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate it signed
    /// (mutual TLS), on top of their token.
    pub client_ca: Option<PathBuf>,
    /// Longest a TLS handshake may take. Default: 10 s.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Longest a client may take to send a request's headers, the first
    /// one included. Default: 10 s.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Longest the agent takes to answer (event streams, once started, are
    /// not cut). Default: 30 s.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Requests handled at once; more are refused with 503. Default: 512.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_requests: usize,
}

/// Which bearer tokens the API accepts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `iss` of the tokens signed with `keys` (`deployd token issue` writes
    /// it). Default: `deployd`.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// `aud` those tokens must carry. Default: `deployd`.
    #[serde(default = "default_audience")]
    pub audience: String,
    /// A token issued (`iat`) longer ago than this is refused, whatever its
    /// `exp`. Default: 24 h.
    #[serde(default = "default_max_token_age", with = "humantime_serde")]
    pub max_token_age: Duration,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`. Default: 30 s.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// Failed authentications allowed per client address and minute;
    /// past that the address gets 429 until its failures age out.
    /// Default: 20.
    #[serde(default = "default_max_failures")]
    pub max_failures_per_minute: usize,
    /// Keys of the tokens this host trusts directly, by `kid`.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// CI systems whose OIDC tokens are accepted, and what they may do.
    #[serde(default)]
    pub oidc: Vec<OidcConfig>,
}

/// An OIDC issuer (GitHub Actions, GitLab CI): its keys come from its JWKS
/// URL; its rules say which of its tokens may do what.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// A name for logs and the audit log, e.g. `github`.
    pub name: String,
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// Where its signing keys are published (HTTPS).
    pub jwks_url: String,
    /// PEM CA bundle trusted for `jwks_url`, besides the system roots.
    pub ca_cert: Option<PathBuf>,
    /// Algorithms its tokens may use. Default: `["RS256"]`.
    #[serde(default = "default_oidc_algorithms")]
    pub algorithms: Vec<KeyAlgorithm>,
    /// Overrides `auth.max_token_age` for this issuer (CI tokens live
    /// minutes).
    #[serde(default, with = "humantime_serde")]
    pub max_token_age: Option<Duration>,
    /// Keys are fetched again once this old. Default: 10 min.
    #[serde(default = "default_jwks_refresh", with = "humantime_serde")]
    pub jwks_refresh: Duration,
    /// A token naming an unknown key refreshes the keys at most this often.
    /// Default: 30 s.
    #[serde(default = "default_jwks_min_interval", with = "humantime_serde")]
    pub jwks_min_interval: Duration,
    /// Which tokens get which scopes on which apps. A token no rule
    /// matches may do nothing.
    pub rules: Vec<RuleConfig>,
}

/// A policy rule, in the spirit of Vault's `bound_claims`: a token matching
/// the audience and every bound claim gets `scopes` on `apps`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The `aud` the token must carry (what the CI job asked its token for).
    pub audience: String,
    /// Claim name -> value. Values are exact strings or globs (`*`, `?`,
    /// `[...]`); booleans and numbers in tokens compare as their text
    /// (GitLab sends `"true"`).
    pub claims: std::collections::BTreeMap<String, String>,
    /// Apps the rule applies to (`*` for all).
    pub apps: Vec<String>,
    /// Granted scopes: read, deploy, rollback, admin.
    pub scopes: Vec<deployd_proto::Scope>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: default_issuer(),
            audience: default_audience(),
            max_token_age: default_max_token_age(),
            leeway: default_leeway(),
            max_failures_per_minute: default_max_failures(),
            keys: Vec::new(),
            oidc: Vec::new(),
        }
    }
}

/// A signing algorithm. The accepted one is set per key here, never taken
/// from a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum KeyAlgorithm {
    /// Ed25519 (preferred).
    EdDSA,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    /// HMAC with a shared secret of at least 32 bytes.
    HS256,
}

impl KeyAlgorithm {
    /// Whether the key is a shared secret rather than a key pair.
    pub fn is_secret(self) -> bool {
        self == Self::HS256
    }
}

/// One key tokens may be signed with.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The `kid` tokens signed with it carry.
    pub id: String,
    pub algorithm: KeyAlgorithm,
    /// PEM public key (SPKI), for EdDSA and RSA.
    pub public_key: Option<PathBuf>,
    /// PEM private key: lets `deployd token issue` sign with this key.
    /// Better kept off the API host.
    pub private_key: Option<PathBuf>,
    /// File holding the HS256 secret (at least 32 bytes; a trailing newline
    /// is ignored).
    pub secret_file: Option<PathBuf>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_concurrent() -> usize {
    512
}
fn default_issuer() -> String {
    "deployd".into()
}
fn default_audience() -> String {
    "deployd".into()
}
fn default_max_token_age() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_max_failures() -> usize {
    20
}
fn default_oidc_algorithms() -> Vec<KeyAlgorithm> {
    vec![KeyAlgorithm::RS256]
}
fn default_jwks_refresh() -> Duration {
    Duration::from_secs(600)
}
fn default_jwks_min_interval() -> Duration {
    Duration::from_secs(30)
}

impl ApiConfig {
    pub(super) fn validate(&self, problems: &mut Problems) {
        if self.max_concurrent_requests == 0 {
            problems.add("api.max_concurrent_requests", "must be at least 1");
        }
        for (key, value) in [
            ("handshake_timeout", self.handshake_timeout),
            ("header_timeout", self.header_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if value.is_zero() {
                problems.add(format!("api.{key}"), "must be longer than 0 s");
            }
        }
    }
}

impl AuthConfig {
    pub(super) fn validate(&self, problems: &mut Problems) {
        if self.issuer.is_empty() {
            problems.add("auth.issuer", "must not be empty");
        }
        if self.audience.is_empty() {
            problems.add("auth.audience", "must not be empty");
        }
        if self.max_failures_per_minute == 0 {
            problems.add("auth.max_failures_per_minute", "must be at least 1");
        }
        if self.max_token_age.is_zero() {
            problems.add("auth.max_token_age", "must be longer than 0 s");
        }
        for (i, key) in self.keys.iter().enumerate() {
            let at = format!("auth.keys[{i}]");
            key.validate(&at, problems);
            if self.keys[..i].iter().any(|k| k.id == key.id) {
                problems.add(format!("{at}.id"), format!("{} is used twice", key.id));
            }
        }
        for (i, oidc) in self.oidc.iter().enumerate() {
            let at = format!("auth.oidc[{i}]");
            oidc.validate(&at, problems);
            let clash = oidc.issuer == self.issuer
                || self.oidc[..i].iter().any(|o| o.issuer == oidc.issuer);
            if clash {
                problems.add(
                    format!("{at}.issuer"),
                    "each issuer may appear once (auth.issuer included)",
                );
            }
        }
    }
}

impl OidcConfig {
    fn validate(&self, at: &str, problems: &mut Problems) {
        if !is_plain_name(&self.name) {
            problems.add(
                format!("{at}.name"),
                "1-32 of a-z, 0-9 and -, starting with a letter",
            );
        }
        if !self.jwks_url.starts_with("https://") {
            problems.add(format!("{at}.jwks_url"), "must be an https:// URL");
        }
        if self.algorithms.is_empty() {
            problems.add(format!("{at}.algorithms"), "name at least one");
        }
        if self.algorithms.iter().any(|a| a.is_secret()) {
            problems.add(
                format!("{at}.algorithms"),
                "an OIDC issuer signs with key pairs, not HS256",
            );
        }
        if self.rules.is_empty() {
            problems.add(
                format!("{at}.rules"),
                "without rules, no token of this issuer may do anything",
            );
        }
        for (j, rule) in self.rules.iter().enumerate() {
            let at = format!("{at}.rules[{j}]");
            if rule.audience.trim().is_empty() || rule.claims.is_empty() {
                problems.add(&at, "a rule must bind the audience and at least one claim");
            }
            for (claim, pattern) in &rule.claims {
                if glob::Pattern::new(pattern).is_err() {
                    problems.add(format!("{at}.claims.{claim}"), "not a valid glob pattern");
                }
            }
            if rule.apps.is_empty() || rule.scopes.is_empty() {
                problems.add(&at, "a rule must name apps and scopes");
            }
        }
    }
}

impl KeyConfig {
    fn validate(&self, at: &str, problems: &mut Problems) {
        if !is_plain_name(&self.id) {
            problems.add(
                format!("{at}.id"),
                "key ids are 1-32 of a-z, 0-9 and -, starting with a letter",
            );
        }
        match (
            self.algorithm.is_secret(),
            &self.public_key,
            &self.secret_file,
        ) {
            (true, None, Some(_)) if self.private_key.is_none() => {}
            (true, ..) => problems.add(
                at,
                "HS256 takes secret_file only (no public_key, no private_key)",
            ),
            (false, Some(_), None) => {}
            (false, ..) => problems.add(
                at,
                "EdDSA and RSA keys take public_key (and optionally private_key), no secret_file",
            ),
        }
    }
}
