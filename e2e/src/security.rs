//! Security material for test sidecars: a users file with hashed passwords, a CA and
//! per-replica certificates laid out as a `kubernetes.io/tls` Secret, and HTTPS clients
//! that trust that CA (optionally presenting a client certificate).

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use tokio_rustls::rustls;

/// `sha256:<salt>:<hex of SHA-256(password || salt)>`, the users file's hash.
pub fn password_hash(password: &str, salt: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(password.as_bytes());
    ctx.update(salt.as_bytes());
    let hex: String = ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{salt}:{hex}")
}

/// One user of the users file; its password (and token, if any) are kept in clear for
/// the test's clients.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub name: String,
    pub role: String,
    pub password: String,
    pub token: Option<String>,
}

impl TestUser {
    pub fn new(name: &str, role: &str) -> TestUser {
        TestUser {
            name: name.to_string(),
            role: role.to_string(),
            password: format!("{name}-{}", rand_suffix()),
            token: None,
        }
    }

    pub fn with_token(mut self) -> TestUser {
        self.token = Some(format!("tok-{}-{}", self.name, rand_suffix()));
        self
    }
}

fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:08x}{:04x}", nanos, std::process::id() & 0xffff)
}

/// Writes the users file the sidecar's `--users-file` reads.
pub fn write_users_file(path: &Path, users: &[TestUser]) -> anyhow::Result<()> {
    let mut text = String::from("users:\n");
    for (i, u) in users.iter().enumerate() {
        text.push_str(&format!(
            "  - name: {}\n    role: {}\n    password: \"{}\"\n",
            u.name,
            u.role,
            password_hash(&u.password, &format!("salt{i}"))
        ));
        if let Some(t) = &u.token {
            text.push_str(&format!(
                "    token: \"{}\"\n",
                password_hash(t, &format!("tsalt{i}"))
            ));
        }
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A certificate authority of the test's own.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

/// A certificate and key in PEM.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    pub fn new(name: &str) -> anyhow::Result<TestCa> {
        let key = KeyPair::generate().context("CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("CA certificate")?;
        Ok(TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A certificate for `localhost` and 127.0.0.1 (where test replicas are reached),
    /// good for serving and as a client, with `serial`.
    pub fn leaf(&self, common_name: &str, serial: u64) -> anyhow::Result<Leaf> {
        let key = KeyPair::generate().context("leaf key")?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().context("DNS name")?),
            SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a leaf certificate")?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
        })
    }

    /// Writes `dir` as a `kubernetes.io/tls` Secret mounts it: `tls.crt`, `tls.key`,
    /// `ca.crt`. Each file is replaced whole (written aside, then renamed), as a Secret
    /// update is seen.
    pub fn write_tls_dir(&self, dir: &Path, leaf: &Leaf) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, text) in [
            ("tls.key", &leaf.key_pem),
            ("tls.crt", &leaf.cert_pem),
            ("ca.crt", &self.cert_pem),
        ] {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, dir.join(name))
                .with_context(|| format!("renaming into {}", dir.display()))?;
        }
        Ok(())
    }
}

/// A rustls client configuration trusting `ca_pem`, presenting `identity` when given.
pub fn client_config(
    ca_pem: &str,
    identity: Option<&Leaf>,
) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.context("CA PEM")?)
            .context("adding the CA")?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots);
    let mut config = match identity {
        Some(leaf) => {
            let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .context("client certificate PEM")?;
            let key =
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).context("client key PEM")?;
            builder
                .with_client_auth_cert(chain, key)
                .context("client certificate")?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The certificate a TLS server at `address` presents (DER), after a handshake that
/// trusts `ca_pem`.
pub async fn served_certificate(address: &str, ca_pem: &str) -> anyhow::Result<Vec<u8>> {
    let config = client_config(ca_pem, None)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    let name = rustls::pki_types::ServerName::try_from("localhost").context("server name")?;
    let tls = connector
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {address}"))?;
    let (_, session) = tls.get_ref();
    let cert = session
        .peer_certificates()
        .and_then(|c| c.first())
        .context("the server presented no certificate")?;
    Ok(cert.as_ref().to_vec())
}

/// How a test cluster's replicas are secured (`ClusterOptions::security`).
#[derive(Debug, Clone, Default)]
pub struct ClusterSecurity {
    /// The users file every replica gets (none when empty).
    pub users: Vec<TestUser>,
    /// Interserver endpoints on a listener of their own (`--interserver-listen`), which
    /// the `host` node names.
    pub split_listeners: bool,
    /// TLS on both listeners with certificates from this CA.
    pub tls: Option<Arc<TestCa>>,
    /// With `tls`: peers must present a certificate on the interserver listener.
    pub interserver_mtls: bool,
    /// `--security-reload-ms`.
    pub reload_ms: Option<u64>,
    /// Replicas (by index) whose certificate and `ca.crt` come from this other CA: a
    /// peer nobody trusts and that trusts nobody.
    pub foreign: Option<(Arc<TestCa>, Vec<usize>)>,
}

impl ClusterSecurity {
    /// The user the harness itself acts as (`Cluster::client`): the first admin.
    pub fn harness_user(&self) -> Option<crate::client::Credentials> {
        self.users
            .iter()
            .find(|u| u.role == "admin")
            .map(|u| crate::client::Credentials::Basic {
                user: u.name.clone(),
                password: u.password.clone(),
            })
    }

    /// A client of `base` trusting the cluster's CA, as the harness user.
    pub fn client(&self, base: &str) -> anyhow::Result<crate::client::ReplicaClient> {
        self.client_trusting(base, self.tls.as_deref())
    }

    fn client_trusting(
        &self,
        base: &str,
        ca: Option<&TestCa>,
    ) -> anyhow::Result<crate::client::ReplicaClient> {
        let tls = match ca {
            Some(ca) => Some(client_config(&ca.cert_pem, None)?),
            None => None,
        };
        Ok(crate::client::ReplicaClient::with_tls(base, tls)?.as_user(self.harness_user()))
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The arguments replica `index` (named `replica`, its client port `port`) of a
    /// cluster rooted at `root` runs with, from `args` (`SidecarConfig::args`), and the
    /// client the harness uses for it.
    pub fn prepare(
        &self,
        mut args: Vec<String>,
        replica: &str,
        port: u16,
        root: &Path,
        index: usize,
    ) -> anyhow::Result<(Vec<String>, crate::client::ReplicaClient)> {
        let interserver_port = if self.split_listeners {
            let port = crate::ports::free_ports(1)?[0];
            args.push("--interserver-listen".into());
            args.push(format!("127.0.0.1:{port}"));
            port
        } else {
            port
        };
        if let Some(i) = args.iter().position(|a| a == "--advertise") {
            args[i + 1] = format!("127.0.0.1:{interserver_port}");
        }
        if !self.users.is_empty() {
            let file = root.join("users.yaml");
            write_users_file(&file, &self.users)?;
            args.push("--users-file".into());
            args.push(file.display().to_string());
        }
        let mut trusted = self.tls.as_deref();
        if let Some(ca) = &self.tls {
            let ca = match &self.foreign {
                Some((foreign, which)) if which.contains(&index) => foreign,
                _ => ca,
            };
            trusted = Some(ca);
            let dir = root.join("tls").join(replica);
            ca.write_tls_dir(&dir, &ca.leaf(replica, 1000 + index as u64)?)?;
            args.push("--tls-dir".into());
            args.push(dir.display().to_string());
            if self.interserver_mtls {
                args.push("--interserver-mtls".into());
            }
        }
        if let Some(ms) = self.reload_ms {
            args.push("--security-reload-ms".into());
            args.push(ms.to_string());
        }
        let base = format!("{}://127.0.0.1:{port}", self.scheme());
        Ok((args, self.client_trusting(&base, trusted)?))
    }
}
