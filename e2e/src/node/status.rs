//! The pod status a kubelet writes, computed from what the agent knows (a pure function,
//! unit-tested) and written with a strategic-merge patch of the status subresource, so the
//! scheduler's `PodScheduled` and any controller's conditions are kept.
//!
//! Fields: `phase` (the kubelet's `getPhase` rules), the conditions
//! `PodReadyToStartContainers`, `Initialized`, `ContainersReady` and `Ready` (with their
//! transition times kept while unchanged, and `observedGeneration`), `hostIP(s)`,
//! `podIP(s)`, `startTime`, and one `containerStatuses`/`initContainerStatuses` entry per
//! container (image, imageID, containerID, state, lastState, ready, started,
//! restartCount, volumeMounts, user).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateWaiting, ContainerStatus, ContainerUser, HostIP,
    LinuxContainerUser, Pod, PodCondition, PodIP, PodStatus, VolumeMountStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};

use super::container::Status;

/// What the agent knows about one pod.
#[derive(Debug, Clone)]
pub struct PodView<'a> {
    pub pod: &'a Pod,
    pub host_ip: Ipv4Addr,
    pub pod_ip: Option<Ipv4Addr>,
    pub start_time: Option<Time>,
    /// The network namespace exists.
    pub sandbox_ready: bool,
    /// Per init container in spec order: its status, `None` before it was created.
    pub init: Vec<Option<Status>>,
    pub containers: Vec<Option<Status>>,
    /// Why containers cannot be created yet (volumes not ready...), shown as their
    /// waiting reason/message.
    pub waiting: Option<(String, String)>,
    /// The pod is stopped for good (deleted, or its containers finished and will not
    /// restart): its phase is terminal.
    pub stopped: bool,
    /// Restart counts of containers not created yet, by (init, name): what an agent that
    /// restarted carries over.
    pub carried_restarts: &'a BTreeMap<(bool, String), i32>,
}

fn waiting_state(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..ContainerState::default()
    }
}

fn container_status(
    spec: &Container,
    status: Option<&Status>,
    default_reason: &str,
    waiting: Option<&(String, String)>,
    carried_restarts: i32,
) -> ContainerStatus {
    let volume_mounts = spec.volume_mounts.as_ref().map(|mounts| {
        mounts
            .iter()
            .map(|m| VolumeMountStatus {
                name: m.name.clone(),
                mount_path: m.mount_path.clone(),
                read_only: m.read_only.filter(|r| *r),
                recursive_read_only: m.read_only.filter(|r| *r).map(|_| "Disabled".into()),
            })
            .collect()
    });
    match status {
        Some(s) => ContainerStatus {
            name: spec.name.clone(),
            image: s.image.clone(),
            image_id: s.image_id.clone(),
            container_id: s.container_id.clone(),
            ready: s.ready,
            started: Some(s.started),
            restart_count: s.restart_count,
            state: Some(s.state.clone()),
            last_state: Some(s.last_state.clone().unwrap_or_default()),
            volume_mounts,
            user: s.user.as_ref().map(|(uid, gid, groups)| ContainerUser {
                linux: Some(LinuxContainerUser {
                    uid: i64::from(*uid),
                    gid: i64::from(*gid),
                    supplemental_groups: Some(groups.iter().map(|g| i64::from(*g)).collect()),
                }),
            }),
            ..ContainerStatus::default()
        },
        None => {
            let (reason, message) = match waiting {
                Some((r, m)) => (r.as_str(), Some(m.clone())),
                None => (default_reason, None),
            };
            ContainerStatus {
                name: spec.name.clone(),
                image: spec.image.clone().unwrap_or_default(),
                image_id: String::new(),
                ready: false,
                started: Some(false),
                restart_count: carried_restarts,
                state: Some(waiting_state(reason, message)),
                last_state: Some(ContainerState::default()),
                volume_mounts,
                ..ContainerStatus::default()
            }
        }
    }
}

/// An init container that keeps running beside the app containers (a "sidecar").
fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// The kubelet's `getPhase`.
fn phase(
    pod: &Pod,
    init: &[ContainerStatus],
    containers: &[ContainerStatus],
    stopped: bool,
) -> &'static str {
    let spec = pod.spec.as_ref();
    let restart = spec
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always");
    let init_specs: Vec<&Container> = spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .collect();
    let mut pending_init = 0;
    let mut failed_init = 0;
    for (c, s) in init_specs.iter().zip(init) {
        if is_sidecar(c) {
            if s.started != Some(true) {
                pending_init += 1;
            }
            continue;
        }
        match s.state.as_ref().and_then(|st| st.terminated.as_ref()) {
            Some(t) if t.exit_code == 0 => {}
            Some(_) => {
                failed_init += 1;
                pending_init += 1;
            }
            None => pending_init += 1,
        }
    }
    if failed_init > 0 && restart == "Never" {
        return "Failed";
    }
    let (mut waiting, mut running, mut stopped_n, mut succeeded) = (0, 0, 0, 0);
    for s in containers {
        let state = s.state.clone().unwrap_or_default();
        if state.running.is_some() {
            running += 1;
        } else if let Some(t) = &state.terminated {
            stopped_n += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            }
        } else if s
            .last_state
            .as_ref()
            .and_then(|l| l.terminated.as_ref())
            .is_some()
        {
            stopped_n += 1;
        } else {
            waiting += 1;
        }
    }
    if pending_init > 0 && !stopped {
        return "Pending";
    }
    if waiting > 0 && !stopped {
        return "Pending";
    }
    if running > 0 && !stopped {
        return "Running";
    }
    if stopped || (running == 0 && stopped_n > 0) {
        if stopped {
            // A stopped pod's containers will not run again.
            return if containers.iter().all(|s| {
                s.state
                    .as_ref()
                    .and_then(|st| st.terminated.as_ref())
                    .is_some_and(|t| t.exit_code == 0)
            }) && !containers.is_empty()
            {
                "Succeeded"
            } else {
                "Failed"
            };
        }
        if restart == "Always" {
            return "Running";
        }
        if stopped_n == succeeded {
            return "Succeeded";
        }
        if restart == "Never" {
            return "Failed";
        }
        return "Running";
    }
    "Pending"
}

fn condition(
    previous: &[PodCondition],
    type_: &str,
    ok: bool,
    reason: Option<&str>,
    message: Option<String>,
    generation: Option<i64>,
    now: &Time,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let transition = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    PodCondition {
        type_: type_.into(),
        status: status.into(),
        reason: if ok { None } else { reason.map(str::to_string) },
        message: if ok { None } else { message },
        last_transition_time: Some(transition),
        last_probe_time: None,
        observed_generation: generation,
    }
}

/// The status the agent writes for `view`.
pub fn pod_status(view: &PodView<'_>, now: &Time) -> PodStatus {
    let pod = view.pod;
    let spec = pod.spec.clone().unwrap_or_default();
    let previous: Vec<PodCondition> = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let generation = pod.metadata.generation;
    let init_specs = spec.init_containers.clone().unwrap_or_default();
    let init: Vec<ContainerStatus> = init_specs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            container_status(
                c,
                view.init.get(i).and_then(Option::as_ref),
                "PodInitializing",
                view.waiting.as_ref(),
                view.carried_restarts
                    .get(&(true, c.name.clone()))
                    .copied()
                    .unwrap_or(0),
            )
        })
        .collect();
    let app_default = if init_specs.is_empty() {
        "ContainerCreating"
    } else {
        "PodInitializing"
    };
    let containers: Vec<ContainerStatus> = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            container_status(
                c,
                view.containers.get(i).and_then(Option::as_ref),
                app_default,
                view.waiting.as_ref(),
                view.carried_restarts
                    .get(&(false, c.name.clone()))
                    .copied()
                    .unwrap_or(0),
            )
        })
        .collect();
    let phase = phase(pod, &init, &containers, view.stopped);
    let terminal = matches!(phase, "Succeeded" | "Failed");

    let incomplete: Vec<String> = init_specs
        .iter()
        .zip(&init)
        .filter(|(c, s)| {
            if is_sidecar(c) {
                s.started != Some(true)
            } else {
                s.state
                    .as_ref()
                    .and_then(|st| st.terminated.as_ref())
                    .is_none_or(|t| t.exit_code != 0)
            }
        })
        .map(|(c, _)| c.name.clone())
        .collect();
    let unready: Vec<String> = containers
        .iter()
        .filter(|s| !s.ready)
        .map(|s| s.name.clone())
        .chain(
            init_specs
                .iter()
                .zip(&init)
                .filter(|(c, s)| is_sidecar(c) && !s.ready)
                .map(|(c, _)| c.name.clone()),
        )
        .collect();
    let containers_ready = unready.is_empty() && !terminal;
    let gates_ready = spec.readiness_gates.iter().flatten().all(|g| {
        previous
            .iter()
            .any(|c| c.type_ == g.condition_type && c.status == "True")
    });
    let list = |names: &[String]| format!("[{}]", names.join(" "));
    let not_ready_reason = if terminal {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    let conditions = vec![
        condition(
            &previous,
            "PodReadyToStartContainers",
            view.sandbox_ready && !(terminal && view.stopped),
            None,
            None,
            generation,
            now,
        ),
        condition(
            &previous,
            "Initialized",
            incomplete.is_empty() || terminal,
            Some("ContainersNotInitialized"),
            Some(format!(
                "containers with incomplete status: {}",
                list(&incomplete)
            )),
            generation,
            now,
        ),
        condition(
            &previous,
            "Ready",
            containers_ready && gates_ready,
            Some(if containers_ready {
                "ReadinessGatesNotReady"
            } else {
                not_ready_reason
            }),
            Some(if containers_ready {
                "corresponding condition of pod readiness gate is not true".into()
            } else {
                format!("containers with unready status: {}", list(&unready))
            }),
            generation,
            now,
        ),
        condition(
            &previous,
            "ContainersReady",
            containers_ready,
            Some(not_ready_reason),
            Some(format!(
                "containers with unready status: {}",
                list(&unready)
            )),
            generation,
            now,
        ),
    ];
    let host_ip = view.host_ip.to_string();
    let pod_ip = view.pod_ip.map(|ip| ip.to_string());
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        host_ip: Some(host_ip.clone()),
        host_ips: Some(vec![HostIP { ip: host_ip }]),
        pod_ip: pod_ip.clone(),
        pod_ips: pod_ip.map(|ip| vec![PodIP { ip }]),
        start_time: view.start_time.clone(),
        init_container_statuses: (!init.is_empty()).then_some(init),
        container_statuses: Some(containers),
        observed_generation: generation,
        ..PodStatus::default()
    }
}

/// The status fields the agent writes.
const OWNED: [&str; 10] = [
    "phase",
    "conditions",
    "hostIP",
    "hostIPs",
    "podIP",
    "podIPs",
    "startTime",
    "containerStatuses",
    "initContainerStatuses",
    "observedGeneration",
];

/// List fields of a pod status that a strategic merge patch merges element by element,
/// and their merge keys.
const MERGE_KEYS: [(&str, &str); 4] = [
    ("conditions", "type"),
    ("containerStatuses", "name"),
    ("initContainerStatuses", "name"),
    ("ephemeralContainerStatuses", "name"),
];

/// `new` with an explicit `null` for every field `old` has and `new` lacks, so a strategic
/// merge patch of `new` removes it (a condition that became True loses its reason, a
/// running container loses its `waiting` state), as the two-way patch a kubelet computes
/// does. Lists with a merge key are matched element by element.
pub fn with_deletions(old: &serde_json::Value, new: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut out = n.clone();
            for (key, old_value) in o {
                match n.get(key) {
                    None => {
                        out.insert(key.clone(), Value::Null);
                    }
                    Some(new_value) => {
                        let merged = match MERGE_KEYS.iter().find(|(field, _)| field == key) {
                            Some((_, merge_key)) => merge_list(old_value, new_value, merge_key),
                            None => with_deletions(old_value, new_value),
                        };
                        out.insert(key.clone(), merged);
                    }
                }
            }
            Value::Object(out)
        }
        _ => new.clone(),
    }
}

fn merge_list(old: &serde_json::Value, new: &serde_json::Value, key: &str) -> serde_json::Value {
    use serde_json::Value;
    let (Value::Array(o), Value::Array(n)) = (old, new) else {
        return new.clone();
    };
    Value::Array(
        n.iter()
            .map(|item| {
                let previous = o
                    .iter()
                    .find(|p| p.get(key).is_some() && p.get(key) == item.get(key));
                match previous {
                    Some(p) => with_deletions(p, item),
                    None => item.clone(),
                }
            })
            .collect(),
    )
}

/// Writes `status` with a strategic-merge patch of the pod's status subresource, removing
/// what the pod's current status has and `status` no longer does.
pub async fn write(
    client: &kube::Client,
    pod: &Pod,
    status: &PodStatus,
) -> Result<Pod, kube::Error> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    // Only the fields the agent writes are compared: `qosClass` (the API server's) or
    // `nominatedNodeName` (the scheduler's) must not be removed.
    let mut current = serde_json::to_value(&pod.status).unwrap_or_default();
    if let Some(fields) = current.as_object_mut() {
        fields.retain(|k, _| OWNED.contains(&k.as_str()));
    }
    let new = serde_json::to_value(status).unwrap_or_default();
    let mut patch = serde_json::json!({ "status": with_deletions(&current, &new) });
    // The UID guards against writing into a newer pod of the same name.
    patch["metadata"] = serde_json::json!({ "uid": pod.metadata.uid });
    api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerStateRunning, ContainerStateTerminated, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::jiff::Timestamp;

    fn pod(restart: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-0".into()),
                generation: Some(1),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                restart_policy: Some(restart.into()),
                containers: vec![Container {
                    name: "web".into(),
                    image: Some("python:3".into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    fn running(ready: bool) -> Status {
        Status {
            image: "python:3".into(),
            ready,
            started: true,
            state: ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(Timestamp::now())),
                }),
                ..ContainerState::default()
            },
            ..Status::default()
        }
    }

    fn exited(code: i32) -> Status {
        Status {
            image: "python:3".into(),
            state: ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            },
            ..Status::default()
        }
    }

    static NONE: BTreeMap<(bool, String), i32> = BTreeMap::new();

    fn view<'a>(pod: &'a Pod, c: Option<Status>, stopped: bool) -> PodView<'a> {
        PodView {
            pod,
            host_ip: Ipv4Addr::new(10, 244, 0, 1),
            pod_ip: Some(Ipv4Addr::new(10, 244, 0, 2)),
            start_time: None,
            sandbox_ready: true,
            init: vec![],
            containers: vec![c],
            waiting: None,
            stopped,
            carried_restarts: &NONE,
        }
    }

    fn cond<'a>(s: &'a PodStatus, t: &str) -> &'a PodCondition {
        s.conditions
            .as_ref()
            .and_then(|c| c.iter().find(|c| c.type_ == t))
            .expect("condition")
    }

    #[test]
    fn phases_and_readiness() {
        let now = Time(Timestamp::now());
        let p = pod("Always");
        let s = pod_status(&view(&p, None, false), &now);
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let cs = &s.container_statuses.as_ref().expect("statuses")[0];
        assert_eq!(
            cs.state
                .as_ref()
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.as_deref()),
            Some("ContainerCreating")
        );

        let s = pod_status(&view(&p, Some(running(false)), false), &now);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(
            cond(&s, "ContainersReady").message.as_deref(),
            Some("containers with unready status: [web]")
        );
        let s = pod_status(&view(&p, Some(running(true)), false), &now);
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "Ready").observed_generation, Some(1));
        assert_eq!(s.pod_ip.as_deref(), Some("10.244.0.2"));

        // Restarting under Always is still Running.
        let s = pod_status(&view(&p, Some(exited(1)), false), &now);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        // Never: a failure is terminal, a success too.
        let never = pod("Never");
        let s = pod_status(&view(&never, Some(exited(1)), false), &now);
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        let s = pod_status(&view(&never, Some(exited(0)), false), &now);
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        assert_eq!(cond(&s, "Ready").reason.as_deref(), Some("PodCompleted"));
        // A deleted pod whose container was killed ends Failed.
        let s = pod_status(&view(&p, Some(exited(143)), true), &now);
        assert_eq!(s.phase.as_deref(), Some("Failed"));
    }

    #[test]
    fn deletions_become_explicit_nulls() {
        let old = serde_json::json!({
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "message": "m"},
                {"type": "PodScheduled", "status": "True"}
            ],
            "containerStatuses": [{"name": "web", "state": {"waiting": {"reason": "ContainerCreating"}}}],
            "podIP": "10.0.0.1"
        });
        let new = serde_json::json!({
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "web", "state": {"running": {"startedAt": "t"}}}]
        });
        assert_eq!(
            with_deletions(&old, &new),
            serde_json::json!({
                "conditions": [{"type": "Ready", "status": "True", "reason": null, "message": null}],
                "containerStatuses": [{"name": "web", "state": {"running": {"startedAt": "t"}, "waiting": null}}],
                "podIP": null
            })
        );
    }

    #[test]
    fn transition_times_are_kept_while_unchanged() {
        let earlier = Time(Timestamp::from_second(1_700_000_000).expect("time"));
        let mut p = pod("Always");
        p.status = Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                last_transition_time: Some(earlier.clone()),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        });
        let now = Time(Timestamp::now());
        let s = pod_status(&view(&p, Some(running(true)), false), &now);
        assert_eq!(cond(&s, "Ready").last_transition_time, Some(earlier));
        let s = pod_status(&view(&p, Some(running(false)), false), &now);
        assert_eq!(cond(&s, "Ready").last_transition_time, Some(now));
    }
}
