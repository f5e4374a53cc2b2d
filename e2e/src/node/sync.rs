//! The pod sync loop: a watch of the pods bound to this node (`spec.nodeName=<node>`, what
//! the Node authorizer lets a node list) feeding one worker per pod UID, and, after the
//! first complete list, the removal of what is left of pods this node no longer has (an
//! agent that restarts finds its old pods' namespaces and directories).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::cleanup;
use super::pod_worker::{self, NodeContext};

struct Worker {
    pod: watch::Sender<Option<Pod>>,
    task: JoinHandle<()>,
}

/// Pod workers by UID.
struct Workers {
    ctx: Arc<NodeContext>,
    running: HashMap<String, Worker>,
    /// UIDs whose worker has finished: a late event for them starts nothing.
    done: HashSet<String>,
    shutdown: CancellationToken,
}

impl Workers {
    fn reap(&mut self) {
        let finished: Vec<String> = self
            .running
            .iter()
            .filter(|(_, w)| w.task.is_finished())
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in finished {
            self.running.remove(&uid);
            self.done.insert(uid);
        }
    }

    fn apply(&mut self, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        if let Some(w) = self.running.get(&uid) {
            w.pod.send_replace(Some(pod));
            return;
        }
        if self.done.contains(&uid) {
            return;
        }
        let (tx, rx) = watch::channel(Some(pod));
        let task = tokio::spawn(pod_worker::run(
            self.ctx.clone(),
            uid.clone(),
            rx,
            self.shutdown.child_token(),
        ));
        self.running.insert(uid, Worker { pod: tx, task });
    }

    fn delete(&mut self, uid: &str) {
        if let Some(w) = self.running.get(uid) {
            w.pod.send_replace(None);
        }
        self.done.remove(uid);
    }

    /// Removes the sandboxes of pods that are neither listed nor running here.
    async fn remove_orphans(&mut self, listed: &HashSet<String>) {
        let mut uids: HashSet<String> = self.ctx.network.allocations().into_iter().collect();
        if let Ok(entries) = std::fs::read_dir(self.ctx.cfg.state_dir.join("pods")) {
            uids.extend(
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
        for uid in uids {
            if listed.contains(&uid) || self.running.contains_key(&uid) {
                continue;
            }
            info!(%uid, "removing what is left of a pod this node no longer runs");
            let dir = self.ctx.pod_dir(&uid);
            if let Err(e) = cleanup::unmount_under(&dir) {
                warn!(%uid, error = %e, "unmounting an orphaned pod's volumes failed");
            }
            if let Err(e) = self.ctx.network.delete_pod_network(&uid).await {
                warn!(%uid, error = %e, "removing an orphaned pod's network failed");
            }
            if dir.exists()
                && let Err(e) = std::fs::remove_dir_all(&dir)
            {
                warn!(%uid, error = %e, "removing an orphaned pod's directory failed");
            }
        }
    }

    /// Lets every worker stop its pod (they share the cancelled token) and waits.
    async fn stop(&mut self, timeout: Duration) {
        let tasks: Vec<JoinHandle<()>> = self.running.drain().map(|(_, w)| w.task).collect();
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(timeout, all).await.is_err() {
            warn!("some pods did not stop in time");
        }
    }
}

/// Runs pods until `shutdown`, then stops them.
pub async fn run(ctx: Arc<NodeContext>, shutdown: CancellationToken) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.cfg.node_name));
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut workers = Workers {
        ctx: ctx.clone(),
        running: HashMap::new(),
        done: HashSet::new(),
        shutdown: shutdown.clone(),
    };
    let mut listing: HashSet<String> = HashSet::new();
    let mut first_list = true;
    let mut reap = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = reap.tick() => workers.reap(),
            event = stream.next() => {
                let Some(event) = event else { break };
                match event {
                    Ok(Event::Init) => listing.clear(),
                    Ok(Event::InitApply(pod)) => {
                        if let Some(uid) = &pod.metadata.uid {
                            listing.insert(uid.clone());
                        }
                        workers.apply(pod);
                    }
                    Ok(Event::InitDone) => {
                        // A relist: pods that were not listed are gone.
                        let gone: Vec<String> = workers
                            .running
                            .keys()
                            .filter(|uid| !listing.contains(*uid))
                            .cloned()
                            .collect();
                        for uid in gone {
                            workers.delete(&uid);
                        }
                        if first_list {
                            first_list = false;
                            workers.remove_orphans(&listing).await;
                        }
                    }
                    Ok(Event::Apply(pod)) => workers.apply(pod),
                    Ok(Event::Delete(pod)) => {
                        if let Some(uid) = &pod.metadata.uid {
                            workers.delete(uid);
                        }
                    }
                    Err(e) => warn!(error = %e, "the pod watch failed; retrying"),
                }
            }
        }
    }
    info!("stopping every pod of the node");
    workers.stop(Duration::from_secs(30)).await;
}
