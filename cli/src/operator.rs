//! An operator's own identity: an Ed25519 key of theirs (the file
//! `deployctl keygen` wrote, or a key held by their running `ssh-agent`),
//! with which deployctl signs a fresh token for every request. The host
//! trusts the public key as `authorized_keys` would (`[[auth.operators]]`).
//!
//! The token is an ordinary EdDSA JWT (an Ed25519 SSH signature is a plain
//! Ed25519 signature): `kid` is the key's OpenSSH fingerprint, `sub` the
//! operator, and it lives a minute (`deployd_proto::OperatorClaims`).

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use deployd_proto::OperatorClaims;
use ssh_key::{HashAlg, PrivateKey, PublicKey};

use crate::exit::{CliError, Exit};
use crate::settings::Settings;

/// Where `deployctl keygen` writes the key, and where it is looked for
/// when no token or key is set.
pub fn default_key_path() -> Option<PathBuf> {
    Some(crate::settings::config_dir()?.join("id_ed25519"))
}

/// What signs: the private key itself, or the agent holding it.
enum Signer {
    File(Box<PrivateKey>),
    Agent { socket: PathBuf, key: PublicKey },
}

/// An operator ready to mint tokens. Its `Debug` shows who, never the key.
pub struct Operator {
    name: String,
    audience: String,
    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    fingerprint: String,
    signer: Signer,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

fn key_error(message: String) -> CliError {
    CliError::new(Exit::Auth, message)
}

/// The operator name: as set, else a key comment that is a plain name
/// (keygen writes the name there), else the login name.
fn operator_name(settings: &Settings, comment: &str) -> Result<String, CliError> {
    if let Some(name) = &settings.operator {
        return Ok(name.clone());
    }
    if deployd_proto::is_plain_name(comment) {
        return Ok(comment.to_owned());
    }
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            CliError::usage("no operator name").hint(
                "set --operator or DEPLOYCTL_OPERATOR to the name the host lists your key under",
            )
        })
}

/// The public key `path` names: a public key file, or a private key file
/// with its `.pub` beside it.
fn public_key_at(path: &Path) -> Result<PublicKey, CliError> {
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    let text =
        read(path).ok_or_else(|| key_error(format!("cannot read the key {}", path.display())))?;
    if let Ok(key) = PublicKey::from_openssh(text.trim()) {
        return Ok(key);
    }
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);
    read(&pub_path)
        .and_then(|t| PublicKey::from_openssh(t.trim()).ok())
        .ok_or_else(|| {
            key_error(format!(
                "{} is not a public key, and {} holds none",
                path.display(),
                pub_path.display()
            ))
        })
}

impl Operator {
    /// The operator the settings name, if the token comes from a key.
    pub fn from_settings(settings: &Settings) -> Result<Option<Self>, CliError> {
        let stored = settings.oidc.is_some() || settings.token.is_some();
        if stored || settings.token_file.is_some() {
            return Ok(None);
        }
        // The host the token is for: a name its certificate holds, so that
        // a token sent to one host is refused by every other.
        let audience = match &settings.audience {
            Some(audience) => audience.clone(),
            None => reqwest::Url::parse(&settings.url)
                .ok()
                .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_owned()))
                .ok_or_else(|| CliError::usage(format!("no host in {}", settings.url)))?,
        };
        let (signer, public) = if settings.ssh_agent {
            let (socket, key) = agent_key(settings.key.as_deref())?;
            (
                Signer::Agent {
                    socket,
                    key: key.clone(),
                },
                key,
            )
        } else if let Some(path) = &settings.key {
            let key = read_private_key(path)?;
            let public = key.public_key().clone();
            (Signer::File(Box::new(key)), public)
        } else {
            return Ok(None);
        };
        Ok(Some(Self {
            name: operator_name(settings, public.comment())?,
            audience,
            fingerprint: public.fingerprint(HashAlg::Sha256).to_string(),
            signer,
        }))
    }

    /// A token for one request, signed now.
    pub fn token(&self) -> Result<String, CliError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = OperatorClaims::new(
            &self.name,
            &self.audience,
            now,
            uuid::Uuid::new_v4().to_string(),
        );
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": self.fingerprint});
        let input = format!("{}.{}", encoded(&header), encoded(&claims));
        let signature = self.sign(input.as_bytes())?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }

    /// The raw 64-byte Ed25519 signature of `data`.
    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, CliError> {
        let signature = match &self.signer {
            Signer::File(key) => sign_with(key.as_ref(), data)
                .map_err(|e| key_error(format!("cannot sign with the operator key: {e}")))?,
            Signer::Agent { socket, key } => {
                let mut agent = ssh_agent_client_rs::Client::connect(socket)
                    .map_err(|e| agent_unreachable(socket, &e))?;
                agent.sign(key, data).map_err(|e| {
                    key_error(format!(
                        "the ssh-agent did not sign with {}: {e}",
                        self.fingerprint
                    ))
                })?
            }
        };
        let bytes = signature.as_bytes();
        if signature.algorithm() != ssh_key::Algorithm::Ed25519 || bytes.len() != 64 {
            return Err(key_error(format!(
                "the signature is not an Ed25519 one ({})",
                signature.algorithm()
            )));
        }
        Ok(bytes.to_vec())
    }
}

/// A JWT part: `value` as JSON, base64url without padding.
fn encoded<T: serde::Serialize>(value: &T) -> String {
    // Plain data: serialising it cannot fail.
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap_or_default())
}

fn sign_with<K: ssh_key::SigningKey + ?Sized>(
    key: &K,
    data: &[u8],
) -> Result<ssh_key::Signature, impl std::fmt::Display> {
    key.try_sign(data)
}

fn read_private_key(path: &Path) -> Result<PrivateKey, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let error = key_error(format!(
            "cannot read the operator key {}: {e}",
            path.display()
        ));
        if e.kind() == std::io::ErrorKind::NotFound {
            error.hint("make one with deployctl keygen, or use --ssh-agent")
        } else {
            error
        }
    })?;
    let key = PrivateKey::from_openssh(text.trim())
        .map_err(|_| key_error(format!("{} is not an OpenSSH private key", path.display())))?;
    if key.is_encrypted() {
        return Err(key_error(format!("{} is encrypted", path.display()))
            .hint("load it into your ssh-agent (ssh-add) and use --ssh-agent"));
    }
    if key.algorithm() != ssh_key::Algorithm::Ed25519 {
        return Err(key_error(format!(
            "{} is a {} key: operators sign with Ed25519 keys",
            path.display(),
            key.algorithm()
        )));
    }
    Ok(key)
}

fn agent_unreachable(socket: &Path, e: &dyn std::fmt::Display) -> CliError {
    key_error(format!(
        "cannot reach the ssh-agent at {}: {e}",
        socket.display()
    ))
    .hint("is ssh-agent running, and SSH_AUTH_SOCK set (eval $(ssh-agent); ssh-add)?")
}

/// The agent's socket, and which of its keys signs: the one `chosen`
/// names, else its only Ed25519 key.
fn agent_key(chosen: Option<&Path>) -> Result<(PathBuf, PublicKey), CliError> {
    let socket = std::env::var_os("SSH_AUTH_SOCK")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| {
            key_error("--ssh-agent: SSH_AUTH_SOCK is not set".to_owned())
                .hint("start one and add your key: eval $(ssh-agent); ssh-add")
        })?;
    let mut agent = ssh_agent_client_rs::Client::connect(&socket)
        .map_err(|e| agent_unreachable(&socket, &e))?;
    let keys: Vec<PublicKey> = agent
        .list_all_identities()
        .map_err(|e| agent_unreachable(&socket, &e))?
        .into_iter()
        .filter_map(|identity| match identity {
            ssh_agent_client_rs::Identity::PublicKey(key) => Some(key.into_owned()),
            ssh_agent_client_rs::Identity::Certificate(_) => None,
        })
        .filter(|key| key.algorithm() == ssh_key::Algorithm::Ed25519)
        .collect();
    let fingerprint = |k: &PublicKey| k.fingerprint(HashAlg::Sha256);
    let key = match chosen {
        Some(path) => {
            let wanted = fingerprint(&public_key_at(path)?);
            keys.into_iter()
                .find(|k| fingerprint(k) == wanted)
                .ok_or_else(|| {
                    key_error(format!(
                        "the ssh-agent holds no key {wanted} ({})",
                        path.display()
                    ))
                    .hint(format!("ssh-add {}", path.display()))
                })?
        }
        None => match keys.len() {
            0 => {
                return Err(key_error("the ssh-agent holds no Ed25519 key".to_owned())
                    .hint("ssh-add ~/.ssh/id_ed25519 (operators sign with Ed25519 keys)"));
            }
            1 => keys
                .into_iter()
                .next()
                .ok_or_else(|| key_error(String::new()))?,
            _ => {
                let list: Vec<String> = keys.iter().map(|k| fingerprint(k).to_string()).collect();
                return Err(key_error(format!(
                    "the ssh-agent holds several Ed25519 keys: {}",
                    list.join(", ")
                ))
                .hint("name one with --key (its public key file)"));
            }
        },
    };
    Ok((socket, key))
}

/// Writes a new Ed25519 key pair: `path` (0600, OpenSSH format) and
/// `path.pub`, with `name` as its comment. Refuses to replace a key unless
/// `force`. Returns the public key.
pub fn keygen(path: &Path, name: &str, force: bool) -> Result<PublicKey, CliError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        CliError::new(
            Exit::Other,
            format!("cannot {what} {}: {e}", path.display()),
        )
    };
    if path.exists() && !force {
        return Err(
            CliError::usage(format!("{} already exists", path.display()))
                .hint("pass --force to replace it (the host must then trust the new key)"),
        );
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| failed("create the directory of", &e))?;
    }
    let mut key = PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
        .map_err(|e| failed("make", &e))?;
    key.set_comment(name);
    // The file is written anew, 0600, before the key is in it.
    let _ = std::fs::remove_file(path);
    key.write_openssh_file(path, ssh_key::LineEnding::LF)
        .map_err(|e| failed("write", &e))?;
    let public = key.public_key().clone();
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    let text = public.to_openssh().map_err(|e| failed("encode", &e))?;
    std::fs::write(PathBuf::from(pub_path), format!("{text}\n"))
        .map_err(|e| failed("write the public key of", &e))?;
    Ok(public)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_token_is_an_eddsa_jwt_of_a_minute_signed_by_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/id_ed25519");
        let public = keygen(&path, "alice", false).unwrap();
        assert!(keygen(&path, "alice", false).is_err(), "not replaced");
        let settings = Settings {
            key: Some(path),
            ..Settings::for_tests()
        };
        let operator = Operator::from_settings(&settings).unwrap().unwrap();
        let (one, two) = (operator.token().unwrap(), operator.token().unwrap());
        assert_ne!(one, two, "a fresh jti each time");
        let header = jsonwebtoken::decode_header(&one).unwrap();
        let fingerprint = public.fingerprint(HashAlg::Sha256).to_string();
        assert_eq!(header.kid.as_deref(), Some(fingerprint.as_str()));
        let raw = public.key_data().ed25519().unwrap().as_ref().to_vec();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        validation.set_audience(&["localhost"]);
        let claims = jsonwebtoken::decode::<OperatorClaims>(
            &one,
            &jsonwebtoken::DecodingKey::from_ed_der(&raw),
            &validation,
        )
        .unwrap()
        .claims;
        assert_eq!(
            (claims.sub.as_str(), claims.iss.as_str()),
            ("alice", "deployctl")
        );
        assert_eq!(claims.exp - claims.iat, 60);
    }
}
