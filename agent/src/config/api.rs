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
    /// Connections open at once; past it new ones are closed at once.
    /// Their file descriptors are set aside before the switch's, so a flood
    /// of the public port never leaves the API unreachable. Default: 1024.
    #[serde(default = "default_api_connections")]
    pub max_connections: usize,
    /// Connections open at once from one address (IPv6: one /64).
    /// Default: 256.
    #[serde(default = "default_api_connections_per_address")]
    pub max_connections_per_address: usize,
    /// Event streams (`deployctl deploy` following a deployment) open at
    /// once per token and per address; more get 429. Defaults: 8 and 64.
    #[serde(default = "default_streams_per_token")]
    pub max_streams_per_token: usize,
    #[serde(default = "default_streams_per_address")]
    pub max_streams_per_address: usize,
    /// Longest request line or header line; past it, 414 or 431.
    /// Default: 8 KiB.
    #[serde(default = "super::switch::default_max_header_line")]
    pub max_header_line: bytesize::ByteSize,
    /// Longest request head in all; past it, 431. Default: 32 KiB.
    #[serde(default = "super::switch::default_max_header_size")]
    pub max_header_size: bytesize::ByteSize,
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
    /// People trusted by their own Ed25519 key, like `authorized_keys`:
    /// deployctl signs a short token for each request with it.
    #[serde(default)]
    pub operators: Vec<OperatorConfig>,
}

/// An operator: a person whose deployctl signs with their own key (a key
/// file from `deployctl keygen`, or a key in their `ssh-agent`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// Who they are in the audit log and in history (`sub` of their tokens).
    pub name: String,
    /// Their public key, as in `authorized_keys`: `ssh-ed25519 AAAA... comment`.
    pub key: String,
    /// Granted scopes: read, deploy, rollback, admin, run, logs.
    pub scopes: Vec<deployd_proto::Scope>,
    /// Apps the scopes apply to. Default: all (`*`).
    #[serde(default = "all_apps")]
    pub apps: Vec<String>,
}

fn all_apps() -> Vec<String> {
    vec!["*".to_owned()]
}

impl OperatorConfig {
    /// The public key, if it is an Ed25519 key in OpenSSH format.
    pub fn public_key(&self) -> Result<ssh_key::PublicKey, String> {
        let key = ssh_key::PublicKey::from_openssh(self.key.trim())
            .map_err(|e| format!("not an OpenSSH public key ({e})"))?;
        if key.algorithm() != ssh_key::Algorithm::Ed25519 {
            return Err(format!(
                "a {} key: operators sign with Ed25519 keys (ssh-ed25519)",
                key.algorithm()
            ));
        }
        Ok(key)
    }

    fn validate(&self, at: &str, problems: &mut Problems) {
        if !is_plain_name(&self.name) {
            problems.add(
                format!("{at}.name"),
                "1-32 of a-z, 0-9 and -, starting with a letter",
            );
        }
        if let Err(e) = self.public_key() {
            problems.add(format!("{at}.key"), e);
        }
        if self.scopes.is_empty() {
            problems.add(format!("{at}.scopes"), "name at least one");
        }
        if self.apps.is_empty() {
            problems.add(format!("{at}.apps"), "name at least one app, or \"*\"");
        }
    }
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
    /// Granted scopes: read, deploy, rollback, admin, run, logs.
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
            operators: Vec::new(),
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
fn default_api_connections() -> usize {
    1024
}
fn default_api_connections_per_address() -> usize {
    256
}
fn default_streams_per_token() -> usize {
    8
}
fn default_streams_per_address() -> usize {
    64
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
        for (key, value) in [
            ("max_concurrent_requests", self.max_concurrent_requests),
            ("max_connections", self.max_connections),
            (
                "max_connections_per_address",
                self.max_connections_per_address,
            ),
            ("max_streams_per_token", self.max_streams_per_token),
            ("max_streams_per_address", self.max_streams_per_address),
        ] {
            if value == 0 {
                problems.add(format!("api.{key}"), "must be at least 1");
            }
        }
        super::switch::check_header_limits(
            "api",
            self.max_header_line,
            self.max_header_size,
            problems,
        );
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
    pub(super) fn warnings(&self, warnings: &mut Problems) {
        for (i, oidc) in self.oidc.iter().enumerate() {
            oidc.warnings(&format!("auth.oidc[{i}]"), warnings);
        }
    }

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
        for (i, operator) in self.operators.iter().enumerate() {
            let at = format!("auth.operators[{i}]");
            operator.validate(&at, problems);
            let earlier = &self.operators[..i];
            if earlier.iter().any(|o| o.name == operator.name) {
                problems.add(
                    format!("{at}.name"),
                    format!("{} is used twice", operator.name),
                );
            }
            let fingerprint = |o: &OperatorConfig| {
                o.public_key()
                    .ok()
                    .map(|k| k.fingerprint(ssh_key::HashAlg::Sha256))
            };
            if fingerprint(operator).is_some()
                && earlier
                    .iter()
                    .any(|o| fingerprint(o) == fingerprint(operator))
            {
                problems.add(
                    format!("{at}.key"),
                    "the same key is listed for another operator",
                );
            }
        }
        let operator_issuer = deployd_proto::OPERATOR_ISSUER;
        if self.issuer == operator_issuer {
            problems.add(
                "auth.issuer",
                format!("{operator_issuer} is the issuer of operator tokens"),
            );
        }
        for (i, oidc) in self.oidc.iter().enumerate() {
            if oidc.issuer == operator_issuer {
                problems.add(
                    format!("auth.oidc[{i}].issuer"),
                    format!("{operator_issuer} is the issuer of operator tokens"),
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
            if !rule.binds_project() {
                problems.add(
                    format!("{at}.claims"),
                    format!(
                        "a rule must bind the project exactly ({}), without a glob: \
                         other claims (environment, ref, ...) match every project of the issuer",
                        PROJECT_CLAIMS.join(", ")
                    ),
                );
            }
            if rule.apps.is_empty() || rule.scopes.is_empty() {
                problems.add(&at, "a rule must name apps and scopes");
            }
        }
    }
}

/// Claims that name one project: GitHub's `repository` and
/// `repository_id`, GitLab's `project_path` and `project_id`. Every other
/// claim (`environment`, `ref`, `workflow`, ...) is the same for many
/// projects of one issuer: a rule that binds none of these would let any
/// repository on github.com deploy.
pub const PROJECT_CLAIMS: [&str; 4] = ["repository", "repository_id", "project_path", "project_id"];

/// Characters that make a claim value a glob.
const GLOB_CHARS: [char; 4] = ['*', '?', '[', ']'];

impl RuleConfig {
    /// Whether the rule binds one project exactly.
    pub fn binds_project(&self) -> bool {
        PROJECT_CLAIMS.iter().any(|claim| {
            self.claims
                .get(*claim)
                .is_some_and(|v| !v.trim().is_empty() && !v.contains(GLOB_CHARS))
        })
    }
}

impl OidcConfig {
    /// What is allowed but probably not meant: a `ref` ending in `*`
    /// matches any branch or tag with that prefix, pushed by anyone who
    /// may push one.
    pub(super) fn warnings(&self, at: &str, warnings: &mut Problems) {
        for (j, rule) in self.rules.iter().enumerate() {
            if rule.claims.get("ref").is_some_and(|r| r.ends_with('*')) {
                warnings.add(
                    format!("{at}.rules[{j}].claims.ref"),
                    "ends with *: any branch or tag with this prefix matches; name the ref exactly",
                );
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
