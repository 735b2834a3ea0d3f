//! Trusting the agent: the system roots plus a given CA, or exactly one
//! certificate pinned by its SHA-256 fingerprint.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::exit::CliError;

/// A fingerprint as `AB:CD:...` or plain hex, normalised to bytes.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], CliError> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    let bad = || {
        CliError::usage(format!(
            "--pin-sha256 {text:?} is not a SHA-256 fingerprint"
        ))
        .hint("64 hex digits, colons allowed, as `deployd init` prints it")
    };
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(bytes)
}

/// Accepts the one certificate whose SHA-256 is pinned (names, dates and
/// issuer are not checked: the pin is the trust), and checks the handshake
/// signatures against it as usual.
#[derive(Debug)]
struct Pinned {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Sha256::digest(end_entity.as_ref())[..] == self.fingerprint[..] {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the agent's certificate does not match the pinned SHA-256".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A rustls client configuration that trusts only the pinned certificate.
pub fn pinned_config(fingerprint: [u8; 32]) -> Result<rustls::ClientConfig, CliError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| CliError::usage(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            fingerprint,
            provider,
        }))
        .with_no_client_auth();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex =
            "AC0E01AD442A5A0899934707591 2FAF11976CB1C885EF4DBD31DC5A17DD5475F".replace(' ', "");
        let with_colons: String = hex
            .as_bytes()
            .chunks(2)
            .map(|p| std::str::from_utf8(p).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(
            parse_fingerprint(&hex).unwrap(),
            parse_fingerprint(&with_colons).unwrap()
        );
        assert!(parse_fingerprint("AC:0E").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
        assert!(parse_fingerprint(&format!("é{}", "a".repeat(62))).is_err());
        assert!(parse_fingerprint(&format!("+f{}", "a".repeat(62))).is_err());
    }
}
