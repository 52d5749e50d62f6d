//! TLS termination with rustls (ring provider): TLS 1.3 and 1.2 only, rustls' default cipher
//! suites, HTTP/1.1 over ALPN. The certificate and key are read from files named in the
//! configuration and can be replaced while serving: [`ReloadableCert::reload`] (on SIGHUP)
//! swaps what new handshakes get, and connections already established keep theirs.

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("the private key does not match the certificate")]
    Mismatch,
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_error(path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// The server's certificate, replaceable at run time.
pub struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for ReloadableCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadableCert")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the chain and the key, and checks that they belong together.
fn load(provider: &CryptoProvider, cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let pem = std::fs::read(cert_path).map_err(|e| file_error(cert_path, e.to_string()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|_| file_error(cert_path, "not a PEM certificate chain"))?;
    if chain.is_empty() {
        return Err(file_error(cert_path, "holds no certificate"));
    }
    // The key is a secret: like the other key files, it must not be readable by others.
    let key_pem = crate::secret_file::read_private(key_path)
        .map_err(|e| file_error(key_path, e))?
        .ok_or_else(|| file_error(key_path, "does not exist"))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| file_error(key_path, "not a PEM private key"))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|_| file_error(key_path, "unsupported private key"))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| TlsError::Mismatch)?;
    Ok(certified)
}

impl ReloadableCert {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<ReloadableCert>, TlsError> {
        let provider = provider();
        let certified = load(&provider, cert_path, key_path)?;
        Ok(Arc::new(ReloadableCert {
            current: RwLock::new(Arc::new(certified)),
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            provider,
        }))
    }

    /// Reads the files again; on any error the certificate in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let certified = load(&self.provider, &self.cert_path, &self.key_path)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(certified);
        Ok(())
    }

    /// The rustls configuration that serves this certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}
