//! The control plane's certificates and keys, made fresh for every control plane.
//!
//! One CA signs the API server's serving certificate and every client certificate (the
//! admin, the controller manager, the scheduler, each node agent), so a client trusts the
//! server through the same `ca.crt` a pod gets as `kube-root-ca.crt`. Keys are ECDSA P-256:
//! quick to make, and accepted by the API server for serving, client auth and signing
//! service-account tokens.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("making the {what} certificate: {source}")]
    Certificate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The CA, the API server's serving pair and the service-account signing key, on disk.
pub struct Pki {
    dir: PathBuf,
    ca: Issuer<'static, KeyPair>,
    pub ca_cert: PathBuf,
    pub serving: CertFiles,
    /// Signs service-account tokens (private key, PKCS#8).
    pub service_account_key: PathBuf,
    /// Verifies them (public key).
    pub service_account_pub: PathBuf,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .field("ca_cert", &self.ca_cert)
            .finish_non_exhaustive()
    }
}

/// The DNS names a pod uses for the API server's `kubernetes` service.
pub const SERVICE_NAMES: [&str; 5] = [
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "localhost",
];

impl Pki {
    /// Makes the CA and the server's pair under `dir`; `server_ips` are the addresses the
    /// API server is reached at (its bind address, the `kubernetes` service's IP).
    pub fn create(dir: &Path, server_ips: &[IpAddr]) -> Result<Pki, PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let ca_key = key("CA")?;
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "rtable-e2e-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(|source| cert_error("CA", source))?;
        let ca_cert_path = dir.join("ca.crt");
        write(&ca_cert_path, &ca_cert.pem())?;
        let ca = Issuer::new(ca_params, ca_key);

        let mut pki = Pki {
            dir: dir.to_path_buf(),
            ca,
            ca_cert: ca_cert_path,
            serving: CertFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            service_account_key: dir.join("sa.key"),
            service_account_pub: dir.join("sa.pub"),
        };

        let mut serving = leaf("kube-apiserver", &[]);
        serving.subject_alt_names = SERVICE_NAMES
            .iter()
            .map(|n| {
                (*n).try_into()
                    .map(SanType::DnsName)
                    .map_err(|source| cert_error("API server", source))
            })
            .collect::<Result<_, _>>()?;
        serving
            .subject_alt_names
            .extend(server_ips.iter().map(|ip| SanType::IpAddress(*ip)));
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        pki.serving = pki.sign("apiserver", serving)?;

        let sa = key("service-account")?;
        write(&pki.service_account_key, &sa.serialize_pem())?;
        write(&pki.service_account_pub, &sa.public_key_pem())?;
        Ok(pki)
    }

    /// A client certificate for `user` in `groups` (the API server reads the common name as
    /// the user and each organization as a group).
    pub fn client(&self, user: &str, groups: &[&str]) -> Result<CertFiles, PkiError> {
        let mut params = leaf(user, groups);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let file = user.replace([':', '/'], "_");
        self.sign(&file, params)
    }

    fn sign(&self, file: &str, params: CertificateParams) -> Result<CertFiles, PkiError> {
        let key = key(file)?;
        let cert = params
            .signed_by(&key, &self.ca)
            .map_err(|source| cert_error(file, source))?;
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
        };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }
}

fn leaf(common_name: &str, organizations: &[&str]) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    for o in organizations {
        params.distinguished_name.push(DnType::OrganizationName, *o);
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params
}

fn key(what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::generate().map_err(|source| cert_error(what, source))
}

fn cert_error(what: &str, source: rcgen::Error) -> PkiError {
    PkiError::Certificate {
        what: what.to_string(),
        source,
    }
}

fn write(path: &Path, text: &str) -> Result<(), PkiError> {
    std::fs::write(path, text).map_err(|source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_every_file_as_pem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::create(dir.path(), &["127.0.0.1".parse().expect("ip")]).expect("pki");
        let admin = pki.client("admin", &["system:masters"]).expect("client");
        for (path, tag) in [
            (&pki.ca_cert, "CERTIFICATE"),
            (&pki.serving.cert, "CERTIFICATE"),
            (&pki.serving.key, "PRIVATE KEY"),
            (&admin.cert, "CERTIFICATE"),
            (&pki.service_account_key, "PRIVATE KEY"),
            (&pki.service_account_pub, "PUBLIC KEY"),
        ] {
            let text = std::fs::read_to_string(path).expect("read");
            assert!(
                text.starts_with(&format!("-----BEGIN {tag}-----")),
                "{}: {text}",
                path.display()
            );
        }
        let node = pki
            .client("system:node:node-1", &["system:nodes"])
            .expect("node");
        assert!(node.cert.ends_with("system_node_node-1.crt"));
    }
}
