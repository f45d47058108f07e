//! TLS to the control plane, for agents and the command line alike: which
//! server certificate to trust (a pinned SHA-256 fingerprint or a CA file)
//! and the rustls client configuration built from it. One crypto provider
//! (ring) everywhere; configurations name it explicitly, so nothing depends
//! on a process-wide default.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The crypto provider every Tessera TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `sha256:<hex>` of a certificate's DER bytes: what `--pin` takes.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

/// This machine's host name (for certificate names).
pub fn host_name() -> String {
    crate::hostname()
}

/// Reads `sha256:<64 hex digits>` (colons between bytes allowed).
pub fn parse_pin(pin: &str) -> anyhow::Result<[u8; 32]> {
    let hexits: String = pin
        .trim()
        .strip_prefix("sha256:")
        .unwrap_or(pin.trim())
        .chars()
        .filter(|c| *c != ':')
        .collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(&hexits, &mut out).map_err(|_| {
        anyhow::anyhow!(
            "`{pin}` is not a certificate fingerprint: expected sha256: and 64 hex digits"
        )
    })?;
    Ok(out)
}

/// An error and its sources on one line: TLS failures (an untrusted or
/// changed certificate) hide in the sources of HTTP and WebSocket errors.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Whether `e` failed in the TLS handshake (rustls refused the peer).
pub fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    if e.is::<rustls::Error>() {
        return true;
    }
    // An I/O error's source skips the error it wraps: look inside.
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        if is_tls_failure(inner) {
            return true;
        }
    }
    e.source().is_some_and(is_tls_failure)
}

/// Which server certificate to trust on `https://` URLs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trust {
    /// Accept exactly the certificate with this fingerprint (`sha256:<hex>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    /// Trust certificates issued by the CA (or self-signed certificate) in this PEM file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

impl Trust {
    pub fn is_empty(&self) -> bool {
        self.pin.is_none() && self.ca.is_none()
    }

    /// The rustls configuration for talking to `url`: `None` for plain
    /// `http://`; for `https://`, one that checks the pin (preferred) or
    /// the CA file, and an error when neither is given.
    pub fn client_config(&self, url: &str) -> anyhow::Result<Option<Arc<ClientConfig>>> {
        if !url.starts_with("https://") {
            return Ok(None);
        }
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("setting up TLS")?;
        let config = if let Some(pin) = &self.pin {
            let verifier = PinVerifier {
                pin: parse_pin(pin)?,
                provider,
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        } else if let Some(ca) = &self.ca {
            let mut roots = rustls::RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect())
                .with_context(|| format!("reading the CA file {}", ca.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                bail!("the CA file {} holds no usable certificate", ca.display());
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            bail!(
                "{url} uses TLS but no server certificate is trusted: pass --pin sha256:<fingerprint> \
                 (the server prints it on start and `tessera join-token create` shows it) \
                 or --ca FILE (TESSERA_PIN or TESSERA_CA for the command line)"
            );
        };
        Ok(Some(Arc::new(config)))
    }
}

/// Accepts exactly one certificate, by the SHA-256 of its DER bytes; the
/// handshake's signatures are still checked against it.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Sha256::digest(end_entity.as_ref())[..] == self.pin[..] {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate fingerprint {} does not match the pinned sha256:{}",
                fingerprint(end_entity.as_ref()),
                hex::encode(self.pin)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
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
        rustls::crypto::verify_tls13_signature(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse() {
        let hex64 = "ab".repeat(32);
        assert_eq!(parse_pin(&format!("sha256:{hex64}")).unwrap(), [0xab; 32]);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_pin(&format!("sha256:{colons}")).unwrap(), [0xab; 32]);
        assert!(parse_pin("sha256:abcd").is_err());
        assert!(parse_pin("nonsense").is_err());
        assert_eq!(fingerprint(b"").len(), 7 + 64);
    }

    #[test]
    fn https_needs_trust() {
        let none = Trust::default();
        assert!(none.client_config("http://h:1").unwrap().is_none());
        let e = none.client_config("https://h:1").unwrap_err().to_string();
        assert!(e.contains("--pin") && e.contains("--ca"), "{e}");
        let pinned = Trust {
            pin: Some(format!("sha256:{}", "00".repeat(32))),
            ca: None,
        };
        assert!(pinned.client_config("https://h:1").unwrap().is_some());
    }
}
