//! TLS on the client side (rustls): the CA to trust, and a certificate for mutual TLS.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsConnector;

use crate::error::{Error, Result};

/// How the client does TLS. With `ca` unset there is nothing to trust: set it to the CA that
/// signed the broker's certificate.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// PEM file with the CA certificate(s) the broker's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// PEM files with this client's certificate chain and key, for brokers that require them.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The name to check the broker's certificate against (default: the host of the address).
    pub server_name: Option<String>,
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Tls(format!("cannot read {}: {e}", path.display())))
}

fn certs(path: &PathBuf) -> Result<Vec<CertificateDer<'static>>> {
    rustls_pemfile::certs(&mut read(path)?.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))
}

fn key(path: &PathBuf) -> Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut read(path)?.as_slice())
        .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?
        .ok_or_else(|| Error::Tls(format!("{}: no private key found", path.display())))
}

pub(crate) fn connector(settings: &ClientTls) -> Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &settings.ca {
        for cert in certs(ca)? {
            roots.add(cert).map_err(|e| Error::Tls(format!("{}: {e}", ca.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match &settings.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, k)) => builder
            .with_client_auth_cert(certs(cert)?, key(k)?)
            .map_err(|e| Error::Tls(format!("client certificate: {e}")))?,
    };
    Ok(TlsConnector::from(Arc::new(config)))
}
