//! TLS for both listeners and for the requests to peers, from a directory laid out as a
//! `kubernetes.io/tls` Secret (cert-manager writes the same): `tls.crt` (this replica's
//! certificate chain), `tls.key` (its key) and `ca.crt` (the CA peers are checked
//! against). The files are re-read when they change; every new connection, served or
//! opened, uses what was last loaded, so a rotated certificate needs no restart.
//!
//! Peers are verified as any HTTPS server is: a chain to `ca.crt` and a name matching the
//! host they are reached at, the pod's DNS name from its `host` node. With mutual TLS the
//! interserver listener also asks peers for a certificate signed by `ca.crt`, and the
//! peer client presents this replica's own.

pub mod listener;
pub mod peer_client;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
pub const CA_FILE: &str = "ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "{path}: {message} (--tls-dir holds a kubernetes.io/tls Secret: tls.crt, tls.key, ca.crt)"
    )]
    File { path: String, message: String },
    #[error("--tls-dir {dir}: {message}")]
    Config { dir: String, message: String },
}

/// Which listener a server configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Interserver,
}

/// What one load of the directory produced.
struct Loaded {
    client_listener: Arc<rustls::ServerConfig>,
    interserver_listener: Arc<rustls::ServerConfig>,
    /// Checks a peer's server certificate against `ca.crt`.
    peer_verifier: Arc<rustls::client::WebPkiServerVerifier>,
    /// This replica's certificate and key, presented to peers under mutual TLS.
    identity: Arc<CertifiedKey>,
}

/// The TLS material of one replica, reloaded in place.
pub struct Tls {
    dir: PathBuf,
    interserver_mtls: bool,
    loaded: RwLock<Loaded>,
}

impl Tls {
    pub fn load(dir: &Path, interserver_mtls: bool) -> Result<Arc<Tls>, TlsError> {
        let loaded = load(dir, interserver_mtls)?;
        Ok(Arc::new(Tls {
            dir: dir.to_path_buf(),
            interserver_mtls,
            loaded: RwLock::new(loaded),
        }))
    }

    /// The configuration new connections on `side` are served with.
    pub fn server_config(&self, side: Side) -> Arc<rustls::ServerConfig> {
        let loaded = self.loaded.read();
        match side {
            Side::Client => loaded.client_listener.clone(),
            Side::Interserver => loaded.interserver_listener.clone(),
        }
    }

    fn peer_verifier(&self) -> Arc<rustls::client::WebPkiServerVerifier> {
        self.loaded.read().peer_verifier.clone()
    }

    fn identity(&self) -> Arc<CertifiedKey> {
        self.loaded.read().identity.clone()
    }

    pub fn files(&self) -> Vec<PathBuf> {
        [CERT_FILE, KEY_FILE, CA_FILE]
            .iter()
            .map(|f| self.dir.join(f))
            .collect()
    }

    /// Re-reads the directory; on failure what was loaded before stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = load(&self.dir, self.interserver_mtls)?;
        *self.loaded.write() = loaded;
        Ok(())
    }

    /// Reloads whenever a file changes, checking every `period`, forever.
    pub async fn watch(self: Arc<Self>, period: Duration) {
        let files = self.files();
        crate::file_watch::on_change(files, period, move || match self.reload() {
            Ok(()) => info!(dir = %self.dir.display(), "TLS certificate reloaded"),
            Err(e) => warn!(error = %e, "TLS files changed but cannot be used (yet); serving the ones loaded before"),
        })
        .await;
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load(dir: &Path, interserver_mtls: bool) -> Result<Loaded, TlsError> {
    let file_error = |file: &str, message: String| TlsError::File {
        path: dir.join(file).display().to_string(),
        message,
    };
    let config_error = |message: String| TlsError::Config {
        dir: dir.display().to_string(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join(CERT_FILE))
        .map_err(|e| file_error(CERT_FILE, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(CERT_FILE, e.to_string()))?;
    if chain.is_empty() {
        return Err(file_error(CERT_FILE, "holds no PEM certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_file(dir.join(KEY_FILE))
        .map_err(|e| file_error(KEY_FILE, e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(dir.join(CA_FILE))
        .map_err(|e| file_error(CA_FILE, e.to_string()))?
    {
        let ca = ca.map_err(|e| file_error(CA_FILE, e.to_string()))?;
        roots
            .add(ca)
            .map_err(|e| file_error(CA_FILE, format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(file_error(CA_FILE, "holds no PEM certificate".into()));
    }
    let roots = Arc::new(roots);
    let provider = provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| file_error(KEY_FILE, e.to_string()))?;
    let identity = Arc::new(CertifiedKey::new(chain.clone(), signing_key));
    identity
        .keys_match()
        .map_err(|e| config_error(format!("tls.key does not belong to tls.crt: {e}")))?;
    let builder = || {
        rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(e.to_string()))
    };
    let finish = |mut config: rustls::ServerConfig| {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    };
    let client_listener = builder()?
        .with_no_client_auth()
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| config_error(e.to_string()))?;
    let interserver_listener = if interserver_mtls {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| config_error(format!("ca.crt for client certificates: {e}")))?;
        builder()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| config_error(e.to_string()))?
    } else {
        client_listener.clone()
    };
    let peer_verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| config_error(format!("ca.crt: {e}")))?;
    Ok(Loaded {
        client_listener: finish(client_listener),
        interserver_listener: finish(interserver_listener),
        peer_verifier,
        identity,
    })
}
