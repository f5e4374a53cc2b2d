//! One pod's life on the node, driven by one task per pod UID (as a kubelet's pod worker):
//! 1. the sandbox: network namespace and address, hostname, `/etc/hosts`,
//!    `/etc/resolv.conf` (its address goes into the status at once);
//! 2. the volumes, retried until they can all be set up (a claim not bound yet, a
//!    ConfigMap not created yet), the reason shown as the containers' waiting message;
//! 3. init containers one after another, then the app containers, each under its
//!    supervisor; the status is rewritten whenever a container's state changes;
//! 4. on deletion (`deletionTimestamp`), every container is stopped within the grace
//!    period, the final status written, the sandbox and volumes removed, and the pod
//!    deleted with grace 0 so its controller can replace it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Preconditions};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::NodeConfig;
use super::container::{self, Backoff, Restart, Supervisor, SupervisorArgs};
use super::env;
use super::events::Events;
use super::images::ImageMap;
use super::launch::{self, NodeFacts, PodLaunch, Sandbox};
use super::network::Network;
use super::status::{self, PodView};
use super::volumes::{PodVolumes, VolumeContext};

/// What every pod worker shares.
pub struct NodeContext {
    pub cfg: NodeConfig,
    /// The node's own identity.
    pub client: kube::Client,
    pub images: Arc<ImageMap>,
    pub network: Network,
    pub events: Events,
    pub node: NodeFacts,
    pub host_ip: Ipv4Addr,
    /// The API server as pods reach it.
    pub api_host: String,
    pub api_port: u16,
    pub self_exe: PathBuf,
}

impl NodeContext {
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.cfg.state_dir.join("pods").join(uid)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("creating the pod network: {0}")]
    Network(#[from] super::network::NetworkError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Volume(#[from] super::volumes::VolumeError),
}

fn io(what: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> SetupError {
    let path = path.to_path_buf();
    move |source| SetupError::Io { what, path, source }
}

fn pod_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The grace period of a deletion: what the API recorded, or the pod's own.
fn grace(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .or(pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds))
        .unwrap_or(30);
    Duration::from_secs(secs.max(0) as u64)
}

/// Restarts each container already had, by (init, name): an agent that restarts continues
/// the counts, since the containers died with the previous agent.
fn carried_restarts(pod: &Pod) -> BTreeMap<(bool, String), i32> {
    let status = pod.status.clone().unwrap_or_default();
    let mut out = BTreeMap::new();
    for (init, statuses) in [
        (true, status.init_container_statuses.unwrap_or_default()),
        (false, status.container_statuses.unwrap_or_default()),
    ] {
        for s in statuses {
            let ran = s
                .state
                .as_ref()
                .is_some_and(|st| st.running.is_some() || st.terminated.is_some())
                || s.last_state
                    .as_ref()
                    .is_some_and(|l| l.terminated.is_some());
            out.insert((init, s.name.clone()), s.restart_count + i32::from(ran));
        }
    }
    out
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// How a worker's main loop ended.
enum End {
    /// The pod is being deleted (or its containers are done): stop, clean up, report.
    Terminate,
    /// The pod is gone from the API (force-deleted): stop and clean up, nothing to report.
    Removed,
    /// The agent is stopping: stop and clean up quickly, leave the API alone.
    Shutdown,
}

/// Runs the pod `uid` until it is gone. `pods` carries its latest version, `None` once it
/// is deleted from the API.
pub async fn run(
    ctx: Arc<NodeContext>,
    uid: String,
    pods: watch::Receiver<Option<Pod>>,
    shutdown: CancellationToken,
) {
    let Some(pod) = pods.borrow().clone() else {
        return;
    };
    let span = info_span!("pod", pod = %pod_name(&pod), uid = %uid);
    async move {
        let mut worker = Worker::new(ctx, uid, pod, pods, shutdown);
        worker.run().await;
    }
    .instrument(span)
    .await
}

struct Worker {
    ctx: Arc<NodeContext>,
    uid: String,
    pod: Pod,
    pods: watch::Receiver<Option<Pod>>,
    shutdown: CancellationToken,
    /// The pod as the containers' launches see it (labels for the downward API...).
    launch_pod: watch::Sender<Pod>,
    sandbox: Option<Arc<Sandbox>>,
    volumes: PodVolumes,
    start_time: Time,
    init: Vec<Option<Supervisor>>,
    containers: Vec<Option<Supervisor>>,
    notify: Arc<Notify>,
    waiting: Option<(String, String)>,
    stopped: bool,
    last_written: Option<serde_json::Value>,
    last_status: Option<k8s_openapi::api::core::v1::PodStatus>,
    carried_restarts: BTreeMap<(bool, String), i32>,
}

impl Worker {
    fn new(
        ctx: Arc<NodeContext>,
        uid: String,
        pod: Pod,
        pods: watch::Receiver<Option<Pod>>,
        shutdown: CancellationToken,
    ) -> Worker {
        let spec = pod.spec.clone().unwrap_or_default();
        let start_time = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.clone())
            .unwrap_or_else(|| Time(Timestamp::now()));
        let volumes = PodVolumes::new(&ctx.pod_dir(&uid).join("volumes"));
        let carried = carried_restarts(&pod);
        Worker {
            launch_pod: watch::channel(pod.clone()).0,
            init: spec
                .init_containers
                .iter()
                .flatten()
                .map(|_| None)
                .collect(),
            containers: spec.containers.iter().map(|_| None).collect(),
            ctx,
            uid,
            pod,
            pods,
            shutdown,
            sandbox: None,
            volumes,
            start_time,
            notify: Arc::new(Notify::new()),
            waiting: None,
            stopped: false,
            last_written: None,
            last_status: None,
            carried_restarts: carried,
        }
    }

    async fn run(&mut self) {
        if is_terminal(&self.pod) {
            // Finished before this agent saw it (or before a restart): nothing runs.
            self.stopped = true;
            let end = self.wait_for_deletion().await;
            self.finish(end).await;
            return;
        }
        let end = match self.set_up().await {
            Some(end) => end,
            None => self.supervise().await,
        };
        self.finish(end).await;
    }

    /// Applies a new version of the pod; the `End` it calls for, if any.
    fn observe(&mut self, latest: Option<Pod>) -> Option<End> {
        match latest {
            None => Some(End::Removed),
            Some(pod) => {
                let deleting = pod.metadata.deletion_timestamp.is_some();
                self.pod = pod.clone();
                self.launch_pod.send_replace(pod);
                deleting.then_some(End::Terminate)
            }
        }
    }

    /// Waits for the next change of the pod or the agent; the `End` it calls for.
    async fn next_change(&mut self) -> Option<End> {
        tokio::select! {
            changed = self.pods.changed() => match changed {
                Ok(()) => {
                    let latest = self.pods.borrow_and_update().clone();
                    self.observe(latest)
                }
                Err(_) => Some(End::Shutdown),
            },
            () = self.shutdown.cancelled() => Some(End::Shutdown),
        }
    }

    async fn wait_for_deletion(&mut self) -> End {
        if self.pod.metadata.deletion_timestamp.is_some() {
            return End::Terminate;
        }
        loop {
            if let Some(end) = self.next_change().await {
                return end;
            }
        }
    }

    /// The sandbox and the volumes; `Some(end)` if the pod went away meanwhile.
    async fn set_up(&mut self) -> Option<End> {
        if self.pod.metadata.deletion_timestamp.is_some() {
            return Some(End::Terminate);
        }
        let mut reported = String::new();
        loop {
            let result = self.try_set_up().await;
            match result {
                Ok(()) => {
                    self.waiting = None;
                    return None;
                }
                Err(e) => {
                    let message = e.to_string();
                    warn!(error = %message, "pod setup incomplete; retrying");
                    self.waiting = Some(("ContainerCreating".into(), message.clone()));
                    self.write_status().await;
                    if message != reported {
                        let reason = if matches!(e, SetupError::Volume(_)) {
                            "FailedMount"
                        } else {
                            "FailedCreatePodSandBox"
                        };
                        self.ctx
                            .events
                            .pod(&self.pod, None, true, reason, message.clone())
                            .await;
                        reported = message;
                    }
                }
            }
            tokio::select! {
                end = self.next_change() => if let Some(end) = end { return Some(end) },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn try_set_up(&mut self) -> Result<(), SetupError> {
        if self.sandbox.is_none() {
            let sandbox = self.create_sandbox().await?;
            self.sandbox = Some(Arc::new(sandbox));
            // The address is known: the status shows it before any container runs.
            self.write_status().await;
        }
        let sandbox = self.sandbox.clone().ok_or_else(|| SetupError::Io {
            what: "creating the sandbox of",
            path: self.ctx.pod_dir(&self.uid),
            source: std::io::Error::other("no sandbox"),
        })?;
        let pod = self.pod.clone();
        let ctx = VolumeContext {
            client: &self.ctx.client,
            facts: self.facts(&pod, &sandbox),
        };
        self.volumes.sync(&ctx).await?;
        Ok(())
    }

    fn facts<'a>(&self, pod: &'a Pod, sandbox: &Sandbox) -> env::PodFacts<'a> {
        env::PodFacts {
            pod,
            pod_ip: Some(sandbox.pod_ip),
            host_ip: sandbox.host_ip,
            allocatable_cpu_milli: self.ctx.node.allocatable_cpu_milli,
            allocatable_memory: self.ctx.node.allocatable_memory,
            allocatable_ephemeral: self.ctx.node.allocatable_ephemeral,
        }
    }

    async fn create_sandbox(&self) -> Result<Sandbox, SetupError> {
        let ctx = &self.ctx;
        let pod = &self.pod;
        let spec = pod.spec.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let dir = ctx.pod_dir(&self.uid);
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        // Who the directory belongs to, for an agent that finds it after a restart.
        let owner = dir.join("pod");
        std::fs::write(&owner, format!("{namespace}/{name}\n")).map_err(io("writing", &owner))?;
        let (netns, pod_ip) = if spec.host_network == Some(true) {
            (None, ctx.host_ip)
        } else {
            let net = ctx.network.create_pod_network(&self.uid).await?;
            (Some(net.netns_path), net.ip)
        };
        let hostname: String = spec
            .hostname
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| name.clone())
            .chars()
            .take(63)
            .collect();
        let fqdn = spec
            .subdomain
            .as_ref()
            .filter(|s| !s.is_empty())
            .map(|sub| {
                format!(
                    "{hostname}.{sub}.{namespace}.svc.{}",
                    ctx.cfg.cluster_domain
                )
            });
        let etc_hosts = dir.join("etc-hosts");
        let resolv = dir.join("resolv.conf");
        let etc_hostname = dir.join("hostname");
        let files = [
            (
                &etc_hosts,
                launch::hosts_file(pod_ip, &hostname, fqdn.as_deref(), pod),
            ),
            (
                &resolv,
                launch::resolv_conf(pod, ctx.network.gateway(), &ctx.cfg.cluster_domain),
            ),
            (&etc_hostname, format!("{hostname}\n")),
        ];
        for (path, text) in files {
            std::fs::write(path, text).map_err(io("writing", path))?;
        }
        let logs_dir = ctx
            .cfg
            .state_dir
            .join("logs")
            .join(format!("{namespace}_{name}_{}", self.uid));
        std::fs::create_dir_all(&logs_dir).map_err(io("creating", &logs_dir))?;
        info!(ip = %pod_ip, %hostname, "sandbox ready");
        Ok(Sandbox {
            uid: self.uid.clone(),
            namespace,
            name,
            dir,
            logs_dir,
            netns,
            pod_ip,
            host_ip: ctx.host_ip,
            hostname,
            etc_hosts,
            resolv_conf: resolv,
            etc_hostname,
        })
    }

    fn pod_launch(&self, sandbox: Arc<Sandbox>) -> Arc<PodLaunch> {
        Arc::new(PodLaunch {
            client: self.ctx.client.clone(),
            images: self.ctx.images.clone(),
            sandbox,
            volumes: self.volumes.paths.clone(),
            pod: self.launch_pod.subscribe(),
            service_env: env::api_service_env(&self.ctx.api_host, self.ctx.api_port),
            node: self.ctx.node.clone(),
        })
    }

    fn start(
        &self,
        launch: &Arc<PodLaunch>,
        container: &Container,
        restart: Restart,
        init: bool,
    ) -> Supervisor {
        let cfg = &self.ctx.cfg;
        container::supervise(SupervisorArgs {
            launch: launch.clone(),
            container: container.clone(),
            restart,
            backoff: Backoff::new(cfg.backoff_initial, cfg.backoff_max),
            restart_count: self
                .carried_restarts
                .get(&(init, container.name.clone()))
                .copied()
                .unwrap_or(0),
            notify: self.notify.clone(),
            events: self.ctx.events.clone(),
            self_exe: self.ctx.self_exe.clone(),
            grace: Duration::from_secs(
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
                    .unwrap_or(30)
                    .max(0) as u64,
            ),
        })
    }

    /// Starts the next init container or, after the last, the app containers. Returns
    /// whether the pod can make no more progress (an init container failed for good).
    fn advance(&mut self, launch: &Arc<PodLaunch>) -> bool {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let policy = spec.restart_policy.as_deref();
        for (i, c) in spec.init_containers.iter().flatten().enumerate() {
            let sidecar = c.restart_policy.as_deref() == Some("Always");
            match &self.init[i] {
                None => {
                    let restart = if sidecar {
                        Restart::Always
                    } else if policy == Some("Never") {
                        Restart::Never
                    } else {
                        Restart::OnFailure
                    };
                    self.init[i] = Some(self.start(launch, c, restart, true));
                    return false;
                }
                Some(s) if sidecar => {
                    if !s.status().started {
                        return false;
                    }
                }
                Some(s) => {
                    let status = s.status();
                    let succeeded = status.terminated().is_some_and(|t| t.exit_code == 0);
                    if !succeeded {
                        // Still running, restarting, or failed for good under Never.
                        return s.is_finished();
                    }
                }
            }
        }
        let restart = Restart::of(policy);
        for (i, c) in spec.containers.iter().enumerate() {
            if self.containers[i].is_none() {
                self.containers[i] = Some(self.start(launch, c, restart, false));
            }
        }
        false
    }

    /// Every app container is done and will not run again (restartPolicy Never or
    /// OnFailure after success).
    fn all_done(&self) -> bool {
        !self.containers.is_empty()
            && self
                .containers
                .iter()
                .all(|c| c.as_ref().is_some_and(Supervisor::is_finished))
    }

    async fn supervise(&mut self) -> End {
        let Some(sandbox) = self.sandbox.clone() else {
            return End::Terminate;
        };
        let launch = self.pod_launch(sandbox);
        let mut blocked = self.advance(&launch);
        let mut status_retry = tokio::time::interval(Duration::from_secs(5));
        status_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_refresh = Instant::now() + self.ctx.cfg.volume_resync;
        loop {
            self.write_status().await;
            if blocked || self.all_done() {
                info!("the pod's containers are done");
                self.stopped = true;
                self.write_status().await;
                self.stop_all(Duration::ZERO).await;
                self.tear_down().await;
                return self.wait_for_deletion().await;
            }
            let refresh_at = self
                .volumes
                .next_token_refresh()
                .map(Instant::from_std)
                .map_or(next_refresh, |t| t.min(next_refresh));
            let notify = self.notify.clone();
            tokio::select! {
                end = self.next_change() => if let Some(end) = end { return end },
                () = notify.notified() => blocked = self.advance(&launch),
                _ = status_retry.tick() => {}
                () = tokio::time::sleep_until(refresh_at) => {
                    next_refresh = Instant::now() + self.ctx.cfg.volume_resync;
                    if let Err(e) = self.refresh_volumes().await {
                        warn!(error = %e, "refreshing the pod's volumes failed");
                    }
                }
            }
        }
    }

    async fn refresh_volumes(&mut self) -> Result<(), SetupError> {
        let Some(sandbox) = self.sandbox.clone() else {
            return Ok(());
        };
        let pod = self.pod.clone();
        let ctx = VolumeContext {
            client: &self.ctx.client,
            facts: self.facts(&pod, &sandbox),
        };
        self.volumes.sync(&ctx).await?;
        debug!("volumes refreshed");
        Ok(())
    }

    /// Stops every container within `grace` (app containers first, then init
    /// containers), and waits for them.
    async fn stop_all(&mut self, grace: Duration) {
        for s in self.containers.iter().flatten() {
            s.stop(grace);
        }
        for s in self.containers.iter_mut().flatten() {
            s.wait().await;
        }
        for s in self.init.iter().flatten() {
            s.stop(grace);
        }
        for s in self.init.iter_mut().flatten() {
            s.wait().await;
        }
    }

    async fn tear_down(&mut self) {
        if let Err(e) = self.volumes.tear_down().await {
            warn!(error = %e, "removing the pod's volumes failed");
        }
        // Also when the sandbox was half made: the address may be allocated already.
        self.sandbox = None;
        if let Err(e) = self.ctx.network.delete_pod_network(&self.uid).await {
            warn!(error = %e, "removing the pod's network failed");
        }
        let dir = self.ctx.pod_dir(&self.uid);
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            warn!(error = %e, dir = %dir.display(), "removing the pod's directory failed");
        }
    }

    async fn finish(&mut self, end: End) {
        let grace = match end {
            End::Shutdown => grace(&self.pod).min(Duration::from_secs(5)),
            _ => grace(&self.pod),
        };
        let running = self
            .init
            .iter()
            .chain(&self.containers)
            .flatten()
            .any(|s| !s.is_finished());
        if running {
            info!(grace_s = grace.as_secs(), "stopping the pod's containers");
            for s in self.containers.iter().flatten() {
                self.ctx
                    .events
                    .pod(
                        &self.pod,
                        Some(&s.name),
                        false,
                        "Killing",
                        format!("Stopping container {}", s.name),
                    )
                    .await;
            }
        }
        self.stop_all(grace).await;
        self.stopped = true;
        if matches!(end, End::Terminate) {
            self.write_status().await;
        }
        self.tear_down().await;
        if matches!(end, End::Terminate) && self.pod.metadata.deletion_timestamp.is_some() {
            self.delete().await;
        }
    }

    /// Deletes the pod for good (grace 0), as a kubelet does once its containers are gone.
    async fn delete(&self) {
        let namespace = self.pod.metadata.namespace.clone().unwrap_or_default();
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&name, &params).await {
            Ok(_) => info!("pod deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
                debug!("the pod was gone already")
            }
            Err(e) => warn!(error = %e, "deleting the pod failed"),
        }
    }

    /// Computes the status and writes it if it changed since the last write.
    async fn write_status(&mut self) {
        // Transition times come from what this worker wrote last (the watch may still
        // deliver an older version of the pod); others' conditions (readiness gates) from
        // the pod as last seen.
        let mut base = self.pod.clone();
        if let Some(last) = &self.last_status {
            let status = base.status.get_or_insert_with(Default::default);
            let mut conditions = last.conditions.clone().unwrap_or_default();
            for c in status.conditions.iter().flatten() {
                if !conditions.iter().any(|own| own.type_ == c.type_) {
                    conditions.push(c.clone());
                }
            }
            status.conditions = Some(conditions);
        }
        let view = PodView {
            pod: &base,
            host_ip: self.ctx.host_ip,
            pod_ip: self.sandbox.as_ref().map(|s| s.pod_ip),
            start_time: Some(self.start_time.clone()),
            sandbox_ready: self.sandbox.is_some(),
            init: self
                .init
                .iter()
                .map(|s| s.as_ref().map(Supervisor::status))
                .collect(),
            containers: self
                .containers
                .iter()
                .map(|s| s.as_ref().map(Supervisor::status))
                .collect(),
            waiting: self.waiting.clone(),
            stopped: self.stopped,
            carried_restarts: &self.carried_restarts,
        };
        let status = status::pod_status(&view, &Time(Timestamp::now()));
        let json = serde_json::to_value(&status).unwrap_or_default();
        if self.last_written.as_ref() == Some(&json) {
            return;
        }
        match status::write(&self.ctx.client, &self.pod, &status).await {
            Ok(written) => {
                debug!(phase = ?status.phase, "status written");
                // The new conditions' transition times are the base of the next write.
                if written.metadata.uid.as_deref() == Some(self.uid.as_str()) {
                    self.pod.status = written.status;
                }
                self.last_written = Some(json);
                self.last_status = Some(status);
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                debug!("the pod is gone; status not written")
            }
            Err(e) => warn!(error = %e, "writing the pod status failed; will retry"),
        }
    }
}
