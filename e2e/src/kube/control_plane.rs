//! A real Kubernetes control plane on this machine: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler, built from their Go module sources
//! (`scripts/kube-binaries.sh`), serving on one address of this host only.
//!
//! The API server authenticates clients by certificates of its own CA (`pki`), authorizes
//! with Node and RBAC as a production cluster does, and signs service-account tokens, so
//! a pod's in-cluster config works. Dropping the control plane stops every process; when
//! the test is failing its directory (logs, command lines, certificates, kubeconfig) is kept
//! and the tail of every log printed.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::binaries::Binaries;
use super::daemon::Daemon;
use super::pki::{CertFiles, Pki};
use crate::ports;

/// The controllers the scenarios rely on. Named as `kube-controller-manager --controllers`
/// takes them.
pub const CONTROLLERS: [&str; 17] = [
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "namespace-controller",
    "garbage-collector-controller",
    "statefulset-controller",
    "deployment-controller",
    "replicaset-controller",
    "disruption-controller",
    "node-lifecycle-controller",
    "persistentvolume-binder-controller",
    "persistentvolume-protection-controller",
    "persistentvolumeclaim-protection-controller",
    "endpointslice-controller",
    "endpoints-controller",
    "pod-garbage-collector-controller",
    "taint-eviction-controller",
];

/// The `kubernetes` service's range; the first address is its ClusterIP.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// Where the API server listens: loopback, or the pods' bridge address so pods reach it.
    pub address: Ipv4Addr,
    /// How long after its last heartbeat a node is marked NotReady.
    pub node_monitor_grace: Duration,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        ControlPlaneOptions {
            address: Ipv4Addr::LOCALHOST,
            node_monitor_grace: Duration::from_secs(20),
        }
    }
}

/// A running control plane. Stops everything it started when dropped.
pub struct ControlPlane {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    pki: Pki,
    binaries: Binaries,
    /// `https://<address>:<port>`.
    pub server: String,
    /// An admin (`system:masters`) kubeconfig.
    pub kubeconfig: PathBuf,
    daemons: Vec<Daemon>,
    keep: bool,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("root", &self.root)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Builds (once per machine) or finds the binaries, starts every component under a new
    /// temporary directory and waits until the API server is ready and the controllers
    /// have set up the `default` namespace.
    pub async fn start(opts: ControlPlaneOptions) -> anyhow::Result<ControlPlane> {
        let binaries = tokio::task::spawn_blocking(Binaries::locate)
            .await
            .context("the binary lookup panicked")??;
        let dir = tempfile::Builder::new()
            .prefix("rtable-kube-")
            .tempdir()
            .context("creating the control plane's directory")?;
        let root = dir.path().to_path_buf();
        let service_ip = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1));
        let mut server_ips = vec![IpAddr::V4(opts.address), service_ip];
        if opts.address != Ipv4Addr::LOCALHOST {
            server_ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        let pki = Pki::create(&root.join("pki"), &server_ips)?;
        let [etcd_client, etcd_peer, api_port] = ports::free_ports(3)?[..] else {
            anyhow::bail!("free_ports returned the wrong count");
        };
        let server = format!("https://{}:{api_port}", opts.address);
        let mut plane = ControlPlane {
            dir: Some(dir),
            kubeconfig: root.join("admin.kubeconfig"),
            root,
            pki,
            binaries,
            server,
            daemons: Vec::new(),
            keep: false,
        };
        let started = plane
            .start_all(&opts, etcd_client, etcd_peer, api_port)
            .await;
        if let Err(e) = started {
            plane.keep = true;
            return Err(e);
        }
        Ok(plane)
    }

    async fn start_all(
        &mut self,
        opts: &ControlPlaneOptions,
        etcd_client: u16,
        etcd_peer: u16,
        api_port: u16,
    ) -> anyhow::Result<()> {
        let t = Instant::now();
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        self.spawn(
            "etcd",
            vec![
                format!("--data-dir={}", self.root.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
                // A test cluster's data is thrown away: no fsync per write.
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
        )?;
        self.wait_etcd(&etcd_url).await?;
        let etcd_ready = t.elapsed();

        let pki = &self.pki;
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={}", opts.address),
            format!("--advertise-address={}", opts.address),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", pki.serving.cert.display()),
            format!("--tls-private-key-file={}", pki.serving.key.display()),
            format!("--client-ca-file={}", pki.ca_cert.display()),
            format!(
                "--service-account-key-file={}",
                pki.service_account_pub.display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                pki.service_account_key.display()
            ),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            // No kube-proxy: nothing routes the `kubernetes` service's IP, so its
            // endpoints are not maintained; pods get the real address (see the node agent).
            "--endpoint-reconciler-type=none".into(),
            "--allow-privileged=true".into(),
            format!("--cert-dir={}", self.root.join("apiserver-certs").display()),
            "--profiling=false".into(),
        ];
        self.spawn("kube-apiserver", apiserver_args)?;
        let admin = self.pki.client("admin", &["system:masters"])?;
        write_kubeconfig(&self.kubeconfig, &self.server, &self.pki.ca_cert, &admin)?;
        self.wait_apiserver().await?;
        let api_ready = t.elapsed();

        let kcm_config = self.client_kubeconfig(
            "kube-controller-manager",
            // Every controller runs with the manager's own identity (no per-controller
            // service-account credentials), so it needs the whole API.
            &["system:masters"],
        )?;
        self.spawn(
            "kube-controller-manager",
            vec![
                format!("--kubeconfig={}", kcm_config.display()),
                format!("--authentication-kubeconfig={}", kcm_config.display()),
                format!("--authorization-kubeconfig={}", kcm_config.display()),
                "--leader-elect=false".into(),
                format!("--controllers={}", CONTROLLERS.join(",")),
                format!(
                    "--service-account-private-key-file={}",
                    self.pki.service_account_key.display()
                ),
                format!("--root-ca-file={}", self.pki.ca_cert.display()),
                format!(
                    "--node-monitor-grace-period={}s",
                    opts.node_monitor_grace.as_secs()
                ),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=0".into(),
                "--concurrent-statefulset-syncs=5".into(),
            ],
        )?;
        let scheduler_config =
            self.client_kubeconfig("system:kube-scheduler", &["system:kube-scheduler"])?;
        self.spawn(
            "kube-scheduler",
            vec![
                format!("--kubeconfig={}", scheduler_config.display()),
                format!("--authentication-kubeconfig={}", scheduler_config.display()),
                format!("--authorization-kubeconfig={}", scheduler_config.display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=0".into(),
            ],
        )?;
        self.wait_controllers().await?;
        eprintln!(
            "control plane: etcd ready after {:.1}s, API server after {:.1}s, controllers after {:.1}s ({})",
            etcd_ready.as_secs_f64(),
            api_ready.as_secs_f64(),
            t.elapsed().as_secs_f64(),
            self.server
        );
        Ok(())
    }

    fn spawn(&mut self, name: &str, args: Vec<String>) -> anyhow::Result<()> {
        let program = self.binaries.path(name);
        let daemon = Daemon::spawn(name, &program, &args, &self.root)?;
        self.daemons.push(daemon);
        Ok(())
    }

    /// A kubeconfig for a client certificate of `user` in `groups`, written beside the
    /// admin's; the node agent and the controllers each get one.
    pub fn client_kubeconfig(&self, user: &str, groups: &[&str]) -> anyhow::Result<PathBuf> {
        let cert = self.pki.client(user, groups)?;
        let path = self
            .root
            .join(format!("{}.kubeconfig", user.replace([':', '/'], "_")));
        write_kubeconfig(&path, &self.server, &self.pki.ca_cert, &cert)?;
        Ok(path)
    }

    /// An admin client.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        client_for(&self.kubeconfig).await
    }

    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    pub fn ca_cert(&self) -> &Path {
        &self.pki.ca_cert
    }

    /// The control plane's directory (logs, certificates, kubeconfigs).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Keeps the directory and prints the logs when dropped, as for a failed test.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// An error naming any component that has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        self.daemons.iter_mut().try_for_each(Daemon::check_running)
    }

    async fn wait_etcd(&mut self, url: &str) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .context("building an HTTP client")?;
        let health = format!("{url}/health");
        self.wait("etcd to answer /health", Duration::from_secs(30), || {
            let (http, health) = (http.clone(), health.clone());
            async move {
                let ok = http
                    .get(&health)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                Ok(ok)
            }
        })
        .await
    }

    async fn wait_apiserver(&mut self) -> anyhow::Result<()> {
        let client = self.client().await?;
        self.wait(
            "kube-apiserver to answer /readyz",
            Duration::from_secs(90),
            || {
                let client = client.clone();
                async move {
                    let request = http::Request::get("/readyz")
                        .body(Vec::new())
                        .context("building a /readyz request")?;
                    Ok(client
                        .request_text(request)
                        .await
                        .is_ok_and(|t| t.trim() == "ok"))
                }
            },
        )
        .await
    }

    /// The serviceaccount and root-CA publisher controllers have done their first round:
    /// a pod in `default` can be admitted and mount its token and CA.
    async fn wait_controllers(&mut self) -> anyhow::Result<()> {
        use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
        let client = self.client().await?;
        self.wait(
            "kube-controller-manager to create the default service account and kube-root-ca.crt",
            Duration::from_secs(60),
            || {
                let client = client.clone();
                async move {
                    let sa: kube::Api<ServiceAccount> =
                        kube::Api::namespaced(client.clone(), "default");
                    let cm: kube::Api<ConfigMap> = kube::Api::namespaced(client, "default");
                    Ok(sa.get_opt("default").await.ok().flatten().is_some()
                        && cm
                            .get_opt("kube-root-ca.crt")
                            .await
                            .ok()
                            .flatten()
                            .is_some())
                }
            },
        )
        .await
    }

    /// Polls `ready` until it says yes, failing early with the log of any component that
    /// exited meanwhile.
    async fn wait<F, Fut>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: F,
    ) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<bool>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()
                .with_context(|| format!("waiting for {what}"))?;
            if ready().await? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "timed out after {}s waiting for {what}; logs in {}",
                    timeout.as_secs(),
                    self.root.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn dump_logs(&self, lines: usize) {
        for d in &self.daemons {
            eprintln!(
                "===== {} ({}) =====\n{}",
                d.name,
                d.log.display(),
                crate::tail(&d.log, lines)
            );
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let failed = std::thread::panicking() || self.keep;
        if failed {
            self.dump_logs(40);
        }
        // The API server first, so the controllers see no half-stopped store.
        for d in self.daemons.iter_mut().rev() {
            if let Err(e) = d.stop(Duration::from_secs(5)) {
                eprintln!("control plane: {e:#}");
            }
        }
        if (failed || crate::keep_dirs())
            && let Some(dir) = self.dir.take()
        {
            eprintln!("control plane directory kept: {}", dir.keep().display());
        }
    }
}

/// A kube client for the kubeconfig at `path`.
pub async fn client_for(path: &Path) -> anyhow::Result<kube::Client> {
    kube::Client::try_from(config_for(path).await?).context("building a kube client")
}

/// The kube client configuration of the kubeconfig at `path`, for a client with settings
/// of its own (say, without kube's retries of 429 answers).
pub async fn config_for(path: &Path) -> anyhow::Result<kube::Config> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading {}", path.display()))?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading {}", path.display()))
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, cert: &CertFiles) -> anyhow::Result<()> {
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: rtable-e2e
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: user
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: rtable-e2e
  context:
    cluster: rtable-e2e
    user: user
    namespace: default
current-context: rtable-e2e
",
        ca = ca.display(),
        cert = cert.cert.display(),
        key = cert.key.display(),
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
