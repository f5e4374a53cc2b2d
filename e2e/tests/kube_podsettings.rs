//! Pod settings on a real control plane: a namespace enforcing the `restricted` Pod Security
//! Standard admits a table's pods with the operator's default security contexts, and the
//! pods carry `spec.pod` as written; an override that leaves `restricted` is refused with
//! the violation named. No kubelet runs here, so the pods stay Pending: admission is what
//! is tested, by the StatefulSet controller creating the pods.

mod kube_common;

use kube_common::*;

/// The messages of the `FailedCreate` Events on `statefulset/<name>` in `ns`.
async fn failed_creates(p: &Plane, ns: &str, name: &str) -> Vec<String> {
    let Some(list) = get_json(p, ns, "events").await else {
        return Vec::new();
    };
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["reason"] == "FailedCreate"
                && e["involvedObject"]["kind"] == "StatefulSet"
                && e["involvedObject"]["name"] == name
        })
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect()
}

/// examples/events.yaml as `name` in `ns` on the ensemble `nodes`, 2 replicas with the
/// `auto` quorum, with `pod` as its `spec.pod` and a user container (which must be admitted
/// too: it gets the restricted defaults of its own).
fn table(ns: &str, name: &str, nodes: &str, pod: &str) -> String {
    let text =
        std::fs::read_to_string(rtable_e2e::example_manifest()).expect("examples/events.yaml");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("the example parses");
    doc["metadata"]["namespace"] = ns.into();
    doc["metadata"]["name"] = name.into();
    doc["spec"]["zookeeper"]["nodes"] = vec![serde_yaml::Value::from(nodes)].into();
    doc["spec"]["replicas"] = 2.into();
    doc["spec"]["insertQuorum"] = "auto".into();
    doc["spec"]["pod"] = serde_yaml::from_str(pod).expect("spec.pod YAML");
    doc["spec"]["userContainer"] =
        serde_yaml::from_str("{name: exporter, image: registry.example/exporter:1.0}")
            .expect("yaml");
    serde_yaml::to_string(&doc).expect("yaml")
}

#[tokio::test]
async fn restricted_namespace_admits_replica_pods_with_their_pod_settings() {
    let p = plane().await;
    let _scenario = p.shared.scenario();
    let ns = "podsettings";
    kubectl(&p, &["create", "namespace", ns], None, "create namespace").await;
    kubectl(
        &p,
        &[
            "label",
            "namespace",
            ns,
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest",
        ],
        None,
        "label the namespace restricted",
    )
    .await;
    let priority_class = "apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\n\
        metadata: {name: rtable-podsettings}\nvalue: 100000\n\
        description: replicas of the kube_podsettings scenario\n";
    kubectl(
        &p,
        &["apply", "-f", "-"],
        Some(priority_class),
        "create the PriorityClass",
    )
    .await;

    let zk = local_zookeeper(&p, "podsettings");
    let (_operator, _) = start_operator(p.shared, "operator-podsettings");

    let settings = r#"
labels: {team: observability}
annotations: {example.com/owner: data-platform}
imagePullSecrets: [{name: registry-credentials}]
nodeSelector: {node-pool: storage}
tolerations: [{key: dedicated, operator: Equal, value: rtable, effect: NoSchedule}]
priorityClassName: rtable-podsettings
"#;
    kubectl(
        &p,
        &["apply", "-f", "-"],
        Some(&table(ns, "events", &zk.connect_string(), settings)),
        "apply the table with pod settings",
    )
    .await;

    // The StatefulSet controller creates both pods: PodSecurity admitted them.
    let pods = eventually("pods events-0 and events-1", 90, || async {
        let mut pods = Vec::new();
        for name in ["events-0", "events-1"] {
            pods.push(get_json(&p, ns, &format!("pod/{name}")).await?);
        }
        Some(pods)
    })
    .await;
    for pod in &pods {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let spec = &pod["spec"];
        assert_eq!(pod["metadata"]["labels"]["team"], "observability", "{name}");
        assert_eq!(
            pod["metadata"]["labels"]["app.kubernetes.io/instance"], "events",
            "{name}: the selector labels stay"
        );
        assert_eq!(
            pod["metadata"]["annotations"]["example.com/owner"], "data-platform",
            "{name}"
        );
        assert_eq!(spec["nodeSelector"]["node-pool"], "storage", "{name}");
        assert_eq!(spec["priorityClassName"], "rtable-podsettings", "{name}");
        // The Priority admission plugin resolved the class: it exists and was applied.
        assert_eq!(spec["priority"], 100000, "{name}");
        assert_eq!(
            spec["imagePullSecrets"][0]["name"], "registry-credentials",
            "{name}"
        );
        let tolerations = spec["tolerations"].as_array().expect("tolerations");
        assert!(
            tolerations
                .iter()
                .any(|t| t["key"] == "dedicated" && t["value"] == "rtable"),
            "{name}: {tolerations:?}"
        );
        let psc = &spec["securityContext"];
        assert_eq!(psc["runAsNonRoot"], true, "{name}");
        assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        let sidecar = &spec["containers"][0];
        assert_eq!(
            sidecar["securityContext"]["allowPrivilegeEscalation"],
            false
        );
        assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(sidecar["resources"]["requests"]["memory"], "128Mi");
        let user = &spec["containers"][1];
        assert_eq!(user["name"], "exporter");
        assert_eq!(user["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(pod["status"]["qosClass"], "Burstable", "{name}");
    }
    // Admission is synchronous: a refused pod would have left an Event by now.
    let refused: Vec<String> = failed_creates(&p, ns, "events")
        .await
        .into_iter()
        .filter(|m| m.contains("PodSecurity"))
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");
    // Two replicas with the `auto` quorum (both) still let a drain evict one.
    let pdb = eventually("poddisruptionbudget/events", 30, || {
        get_json(&p, ns, "poddisruptionbudget/events")
    })
    .await;
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    // An override that leaves `restricted`: the pods are refused, the reason named.
    let insecure = "securityContext: {runAsNonRoot: false}\n";
    kubectl(
        &p,
        &["apply", "-f", "-"],
        Some(&table(ns, "insecure", &zk.connect_string(), insecure)),
        "apply the table with runAsNonRoot: false",
    )
    .await;
    let messages = eventually("a FailedCreate naming PodSecurity", 90, || async {
        let found: Vec<String> = failed_creates(&p, ns, "insecure")
            .await
            .into_iter()
            .filter(|m| m.contains("violates PodSecurity"))
            .collect();
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert!(
        messages[0].contains("restricted") && messages[0].contains("runAsNonRoot != true"),
        "{messages:#?}"
    );
    assert!(
        get_json(&p, ns, "pod/insecure-0").await.is_none(),
        "no pod of the insecure table was admitted"
    );
    drop(zk);
}
