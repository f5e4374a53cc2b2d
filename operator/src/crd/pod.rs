//! `spec.pod`: the settings of every replica pod that Kubernetes itself reads (scheduling,
//! image pulls, security, metadata). Each field is the Kubernetes type with its own schema,
//! so the API server validates them as it would in a pod template.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, PodSecurityContext, Toleration, TopologySpreadConstraint,
};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Pod labels the operator sets itself: the StatefulSet's selector and the component. A
/// user label with one of these keys would change which pods the StatefulSet, the Services
/// and the PodDisruptionBudget select, so `spec.pod.labels` may not hold them.
pub const RESERVED_POD_LABELS: [&str; 3] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
];

/// Pod annotations the operator sets itself: the schema hash rolls the pods on a schema
/// change, so a user value would hide one.
pub const RESERVED_POD_ANNOTATIONS: [&str; 2] = [
    "rtable.io/schema-hash",
    "kubectl.kubernetes.io/default-container",
];

/// Settings of every replica pod. Everything is optional; an absent field keeps the
/// operator's default (see docs/operator.md, "Pod settings").
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSettings {
    /// Labels added to every pod. The keys the operator sets (`app.kubernetes.io/name`,
    /// `app.kubernetes.io/instance`, `app.kubernetes.io/component`) are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new(
        "!('app.kubernetes.io/name' in self) && !('app.kubernetes.io/instance' in self) && !('app.kubernetes.io/component' in self)"
    ).message("spec.pod.labels may not set app.kubernetes.io/name, app.kubernetes.io/instance or app.kubernetes.io/component: the operator selects the table's pods by them; use other keys"))]
    pub labels: BTreeMap<String, String>,

    /// Annotations added to every pod (the operator's own, `rtable.io/schema-hash` and
    /// `kubectl.kubernetes.io/default-container`, are refused).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,

    /// Secrets in the table's namespace used to pull the sidecar's (and the user
    /// container's) image from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Only nodes with all these labels run the replicas.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Taints the replicas tolerate (dedicated node pools).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Node and pod (anti-)affinity of the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Replaces the default spread (`maxSkew: 1` over `kubernetes.io/hostname`,
    /// `ScheduleAnyway`) when set; an empty list turns spreading off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,

    /// PriorityClass of the replicas, e.g. one that keeps them from being preempted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,

    /// Overrides the pod-level security context field by field: every field set here
    /// replaces the operator's default, the others keep it. The defaults satisfy the
    /// `restricted` Pod Security Standard (non-root uid/gid/fsGroup 10001, RuntimeDefault
    /// seccomp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
}
