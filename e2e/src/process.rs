//! Signals to child processes.

use std::os::unix::process::CommandExt as _;

use anyhow::Context as _;

/// Makes the kernel SIGKILL the child when the thread that spawned it dies, so a harness
/// killed with SIGKILL leaves no ZooKeeper or sidecar behind.
pub fn die_with_parent(command: &mut std::process::Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe; it allocates nothing and touches no locks.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `signal` (libc::SIGKILL, SIGSTOP, SIGCONT, SIGTERM, ...) to `pid`.
pub fn signal(pid: u32, signal: libc::c_int) -> anyhow::Result<()> {
    let pid_t = libc::pid_t::try_from(pid).context("pid does not fit pid_t")?;
    // SAFETY: kill(2) has no memory-safety preconditions; it only takes two integers.
    let rc = unsafe { libc::kill(pid_t, signal) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("kill -{signal} {pid}"));
    }
    Ok(())
}

/// Waits up to `timeout` for `child` to exit; `None` if it is still running.
pub fn wait_timeout(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
) -> anyhow::Result<Option<std::process::ExitStatus>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            return Ok(Some(status));
        }
        if std::time::Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// SIGTERM, then SIGKILL if the process has not exited within `grace`.
pub fn terminate(
    child: &mut std::process::Child,
    grace: std::time::Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    if let Some(status) = child.try_wait().context("checking a child process")? {
        return Ok(status);
    }
    // A stopped process cannot act on SIGTERM: continue it first.
    let _ = signal(child.id(), libc::SIGCONT);
    signal(child.id(), libc::SIGTERM)?;
    if let Some(status) = wait_timeout(child, grace)? {
        return Ok(status);
    }
    child.kill().context("SIGKILL after SIGTERM grace period")?;
    child.wait().context("waiting for a killed child")
}
