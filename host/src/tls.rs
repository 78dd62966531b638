//! HTTPS with rustls: loading the operator's certificate and key, and the
//! server configuration (aws-lc-rs, TLS 1.2 and 1.3, HTTP/1.1).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// The rustls server configuration for `tls`; relative paths resolve
/// against `base_dir`. Fails with the file and the reason when a PEM file is
/// missing, empty or not a certificate/key, or when they do not match.
pub fn server_config(
    tls: &TlsConfig,
    base_dir: &Path,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_owned()
        } else {
            base_dir.join(p)
        }
    };
    let cert_file = resolve(&tls.cert_file);
    let key_file = resolve(&tls.key_file);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .with_context(|| {
            format!(
                "server.tls.cert_file {}: not a PEM certificate chain",
                cert_file.display()
            )
        })?;
    if certs.is_empty() {
        bail!(
            "server.tls.cert_file {} holds no certificate",
            cert_file.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&key_file).with_context(|| {
        format!(
            "server.tls.key_file {}: not a PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key_file.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("rustls has no usable protocol version")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("server.tls: the key does not match the certificate, or is unsupported")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
