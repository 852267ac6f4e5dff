//! TLS for the broker sources (RabbitMQ, NATS, MQTT), with the same meaning of `tls.mode` as the
//! Kafka source: `disable` is plain TCP; `prefer` and `require` encrypt without checking the
//! server's certificate; `verify-full` checks the chain (against the CA from the Secret, or the
//! system's roots) and the host name.

use std::sync::Arc;

use obsrv_crds::{Tls, TlsMode};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};

use crate::error::{Error, Result};

/// Whether `tls` asks for an encrypted connection.
pub fn enabled(tls: Option<&Tls>) -> bool {
    tls.is_some_and(|t| t.mode != TlsMode::Disable)
}

/// The client configuration for `tls` (None: plain TCP). `ca` is the PEM bundle from the Secret.
pub fn client_config(tls: Option<&Tls>, ca: Option<&str>) -> Result<Option<ClientConfig>> {
    match tls.filter(|_| enabled(tls)) {
        Some(t) => config_for(t.mode, ca.map(str::as_bytes)).map(Some),
        None => Ok(None),
    }
}

/// The client configuration of an encrypted connection in `mode` (libpq's meaning: `verify-full`
/// checks the chain and the host name, `prefer`/`require` encrypt without checking). Shared by
/// the broker sources and the Postgres CDC TLS bridge.
pub fn config_for(mode: TlsMode, ca: Option<&[u8]>) -> Result<ClientConfig> {
    let provider = Arc::new(ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("tls: {e}")))?;
    Ok(if mode == TlsMode::VerifyFull {
        builder
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
            .with_no_client_auth()
    })
}

/// The CA bundle from the Secret; without one the system's roots, or Mozilla's (webpki-roots)
/// where the image has none.
fn roots(ca: Option<&[u8]>) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert =
                    cert.map_err(|e| Error::Config(format!("tls.ca is not a PEM bundle: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::Config(format!("tls.ca: {e}")))?;
            }
            if roots.is_empty() {
                return Err(Error::Config(
                    "tls.ca holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
        }
    }
    Ok(roots)
}

/// `prefer` / `require`: any certificate is accepted (the connection is encrypted, the server not
/// authenticated), but the handshake's signatures are still checked.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use obsrv_crds::SecretKeyRef;

    fn tls(mode: TlsMode) -> Tls {
        Tls {
            mode,
            ca: Some(SecretKeyRef {
                secret_name: "s".into(),
                key: "ca.crt".into(),
            }),
        }
    }

    #[test]
    fn disable_and_absent_are_plain_and_a_bad_ca_names_the_field() {
        assert!(client_config(None, None).unwrap().is_none());
        assert!(
            client_config(Some(&tls(TlsMode::Disable)), None)
                .unwrap()
                .is_none()
        );
        assert!(
            client_config(Some(&tls(TlsMode::Require)), None)
                .unwrap()
                .is_some()
        );
        let e = client_config(Some(&tls(TlsMode::VerifyFull)), Some("not pem")).unwrap_err();
        assert!(e.to_string().contains("tls.ca"), "{e}");
    }
}
