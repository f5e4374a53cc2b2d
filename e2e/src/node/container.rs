//! One container's life: start it through the init shim, watch it and its probes, stop it
//! gracefully, and restart it in place by the pod's `restartPolicy` with CrashLoopBackOff
//! delays (the first restart at once, then `backoff_initial` doubling up to `backoff_max`,
//! reset after a run of twice the maximum, as a kubelet does).
//!
//! The state it keeps is the container's status (API types, so the pod's status is a copy
//! of it); every change wakes the pod worker through a `Notify`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::events::Events;
use super::init::START_ERROR_EXIT;
use super::launch::{PodLaunch, Prepared};
use super::probes::{self, Handler, ProbeEvent, ProbeTarget};

/// A container's status, as its `containerStatuses` entry shows it.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub image: String,
    pub image_id: String,
    pub container_id: Option<String>,
    pub restart_count: i32,
    pub state: ContainerState,
    pub last_state: Option<ContainerState>,
    pub ready: bool,
    pub started: bool,
    pub pid: Option<i32>,
    pub user: Option<(u32, u32, Vec<u32>)>,
}

impl Status {
    fn waiting(reason: &str, message: Option<String>) -> ContainerState {
        ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message,
            }),
            ..ContainerState::default()
        }
    }

    /// The last exit, for a status that tells whether the container succeeded.
    pub fn terminated(&self) -> Option<&ContainerStateTerminated> {
        self.state.terminated.as_ref()
    }
}

/// When a container is restarted after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    Always,
    OnFailure,
    Never,
}

impl Restart {
    pub fn of(policy: Option<&str>) -> Restart {
        match policy {
            Some("Never") => Restart::Never,
            Some("OnFailure") => Restart::OnFailure,
            _ => Restart::Always,
        }
    }

    fn restarts(self, exit_code: i32) -> bool {
        match self {
            Restart::Always => true,
            Restart::OnFailure => exit_code != 0,
            Restart::Never => false,
        }
    }
}

/// CrashLoopBackOff delays.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Option<Duration>,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: None,
        }
    }

    /// The delay before the restart that follows a run of `ran_for`.
    pub fn delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.max * 2 {
            self.next = None;
        }
        match self.next {
            None => {
                self.next = Some(self.initial);
                Duration::ZERO
            }
            Some(d) => {
                self.next = Some((d * 2).min(self.max));
                d
            }
        }
    }
}

/// A request to stop the container: the grace period between SIGTERM and SIGKILL.
pub type StopRequest = Option<Duration>;

/// A running supervisor of one container.
pub struct Supervisor {
    pub name: String,
    status: Arc<Mutex<Status>>,
    stop: watch::Sender<StopRequest>,
    task: JoinHandle<()>,
}

impl Supervisor {
    pub fn status(&self) -> Status {
        lock(&self.status).clone()
    }

    /// Asks the container to stop: preStop hook, SIGTERM, and SIGKILL after `grace`.
    pub fn stop(&self, grace: Duration) {
        let _ = self.stop.send(Some(grace));
    }

    /// Whether the supervisor is done (stopped, or exited for good).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until the supervisor is done.
    pub async fn wait(&mut self) {
        if let Err(e) = (&mut self.task).await {
            warn!(container = %self.name, error = %e, "the container's supervisor panicked");
        }
    }
}

fn lock(status: &Mutex<Status>) -> std::sync::MutexGuard<'_, Status> {
    status
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Everything a supervisor needs.
pub struct SupervisorArgs {
    pub launch: Arc<PodLaunch>,
    pub container: Container,
    pub restart: Restart,
    pub backoff: Backoff,
    /// Restarts before this supervisor (a restarted agent continues the count).
    pub restart_count: i32,
    pub notify: Arc<Notify>,
    pub events: Events,
    pub self_exe: std::path::PathBuf,
    /// A pod `terminationGracePeriodSeconds` for a liveness-failure kill.
    pub grace: Duration,
}

/// Starts supervising a container.
pub fn supervise(args: SupervisorArgs) -> Supervisor {
    let name = args.container.name.clone();
    let image = args.container.image.clone().unwrap_or_default();
    let status = Arc::new(Mutex::new(Status {
        image: image.clone(),
        image_id: args
            .launch
            .image(&args.container)
            .map(|i| i.id)
            .unwrap_or_default(),
        restart_count: args.restart_count,
        state: Status::waiting("ContainerCreating", None),
        ..Status::default()
    }));
    let (stop, stop_rx) = watch::channel(None);
    let span = info_span!("container", container = %name);
    let task = tokio::spawn(run(args, status.clone(), stop_rx).instrument(span));
    Supervisor {
        name,
        status,
        stop,
        task,
    }
}

/// How one run of the container ended.
struct Exit {
    code: i32,
    reason: String,
    message: Option<String>,
}

async fn run(
    args: SupervisorArgs,
    status: Arc<Mutex<Status>>,
    mut stop: watch::Receiver<StopRequest>,
) {
    let SupervisorArgs {
        launch,
        container,
        restart,
        mut backoff,
        restart_count,
        notify,
        events,
        self_exe,
        grace,
    } = args;
    let pod = || launch.pod.borrow().clone();
    let update = |f: &dyn Fn(&mut Status)| {
        f(&mut lock(&status));
        notify.notify_one();
    };
    let mut attempt = restart_count;
    loop {
        if stop.borrow().is_some() {
            return;
        }
        let started = Instant::now();
        let exit = match launch.prepare(&container, attempt).await {
            Err(e) => {
                warn!(error = %e, "cannot start the container");
                let reason = e.reason();
                update(&|s| s.state = Status::waiting(reason, Some(e.to_string())));
                events
                    .pod(
                        &pod(),
                        Some(&container.name),
                        true,
                        "Failed",
                        format!("Error: {e}"),
                    )
                    .await;
                None
            }
            Ok(prepared) => {
                let exit = run_once(
                    &prepared, attempt, &container, &self_exe, &launch, &status, &notify, &events,
                    &mut stop, grace,
                )
                .await;
                Some(exit)
            }
        };
        if stop.borrow().is_some() {
            return;
        }
        let code = exit.as_ref().map_or(1, |e| e.code);
        if exit.is_some() && !restart.restarts(code) {
            return;
        }
        let delay = backoff.delay(started.elapsed());
        if !delay.is_zero() {
            let message = format!(
                "back-off {}s restarting failed container={} pod={}_{}({})",
                delay.as_secs(),
                container.name,
                launch.sandbox.name,
                launch.sandbox.namespace,
                launch.sandbox.uid
            );
            if exit.is_some() {
                update(&|s| {
                    s.last_state = Some(s.state.clone());
                    s.state = Status::waiting("CrashLoopBackOff", Some(message.clone()));
                });
                events
                    .pod(
                        &pod(),
                        Some(&container.name),
                        true,
                        "BackOff",
                        "Back-off restarting failed container".into(),
                    )
                    .await;
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
        }
        if exit.is_some() {
            attempt += 1;
        }
    }
}

/// Starts the container once and waits for it to end; records the exit.
#[allow(clippy::too_many_arguments)]
async fn run_once(
    prepared: &Prepared,
    attempt: i32,
    container: &Container,
    self_exe: &std::path::Path,
    launch: &PodLaunch,
    status: &Mutex<Status>,
    notify: &Notify,
    events: &Events,
    stop: &mut watch::Receiver<StopRequest>,
    liveness_grace: Duration,
) -> Exit {
    let update = |f: &dyn Fn(&mut Status)| {
        f(&mut lock(status));
        notify.notify_one();
    };
    let pod = || launch.pod.borrow().clone();
    let log = match std::fs::File::create(&prepared.log_path).and_then(|f| Ok((f.try_clone()?, f)))
    {
        Ok(files) => files,
        Err(e) => {
            let message = format!("creating the log {}: {e}", prepared.log_path.display());
            return record_exit(
                status,
                notify,
                Exit {
                    code: START_ERROR_EXIT,
                    reason: "StartError".into(),
                    message: Some(message),
                },
                None,
            );
        }
    };
    let mut child = match tokio::process::Command::new(self_exe)
        .arg("init")
        .arg(&prepared.spec_path)
        .stdin(std::process::Stdio::null())
        .stdout(log.0)
        .stderr(log.1)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            let message = format!("starting the init shim {}: {e}", self_exe.display());
            return record_exit(
                status,
                notify,
                Exit {
                    code: START_ERROR_EXIT,
                    reason: "StartError".into(),
                    message: Some(message),
                },
                None,
            );
        }
    };
    let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
    let started_at = now();
    let process = &prepared.spec.process;
    info!(pid, restart = attempt, argv = ?process.argv, "container started");
    let container_id = format!("{}://{}", super::RUNTIME_NAME, prepared.container_id);
    update(&|s| {
        if s.state.terminated.is_some() {
            s.last_state = Some(s.state.clone());
        }
        s.restart_count = attempt;
        s.container_id = Some(container_id.clone());
        s.image_id = prepared.image.id.clone();
        s.pid = Some(pid);
        s.ready = false;
        s.started = false;
        s.user = Some((process.uid, process.gid, process.groups.clone()));
        s.state = ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(started_at.clone()),
            }),
            ..ContainerState::default()
        };
    });
    events
        .pod(
            &pod(),
            Some(&container.name),
            false,
            "Started",
            format!("Started container {}", container.name),
        )
        .await;

    let (probe_tx, mut probe_rx) = mpsc::unbounded_channel();
    let target = ProbeTarget {
        pod_ip: launch.sandbox.pod_ip,
        ports: container.ports.clone().unwrap_or_default(),
        self_exe: self_exe.to_path_buf(),
        pid,
        spec: prepared.spec_path.clone(),
    };
    let probes = tokio::spawn(
        probes::run_probes(container.clone(), target.clone(), Instant::now(), probe_tx)
            .in_current_span(),
    );
    let mut killed_for: Option<String> = None;
    let exit_status = loop {
        tokio::select! {
            status = child.wait() => break status,
            changed = stop.changed() => {
                let grace = match changed {
                    Ok(()) => (*stop.borrow()).unwrap_or(Duration::ZERO),
                    Err(_) => Duration::ZERO,
                };
                break terminate(&mut child, pid, container, &target, grace, events, &pod()).await;
            }
            Some(event) = probe_rx.recv() => match event {
                ProbeEvent::Started => update(&|s| s.started = true),
                ProbeEvent::Ready(ready) => {
                    debug!(ready, "readiness changed");
                    update(&|s| s.ready = ready && s.started);
                }
                ProbeEvent::Unhealthy { probe, message } => {
                    events.pod(&pod(), Some(&container.name), true, "Unhealthy", format!("{probe} probe failed: {message}")).await;
                }
                ProbeEvent::LivenessFailed(message) | ProbeEvent::StartupFailed(message) => {
                    let why = format!("Container {} failed {} probe, will be restarted", container.name,
                        if lock(status).started { "liveness" } else { "startup" });
                    info!(%message, "{why}");
                    events.pod(&pod(), Some(&container.name), false, "Killing", why.clone()).await;
                    killed_for = Some(why);
                    update(&|s| s.ready = false);
                    break terminate(&mut child, pid, container, &target, liveness_grace, events, &pod()).await;
                }
            },
        }
    };
    probes.abort();
    // A container is its whole process group: whatever the main process left behind goes.
    let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
    let start_error = std::fs::read_to_string(&prepared.spec.error_file)
        .ok()
        .filter(|m| !m.is_empty());
    let exit = match exit_status {
        Err(e) => Exit {
            code: START_ERROR_EXIT,
            reason: "Error".into(),
            message: Some(format!("waiting for the container: {e}")),
        },
        Ok(st) => {
            use std::os::unix::process::ExitStatusExt as _;
            let code = st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
            match start_error {
                Some(message) if code == START_ERROR_EXIT => Exit {
                    code,
                    reason: "StartError".into(),
                    message: Some(message),
                },
                _ => Exit {
                    code,
                    reason: if code == 0 {
                        "Completed".into()
                    } else {
                        "Error".into()
                    },
                    message: termination_message(prepared, container, code).or(killed_for),
                },
            }
        }
    };
    info!(exit_code = exit.code, reason = %exit.reason, "container exited");
    record_exit(status, notify, exit, Some(started_at))
}

fn record_exit(
    status: &Mutex<Status>,
    notify: &Notify,
    exit: Exit,
    started_at: Option<Time>,
) -> Exit {
    let container_id = lock(status).container_id.clone();
    let mut s = lock(status);
    s.ready = false;
    s.pid = None;
    let terminated = ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: exit.code,
            reason: Some(exit.reason.clone()),
            message: exit.message.clone(),
            started_at,
            finished_at: Some(now()),
            container_id,
            signal: None,
        }),
        ..ContainerState::default()
    };
    // A run that ended is the current state until the container waits or runs again;
    // then it becomes the last state.
    s.state = terminated;
    drop(s);
    notify.notify_one();
    exit
}

/// The container's termination message: its termination-log file, or with
/// `FallbackToLogsOnError` after a failure, the end of its log.
fn termination_message(prepared: &Prepared, container: &Container, code: i32) -> Option<String> {
    let written = std::fs::read(&prepared.termination_log)
        .ok()
        .filter(|b| !b.is_empty())
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(4096)]).into_owned());
    let fallback = container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
    written.or_else(|| {
        (fallback && code != 0).then(|| {
            let tail = crate::tail(&prepared.log_path, 80);
            let start = tail.len().saturating_sub(2048);
            tail[tail.ceil_char_boundary(start)..].to_string()
        })
    })
}

/// preStop hook, SIGTERM to the container's process group, SIGKILL after `grace`.
async fn terminate(
    child: &mut tokio::process::Child,
    pid: i32,
    container: &Container,
    target: &ProbeTarget,
    grace: Duration,
    events: &Events,
    pod: &k8s_openapi::api::core::v1::Pod,
) -> std::io::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + grace;
    let hook = container
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(Handler::of_hook);
    if let Some(hook) = hook {
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            result = probes::run(&hook, target, remaining.max(Duration::from_secs(1))) => {
                if let Err(message) = result {
                    events.pod(pod, Some(&container.name), true, "FailedPreStopHook", format!("PreStopHook failed: {message}")).await;
                }
            }
            status = child.wait() => return status,
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    debug!(pid, grace_s = grace.as_secs_f64(), "sending SIGTERM");
    let pgid = Pid::from_raw(pid);
    if nix::sys::signal::killpg(pgid, Signal::SIGTERM).is_err() {
        let _ = nix::sys::signal::kill(pgid, Signal::SIGTERM);
    }
    tokio::select! {
        status = child.wait() => status,
        _ = tokio::time::sleep_until(deadline) => {
            debug!(pid, "grace period over: sending SIGKILL");
            if nix::sys::signal::killpg(pgid, Signal::SIGKILL).is_err() {
                let _ = nix::sys::signal::kill(pgid, Signal::SIGKILL);
            }
            child.wait().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_restarts_at_once_then_doubles_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(300));
        let quick = Duration::from_secs(1);
        assert_eq!(b.delay(quick), Duration::ZERO);
        assert_eq!(b.delay(quick), Duration::from_secs(10));
        assert_eq!(b.delay(quick), Duration::from_secs(20));
        assert_eq!(b.delay(quick), Duration::from_secs(40));
        for _ in 0..10 {
            b.delay(quick);
        }
        assert_eq!(b.delay(quick), Duration::from_secs(300));
        assert_eq!(
            b.delay(Duration::from_secs(601)),
            Duration::ZERO,
            "a long run resets"
        );
    }

    #[test]
    fn restart_policies() {
        assert!(Restart::of(None).restarts(0));
        assert!(Restart::of(Some("OnFailure")).restarts(1));
        assert!(!Restart::of(Some("OnFailure")).restarts(0));
        assert!(!Restart::of(Some("Never")).restarts(1));
    }
}
