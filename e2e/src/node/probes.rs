//! Startup, liveness and readiness probes, and the handlers `preStop` hooks share with them.
//! HTTP and TCP probes go from the node to the pod's address, as a kubelet's do; exec
//! probes run in the container's namespaces through `rtable-node exec`.
//!
//! Timing follows the kubelet: a probe first runs `initialDelaySeconds` after the container
//! started, then every `periodSeconds`, each try bounded by `timeoutSeconds`; liveness and
//! readiness start once the startup probe (if any) has succeeded; thresholds count
//! consecutive results.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, ContainerPort, LifecycleHandler, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Where and how to reach one running container.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    pub pod_ip: Ipv4Addr,
    pub ports: Vec<ContainerPort>,
    /// The agent's binary, the container's main pid and its init spec, for exec handlers.
    pub self_exe: PathBuf,
    pub pid: i32,
    pub spec: PathBuf,
}

/// One action of a probe or lifecycle hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handler {
    Exec(Vec<String>),
    Http {
        scheme: String,
        host: Option<String>,
        port: IntOrString,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: Option<String>,
        port: IntOrString,
    },
    Grpc,
    Sleep(Duration),
}

impl Handler {
    pub fn of_probe(p: &Probe) -> Option<Handler> {
        if let Some(e) = &p.exec {
            return Some(Handler::Exec(e.command.clone().unwrap_or_default()));
        }
        if let Some(h) = &p.http_get {
            return Some(Handler::Http {
                scheme: h.scheme.clone().unwrap_or_else(|| "HTTP".into()),
                host: h.host.clone(),
                port: h.port.clone(),
                path: h.path.clone().unwrap_or_else(|| "/".into()),
                headers: h
                    .http_headers
                    .iter()
                    .flatten()
                    .map(|x| (x.name.clone(), x.value.clone()))
                    .collect(),
            });
        }
        if let Some(t) = &p.tcp_socket {
            return Some(Handler::Tcp {
                host: t.host.clone(),
                port: t.port.clone(),
            });
        }
        p.grpc.as_ref().map(|_| Handler::Grpc)
    }

    pub fn of_hook(h: &LifecycleHandler) -> Option<Handler> {
        if let Some(e) = &h.exec {
            return Some(Handler::Exec(e.command.clone().unwrap_or_default()));
        }
        if let Some(g) = &h.http_get {
            return Some(Handler::Http {
                scheme: g.scheme.clone().unwrap_or_else(|| "HTTP".into()),
                host: g.host.clone(),
                port: g.port.clone(),
                path: g.path.clone().unwrap_or_else(|| "/".into()),
                headers: g
                    .http_headers
                    .iter()
                    .flatten()
                    .map(|x| (x.name.clone(), x.value.clone()))
                    .collect(),
            });
        }
        if let Some(t) = &h.tcp_socket {
            return Some(Handler::Tcp {
                host: t.host.clone(),
                port: t.port.clone(),
            });
        }
        h.sleep
            .as_ref()
            .map(|s| Handler::Sleep(Duration::from_secs(s.seconds.max(0) as u64)))
    }
}

fn port(target: &ProbeTarget, port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(name) => target
            .ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("the container has no port named {name:?}")),
    }
}

/// Runs `handler` once against `target`; `Err` carries the failure's description.
pub async fn run(handler: &Handler, target: &ProbeTarget, timeout: Duration) -> Result<(), String> {
    match handler {
        Handler::Http {
            scheme,
            host,
            port: p,
            path,
            headers,
        } => {
            if !scheme.eq_ignore_ascii_case("HTTP") {
                return Err(format!("{scheme} probes are not supported by rtable-node"));
            }
            let host = host.clone().unwrap_or_else(|| target.pod_ip.to_string());
            let url = format!("http://{host}:{}{path}", port(target, p)?);
            let client = reqwest::Client::builder()
                .timeout(timeout)
                .no_proxy()
                .user_agent("kube-probe/1.35")
                .build()
                .map_err(|e| e.to_string())?;
            let mut request = client.get(&url);
            for (k, v) in headers {
                request = request.header(k, v);
            }
            match request.send().await {
                Ok(r) if (200..400).contains(&r.status().as_u16()) => Ok(()),
                Ok(r) => Err(format!(
                    "HTTP probe failed with statuscode: {}",
                    r.status().as_u16()
                )),
                Err(e) => Err(format!("Get \"{url}\": {e}")),
            }
        }
        Handler::Tcp { host, port: p } => {
            let host = host.clone().unwrap_or_else(|| target.pod_ip.to_string());
            let address = format!("{host}:{}", port(target, p)?);
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&address)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("dial tcp {address}: {e}")),
                Err(_) => Err(format!("dial tcp {address}: i/o timeout")),
            }
        }
        Handler::Exec(command) => {
            let mut child = tokio::process::Command::new(&target.self_exe);
            child
                .arg("exec")
                .arg(format!("--pid={}", target.pid))
                .arg(format!("--spec={}", target.spec.display()))
                .arg("--")
                .args(command)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            match tokio::time::timeout(timeout, child.output()).await {
                Ok(Ok(out)) if out.status.success() => Ok(()),
                Ok(Ok(out)) => {
                    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                    text.push_str(&String::from_utf8_lossy(&out.stderr));
                    Err(format!(
                        "command {command:?} exited with {}: {}",
                        out.status.code().unwrap_or(-1),
                        text.trim()
                    ))
                }
                Ok(Err(e)) => Err(format!("running command {command:?}: {e}")),
                Err(_) => Err(format!(
                    "command {command:?} timed out after {}s",
                    timeout.as_secs_f64()
                )),
            }
        }
        Handler::Grpc => Err("gRPC probes are not supported by rtable-node".into()),
        Handler::Sleep(d) => {
            tokio::time::sleep(*d).await;
            Ok(())
        }
    }
}

/// What the probes of one running container found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeEvent {
    /// The startup probe succeeded (or there is none).
    Started,
    StartupFailed(String),
    Ready(bool),
    /// A failed probe try, for an `Unhealthy` event.
    Unhealthy {
        probe: &'static str,
        message: String,
    },
    LivenessFailed(String),
}

#[derive(Debug, Clone)]
struct Timing {
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
}

fn timing(p: &Probe) -> Timing {
    let secs =
        |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    Timing {
        initial_delay: secs(p.initial_delay_seconds, 0),
        period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
        failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
    }
}

/// Runs the container's probes until a liveness or startup probe fails for good, or the
/// task is aborted (the container exited). Results go to `events`.
pub async fn run_probes(
    container: Container,
    target: ProbeTarget,
    started_at: Instant,
    events: mpsc::UnboundedSender<ProbeEvent>,
) {
    let send = |e: ProbeEvent| {
        let _ = events.send(e);
    };
    if let Some(probe) = &container.startup_probe
        && let Some(handler) = Handler::of_probe(probe)
    {
        let t = timing(probe);
        tokio::time::sleep_until(started_at + t.initial_delay).await;
        let mut failures = 0;
        loop {
            match run(&handler, &target, t.timeout).await {
                Ok(()) => break,
                Err(message) => {
                    failures += 1;
                    send(ProbeEvent::Unhealthy {
                        probe: "Startup",
                        message: message.clone(),
                    });
                    if failures >= t.failure_threshold {
                        send(ProbeEvent::StartupFailed(message));
                        return;
                    }
                }
            }
            tokio::time::sleep(t.period).await;
        }
    }
    send(ProbeEvent::Started);
    let liveness = async {
        let Some(probe) = &container.liveness_probe else {
            return std::future::pending::<()>().await;
        };
        let Some(handler) = Handler::of_probe(probe) else {
            return std::future::pending::<()>().await;
        };
        let t = timing(probe);
        tokio::time::sleep_until(started_at + t.initial_delay).await;
        let mut failures = 0;
        loop {
            match run(&handler, &target, t.timeout).await {
                Ok(()) => failures = 0,
                Err(message) => {
                    failures += 1;
                    send(ProbeEvent::Unhealthy {
                        probe: "Liveness",
                        message: message.clone(),
                    });
                    if failures >= t.failure_threshold {
                        send(ProbeEvent::LivenessFailed(message));
                        return;
                    }
                }
            }
            tokio::time::sleep(t.period).await;
        }
    };
    let readiness = async {
        let Some(probe) = &container.readiness_probe else {
            send(ProbeEvent::Ready(true));
            return std::future::pending::<()>().await;
        };
        let Some(handler) = Handler::of_probe(probe) else {
            send(ProbeEvent::Ready(true));
            return std::future::pending::<()>().await;
        };
        let t = timing(probe);
        tokio::time::sleep_until(started_at + t.initial_delay).await;
        let (mut successes, mut failures, mut ready) = (0, 0, None);
        loop {
            match run(&handler, &target, t.timeout).await {
                Ok(()) => {
                    successes += 1;
                    failures = 0;
                    if successes >= t.success_threshold && ready != Some(true) {
                        ready = Some(true);
                        send(ProbeEvent::Ready(true));
                    }
                }
                Err(message) => {
                    failures += 1;
                    successes = 0;
                    if ready == Some(true) || failures == 1 {
                        send(ProbeEvent::Unhealthy {
                            probe: "Readiness",
                            message,
                        });
                    }
                    if failures >= t.failure_threshold && ready != Some(false) {
                        ready = Some(false);
                        send(ProbeEvent::Ready(false));
                    }
                }
            }
            tokio::time::sleep(t.period).await;
        }
    };
    // Liveness ends the task when it fails for good; readiness never ends by itself.
    tokio::select! {
        () = liveness => {}
        () = readiness => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(ports: Vec<ContainerPort>) -> ProbeTarget {
        ProbeTarget {
            pod_ip: Ipv4Addr::LOCALHOST,
            ports,
            self_exe: PathBuf::from("/nonexistent"),
            pid: 0,
            spec: PathBuf::from("/nonexistent"),
        }
    }

    #[tokio::test]
    async fn tcp_and_http_probes_reach_a_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port_number = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let status = if text.starts_with("GET /ok") {
                    "200 OK"
                } else {
                    "503 Unavailable"
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        let named = vec![ContainerPort {
            name: Some("http".into()),
            container_port: i32::from(port_number),
            ..ContainerPort::default()
        }];
        let t = target(named);
        let http = |path: &str, port| Handler::Http {
            scheme: "HTTP".into(),
            host: None,
            port,
            path: path.into(),
            headers: vec![],
        };
        let timeout = Duration::from_secs(2);
        assert_eq!(
            run(
                &http("/ok", IntOrString::String("http".into())),
                &t,
                timeout
            )
            .await,
            Ok(())
        );
        let failed = run(
            &http("/bad", IntOrString::Int(i32::from(port_number))),
            &t,
            timeout,
        )
        .await;
        assert_eq!(failed, Err("HTTP probe failed with statuscode: 503".into()));
        let tcp = Handler::Tcp {
            host: None,
            port: IntOrString::Int(i32::from(port_number)),
        };
        assert_eq!(run(&tcp, &t, timeout).await, Ok(()));
        let missing = Handler::Tcp {
            host: None,
            port: IntOrString::String("nope".into()),
        };
        assert!(run(&missing, &t, timeout).await.is_err());
    }
}
