//! One long-running control-plane process: its command line and log file kept beside it,
//! killed with the harness if the harness dies.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

#[derive(Debug)]
pub struct Daemon {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Daemon {
    /// Starts `program args` with stdout and stderr in `<dir>/<name>.log` and the command
    /// line in `<dir>/<name>.cmdline`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        dir: &Path,
    ) -> anyhow::Result<Daemon> {
        Self::spawn_with_env(name, program, args, &[], dir)
    }

    /// [`Daemon::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        dir: &Path,
    ) -> anyhow::Result<Daemon> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("opening {} twice", log.display()))?;
        let cmdline = std::iter::once(program.display().to_string())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" \\\n  ");
        std::fs::write(dir.join(format!("{name}.cmdline")), cmdline + "\n")
            .with_context(|| format!("writing {name}.cmdline"))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // A process group of its own: a Ctrl-C in the terminal reaches the harness only,
        // which stops the daemons after what runs on them.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        crate::process::die_with_parent(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Daemon {
            name: name.to_string(),
            log,
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error naming the daemon and the tail of its log if it has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self
            .child
            .try_wait()
            .with_context(|| format!("checking {}", self.name))?
        {
            anyhow::bail!(
                "{} exited ({status}); the end of {}:\n{}",
                self.name,
                self.log.display(),
                crate::tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<()> {
        crate::process::terminate(&mut self.child, grace)
            .with_context(|| format!("stopping {}", self.name))
            .map(drop)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
