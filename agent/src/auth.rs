//! Bearer tokens: which are accepted, and what their holder may do.
//!
//! Every token is a JWT whose header names its key (`kid`). The algorithm
//! that key verifies comes from the configuration, never from the token, so
//! `alg: none` or an HS256 token signed with an RSA public key fail before
//! any signature check. `exp`, `iat`, `nbf`, `iss`, `aud` and `sub` are
//! required; `iat` may not be older than the configured maximum age.

pub(crate) mod gate;
mod oidc;
mod token;
mod verified;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use deployd_proto::{Grant, MAX_OPERATOR_TOKEN_SECS, OPERATOR_ISSUER, Scope};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use time::OffsetDateTime;

pub use gate::FailureGate;
pub use token::{TokenRequest, issue};

use crate::config::{AuthConfig, KeyAlgorithm, KeyConfig, OperatorConfig};

/// Longest token accepted, in bytes: far above any real one.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Why a token was refused (401) or a request not allowed (403). Messages
/// say what was wrong with the token, never its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("this endpoint needs an Authorization: Bearer token")]
    Missing,
    #[error("the token was refused: {0}")]
    Invalid(String),
    #[error("too many failed authentications from this address; try again in a minute")]
    TooManyFailures,
    #[error("this token was already used for a change (jti); get a new one")]
    Replayed,
    #[error("{subject} may not {scope} {app}")]
    Forbidden {
        subject: String,
        scope: Scope,
        app: String,
    },
}

/// Why the auth configuration cannot be used; names the key or issuer.
#[derive(Debug, thiserror::Error)]
#[error("{at}: {reason}")]
pub struct KeyError {
    /// `auth.keys[0]`, `auth.oidc[1]`, ...
    pub at: String,
    pub reason: String,
}

/// Who is calling, from a verified token, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub issuer: String,
    pub grants: Vec<Grant>,
    pub expires_at: OffsetDateTime,
    /// The token's id, if it has one.
    pub jti: Option<String>,
    /// A `sha` claim binds the token to deploying that commit only.
    pub sha: Option<String>,
    /// The claims kept in the audit log: where a CI token came from.
    pub audit_claims: BTreeMap<String, String>,
}

/// Claims worth recording about a token, GitHub's and GitLab's; an
/// allow-list, so that personal data (GitLab's `user_email`) never reaches
/// the audit log.
const AUDITED_CLAIMS: &[&str] = &[
    "jti",
    "repository",
    "ref",
    "sha",
    "environment",
    "workflow",
    "job_workflow_ref",
    "run_id",
    "actor",
    "project_path",
    "pipeline_id",
    "job_id",
    "user_login",
    "environment_protected",
    "ref_protected",
];

impl Principal {
    /// Whether the caller holds `scope` on `app`.
    pub fn may(&self, scope: Scope, app: &str) -> bool {
        self.grants
            .iter()
            .any(|g| g.scopes.contains(&scope) && g.apps.iter().any(|a| a == "*" || a == app))
    }

    /// `Ok` if the caller holds any of `scopes` on `app`, else the 403 to
    /// answer, naming the last.
    pub fn require_any(&self, scopes: &[Scope], app: &str) -> Result<(), AuthError> {
        if scopes.iter().any(|s| self.may(*s, app)) {
            return Ok(());
        }
        self.require(scopes.last().copied().unwrap_or(Scope::Admin), app)
    }

    /// `Ok` if the caller holds `scope` on `app`, else the 403 to answer.
    pub fn require(&self, scope: Scope, app: &str) -> Result<(), AuthError> {
        if self.may(scope, app) {
            return Ok(());
        }
        Err(AuthError::Forbidden {
            subject: self.subject.clone(),
            scope,
            app: app.to_owned(),
        })
    }
}

/// A key tokens may be signed with, ready to verify.
struct VerifyingKey {
    algorithm: Algorithm,
    key: DecodingKey,
}

/// An operator's key, ready to verify their tokens.
struct Operator {
    name: String,
    key: DecodingKey,
    grants: Vec<Grant>,
}

/// `kid` of an operator's tokens: the key's OpenSSH SHA-256 fingerprint.
fn operator(cfg: &OperatorConfig) -> Result<(String, Operator), String> {
    let public = cfg.public_key()?;
    let raw = public.key_data().ed25519().ok_or("not an Ed25519 key")?;
    // jsonwebtoken verifies EdDSA with the raw 32 bytes of the public key,
    // which is what it keeps from a "DER" one (and from a JWK's `x`).
    let key = DecodingKey::from_ed_der(raw.as_ref());
    let fingerprint = public.fingerprint(ssh_key::HashAlg::Sha256).to_string();
    let grants = vec![Grant {
        apps: cfg.apps.clone(),
        scopes: cfg.scopes.clone(),
    }];
    Ok((
        fingerprint,
        Operator {
            name: cfg.name.clone(),
            key,
            grants,
        },
    ))
}

/// Verifies tokens against the configured keys, operators and OIDC issuers.
pub struct Authenticator {
    issuer: String,
    audience: String,
    max_age: Duration,
    leeway: Duration,
    keys: HashMap<String, VerifyingKey>,
    /// By key fingerprint.
    operators: HashMap<String, Operator>,
    /// The agent's own TLS certificate: an operator token's `aud` must be
    /// a name it is valid for, so that a token sent to one host is no good
    /// on another. None known: operator tokens are refused.
    host_certificate: Option<rustls::pki_types::CertificateDer<'static>>,
    oidc: Vec<oidc::Issuer>,
    /// Tokens that verified, for a while (see `verified`).
    verified: verified::Verified,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .field(
                "operators",
                &self.operators.values().map(|o| &o.name).collect::<Vec<_>>(),
            )
            .field(
                "oidc",
                &self.oidc.iter().map(|o| &o.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// What a token is checked against, once its issuer is known.
struct Check<'a> {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
    issuer: &'a str,
    audiences: Vec<&'a str>,
    max_age: Duration,
}

pub(crate) fn algorithm(a: KeyAlgorithm) -> Algorithm {
    match a {
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::HS256 => Algorithm::HS256,
    }
}

/// Reads a key file; errors name the file, never its content.
pub(crate) fn read_key_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// An HS256 secret: the file's bytes without a trailing newline.
pub(crate) fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    let mut secret = read_key_file(path)?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    if secret.len() < 32 {
        return Err(format!(
            "the secret in {} is shorter than 32 bytes",
            path.display()
        ));
    }
    Ok(secret)
}

fn verifying_key(cfg: &KeyConfig) -> Result<VerifyingKey, String> {
    let algorithm = algorithm(cfg.algorithm);
    let key = match (cfg.algorithm, &cfg.public_key, &cfg.secret_file) {
        (KeyAlgorithm::HS256, _, Some(path)) => DecodingKey::from_secret(&read_secret(path)?),
        (KeyAlgorithm::EdDSA, Some(path), _) => DecodingKey::from_ed_pem(&read_key_file(path)?)
            .map_err(|e| format!("{} is not a PEM Ed25519 public key: {e}", path.display()))?,
        (_, Some(path), _) => DecodingKey::from_rsa_pem(&read_key_file(path)?)
            .map_err(|e| format!("{} is not a PEM RSA public key: {e}", path.display()))?,
        _ => return Err("no key file".into()),
    };
    Ok(VerifyingKey { algorithm, key })
}

impl Authenticator {
    /// Loads every configured key; OIDC keys are fetched when first needed.
    pub fn new(cfg: &AuthConfig) -> Result<Self, KeyError> {
        let mut keys = HashMap::new();
        for (index, key) in cfg.keys.iter().enumerate() {
            let verifying = verifying_key(key).map_err(|reason| KeyError {
                at: format!("auth.keys[{index}] ({})", key.id),
                reason,
            })?;
            keys.insert(key.id.clone(), verifying);
        }
        let mut operators = HashMap::new();
        for (index, cfg) in cfg.operators.iter().enumerate() {
            let (fingerprint, operator) = operator(cfg).map_err(|reason| KeyError {
                at: format!("auth.operators[{index}] ({})", cfg.name),
                reason,
            })?;
            operators.insert(fingerprint, operator);
        }
        let oidc = cfg
            .oidc
            .iter()
            .enumerate()
            .map(|(index, issuer)| {
                oidc::Issuer::new(issuer).map_err(|reason| KeyError {
                    at: format!("auth.oidc[{index}] ({})", issuer.name),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            max_age: cfg.max_token_age,
            leeway: cfg.leeway,
            keys,
            operators,
            host_certificate: None,
            oidc,
            verified: verified::Verified::default(),
        })
    }

    /// Binds operator tokens to this host: their `aud` must be a name (DNS
    /// name or IP address) the certificate in `pem` (the API's own, its
    /// first one) is valid for, as deployctl checked when it connected.
    pub fn for_host(mut self, pem: &Path) -> Result<Self, KeyError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let certificate = CertificateDer::from_pem_file(pem).map_err(|e| KeyError {
            at: "api.tls_cert".into(),
            reason: format!("{}: {e}", pem.display()),
        })?;
        self.host_certificate = Some(certificate);
        Ok(self)
    }

    /// Whether `name` is one the host's certificate is valid for.
    fn is_host_name(&self, name: &str) -> bool {
        let Some(der) = &self.host_certificate else {
            return false;
        };
        let Ok(name) = rustls::pki_types::ServerName::try_from(name) else {
            return false;
        };
        webpki::EndEntityCert::try_from(der)
            .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
    }

    /// Clock skew tolerated: a token is usable until `exp` plus this.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Verifies the value of an `Authorization` header.
    pub async fn verify_header(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let value = header.ok_or(AuthError::Missing)?;
        let token = value
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
            .ok_or_else(|| invalid("the Authorization header is not a Bearer token"))?;
        self.verify(token.trim()).await
    }

    /// Verifies a token: its key, signature, times, issuer and audience;
    /// then what it may do (its own scopes for this host's issuer, the
    /// rules for an OIDC issuer). A token that verified is taken as it is
    /// for up to a minute (and never past its expiry or its maximum age):
    /// a client polling status costs one signature check a minute, not one
    /// per request.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        if let Some(principal) = self.verified.get(token) {
            return Ok(principal);
        }
        let (principal, usable_until) = self.verify_signed(token).await?;
        self.verified.put(token, &principal, usable_until);
        Ok(principal)
    }

    /// [`Authenticator::verify`] without the cache; also says until when
    /// (Unix seconds) the token stays usable.
    async fn verify_signed(&self, token: &str) -> Result<(Principal, i64), AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid("the token is too long"));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| invalid(&format!("not a JWT we accept ({})", describe(e.kind()))))?;
        let kid = header
            .kid
            .ok_or_else(|| invalid("the token names no key (kid)"))?;
        // Only to pick the keys: nothing of it is trusted before the
        // signature is checked against them.
        let claimed: Map<String, Value> = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|e| invalid(&format!("not a JWT we accept ({})", describe(e.kind()))))?;
        let claimed_issuer = claimed
            .get("iss")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if claimed_issuer == self.issuer {
            let key = self
                .keys
                .get(&kid)
                .ok_or_else(|| invalid("the token's key (kid) is not known here"))?;
            let check = Check {
                key: key.key.clone(),
                algorithms: vec![key.algorithm],
                issuer: &self.issuer,
                audiences: vec![&self.audience],
                max_age: self.max_age,
            };
            let (claims, until) = self.check(token, &check)?;
            return Ok((own_principal(&claims)?, until));
        }
        if claimed_issuer == OPERATOR_ISSUER {
            let audience = claimed
                .get("aud")
                .and_then(Value::as_str)
                .unwrap_or_default();
            return self.verify_operator(token, &kid, audience);
        }
        let issuer = self
            .oidc
            .iter()
            .find(|o| o.issuer == claimed_issuer)
            .ok_or_else(|| invalid("the token's issuer (iss) is not trusted here"))?;
        let check = Check {
            key: issuer.key(&kid).await?,
            algorithms: issuer.algorithms.clone(),
            issuer: &issuer.issuer,
            audiences: issuer.audiences.iter().map(String::as_str).collect(),
            max_age: issuer.max_age.unwrap_or(self.max_age),
        };
        let (claims, until) = self.check(token, &check)?;
        let mut principal = principal_of(&claims)?;
        principal.grants = issuer.grants(&claims);
        Ok((principal, until))
    }

    /// An operator's token: signed by the key its `kid` names, for this
    /// host (`aud`, claimed as `audience`, one of its certificate's names),
    /// by the operator that key belongs to, living at most a minute, with
    /// an id of its own.
    fn verify_operator(
        &self,
        token: &str,
        kid: &str,
        audience: &str,
    ) -> Result<(Principal, i64), AuthError> {
        let operator = self
            .operators
            .get(kid)
            .ok_or_else(|| invalid("the token's key is not an operator's key here"))?;
        if !self.is_host_name(audience) {
            return Err(invalid(
                "the token's audience (aud) is not a name of this host's certificate",
            ));
        }
        let max = MAX_OPERATOR_TOKEN_SECS;
        let check = Check {
            key: operator.key.clone(),
            algorithms: vec![Algorithm::EdDSA],
            issuer: OPERATOR_ISSUER,
            audiences: vec![audience],
            max_age: Duration::from_secs(max.unsigned_abs()),
        };
        let (claims, until) = self.check(token, &check)?;
        let mut principal = principal_of(&claims)?;
        if principal.subject != operator.name {
            return Err(invalid(&format!(
                "the token names operator {} but its key is {}'s",
                principal.subject, operator.name
            )));
        }
        let claim = |name: &str| claims.get(name).and_then(Value::as_i64).unwrap_or(0);
        if claim("exp").saturating_sub(claim("iat")) > max {
            return Err(invalid(&format!(
                "an operator token lives at most {max} s (exp - iat)"
            )));
        }
        if principal.jti.is_none() {
            return Err(invalid("an operator token needs an id (jti)"));
        }
        principal.grants = operator.grants.clone();
        // Only what the agent checked: an operator writes their own claims.
        principal.audit_claims.retain(|name, _| name == "jti");
        principal
            .audit_claims
            .insert("key".to_owned(), kid.to_owned());
        Ok((principal, until))
    }

    /// Signature, algorithm, `exp`, `nbf`, `iss`, `aud`, `sub`, then `iat`.
    /// Returns the claims, and until when (Unix seconds, leeway included)
    /// both `exp` and the maximum age allow the token.
    fn check(
        &self,
        token: &str,
        check: &Check<'_>,
    ) -> Result<(Map<String, Value>, i64), AuthError> {
        let mut validation = Validation::new(check.algorithms[0]);
        validation.algorithms = check.algorithms.clone();
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway.as_secs();
        validation.set_issuer(&[check.issuer]);
        validation.set_audience(&check.audiences);
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &check.key, &validation)
            .map_err(|e| invalid(describe(e.kind())))?
            .claims;
        self.check_age(&claims, check.max_age)?;
        let leeway = i64::try_from(self.leeway.as_secs()).unwrap_or(i64::MAX);
        let max = i64::try_from(check.max_age.as_secs()).unwrap_or(i64::MAX);
        let claim = |name: &str| claims.get(name).and_then(Value::as_i64).unwrap_or(0);
        let until = claim("exp")
            .min(claim("iat").saturating_add(max))
            .saturating_add(leeway);
        Ok((claims, until))
    }

    /// `iat` is required, not in the future, and not older than `max_age`.
    fn check_age(&self, claims: &Map<String, Value>, max_age: Duration) -> Result<(), AuthError> {
        let iat = claims
            .get("iat")
            .and_then(Value::as_i64)
            .ok_or_else(|| invalid("the token has no issued-at time (iat)"))?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let leeway = i64::try_from(self.leeway.as_secs()).unwrap_or(i64::MAX);
        let max = i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX);
        if iat > now.saturating_add(leeway) {
            return Err(invalid("the token was issued in the future (iat)"));
        }
        if now.saturating_sub(iat) > max.saturating_add(leeway) {
            return Err(invalid(&format!(
                "the token was issued more than {} ago (iat)",
                humantime::format_duration(max_age)
            )));
        }
        Ok(())
    }
}

fn invalid(reason: &str) -> AuthError {
    AuthError::Invalid(reason.to_owned())
}

/// A sentence for a jsonwebtoken error: which check failed, nothing more.
fn describe(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "it has expired (exp)",
        ErrorKind::ImmatureSignature => "it is not valid yet (nbf)",
        ErrorKind::InvalidIssuer => "wrong issuer (iss)",
        ErrorKind::InvalidAudience => "wrong audience (aud)",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAlgorithm => "the algorithm does not match its key",
        ErrorKind::MissingRequiredClaim(_) => {
            "a required claim is missing (exp, nbf, iss, aud, sub)"
        }
        ErrorKind::InvalidClaimFormat(_) => "a claim has the wrong type",
        _ => "malformed token",
    }
}

/// What a token with `claims` would be granted under issuer `cfg`'s rules:
/// for checking CI templates or a token's claims against a configuration.
pub fn grants_under(
    cfg: &crate::config::OidcConfig,
    claims: &Map<String, Value>,
) -> Result<Vec<Grant>, String> {
    Ok(oidc::Issuer::new(cfg)?.grants(claims))
}

/// Who a verified token names, with no grants yet.
fn principal_of(claims: &Map<String, Value>) -> Result<Principal, AuthError> {
    let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
    // Validated as a number already; a fraction is rounded up, never lost.
    let exp = claims
        .get("exp")
        .and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f.ceil() as i64)))
        .ok_or_else(|| invalid("exp is not a number"))?;
    Ok(Principal {
        subject: text("sub").unwrap_or_default(),
        issuer: text("iss").unwrap_or_default(),
        grants: Vec::new(),
        expires_at: OffsetDateTime::from_unix_timestamp(exp)
            .map_err(|_| invalid("exp is out of range"))?,
        jti: text("jti"),
        sha: text("sha"),
        audit_claims: AUDITED_CLAIMS
            .iter()
            .filter_map(|name| Some(((*name).to_owned(), oidc::claim_text(claims.get(*name))?)))
            .collect(),
    })
}

/// A token of this host's own issuer carries its grants: `scope` is
/// space-separated scopes, `apps` (optional) the apps they apply to, all
/// when absent.
fn own_principal(claims: &Map<String, Value>) -> Result<Principal, AuthError> {
    let scopes = claims
        .get("scope")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .split_whitespace()
        .map(|s| s.parse::<Scope>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&format!("scope claim: {e}")))?;
    let apps = match claims.get("apps") {
        None => vec!["*".to_owned()],
        Some(Value::Array(apps)) => apps
            .iter()
            .map(|a| a.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("apps claim: a list of app names"))?,
        Some(_) => return Err(invalid("apps claim: a list of app names")),
    };
    let mut principal = principal_of(claims)?;
    principal.grants = vec![Grant { apps, scopes }];
    Ok(principal)
}
