//! One control plane for every scenario of a test binary: starting one takes seconds, and
//! the scenarios each work in a namespace of their own.
//!
//! The processes are started from a thread of their own that lives as long as the test
//! binary: they are tied to the thread that started them (PR_SET_PDEATHSIG), and libtest
//! runs each test on a thread that ends with it. At exit the plane is stopped; its
//! directory (logs, certificates, kubeconfig) is kept when a scenario failed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use super::binaries::Binaries;
use super::control_plane::{ControlPlane, ControlPlaneOptions};
use super::kubectl::Cli;

/// What scenarios use of the shared plane.
#[derive(Debug)]
pub struct Shared {
    pub kubeconfig: PathBuf,
    pub server: String,
    pub binaries: Binaries,
    pub dir: PathBuf,
    failed: AtomicBool,
}

static SHARED: OnceLock<Shared> = OnceLock::new();
static PLANE: Mutex<Option<ControlPlane>> = Mutex::new(None);

impl Shared {
    /// The plane, started on first use with `opts` (later calls get the same plane).
    /// Panics when it cannot start: this is for tests, and every scenario needs it.
    pub fn get(opts: ControlPlaneOptions) -> &'static Shared {
        SHARED.get_or_init(|| match start(opts) {
            Ok(shared) => shared,
            Err(e) => panic!("starting the control plane: {e:#}"),
        })
    }

    pub fn kubectl(&self) -> Cli {
        Cli::new(&self.binaries.path("kubectl"), &self.kubeconfig)
    }

    pub fn helm(&self) -> Cli {
        Cli::new(&self.binaries.path("helm"), &self.kubeconfig)
    }

    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        super::control_plane::client_for(&self.kubeconfig).await
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Applies the chart's CRD (server-side) and waits until it is Established. Polled
    /// through the API rather than with `kubectl wait`, which fails instead of waiting when
    /// a CRD just created has no conditions yet.
    pub async fn install_chart_crd(&self) -> anyhow::Result<()> {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let path = crate::repo_root().join("charts/rtable-operator/crds/replicatedtable.yaml");
        let path = path.display().to_string();
        self.kubectl()
            .run(&["apply", "--server-side", "-f", &path], None)
            .await?
            .ok("kubectl apply of the chart's CRD")?;
        let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(self.client().await?);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let established = crds
                .get_opt("replicatedtables.rtable.io")
                .await?
                .and_then(|crd| crd.status)
                .and_then(|s| s.conditions)
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the ReplicatedTable CRD was not Established within 60 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Held for a scenario: if the scenario panics, the plane's logs are printed and its
    /// directory kept when the test binary exits.
    pub fn scenario(&'static self) -> ScenarioGuard {
        ScenarioGuard(self)
    }
}

pub struct ScenarioGuard(&'static Shared);

impl Drop for ScenarioGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.failed.store(true, Ordering::SeqCst);
        }
    }
}

fn start(opts: ControlPlaneOptions) -> anyhow::Result<Shared> {
    let plane = on_lasting_thread("control-plane", move || ControlPlane::start(opts))?;
    let shared = Shared {
        kubeconfig: plane.kubeconfig.clone(),
        server: plane.server.clone(),
        binaries: plane.binaries().clone(),
        dir: plane.dir().to_path_buf(),
        failed: AtomicBool::new(false),
    };
    *PLANE.lock().unwrap_or_else(|p| p.into_inner()) = Some(plane);
    // SAFETY: atexit(3) only records the function pointer; `stop_at_exit` is an
    // `extern "C" fn()` that never unwinds.
    if unsafe { libc::atexit(stop_at_exit) } != 0 {
        eprintln!(
            "control plane: cannot register its stop at exit; its processes die with the test binary"
        );
    }
    Ok(shared)
}

/// Runs `start` to completion on a thread of its own that then lives as long as the
/// process (processes die with the thread that started them), and returns what it built.
pub(crate) fn on_lasting_thread<T, F, Fut>(name: &str, start: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let started = match runtime {
                Ok(rt) => rt.block_on(start()),
                Err(e) => Err(anyhow::Error::new(e).context("building a runtime")),
            };
            let failed = started.is_err();
            let _ = tx.send(started);
            if !failed {
                // The processes die with this thread: keep it until the process exits.
                loop {
                    std::thread::park();
                }
            }
        })?;
    rx.recv()?
}

extern "C" fn stop_at_exit() {
    let plane = PLANE.lock().map(|mut p| p.take()).unwrap_or(None);
    if let Some(mut plane) = plane {
        if SHARED
            .get()
            .is_some_and(|s| s.failed.load(Ordering::SeqCst))
        {
            plane.keep();
        }
        drop(plane);
    }
}
