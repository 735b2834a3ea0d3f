//! Operator tokens: what deployctl mints, per request, with an operator's
//! own Ed25519 key (a key file or one held by `ssh-agent`), and what the
//! agent checks them against. The token is an ordinary EdDSA JWT whose
//! `kid` is the key's OpenSSH fingerprint (`SHA256:...`, as `ssh-keygen -l`
//! prints it) and whose `sub` is the operator's name.

use serde::{Deserialize, Serialize};

/// `iss` of every operator token.
pub const OPERATOR_ISSUER: &str = "deployctl";

/// Longest life (`exp - iat`) an operator token may claim, in seconds. A
/// token is minted for each request, so a minute is plenty, and a token
/// copied from a log or a proxy is soon worthless.
pub const MAX_OPERATOR_TOKEN_SECS: i64 = 60;

/// The claims of an operator token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorClaims {
    /// Always [`OPERATOR_ISSUER`].
    pub iss: String,
    /// The operator's name, as the host lists it in `[[auth.operators]]`.
    pub sub: String,
    /// The host the token is for: a DNS name or IP address its TLS
    /// certificate holds (deployctl uses the one it connects to), so that
    /// a token one host received is refused by every other.
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    /// Fresh for every token.
    pub jti: String,
}

impl OperatorClaims {
    /// Claims for a token usable from `now` (Unix seconds) for the longest
    /// life allowed.
    pub fn new(operator: &str, audience: &str, now: i64, jti: String) -> Self {
        Self {
            iss: OPERATOR_ISSUER.to_owned(),
            sub: operator.to_owned(),
            aud: audience.to_owned(),
            iat: now,
            nbf: now,
            exp: now + MAX_OPERATOR_TOKEN_SECS,
            jti,
        }
    }
}
