//! TLS material: loading PEM files and building rustls configs with the ring provider.
//!
//! Every config is built with an explicit provider (no process-wide default to install), so the
//! library works the same from `main`, from tests and from the sandbox.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;
use crate::error::StartupError;

/// The crypto provider used everywhere (ring: no cmake needed on a fresh machine).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// ALPN protocols offered and accepted, best first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Reads every certificate in a PEM file; an empty file is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, StartupError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            StartupError::Tls(format!("{}: cannot read certificates: {e}", path.display()))
        })?;
    if certs.is_empty() {
        return Err(StartupError::Tls(format!(
            "{}: no PEM certificate found",
            path.display()
        )));
    }
    Ok(certs)
}

/// Reads certificates from PEM text.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, StartupError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StartupError::Tls(format!("cannot parse certificates: {e}")))?;
    if certs.is_empty() {
        return Err(StartupError::Tls("no PEM certificate found".into()));
    }
    Ok(certs)
}

/// The roots the upstream is verified against: the system's plus `extra` (a private CA).
pub fn upstream_roots(extra: Option<&Path>) -> Result<RootCertStore, StartupError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra {
        for cert in load_certs(path)? {
            roots.add(cert).map_err(|e| {
                StartupError::Tls(format!("{}: unusable CA certificate: {e}", path.display()))
            })?;
        }
    } else if added == 0 {
        tracing::warn!("no system root certificates found; set upstream.ca_file");
    }
    Ok(roots)
}

/// Client config for the upstream: verification always on, ALPN h2 and http/1.1 (set by
/// hyper-rustls).
pub fn client_config(roots: RootCertStore) -> Result<ClientConfig, StartupError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| StartupError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Server config from a certificate chain and key, offering h2 and http/1.1.
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Option<RootCertStore>,
) -> Result<Arc<ServerConfig>, StartupError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| StartupError::Tls(e.to_string()))?;
    let builder = match client_roots {
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| StartupError::Tls(format!("client_ca: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| StartupError::Tls(format!("certificate and key do not fit: {e}")))?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, StartupError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| StartupError::Tls(format!("{}: cannot read private key: {e}", path.display())))
}

/// Server config from a listener's TLS files.
pub fn server_config_from_files(files: &TlsFiles) -> Result<Arc<ServerConfig>, StartupError> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let client_roots = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(path)? {
                roots.add(cert).map_err(|e| {
                    StartupError::Tls(format!("{}: unusable CA certificate: {e}", path.display()))
                })?;
            }
            Some(roots)
        }
        None => None,
    };
    server_config(certs, key, client_roots)
}
