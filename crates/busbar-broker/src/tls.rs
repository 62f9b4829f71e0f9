//! TLS for the native listener (rustls): server certificate and key from PEM files, optional
//! client-certificate verification against a CA (mutual TLS), and "TLS required" or "TLS
//! optional" on one port, told apart by the first byte a client sends (0x16 opens a TLS
//! handshake; a busbar frame opens with a length prefix).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use crate::server::BrokerError;

/// TLS settings of the native listener.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// PEM file with the server's certificate chain.
    pub cert: PathBuf,
    /// PEM file with the server's private key.
    pub key: PathBuf,
    /// PEM file with the CA(s) that client certificates must chain to: mutual TLS. Clients
    /// without a valid certificate are refused in the TLS handshake.
    pub client_ca: Option<PathBuf>,
    /// Refuse plain connections (with ERROR `TlsRequired`); otherwise accept both on one port.
    pub required: bool,
}

fn load_certs(path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, BrokerError> {
    let data =
        std::fs::read(path).map_err(|e| BrokerError::Tls(format!("cannot read {}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BrokerError::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(BrokerError::Tls(format!("{}: no certificate found", path.display())));
    }
    Ok(certs)
}

fn load_key(path: &PathBuf) -> Result<PrivateKeyDer<'static>, BrokerError> {
    let data =
        std::fs::read(path).map_err(|e| BrokerError::Tls(format!("cannot read {}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| BrokerError::Tls(format!("{}: {e}", path.display())))?
        .ok_or_else(|| BrokerError::Tls(format!("{}: no private key found", path.display())))
}

/// Builds the acceptor, or explains what is wrong with the files.
pub(crate) fn acceptor(options: &TlsOptions) -> Result<TlsAcceptor, BrokerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| BrokerError::Tls(e.to_string()))?;
    let builder = match &options.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots.add(cert).map_err(|e| BrokerError::Tls(format!("{}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| BrokerError::Tls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(load_certs(&options.cert)?, load_key(&options.key)?)
        .map_err(|e| BrokerError::Tls(format!("certificate and key: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Mutual TLS between the brokers of a cluster: each presents its certificate, and accepts only
/// peers whose certificate chains to `ca` (both when dialling and when accepting).
#[derive(Debug, Clone)]
pub struct RouteTls {
    /// PEM file with this broker's certificate chain; its names must include the address the
    /// other brokers dial (an IP address SAN for an IP address).
    pub cert: PathBuf,
    /// PEM file with its private key.
    pub key: PathBuf,
    /// PEM file with the CA(s) the cluster's certificates chain to.
    pub ca: PathBuf,
}

/// The TLS ends of routes: the acceptor (peer certificates required) and the connector.
#[derive(Clone)]
pub(crate) struct RouteTlsEnds {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for RouteTlsEnds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteTlsEnds")
    }
}

/// Builds both ends of route TLS, or explains what is wrong with the files.
pub(crate) fn route_ends(options: &RouteTls) -> Result<RouteTlsEnds, BrokerError> {
    let server = TlsOptions {
        cert: options.cert.clone(),
        key: options.key.clone(),
        client_ca: Some(options.ca.clone()),
        required: true,
    };
    let acceptor = acceptor(&server)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(&options.ca)? {
        roots.add(cert).map_err(|e| BrokerError::Tls(format!("{}: {e}", options.ca.display())))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BrokerError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(&options.cert)?, load_key(&options.key)?)
        .map_err(|e| BrokerError::Tls(format!("certificate and key: {e}")))?;
    Ok(RouteTlsEnds { acceptor, connector: tokio_rustls::TlsConnector::from(Arc::new(config)) })
}

/// The common name of a verified client certificate, if any (for mapping it to a user).
pub(crate) fn peer_common_name(conn: &rustls::ServerConnection) -> Option<String> {
    let cert = conn.peer_certificates()?.first()?;
    common_name(cert.as_ref())
}

/// The subject's common name of a DER certificate: exactly one CN, as text; anything else (no
/// CN, several, not text, an unparsable certificate) names nobody.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = cert.subject().iter_common_name();
    let cn = names.next()?.as_str().ok()?.to_string();
    names.next().is_none().then_some(cn)
}
