//! `rtable-node` on a real control plane: the kube-scheduler binds a StatefulSet's pods to
//! the node, the agent runs them as processes in namespaces of their own, and everything a
//! pod relies on is checked from inside the pods (through a tiny agnhost-like HTTP program
//! mapped from a `python` image) and through the API: addresses, names, volumes, the
//! downward API, the service-account token, restarts in place and replacement.
//!
//! Needs root and `ip` (iproute2). Run with
//! `cargo test -p rtable-e2e --test kube_pods -- --nocapture`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
use rtable_e2e::kube::node_cluster::{NODE, NodeCluster as Cluster, repository_image_map};
use rtable_e2e::node::process::NodeProcess;
use rtable_e2e::node::provisioner;
use rtable_e2e::{Check, poll_until};
use serde_json::Value;

const NS: &str = "pods-e2e";
const CLAIM: u64 = 64 << 20;

/// The pods' program: answers what a test asks about the pod from inside it.
const AGNHOST: &str = r#"
import http.server, json, os, socket, ssl, urllib.parse, urllib.request

SA = "/var/run/secrets/kubernetes.io/serviceaccount"

def df(path):
    s = os.statvfs(path)
    return {"total": s.f_blocks * s.f_frsize, "free": s.f_bavail * s.f_frsize}

def whoami():
    token = open(SA + "/token").read()
    ctx = ssl.create_default_context(cafile=SA + "/ca.crt")
    port = os.environ["KUBERNETES_SERVICE_PORT"]
    body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode()
    req = urllib.request.Request(
        "https://kubernetes.default.svc:%s/apis/authentication.k8s.io/v1/selfsubjectreviews" % port,
        data=body, method="POST",
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
        return json.load(r)["status"]["userInfo"]["username"]

def fill(path):
    written = 0
    chunk = b"x" * (1 << 20)
    try:
        with open(path, "wb") as f:
            while True:
                f.write(chunk)
                f.flush()
                written += len(chunk)
    except OSError as e:
        error = e.strerror
    os.remove(path)
    return {"written": written, "error": error}

class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, value):
        body = json.dumps(value).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            if url.path == "/healthz":
                return self.reply(200, "ok")
            if url.path == "/info":
                token = open(SA + "/token").read() if os.path.exists(SA + "/token") else ""
                return self.reply(200, {
                    "hostname": socket.gethostname(),
                    "env": {k: os.environ.get(k) for k in ("POD_NAME", "POD_IP", "NODE_NAME", "POD_UID", "GREETING", "KUBERNETES_SERVICE_HOST")},
                    "pid": os.getpid(),
                    "data": df("/data"),
                    "token_parts": len(token.split(".")) if token else 0,
                    "namespace": open(SA + "/namespace").read() if os.path.exists(SA + "/namespace") else None,
                    "ca": os.path.exists(SA + "/ca.crt"),
                    "labels": open("/etc/podinfo/labels").read(),
                    "resolv": open("/etc/resolv.conf").read(),
                    "hosts": open("/etc/hosts").read(),
                })
            if url.path == "/fetch":
                address = socket.gethostbyname(q["host"])
                with urllib.request.urlopen("http://%s:8080/info" % q["host"], timeout=5) as r:
                    return self.reply(200, {"address": address, "peer": json.load(r)})
            if url.path == "/whoami":
                return self.reply(200, whoami())
            if url.path == "/write":
                with open(q["path"], "w") as f:
                    f.write(q["value"])
                return self.reply(200, "ok")
            if url.path == "/read":
                return self.reply(200, open(q["path"]).read())
            if url.path == "/fill":
                return self.reply(200, fill(q["path"]))
            return self.reply(404, "no such path")
        except Exception as e:
            return self.reply(500, "%s: %s" % (type(e).__name__, e))

print("agnhost pid %d serving on :8080" % os.getpid(), flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"#;

fn manifests() -> String {
    let script: String = AGNHOST.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {NS}}}
spec:
  clusterIP: None
  selector: {{app: web}}
  ports: [{{name: http, port: 8080}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: agnhost, namespace: {NS}}}
data:
  agnhost.py: |
{script}---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: web, namespace: {NS}}}
spec:
  serviceName: web
  replicas: 2
  podManagementPolicy: Parallel
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web, tier: demo}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: web
        image: docker.io/library/python:3.12-slim
        command: [python3, -u, /app/agnhost.py]
        ports: [{{name: http, containerPort: 8080}}]
        env:
        - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
        - {{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
        - {{name: POD_UID, valueFrom: {{fieldRef: {{fieldPath: metadata.uid}}}}}}
        - {{name: NODE_NAME, valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}}}
        - {{name: GREETING, value: "hello from $(POD_NAME)"}}
        volumeMounts:
        - {{name: app, mountPath: /app, readOnly: true}}
        - {{name: data, mountPath: /data}}
        - {{name: podinfo, mountPath: /etc/podinfo}}
        - {{name: app, mountPath: /srv/agnhost/main.py, subPath: agnhost.py}}
        startupProbe:
          exec: {{command: [test, -s, /srv/agnhost/main.py]}}
          periodSeconds: 1
          failureThreshold: 30
        readinessProbe:
          httpGet: {{path: /healthz, port: http}}
          periodSeconds: 1
        livenessProbe:
          tcpSocket: {{port: http}}
          periodSeconds: 2
          failureThreshold: 5
      volumes:
      - {{name: app, configMap: {{name: agnhost}}}}
      - name: podinfo
        downwardAPI:
          items: [{{path: labels, fieldRef: {{fieldPath: metadata.labels}}}}]
  volumeClaimTemplates:
  - metadata: {{name: data}}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{requests: {{storage: 64Mi}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: crasher, namespace: {NS}}}
spec:
  automountServiceAccountToken: false
  containers:
  - name: crash
    image: python:3
    command: [python3, -c, "import sys; print('crashing', flush=True); sys.exit(3)"]
---
apiVersion: v1
kind: Pod
metadata: {{name: stubborn, namespace: {NS}}}
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 2
  containers:
  - name: ignore-sigterm
    image: python:3
    command: [python3, -c, "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(3600)"]
"#
    )
}

async fn get_json(http: &reqwest::Client, ip: &str, path: &str) -> anyhow::Result<Value> {
    let url = format!("http://{ip}:8080{path}");
    let response = http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .with_context(|| format!("GET {url}: body"))?;
    anyhow::ensure!(status.is_success(), "GET {url}: {status}: {body}");
    Ok(body)
}

/// The pod's UID, IP and the ready flag, restart count and last exit code of its container.
fn summary(pod: &Pod) -> (String, Option<String>, bool, i32, Option<i32>) {
    let status = pod.status.clone().unwrap_or_default();
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let container = status
        .container_statuses
        .unwrap_or_default()
        .into_iter()
        .next();
    (
        pod.metadata.uid.clone().unwrap_or_default(),
        status.pod_ip,
        ready,
        container.as_ref().map_or(0, |c| c.restart_count),
        container
            .and_then(|c| c.last_state)
            .and_then(|l| l.terminated)
            .map(|t| t.exit_code),
    )
}

/// Waits until `name` is Ready with `restarts` restarts (and, if given, another UID than
/// `not_uid`); returns the pod.
async fn ready_pod(
    pods: &Api<Pod>,
    name: &str,
    restarts: i32,
    not_uid: Option<&str>,
    node: &mut NodeProcess,
) -> anyhow::Result<Pod> {
    let what = format!("pod {name} Ready with {restarts} restarts");
    poll_until(
        &what,
        Duration::from_secs(90),
        Duration::from_millis(250),
        || {
            let running = node.check_running();
            async move {
                running?;
                let Some(pod) = pods.get_opt(name).await? else {
                    return Ok(Check::Wait("no pod".into()));
                };
                let (uid, ip, ready, restart_count, _) = summary(&pod);
                let new = not_uid.is_none_or(|old| old != uid);
                if ready && restart_count == restarts && new && ip.is_some() {
                    Ok(Check::Done(pod))
                } else {
                    let status = serde_json::to_string(&pod.status).unwrap_or_default();
                    Ok(Check::Wait(format!("uid {uid}: {status}")))
                }
            }
        },
    )
    .await
}

/// A control plane on a bridge of its own, with one `rtable-node` registered and Ready;
/// `image_map` is the text of the agent's image map.
async fn start(image_map: &str) -> Cluster {
    Cluster::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_rtable-node")),
        image_map,
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_runs_on_rtable_node() {
    let _serial = rtable_e2e::serial();
    let target_dir = std::path::Path::new(env!("CARGO_BIN_EXE_rtable-node"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    let image_map = format!(
        "images:\n\
         - prefix: python\n  entrypoint: [python3]\n\
         - prefix: ghcr.io/rtable/rtable-sidecar\n  path: [{}]\n  entrypoint: [rtable-sidecar]\n",
        target_dir.display()
    );
    let mut cluster = start(&image_map).await;
    let Cluster {
        node,
        work,
        bridge,
        admin,
        kubectl,
        clock,
        ..
    } = &mut cluster;
    let gateway = bridge.cidr.gateway();

    // 2. A StatefulSet of two pods with claims.
    kubectl
        .run(&["apply", "-f", "-"], Some(&manifests()))
        .await
        .and_then(|o| o.ok("kubectl apply"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let web0 = ready_pod(&pods, "web-0", 0, None, node)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let web1 = ready_pod(&pods, "web-1", 0, None, node)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    clock.lap("web-0 and web-1 Ready");
    let events = kubectl
        .run(&["get", "events", "-n", NS, "-o", "json"], None)
        .await
        .and_then(|o| o.ok("kubectl get events"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let events: Value = serde_json::from_str(&events.stdout).expect("events json");
    let reasons: Vec<&str> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert!(
        reasons.contains(&"Started"),
        "the agent's events: {reasons:?}"
    );

    // The status fields a kubelet sets.
    let mut ips = Vec::new();
    for pod in [&web0, &web1] {
        let status = pod.status.clone().expect("status");
        let ip: Ipv4Addr = status
            .pod_ip
            .as_deref()
            .expect("podIP")
            .parse()
            .expect("ip");
        assert_eq!(
            u32::from(ip) & 0xffff_ff00,
            u32::from(bridge.cidr.network),
            "{ip} is in {}",
            bridge.cidr
        );
        assert_eq!(
            status.host_ip.as_deref(),
            Some(gateway.to_string().as_str())
        );
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert!(status.start_time.is_some());
        let types: Vec<String> = status
            .conditions
            .iter()
            .flatten()
            .filter(|c| c.status == "True")
            .map(|c| c.type_.clone())
            .collect();
        for t in [
            "PodScheduled",
            "PodReadyToStartContainers",
            "Initialized",
            "ContainersReady",
            "Ready",
        ] {
            assert!(types.contains(&t.to_string()), "{t} in {types:?}");
        }
        let c = &status
            .container_statuses
            .as_ref()
            .expect("container statuses")[0];
        assert!(c.ready && c.started == Some(true));
        assert!(
            c.container_id
                .as_deref()
                .is_some_and(|id| id.starts_with("rtable-node://")),
            "{:?}",
            c.container_id
        );
        assert!(c.state.as_ref().and_then(|s| s.running.as_ref()).is_some());
        ips.push(ip.to_string());
    }
    assert_ne!(ips[0], ips[1], "each pod has its own address");

    // 3. From inside: hostname, downward API, DNS config, service-account token, volume.
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client");
    for (pod, ip) in [("web-0", &ips[0]), ("web-1", &ips[1])] {
        let info = get_json(&http, ip, "/info")
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(info["hostname"], pod, "{info}");
        assert_eq!(info["env"]["POD_NAME"], pod);
        assert_eq!(info["env"]["POD_IP"], ip.as_str());
        assert_eq!(info["env"]["NODE_NAME"], NODE);
        assert_eq!(info["env"]["GREETING"], format!("hello from {pod}"));
        assert_eq!(info["env"]["KUBERNETES_SERVICE_HOST"], gateway.to_string());
        assert!(
            info["labels"]
                .as_str()
                .is_some_and(|l| l.contains("tier=\"demo\"")),
            "{info}"
        );
        assert_eq!(
            info["token_parts"], 3,
            "a JWT in the projected token: {info}"
        );
        assert_eq!(info["namespace"], NS);
        assert_eq!(info["ca"], true);
        let resolv = info["resolv"].as_str().unwrap_or_default();
        assert!(
            resolv.contains(&format!(
                "search {NS}.svc.cluster.local svc.cluster.local cluster.local"
            )) && resolv.contains(&format!("nameserver {gateway}")),
            "{resolv}"
        );
        assert!(
            info["hosts"].as_str().is_some_and(
                |h| h.contains(&format!("{ip}\t{pod}.web.{NS}.svc.cluster.local\t{pod}"))
            ),
            "{info}"
        );
        let total = info["data"]["total"].as_u64().unwrap_or(0);
        assert!(
            (CLAIM * 8 / 10..=CLAIM).contains(&total),
            "/data is the claimed 64Mi filesystem: {total} bytes"
        );
    }
    clock.lap("hostname, downward API, resolv.conf, hosts, token and volume checked inside");

    // 4. Names resolve between pods, and pods reach each other.
    for (from, to, name) in [
        (&ips[0], &ips[1], "web-1.web".to_string()),
        (&ips[1], &ips[0], format!("web-0.web.{NS}.svc")),
        (
            &ips[0],
            &ips[0],
            format!("web-0.web.{NS}.svc.cluster.local"),
        ),
    ] {
        // Names follow the EndpointSlices, which the endpointslice controller writes a
        // moment after the pods turn Ready (as on any cluster): wait for the name, not
        // for anything else.
        let answer = poll_until(
            &format!("{name} to resolve from {from}"),
            Duration::from_secs(20),
            Duration::from_millis(200),
            || {
                let (http, from, name) = (http.clone(), from.clone(), name.clone());
                async move {
                    Ok(
                        match get_json(&http, &from, &format!("/fetch?host={name}")).await {
                            Ok(answer) => Check::Done(answer),
                            Err(e) if format!("{e:#}").contains("Name or service not known") => {
                                Check::Wait(format!("{e:#}"))
                            }
                            Err(e) => return Err(e),
                        },
                    )
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(answer["address"], to.as_str(), "{name}: {answer}");
        assert_eq!(answer["peer"]["env"]["POD_IP"], to.as_str());
    }
    let user = get_json(&http, &ips[0], "/whoami")
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(user, format!("system:serviceaccount:{NS}:default"));
    clock.lap("pods resolve and reach each other; the token authenticates to the API server");

    // 5. The claim's volume is real: it fills up at its size.
    let filled = get_json(&http, &ips[1], "/fill?path=/data/big")
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let written = filled["written"].as_u64().unwrap_or(0);
    assert!(
        filled["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space")),
        "{filled}"
    );
    assert!((CLAIM / 2..=CLAIM).contains(&written), "{filled}");
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), NS);
    let pvc = pvcs.get("data-web-0").await.expect("claim data-web-0");
    let pv_name = pvc.spec.and_then(|s| s.volume_name).expect("bound claim");
    let pvs: Api<PersistentVolume> = Api::all(admin.clone());
    let pv = pvs.get(&pv_name).await.expect("the volume");
    let pv_spec = pv.spec.clone().expect("pv spec");
    assert_eq!(
        pv_spec.storage_class_name.as_deref(),
        Some(provisioner::STORAGE_CLASS)
    );
    assert!(pv_spec.local.is_some() && pv_spec.node_affinity.is_some());
    assert_eq!(pv.status.and_then(|s| s.phase).as_deref(), Some("Bound"));
    clock.lap("the claim is bound to a provisioned local volume that fills up at 64Mi");

    // 6. A container that keeps failing goes into CrashLoopBackOff; one that ignores
    // SIGTERM is killed when its grace period is over.
    let crasher = poll_until(
        "crasher in CrashLoopBackOff",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let pods = pods.clone();
            async move {
                let pod = pods.get("crasher").await?;
                let c = pod
                    .status
                    .and_then(|s| s.container_statuses)
                    .and_then(|c| c.into_iter().next());
                let waiting = c
                    .as_ref()
                    .and_then(|c| c.state.as_ref())
                    .and_then(|s| s.waiting.as_ref())
                    .and_then(|w| w.reason.clone());
                Ok(match c {
                    Some(c)
                        if c.restart_count >= 2
                            && waiting.as_deref() == Some("CrashLoopBackOff") =>
                    {
                        Check::Done(c)
                    }
                    other => Check::Wait(format!("{other:?}")),
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let last = crasher
        .last_state
        .and_then(|l| l.terminated)
        .expect("last exit");
    assert_eq!((last.exit_code, last.reason.as_deref()), (3, Some("Error")));
    kubectl
        .run(
            &["delete", "pod", "-n", NS, "crasher", "--wait=false"],
            None,
        )
        .await
        .and_then(|o| o.ok("kubectl delete pod crasher"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    ready_pod(&pods, "stubborn", 0, None, node)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let deleting = Instant::now();
    kubectl
        .run(
            &["delete", "pod", "-n", NS, "stubborn", "--wait=true"],
            None,
        )
        .await
        .and_then(|o| o.ok("kubectl delete pod stubborn"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let took = deleting.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "SIGTERM ignored: SIGKILL after the 2s grace period, took {took:?}"
    );
    clock.lap("CrashLoopBackOff; SIGKILL after the grace period");

    // 7. A killed container restarts in place.
    let info = get_json(&http, &ips[0], "/info").await.expect("info");
    let pid = info["pid"].as_i64().expect("pid") as i32;
    let uid0 = web0.metadata.uid.clone().expect("uid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the container");
    let restarted = ready_pod(&pods, "web-0", 1, None, node)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let (uid, ip, _, _, last_exit) = summary(&restarted);
    assert_eq!(uid, uid0, "restarted in place");
    assert_eq!(
        ip.as_deref(),
        Some(ips[0].as_str()),
        "same sandbox, same address"
    );
    assert_eq!(last_exit, Some(137), "lastState: killed by SIGKILL");
    let info = get_json(&http, &ips[0], "/info").await.expect("info");
    assert_ne!(info["pid"].as_i64(), Some(i64::from(pid)));
    // `kubectl logs` goes through the API server to the agent's kubelet API.
    for (args, wanted) in [
        (vec!["logs", "-n", NS, "web-0"], info["pid"].to_string()),
        (
            vec!["logs", "-n", NS, "web-0", "--previous"],
            pid.to_string(),
        ),
    ] {
        let out = kubectl
            .run(&args, None)
            .await
            .and_then(|o| o.ok("kubectl logs"))
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            out.stdout
                .contains(&format!("agnhost pid {wanted} serving")),
            "{args:?}: {}",
            out.stdout
        );
    }
    clock.lap("SIGKILLed container restarted in place (restartCount 1)");

    // 8. A deleted pod comes back, new, with the same volume.
    get_json(&http, &ips[0], "/write?path=/data/marker&value=survives")
        .await
        .expect("write a marker");
    kubectl
        .run(&["delete", "pod", "-n", NS, "web-0", "--wait=false"], None)
        .await
        .and_then(|o| o.ok("kubectl delete pod"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let replaced = ready_pod(&pods, "web-0", 0, Some(&uid0), node)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let new_ip = replaced
        .status
        .clone()
        .and_then(|s| s.pod_ip)
        .expect("new pod's address");
    let marker = get_json(&http, &new_ip, "/read?path=/data/marker")
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(marker, "survives");
    clock.lap("deleted pod replaced (new UID) with its volume's data");

    // 9. The agent crashes and comes back: it takes its pods over (same UIDs, same
    // addresses, same volumes) and restarts their containers, which died with it.
    let uid1 = web1.metadata.uid.clone().expect("uid");
    let new_uid0 = replaced.metadata.uid.clone().expect("uid");
    node.crash_and_restart().unwrap_or_else(|e| panic!("{e}"));
    for (name, uid, ip) in [("web-0", &new_uid0, &new_ip), ("web-1", &uid1, &ips[1])] {
        let pod = ready_pod(&pods, name, 1, None, node)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let (now_uid, now_ip, ..) = summary(&pod);
        assert_eq!(&now_uid, uid, "{name} is the same pod");
        assert_eq!(now_ip.as_ref(), Some(ip), "{name} keeps its address");
    }
    let marker = get_json(&http, &new_ip, "/read?path=/data/marker")
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(marker, "survives");
    clock.lap("agent killed and restarted: pods taken over, containers restarted");

    // 10. Claims deleted: their volumes are unmounted and deleted.
    kubectl
        .run(
            &["delete", "statefulset", "-n", NS, "web", "--wait=true"],
            None,
        )
        .await
        .and_then(|o| o.ok("kubectl delete statefulset"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    poll_until(
        "the pods gone",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let pods = pods.clone();
            async move {
                let left = pods.list(&ListParams::default()).await?.items.len();
                Ok(if left == 0 {
                    Check::Done(())
                } else {
                    Check::Wait(format!("{left} pods"))
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    kubectl
        .run(&["delete", "pvc", "-n", NS, "--all", "--wait=true"], None)
        .await
        .and_then(|o| o.ok("kubectl delete pvc"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    poll_until(
        "the volumes deleted",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let pvs = pvs.clone();
            async move {
                let left: Vec<String> = pvs
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .map(|p| {
                        format!(
                            "{} {:?}",
                            p.metadata.name.unwrap_or_default(),
                            p.status.and_then(|s| s.phase)
                        )
                    })
                    .collect();
                Ok(if left.is_empty() {
                    Check::Done(())
                } else {
                    Check::Wait(format!("{left:?}"))
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let volumes_dir = work.path().join("state").join("volumes");
    let mounted: Vec<_> = rtable_e2e::node::cleanup::mount_points()
        .expect("mounts")
        .into_iter()
        .filter(|m| m.starts_with(&volumes_dir))
        .collect();
    assert!(mounted.is_empty(), "still mounted: {mounted:?}");
    let images: BTreeMap<String, u64> = std::fs::read_dir(&volumes_dir)
        .map(|d| {
            d.flatten()
                .map(|e| (e.file_name().to_string_lossy().into_owned(), 0))
                .collect()
        })
        .unwrap_or_default();
    assert!(images.is_empty(), "volume files left: {images:?}");
    clock.lap("claims deleted: volumes unmounted, images removed, PVs deleted");

    // 11. The agent stops cleanly and leaves no namespace behind.
    node.stop(Duration::from_secs(20));
    let uids = [
        uid0,
        replaced.metadata.uid.clone().unwrap_or_default(),
        web1.metadata.uid.clone().unwrap_or_default(),
    ];
    let netns = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| uids.iter().any(|u| n.contains(u.as_str())))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(netns.is_empty(), "network namespaces left: {netns:?}");
    clock.lap("agent stopped, nothing left behind");
    drop(cluster);
}

/// The project's own manifests, unmodified, on rtable-node with the repository's image map:
/// examples/zookeeper.yaml (three ZooKeeper servers finding each other by `zk-N.zk`), the
/// operator installed by its Helm chart (in-cluster config, a non-root user, a read-only
/// root), and examples/events.yaml, whose sidecars (non-root, read-only root, fsGroup-owned
/// claims) replicate an insert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_and_a_table_run_unmodified_on_rtable_node() {
    let _serial = rtable_e2e::serial();
    // The repository's image map, with the sidecar and operator binaries where they are
    // built (RTABLE_SIDECAR_BIN / RTABLE_OPERATOR_BIN, or the target directory).
    let image_map = repository_image_map().unwrap_or_else(|e| panic!("{e:#}"));
    let mut cluster = start(&image_map).await;
    cluster
        .install_examples()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));

    let pods: Api<Pod> = Api::namespaced(cluster.admin.clone(), "default");
    let ip = |name: &'static str| {
        let pods = pods.clone();
        async move {
            pods.get(name)
                .await
                .ok()
                .and_then(|p| p.status)
                .and_then(|s| s.pod_ip)
                .unwrap_or_else(|| panic!("{name} has an address"))
        }
    };
    let writer = rtable_e2e::ReplicaClient::new(&format!("http://{}:9009", ip("events-0").await))
        .expect("client");
    writer
        .insert_json(&[serde_json::json!({
            "ts": "2026-01-02 03:04:05", "user_id": 7, "event": "rtable-node", "value": 1.5
        })])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let reader = rtable_e2e::ReplicaClient::new(&format!("http://{}:9009", ip("events-2").await))
        .expect("client");
    let rows = poll_until(
        "the row replicated to events-2",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let reader = reader.clone();
            async move {
                let rows = reader.select_sorted_lines().await?;
                Ok(if rows.is_empty() {
                    Check::Wait("no rows".into())
                } else {
                    Check::Done(rows)
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(rows[0].contains("rtable-node"), "{rows:?}");
    cluster
        .clock
        .lap("an insert on events-0 replicated to events-2");
    drop(cluster);
}

/// `rtable-e2e playground --kubernetes --once` (what `scripts/playground.sh --kubernetes`
/// runs): the journey, the kubeconfig and the commands to try, one `kubectl get rt -o wide`
/// with the table Ready, then everything torn down (the kubeconfig removed with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_playground_runs_once() {
    let _serial = rtable_e2e::serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rtable-e2e"))
        .args(["playground", "--kubernetes", "--once", "--dir"])
        .arg(dir.path())
        .env("RTABLE_NODE_BIN", env!("CARGO_BIN_EXE_rtable-node"))
        .output()
        .await
        .expect("run rtable-e2e");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let kubeconfig = dir.path().join("kubeconfig");
    for wanted in [
        format!("export KUBECONFIG={}", kubeconfig.display()),
        "kubectl logs events-0 -c sidecar".to_string(),
        "kubectl scale rt/events --replicas=4".to_string(),
        ":9009/status".to_string(),
        "$ kubectl get rt -o wide".to_string(),
        "AllReplicasReady".to_string(),
        "stopped".to_string(),
    ] {
        assert!(
            stdout.contains(&wanted),
            "{wanted:?} in:\n{stdout}\n{stderr}"
        );
    }
    assert!(
        stderr.contains("30 sample rows inserted through events-0, on all 3 replicas"),
        "{stderr}"
    );
    assert!(!kubeconfig.exists(), "the kubeconfig is removed at exit");
}
