//! The test harness's side: an `rtable-node` child process with its log beside its state
//! directory, and the bridge its pods (and the API server) live on. Both clean up after
//! themselves when dropped, also when the test failed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::cleanup;
use super::config::{NodeConfig, PodCidr};
use super::network::{self, NetworkError};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(
        "rtable-node needs root (network namespaces, mounts, loop devices): run the test as root"
    )]
    NotRoot,
    #[error("`{command}` is missing: install it (apt-get install {package}); {why}")]
    Missing {
        command: &'static str,
        package: &'static str,
        why: &'static str,
    },
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("no free pod network rtbr0..rtbr99 / 10.244.N.0/24 on this machine")]
    NoFreeBridge,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rtable-node exited ({status}); the end of {log}:\n{tail}")]
    Exited {
        status: std::process::ExitStatus,
        log: PathBuf,
        tail: String,
    },
}

/// Checks what the agent needs from the machine, with a message naming the fix.
pub fn preflight() -> Result<(), ProcessError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(ProcessError::NotRoot);
    }
    let tools = [
        (
            "ip",
            "-V",
            "iproute2",
            "the agent builds pod networks with it",
        ),
        (
            "mkfs.ext4",
            "-V",
            "e2fsprogs",
            "the agent's provisioner formats volumes with it",
        ),
        ("mount", "-V", "mount", "the agent mounts volumes with it"),
    ];
    for (command, flag, package, why) in tools {
        let found = Command::new(command)
            .arg(flag)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Err(ProcessError::Missing {
                command,
                package,
                why,
            });
        }
    }
    Ok(())
}

/// A bridge made for one test, removed when dropped.
#[derive(Debug)]
pub struct Bridge {
    pub name: String,
    pub cidr: PodCidr,
}

impl Bridge {
    /// The first unused `rtbrN` with `10.244.N.0/24`, created now so an API server can
    /// bind its address before any agent runs. Fails with a clear message without `ip`.
    /// Creating the link is the claim: of two harnesses racing for a name, one gets it.
    pub fn create() -> Result<Bridge, ProcessError> {
        network::ip_blocking(&["-V"])?;
        let addresses = network::ip_blocking(&["-o", "-4", "addr", "show"])?;
        for n in 0..100u8 {
            let name = format!("rtbr{n}");
            if addresses.contains(&format!("10.244.{n}.")) {
                continue;
            }
            if network::ip_blocking(&["link", "add", &name, "type", "bridge"]).is_err() {
                continue;
            }
            let cidr: PodCidr = format!("10.244.{n}.0/24")
                .parse()
                .map_err(|_| ProcessError::NoFreeBridge)?;
            let bridge = Bridge { name, cidr };
            network::ensure_bridge(&bridge.name, &cidr)?;
            return Ok(bridge);
        }
        Err(ProcessError::NoFreeBridge)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Err(e) = network::delete_bridge(&self.name) {
            eprintln!("rtable-node harness: {e}");
        }
    }
}

/// A running `rtable-node`.
#[derive(Debug)]
pub struct NodeProcess {
    pub config: NodeConfig,
    binary: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl NodeProcess {
    /// Starts `binary run <config>` with its log in `<state dir>/../<node>.log`.
    pub fn start(binary: &Path, config: NodeConfig) -> Result<NodeProcess, ProcessError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| ProcessError::Io {
            what: "creating",
            path: config.state_dir.clone(),
            source,
        })?;
        let log = config
            .state_dir
            .parent()
            .unwrap_or(&config.state_dir)
            .join(format!("{}.log", config.node_name));
        let child = Self::spawn(binary, &config, &log)?;
        Ok(NodeProcess {
            config,
            binary: binary.to_path_buf(),
            log,
            child: Some(child),
        })
    }

    fn spawn(binary: &Path, config: &NodeConfig, log: &Path) -> Result<Child, ProcessError> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| ProcessError::Io { what, path, source }
        };
        // Appended to: a restarted agent's log follows its predecessor's.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io("creating", log))?;
        let err = out.try_clone().map_err(io("opening twice", log))?;
        let mut command = Command::new(binary);
        command
            .args(config.to_args())
            .env(
                "RUST_LOG",
                std::env::var("RTABLE_NODE_LOG")
                    .unwrap_or_else(|_| "info,rtable_e2e::node=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // A process group of its own: a Ctrl-C in the terminal reaches the harness only,
        // which stops the agent (and its pods) in order.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        crate::process::die_with_parent(&mut command);
        command.spawn().map_err(io("starting", binary))
    }

    /// Kills the agent with SIGKILL, as a crash (its containers die with it; their
    /// namespaces, addresses and volumes stay), and starts a new one with the same config,
    /// which takes the node's pods over.
    pub fn crash_and_restart(&mut self) -> Result<(), ProcessError> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.child = Some(Self::spawn(&self.binary, &self.config, &self.log)?);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// An error with the end of the log if the agent has exited.
    pub fn check_running(&mut self) -> Result<(), ProcessError> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(ProcessError::Exited {
                status,
                log: self.log.clone(),
                tail: crate::tail(&self.log, 40),
            });
        }
        Ok(())
    }

    /// SIGTERM (the agent stops its pods), SIGKILL after `grace`, then removes whatever
    /// is left under its state directory.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take()
            && let Err(e) = crate::process::terminate(&mut child, grace)
        {
            eprintln!("rtable-node harness: stopping the agent: {e:#}");
        }
        match cleanup::clean_state(&self.config.state_dir, None) {
            Ok(report) if report != cleanup::Report::default() => {
                eprintln!("rtable-node harness: cleaned up after the agent: {report:?}")
            }
            Ok(_) => {}
            Err(e) => eprintln!(
                "rtable-node harness: cleanup of {}: {e}",
                self.config.state_dir.display()
            ),
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "===== rtable-node {} ({}) =====\n{}",
                self.config.node_name,
                self.log.display(),
                crate::tail(&self.log, 80)
            );
        }
        self.stop(Duration::from_secs(10));
    }
}
