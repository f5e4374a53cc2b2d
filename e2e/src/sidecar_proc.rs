//! One `rtable-sidecar` process: spawn, signal, restart with the same data directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::client::ReplicaClient;
use crate::poll::{Check, poll_until};

/// Everything needed to (re)start one replica.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub table: PathBuf,
    pub replica: String,
    pub data_dir: PathBuf,
    pub port: u16,
    pub zookeeper: String,
    pub session_timeout_ms: u64,
    pub interserver_secret_file: Option<PathBuf>,
    pub max_body_bytes: Option<usize>,
    /// Extra `KEY=VALUE` environment for the process.
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
}

impl SidecarConfig {
    pub fn listen(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--table".to_string(),
            self.table.display().to_string(),
            "--replica".to_string(),
            self.replica.clone(),
            "--data-dir".to_string(),
            self.data_dir.display().to_string(),
            "--listen".to_string(),
            self.listen(),
            "--advertise".to_string(),
            self.listen(),
            "--zookeeper".to_string(),
            self.zookeeper.clone(),
            "--session-timeout-ms".to_string(),
            self.session_timeout_ms.to_string(),
        ];
        if let Some(f) = &self.interserver_secret_file {
            args.push("--interserver-secret-file".to_string());
            args.push(f.display().to_string());
        }
        if let Some(n) = self.max_body_bytes {
            args.push("--max-body-bytes".to_string());
            args.push(n.to_string());
            // The limit of a streamed `/insert` body as well.
            args.push("--max-insert-bytes".to_string());
            args.push(n.to_string());
        }
        args
    }
}

/// Where the `rtable-sidecar` binary is: `RTABLE_SIDECAR_BIN`, else the workspace's
/// `target/debug` (or `target/release` when only that exists, or `RTABLE_PROFILE=release`).
pub fn sidecar_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("rtable-sidecar", "RTABLE_SIDECAR_BIN", "rtable-sidecar")
}

/// A binary of this workspace: `$env_var` if set, else `target/debug/<name>` (or
/// `target/release`, see [`sidecar_binary`]); the error names the package to build.
pub fn workspace_binary(name: &str, env_var: &str, package: &str) -> anyhow::Result<PathBuf> {
    if let Ok(bin) = std::env::var(env_var) {
        let path = PathBuf::from(bin);
        anyhow::ensure!(path.exists(), "{env_var}={} does not exist", path.display());
        return Ok(path);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| crate::repo_root().join("target"));
    let debug = target.join("debug").join(name);
    let release = target.join("release").join(name);
    let prefer_release = std::env::var("RTABLE_PROFILE").is_ok_and(|p| p == "release");
    let order = if prefer_release {
        [&release, &debug]
    } else {
        [&debug, &release]
    };
    order
        .into_iter()
        .find(|p| p.exists())
        .cloned()
        .with_context(|| {
            format!(
                "{name} is not built ({} missing): run `cargo build -p {package}` (scripts/test.sh does)",
                debug.display()
            )
        })
}

/// A running (or stopped) sidecar. Dropping it SIGKILLs the process.
#[derive(Debug)]
pub struct SidecarProc {
    pub cfg: SidecarConfig,
    binary: PathBuf,
    child: Option<Child>,
    client: ReplicaClient,
    /// Flags appended to `cfg.args()` on every (re)start (see `set_extra_args`).
    extra_args: Vec<String>,
    /// The whole argument list instead of `cfg.args()` (a pod rendered by the operator).
    exact_args: Option<Vec<String>>,
}

impl SidecarProc {
    /// Spawns the process (does not wait for readiness: see `wait_ready`).
    pub fn spawn(cfg: SidecarConfig) -> anyhow::Result<SidecarProc> {
        Self::spawn_inner(cfg, None)
    }

    /// Spawns the process with exactly `args` (after the binary); `cfg` still names the
    /// replica, its port, data directory, log and extra environment.
    pub fn spawn_with_args(cfg: SidecarConfig, args: Vec<String>) -> anyhow::Result<SidecarProc> {
        Self::spawn_inner(cfg, Some(args))
    }

    fn spawn_inner(
        cfg: SidecarConfig,
        exact_args: Option<Vec<String>>,
    ) -> anyhow::Result<SidecarProc> {
        let binary = sidecar_binary()?;
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let client = ReplicaClient::new(&format!("http://{}", cfg.listen()))?;
        let mut proc = SidecarProc {
            cfg,
            binary,
            child: None,
            client,
            extra_args: Vec::new(),
            exact_args,
        };
        proc.start()?;
        Ok(proc)
    }

    fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.child.is_none(),
            "replica {} is already running",
            self.cfg.replica
        );
        crate::ports::check_free(self.cfg.port)?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.cfg.log)
            .with_context(|| format!("opening {}", self.cfg.log.display()))?;
        let log_err = log
            .try_clone()
            .with_context(|| format!("duplicating {}", self.cfg.log.display()))?;
        let mut command = Command::new(&self.binary);
        crate::process::die_with_parent(&mut command);
        let args = match &self.exact_args {
            Some(args) => args.clone(),
            None => self.cfg.args(),
        };
        command
            .args(args)
            .args(&self.extra_args)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        for (k, v) in &self.cfg.env {
            command.env(k, v);
        }
        let child = command.spawn().with_context(|| {
            format!(
                "starting {} for replica {}",
                self.binary.display(),
                self.cfg.replica
            )
        })?;
        self.child = Some(child);
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.cfg.replica
    }

    pub fn client(&self) -> &ReplicaClient {
        &self.client
    }

    /// The client `wait_ready` and `client()` use from now on (HTTPS, credentials).
    pub fn set_client(&mut self, client: ReplicaClient) {
        self.client = client;
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.cfg.listen())
    }

    pub fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.cfg.log
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive (a stopped process counts as running).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The exit status if the process has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child
                .kill()
                .with_context(|| format!("SIGKILL replica {}", self.cfg.replica))?;
            child
                .wait()
                .with_context(|| format!("reaping replica {}", self.cfg.replica))?;
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit (SIGKILL after `grace`).
    pub fn terminate(
        &mut self,
        grace: Duration,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match self.child.take() {
            Some(mut child) => Ok(Some(crate::process::terminate(&mut child, grace)?)),
            None => Ok(None),
        }
    }

    /// SIGSTOP: the process freezes (its ZooKeeper session stops heartbeating).
    pub fn stop(&self) -> anyhow::Result<()> {
        let pid = self.pid().context("replica is not running")?;
        crate::process::signal(pid, libc::SIGSTOP)
    }

    /// SIGCONT after `stop`.
    pub fn cont(&self) -> anyhow::Result<()> {
        let pid = self.pid().context("replica is not running")?;
        crate::process::signal(pid, libc::SIGCONT)
    }

    /// Kills the process (if running) and starts it again with the same data directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        self.start()
    }

    /// Starts a process that was killed (no-op error if it is running).
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() && self.is_running() {
            anyhow::bail!("replica {} is still running", self.cfg.replica);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        self.start()
    }

    /// Stops the process with SIGTERM (SIGKILL after `grace`), as Kubernetes stops a pod,
    /// and starts it again with the same data directory reading the table manifest at
    /// `table`: a pod rolled after its table's definition changed.
    pub fn restart_with_table(&mut self, table: PathBuf, grace: Duration) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.exact_args.is_none(),
            "replica {} runs an exact argument list; its --table cannot be replaced",
            self.cfg.replica
        );
        self.terminate(grace)?;
        self.cfg.table = table;
        self.start()
    }

    /// Extra sidecar flags (`--max-logs-to-keep 20`, ...) used from the next (re)start on.
    pub fn set_extra_args(&mut self, args: Vec<String>) {
        self.extra_args = args;
    }

    pub fn extra_args(&self) -> &[String] {
        &self.extra_args
    }

    /// SIGKILL, delete the data directory (an empty one is left) and start again: the
    /// replica comes back with a blank disk.
    pub fn kill_wipe_restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        self.wipe_data_dir()?;
        self.start()
    }

    /// Removes everything in the data directory (the process must not be running).
    pub fn wipe_data_dir(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.is_running(),
            "replica {} is running; kill it before wiping its disk",
            self.cfg.replica
        );
        match std::fs::remove_dir_all(&self.cfg.data_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing {}", self.cfg.data_dir.display()));
            }
        }
        std::fs::create_dir_all(&self.cfg.data_dir)
            .with_context(|| format!("creating {}", self.cfg.data_dir.display()))
    }

    /// Polls `GET /readyz` until it answers 200 (active and writable).
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let name = self.cfg.replica.clone();
        let log = self.cfg.log.clone();
        let client = self.client.clone();
        let mut exited = None;
        let result = poll_until(
            &format!("replica {name} to be ready"),
            timeout,
            Duration::from_millis(100),
            || {
                let status = self.exit_status();
                if status.is_some() {
                    exited = status;
                }
                let client = client.clone();
                async move {
                    if let Some(s) = status {
                        anyhow::bail!("process exited with {s}");
                    }
                    let (code, body) = client.readyz().await?;
                    Ok(if code == 200 {
                        Check::Done(())
                    } else {
                        Check::Wait(format!("/readyz {code}: {body}"))
                    })
                }
            },
        )
        .await;
        match (result, exited) {
            (Ok(()), _) => Ok(()),
            (Err(e), Some(status)) => Err(anyhow::anyhow!(
                "replica {name} exited with {status}; log {} ends with:\n{}",
                log.display(),
                crate::tail(&log, 30)
            )
            .context(e)),
            (Err(e), None) => Err(e.context(format!(
                "replica {name}; log {} ends with:\n{}",
                log.display(),
                crate::tail(&log, 30)
            ))),
        }
    }
}

impl Drop for SidecarProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = crate::process::signal(child.id(), libc::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
