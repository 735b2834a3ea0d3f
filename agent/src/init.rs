//! `deployd init`: what a new host needs before `deployd run`: a TLS key
//! and certificate, an Ed25519 token signing key pair, and a configuration
//! pointing at them. Nothing existing is overwritten.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, DnType, KeyPair};
use sha2::{Digest, Sha256};

/// What to generate.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Directory for everything (created if missing), e.g. `/etc/deployd`.
    pub dir: PathBuf,
    /// Names and addresses the certificate is valid for.
    pub sans: Vec<String>,
    /// Where the API will listen.
    pub listen: SocketAddr,
    /// Where the agent keeps its store.
    pub state_dir: PathBuf,
    /// Where the daemon finds its secrets when systemd hands them over
    /// (`LoadCredential=`, e.g. `/run/credentials/deployd.service`); the
    /// configuration then names the TLS key there. `None`: the files as
    /// written.
    pub credentials_dir: Option<PathBuf>,
}

/// What was generated, for the operator.
#[derive(Debug, Clone)]
pub struct InitReport {
    pub config: PathBuf,
    pub tls_cert: PathBuf,
    pub signing_key: PathBuf,
    /// SHA-256 of the certificate (DER), hex pairs joined by `:`.
    pub fingerprint: String,
}

/// Why `init` stopped; nothing after the failing file was written.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{} exists already; init never overwrites (move it away first)", .0.display())]
    Exists(PathBuf),
    #[error("{}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
    #[error("cannot generate keys: {0}")]
    Keys(String),
    #[error("name at least one --san (a DNS name or IP address clients use)")]
    NoNames,
}

fn keys_error(e: impl std::fmt::Display) -> InitError {
    InitError::Keys(e.to_string())
}

/// An Ed25519 private key as PKCS#8 v1 PEM: the seed alone. ring writes
/// v2 (the public key too), which OpenSSL 3.0 (`openssl pkey`) and Python's
/// `cryptography` refuse ("extra data"); deployd reads both.
fn ed25519_v1_pem(key: &KeyPair) -> Result<String, InitError> {
    use ed25519::pkcs8::spki::der::pem::LineEnding;
    use ed25519::pkcs8::{DecodePrivateKey, EncodePrivateKey, KeypairBytes};
    let mut pair = KeypairBytes::from_pkcs8_der(key.serialized_der()).map_err(keys_error)?;
    pair.public_key = None;
    let pem = pair.to_pkcs8_pem(LineEnding::LF).map_err(keys_error)?;
    Ok(pem.as_str().to_owned())
}

/// Writes `content` to a new file with `mode`; refuses to replace one.
fn write_new(path: &Path, content: &[u8], mode: u32) -> Result<(), InitError> {
    let io = |e: std::io::Error| InitError::Write {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => InitError::Exists(path.to_owned()),
            _ => io(e),
        })?;
    file.write_all(content).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Generates the files; refuses if any already exists.
pub fn init(options: &InitOptions) -> Result<InitReport, InitError> {
    if options.sans.is_empty() {
        return Err(InitError::NoNames);
    }
    let dir = &options.dir;
    let paths = [
        dir.join("deployd.toml"),
        dir.join("tls/cert.pem"),
        dir.join("tls/key.pem"),
        dir.join("keys/ops.key"),
        dir.join("keys/ops.pub"),
    ];
    if let Some(existing) = paths.iter().find(|p| p.exists()) {
        return Err(InitError::Exists(existing.clone()));
    }
    let [config, cert_path, key_path, signing_path, public_path] = paths;

    let tls_key = KeyPair::generate().map_err(keys_error)?;
    let mut params = CertificateParams::new(options.sans.clone()).map_err(keys_error)?;
    params
        .distinguished_name
        .push(DnType::CommonName, options.sans[0].clone());
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(825);
    let cert = params.self_signed(&tls_key).map_err(keys_error)?;
    let fingerprint = fingerprint(cert.der());
    let signing = KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(keys_error)?;

    write_new(&key_path, tls_key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    write_new(&signing_path, ed25519_v1_pem(&signing)?.as_bytes(), 0o600)?;
    write_new(&public_path, signing.public_key_pem().as_bytes(), 0o644)?;
    // Under systemd the daemon reads its TLS key as the credential
    // `tls-key.pem` (deployd.service: LoadCredential=).
    let key_for_daemon = match &options.credentials_dir {
        Some(credentials) => credentials.join("tls-key.pem"),
        None => key_path.clone(),
    };
    let text = config_text(
        options,
        &cert_path,
        &key_for_daemon,
        &public_path,
        &signing_path,
    );
    write_new(&config, text.as_bytes(), 0o600)?;
    Ok(InitReport {
        config,
        tls_cert: cert_path,
        signing_key: signing_path,
        fingerprint,
    })
}

/// SHA-256 of DER bytes, as `AB:CD:...`.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn config_text(
    options: &InitOptions,
    cert: &Path,
    key: &Path,
    public: &Path,
    private: &Path,
) -> String {
    format!(
        r#"# Written by `deployd init`. `deployd default-config` prints every key,
# documented; `deployd check-config` checks this file.

state_dir = "{state}"

[api]
listen = "{listen}"
tls_cert = "{cert}"
tls_key = "{key}"

[auth]
# Tokens signed with this key: `deployd token issue --sub NAME --scope ...`.
[[auth.keys]]
id = "ops"
algorithm = "EdDSA"
public_key = "{public}"
# Read by `deployd token issue` only, never by the daemon; move it off the
# host once you have issued tokens.
private_key = "{private}"

# Keyless CI (GitHub Actions, GitLab CI): add [[auth.oidc]] issuers with rules;
# see `deployd default-config`.

# Add one [apps.NAME] table per app this host runs; see `deployd default-config`.
"#,
        state = options.state_dir.display(),
        listen = options.listen,
        cert = cert.display(),
        key = key.display(),
        public = public.display(),
        private = private.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_working_configuration_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let options = InitOptions {
            dir: dir.path().join("etc"),
            sans: vec!["deploy.example.com".into(), "127.0.0.1".into()],
            listen: "0.0.0.0:8443".parse().unwrap(),
            state_dir: dir.path().join("state"),
            credentials_dir: None,
        };
        let report = init(&options).unwrap();
        assert_eq!(report.fingerprint.len(), 32 * 3 - 1);
        let config = crate::config::Config::load(&report.config).unwrap();
        let api = config.api.clone().unwrap();
        crate::api::server_config(&api).unwrap();
        crate::auth::Authenticator::new(&config.auth).unwrap();
        let token = crate::auth::issue(
            &config.auth,
            &crate::auth::TokenRequest {
                key: None,
                subject: "ops".into(),
                scopes: vec![deployd_proto::Scope::Read],
                apps: Vec::new(),
                sha: None,
                ttl: std::time::Duration::from_secs(60),
            },
        )
        .unwrap();
        assert_eq!(token.split('.').count(), 3);
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(&report.signing_key), 0o600);
        // PKCS#8 v1, which every tool reads: OpenSSL 3.0 refuses ring's v2.
        let pem = std::fs::read_to_string(&report.signing_key).unwrap();
        let (label, der) = ed25519::pkcs8::Document::from_pem(&pem).unwrap();
        assert_eq!(label, "PRIVATE KEY");
        let info = ed25519::pkcs8::PrivateKeyInfo::try_from(der.as_bytes()).unwrap();
        // v1: no public key after the seed.
        assert!(info.public_key.is_none());
        assert_eq!(der.as_bytes().len(), 48);
        if let Ok(out) = std::process::Command::new("openssl")
            .args(["pkey", "-noout", "-in"])
            .arg(&report.signing_key)
            .output()
        {
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "openssl pkey: {said}");
        }
        assert_eq!(mode(&api.tls_key), 0o600);
        assert!(matches!(init(&options), Err(InitError::Exists(_))));
    }

    #[test]
    fn for_systemd_the_daemon_reads_its_tls_key_as_a_credential() {
        let dir = tempfile::tempdir().unwrap();
        let options = InitOptions {
            dir: dir.path().join("etc"),
            sans: vec!["deploy.example.com".into()],
            listen: "0.0.0.0:8443".parse().unwrap(),
            state_dir: dir.path().join("state"),
            credentials_dir: Some("/run/credentials/deployd.service".into()),
        };
        let report = init(&options).unwrap();
        let config = crate::config::Config::load(&report.config).unwrap();
        let api = config.api.unwrap();
        assert_eq!(
            api.tls_key,
            Path::new("/run/credentials/deployd.service/tls-key.pem")
        );
        assert!(dir.path().join("etc/tls/key.pem").exists());
        assert_eq!(api.tls_cert, dir.path().join("etc/tls/cert.pem"));
    }
}
