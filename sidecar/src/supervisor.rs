//! Keeps the replica's background tasks running. Each task is registered by name with a
//! factory that builds its future, so that it can be started again: a task that died
//! would otherwise stop replication silently while `/readyz` still said ready.
//!
//! For every task registered with [`Supervisor::spawn`] (or [`Supervisor::spawn_with`]):
//! - A panic, or a return (every task is meant to run until shutdown), is logged at error
//!   level with the replica, the task and the panic message, and the task is started again
//!   from its factory after a [`Backoff`]: 100 ms doubling to 30 s, back to 100 ms once a
//!   run lasted 60 s. It is never given up on: the replica cannot replicate without it.
//!   Every start after the first is counted in `rtable_task_restarts_total{replica,task}`.
//! - From its failure to its restart the task is down: `rtable_task_up{replica,task}` is 0
//!   and [`Health::check`] names it, why it failed and when it restarts (`/readyz`
//!   answers 503 with that).
//! - [`Supervisor::shutdown`] aborts every task and waits until they are gone; nothing is
//!   restarted once it began. Dropping the supervisor aborts them too, without waiting.
//!
//! Not guaranteed: what a failed run held only in its own locals is gone (a restarted task
//! starts from what its factory captured, the shared `Replica`, the way it resumes after a
//! new session), and tasks it spawned itself keep running unsupervised.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How long a failed task waits before it is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after a first failure, or after a run that lasted `healthy_after`.
    pub initial: Duration,
    /// The longest wait: a task that keeps failing is retried at least this often.
    pub max: Duration,
    /// A run at least this long was healthy: its failure starts the backoff over.
    pub healthy_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The wait before restarting a task that failed after running `ran_for`, given the
    /// wait before its previous restart (`None` when this is its first failure).
    pub fn next(&self, previous: Option<Duration>, ran_for: Duration) -> Duration {
        match previous {
            Some(previous) if ran_for < self.healthy_after => previous
                .saturating_mul(2)
                .clamp(self.initial, self.max.max(self.initial)),
            _ => self.initial,
        }
    }
}

/// How a run of a task ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskFailure {
    #[error("panicked: {0}")]
    Panicked(String),
    #[error("returned, but it is meant to run until shutdown")]
    Returned,
    /// Only the supervisor aborts its tasks, and only at shutdown; seen otherwise, it is
    /// a bug worth a restart rather than a silent stop.
    #[error("was cancelled outside the supervisor")]
    Cancelled,
}

impl TaskFailure {
    fn of(joined: Result<(), JoinError>) -> TaskFailure {
        match joined {
            Ok(()) => TaskFailure::Returned,
            Err(e) if e.is_panic() => TaskFailure::Panicked(panic_message(e.into_panic())),
            Err(_) => TaskFailure::Cancelled,
        }
    }
}

/// The text a panic was raised with (`panic!("...")` gives a `&str` or a `String`).
fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_string(),
            Err(_) => "(a panic payload that is not text)".to_string(),
        },
    }
}

/// A task between its failure and its restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownTask {
    pub task: &'static str,
    pub failure: TaskFailure,
    /// Until its restart, rounded to the millisecond.
    pub restart_in: Duration,
}

impl fmt::Display for DownTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task {} is down ({}), ", self.task, self.failure)?;
        if self.restart_in.is_zero() {
            write!(f, "restarting now")
        } else {
            write!(f, "restarting in {:?}", self.restart_in)
        }
    }
}

/// The tasks down right now (what `/readyz` answers with).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct TasksDown(pub Vec<DownTask>);

#[derive(Default)]
struct TaskState {
    restarts: u64,
    down: Option<(TaskFailure, Instant)>,
}

/// What the HTTP API reads of the supervised tasks: cheap to clone, shared with the
/// supervisor that updates it.
#[derive(Clone, Default)]
pub struct Health {
    tasks: Arc<Mutex<BTreeMap<&'static str, TaskState>>>,
}

impl Health {
    /// `Err` naming every task that is down, in name order.
    pub fn check(&self) -> Result<(), TasksDown> {
        let now = Instant::now();
        let down: Vec<DownTask> = self
            .tasks
            .lock()
            .iter()
            .filter_map(|(task, state)| {
                let (failure, restart_at) = state.down.as_ref()?;
                let restart_in = restart_at.saturating_duration_since(now);
                Some(DownTask {
                    task,
                    failure: failure.clone(),
                    restart_in: Duration::from_millis(restart_in.as_millis() as u64),
                })
            })
            .collect();
        if down.is_empty() {
            Ok(())
        } else {
            Err(TasksDown(down))
        }
    }

    /// How often `task` was started again; `None` for a task never registered.
    pub fn restarts(&self, task: &str) -> Option<u64> {
        self.tasks.lock().get(task).map(|s| s.restarts)
    }

    /// Appends `rtable_task_restarts_total` and `rtable_task_up` in Prometheus text.
    pub fn write_metrics(&self, replica: &str, out: &mut String) {
        let tasks = self.tasks.lock();
        let _ = writeln!(
            out,
            "# HELP rtable_task_restarts_total Times a background task was started again after it panicked or returned\n\
             # TYPE rtable_task_restarts_total counter"
        );
        for (task, state) in tasks.iter() {
            let _ = writeln!(
                out,
                "rtable_task_restarts_total{{replica=\"{replica}\",task=\"{task}\"}} {}",
                state.restarts
            );
        }
        let _ = writeln!(
            out,
            "# HELP rtable_task_up 1 while a background task runs, 0 while it waits to be restarted\n\
             # TYPE rtable_task_up gauge"
        );
        for (task, state) in tasks.iter() {
            let up = u8::from(state.down.is_none());
            let _ = writeln!(
                out,
                "rtable_task_up{{replica=\"{replica}\",task=\"{task}\"}} {up}"
            );
        }
    }

    fn register(&self, task: &'static str) {
        let previous = self.tasks.lock().insert(task, TaskState::default());
        // Two tasks under one name would share (and garble) one health entry.
        assert!(previous.is_none(), "task `{task}` registered twice");
    }

    fn mark_down(&self, task: &'static str, failure: TaskFailure, restart_at: Instant) {
        if let Some(state) = self.tasks.lock().get_mut(task) {
            state.down = Some((failure, restart_at));
        }
    }

    fn mark_restarted(&self, task: &'static str) -> u64 {
        match self.tasks.lock().get_mut(task) {
            Some(state) => {
                state.down = None;
                state.restarts += 1;
                state.restarts
            }
            None => 0,
        }
    }
}

type Factory = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// Owns the replica's named background tasks; see the module doc for what it guarantees.
pub struct Supervisor {
    replica: String,
    policy: Backoff,
    health: Health,
    stop: CancellationToken,
    monitors: Vec<JoinHandle<()>>,
}

impl Supervisor {
    pub fn new(replica: &str) -> Self {
        Self::with_backoff(replica, Backoff::default())
    }

    pub fn with_backoff(replica: &str, policy: Backoff) -> Self {
        Supervisor {
            replica: replica.to_string(),
            policy,
            health: Health::default(),
            stop: CancellationToken::new(),
            monitors: Vec::new(),
        }
    }

    /// The tasks' health, for `/readyz` and `/metrics`.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Starts the task `name`, and starts it again from `factory` each time it fails.
    /// Must be called inside the runtime. Panics if `name` is already registered.
    pub fn spawn<F, Fut>(&mut self, name: &'static str, factory: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.health.register(name);
        let factory: Factory = Arc::new(move || factory().boxed());
        self.monitors.push(tokio::spawn(supervise(
            Monitor {
                replica: self.replica.clone(),
                task: name,
                factory,
                policy: self.policy,
                health: self.health.clone(),
            },
            self.stop.clone(),
        )));
    }

    /// [`Supervisor::spawn`] for a task that is `run(arg)`: each start gets a clone of `arg`.
    pub fn spawn_with<T, F, Fut>(&mut self, name: &'static str, arg: T, run: F)
    where
        T: Clone + Send + Sync + 'static,
        F: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.spawn(name, move || run(arg.clone()));
    }

    /// Aborts every task and waits until each is gone. A task backing off is not restarted.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        for monitor in std::mem::take(&mut self.monitors) {
            if let Err(e) = monitor.await
                && e.is_panic()
            {
                warn!(replica = %self.replica, error = %e, "a task's supervisor panicked during shutdown");
            }
        }
    }
}

impl Drop for Supervisor {
    /// The monitors are detached, not aborted, by dropping their handles: cancelling lets
    /// each abort its own task instead of leaving it running unsupervised.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One supervised task: what it takes to start it again and to report on it.
struct Monitor {
    replica: String,
    task: &'static str,
    factory: Factory,
    policy: Backoff,
    health: Health,
}

/// Runs one task until `stop`: starts it, waits for it to end, reports the failure, waits
/// out the backoff (down meanwhile) and starts it again.
async fn supervise(m: Monitor, stop: CancellationToken) {
    let mut last_wait = None;
    loop {
        let started = Instant::now();
        let factory = m.factory.clone();
        // The factory is called inside the task, so that a panic while building the future
        // is caught like one while running it.
        let mut run = tokio::spawn(async move { factory().await });
        let joined = tokio::select! {
            // Shutdown first: a task that fails while the process stops is not reported.
            biased;
            () = stop.cancelled() => {
                run.abort();
                // Gone once this returns, so nothing of it outlives `shutdown`.
                let _ = run.await;
                return;
            }
            joined = &mut run => joined,
        };
        let failure = TaskFailure::of(joined);
        let ran_for = started.elapsed();
        let wait = m.policy.next(last_wait, ran_for);
        last_wait = Some(wait);
        error!(
            replica = %m.replica,
            task = %m.task,
            %failure,
            ran_for_ms = ran_for.as_millis() as u64,
            restart_in_ms = wait.as_millis() as u64,
            "background task failed; restarting it after the backoff"
        );
        m.health.mark_down(m.task, failure, Instant::now() + wait);
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let restarts = m.health.mark_restarted(m.task);
        info!(replica = %m.replica, task = %m.task, restarts, "restarting background task");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy(initial: Duration) -> Backoff {
        Backoff {
            initial,
            max: initial * 8,
            healthy_after: Duration::from_secs(60),
        }
    }

    /// Polls `cond` every 5 ms for up to 5 s.
    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(5 * MS).await;
        }
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap_and_starts_over_after_a_healthy_run() {
        let b = Backoff::default();
        let short = Duration::from_secs(1);
        assert_eq!(b.next(None, short), 100 * MS, "first failure");
        assert_eq!(b.next(Some(100 * MS), short), 200 * MS);
        assert_eq!(b.next(Some(200 * MS), short), 400 * MS);
        assert_eq!(b.next(Some(20_000 * MS), short), Duration::from_secs(30));
        assert_eq!(
            b.next(Some(Duration::from_secs(30)), short),
            Duration::from_secs(30),
            "capped"
        );
        assert_eq!(
            b.next(Some(Duration::from_secs(30)), Duration::from_secs(60)),
            100 * MS,
            "a run of healthy_after resets it"
        );
        assert_eq!(b.next(Some(Duration::MAX), short), Duration::from_secs(30));
    }

    #[test]
    fn a_down_task_says_what_failed_and_when_it_restarts() {
        let down = DownTask {
            task: "queue_executor",
            failure: TaskFailure::Panicked("boom".to_string()),
            restart_in: 400 * MS,
        };
        assert_eq!(
            down.to_string(),
            "task queue_executor is down (panicked: boom), restarting in 400ms"
        );
        let two = TasksDown(vec![
            down,
            DownTask {
                task: "session",
                failure: TaskFailure::Returned,
                restart_in: Duration::ZERO,
            },
        ]);
        assert!(two.to_string().ends_with(
            "; task session is down (returned, but it is meant to run until shutdown), restarting now"
        ));
    }

    #[tokio::test]
    async fn a_task_that_panics_once_is_restarted_and_counted() {
        let mut s = Supervisor::with_backoff("r1", policy(10 * MS));
        let starts = Arc::new(AtomicUsize::new(0));
        let counter = starts.clone();
        s.spawn("flaky", move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("first run fails");
                }
                std::future::pending::<()>().await;
            }
        });
        let health = s.health();
        eventually("the restart", || starts.load(Ordering::SeqCst) == 2).await;
        assert_eq!(health.restarts("flaky"), Some(1));
        assert_eq!(health.check(), Ok(()));
        let mut text = String::new();
        health.write_metrics("r1", &mut text);
        assert!(
            text.contains("rtable_task_restarts_total{replica=\"r1\",task=\"flaky\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("rtable_task_up{replica=\"r1\",task=\"flaky\"} 1\n"),
            "{text}"
        );
        s.shutdown().await;
    }

    #[tokio::test]
    async fn a_task_backing_off_is_down_by_name_with_its_panic() {
        let mut s = Supervisor::with_backoff("r1", policy(Duration::from_secs(30)));
        s.spawn("healthy", std::future::pending::<()>);
        s.spawn("queue_executor", || async { panic!("boom") });
        s.spawn("quits", || async {});
        let health = s.health();
        eventually("both failures", || {
            health.check().is_err_and(|down| down.0.len() == 2)
        })
        .await;
        let Err(TasksDown(down)) = health.check() else {
            unreachable!("checked above")
        };
        assert_eq!(down[0].task, "queue_executor");
        assert_eq!(down[0].failure, TaskFailure::Panicked("boom".to_string()));
        assert!(down[0].restart_in > Duration::from_secs(25), "{down:?}");
        assert_eq!(
            (down[1].task, &down[1].failure),
            ("quits", &TaskFailure::Returned)
        );
        let mut text = String::new();
        health.write_metrics("r1", &mut text);
        assert!(
            text.contains("rtable_task_up{replica=\"r1\",task=\"queue_executor\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("rtable_task_up{replica=\"r1\",task=\"healthy\"} 1\n"),
            "{text}"
        );
        assert_eq!(
            health.restarts("queue_executor"),
            Some(0),
            "not restarted yet"
        );
        s.shutdown().await;
    }

    #[tokio::test]
    async fn a_healthy_task_is_not_restarted() {
        let mut s = Supervisor::with_backoff("r1", policy(MS));
        let starts = Arc::new(AtomicUsize::new(0));
        let counter = starts.clone();
        s.spawn_with("steady", counter, |counter: Arc<AtomicUsize>| async move {
            counter.fetch_add(1, Ordering::SeqCst);
            loop {
                tokio::time::sleep(MS).await;
            }
        });
        tokio::time::sleep(100 * MS).await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        assert_eq!(s.health().restarts("steady"), Some(0));
        assert_eq!(s.health().check(), Ok(()));
        s.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_aborts_the_tasks_and_stops_the_restarts() {
        let mut s = Supervisor::with_backoff("r1", policy(MS));
        let starts = Arc::new(AtomicUsize::new(0));
        let counter = starts.clone();
        s.spawn("always_fails", move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { panic!("again") }
        });
        /// Sets its flag when dropped: the aborted task's future was dropped.
        struct Dropped(Arc<AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let aborted = Arc::new(AtomicBool::new(false));
        let flag = aborted.clone();
        s.spawn("runs", move || {
            let guard = Dropped(flag.clone());
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            }
        });
        eventually("a few restarts", || starts.load(Ordering::SeqCst) >= 3).await;
        let health = s.health();
        tokio::time::timeout(Duration::from_secs(5), s.shutdown())
            .await
            .expect("shutdown returns promptly");
        assert!(
            aborted.load(Ordering::SeqCst),
            "the running task was aborted"
        );
        let after = starts.load(Ordering::SeqCst);
        tokio::time::sleep(50 * MS).await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            after,
            "no restart after shutdown"
        );
        assert_eq!(health.restarts("runs"), Some(0));
    }
}
