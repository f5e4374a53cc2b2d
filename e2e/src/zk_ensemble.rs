//! A real ZooKeeper ensemble (1 or 3 nodes, or any count) on 127.0.0.1, one JVM per node,
//! started from the Debian `zookeeper` package's jar.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::ports;

pub const DEFAULT_JAR: &str = "/usr/share/java/zookeeper.jar";
pub const DEFAULT_SLF4J: &str = "/usr/share/java/slf4j-simple.jar";
const NETTY_TLS_JARS: [&str; 2] = [
    "/usr/share/java/netty-codec.jar",
    "/usr/share/java/netty-resolver.jar",
];

#[derive(Debug, thiserror::Error)]
pub enum PrerequisiteError {
    #[error(
        "ZooKeeper is not installed: {jar} is missing. Install ZooKeeper: scripts/setup.sh (or `apt-get install -y --no-install-recommends zookeeper`)"
    )]
    NoJar { jar: String },
    #[error(
        "Java is not available (`{java} -version` failed: {reason}). Install ZooKeeper: scripts/setup.sh (it needs a Java runtime, e.g. `apt-get install -y default-jre-headless`)"
    )]
    NoJava { java: String, reason: String },
}

/// Ports of one ensemble member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePorts {
    pub client: u16,
    pub peer: u16,
    pub election: u16,
}

#[derive(Debug)]
struct Node {
    id: usize,
    ports: NodePorts,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// How the ZooKeeper JVMs compile: tests want a server that serves within a second or two,
/// a benchmark or a long-running playground one that runs as production servers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jit {
    /// The quick first-tier compiler only: a fast start, more CPU per request after it.
    #[default]
    QuickStart,
    /// The JVM's default tiered compilation, as a production server runs.
    Full,
}

/// A running ensemble. Dropping it SIGKILLs every node.
#[derive(Debug)]
pub struct ZkEnsemble {
    nodes: Vec<Node>,
    java: String,
    classpath: String,
    jit: Jit,
    tls: Option<ServerTls>,
}

/// A TLS-only ensemble: the client port of [`NodePorts`] is a secure client port (Netty)
/// and there is no plain one.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// PEM file holding the server's private key and certificate chain.
    pub key_store: PathBuf,
    /// PEM file of the CA certificates clients' certificates are checked against.
    pub trust_store: PathBuf,
    /// `ssl.clientAuth=need` (else `none`).
    pub need_client_certificate: bool,
}

impl ServerTls {
    fn config(&self, port: u16) -> String {
        format!(
            "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n\
             secureClientPort={port}\nsecureClientPortAddress=127.0.0.1\n\
             ssl.keyStore.location={}\nssl.keyStore.type=PEM\n\
             ssl.trustStore.location={}\nssl.trustStore.type=PEM\n\
             ssl.clientAuth={}\n",
            self.key_store.display(),
            self.trust_store.display(),
            if self.need_client_certificate {
                "need"
            } else {
                "none"
            }
        )
    }
}

/// Checks that Java and the ZooKeeper jar are present; returns (java, classpath).
/// `RTABLE_ZK_JAR` and `RTABLE_JAVA` override the defaults.
pub fn prerequisites() -> Result<(String, String), PrerequisiteError> {
    let jar = std::env::var("RTABLE_ZK_JAR").unwrap_or_else(|_| DEFAULT_JAR.to_string());
    let java = std::env::var("RTABLE_JAVA").unwrap_or_else(|_| "java".to_string());
    check_prerequisites(&jar, &java)
}

/// Checks the given jar and java command; returns (java, classpath).
pub fn check_prerequisites(jar: &str, java: &str) -> Result<(String, String), PrerequisiteError> {
    if !Path::new(jar).exists() {
        return Err(PrerequisiteError::NoJar {
            jar: jar.to_string(),
        });
    }
    let probe = Command::new(java)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let reason = match probe {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!("exit status {s}")),
        Err(e) => Some(e.to_string()),
    };
    if let Some(reason) = reason {
        return Err(PrerequisiteError::NoJava {
            java: java.to_string(),
            reason,
        });
    }
    let mut classpath = jar.to_string();
    if Path::new(DEFAULT_SLF4J).exists() {
        classpath.push(':');
        classpath.push_str(DEFAULT_SLF4J);
    }
    Ok((java.to_string(), classpath))
}

impl ZkEnsemble {
    /// Starts `size` nodes on free ports under `dir` and waits until they serve.
    pub fn start(size: usize, dir: &Path, jit: Jit) -> anyhow::Result<ZkEnsemble> {
        let node_ports = Self::pick_ports(size)?;
        Self::start_with_ports(&node_ports, dir, jit)
    }

    /// Starts `size` nodes that serve clients over TLS only.
    pub fn start_tls(
        size: usize,
        dir: &Path,
        jit: Jit,
        tls: ServerTls,
    ) -> anyhow::Result<ZkEnsemble> {
        let node_ports = Self::pick_ports(size)?;
        Self::start_inner(&node_ports, dir, jit, Some(tls))
    }

    fn pick_ports(size: usize) -> anyhow::Result<Vec<NodePorts>> {
        let all = ports::free_ports(size * 3)?;
        Ok(all
            .chunks(3)
            .map(|c| NodePorts {
                client: c[0],
                peer: c[1],
                election: c[2],
            })
            .collect())
    }

    /// Starts one node per entry of `node_ports` (checked to be free first).
    pub fn start_with_ports(
        node_ports: &[NodePorts],
        dir: &Path,
        jit: Jit,
    ) -> anyhow::Result<ZkEnsemble> {
        Self::start_inner(node_ports, dir, jit, None)
    }

    fn start_inner(
        node_ports: &[NodePorts],
        dir: &Path,
        jit: Jit,
        tls: Option<ServerTls>,
    ) -> anyhow::Result<ZkEnsemble> {
        anyhow::ensure!(
            !node_ports.is_empty(),
            "an ensemble needs at least one node"
        );
        let (java, mut classpath) = prerequisites()?;
        if tls.is_some() {
            // Debian's zookeeper.jar names the Netty jars its plain server needs; its TLS
            // handler also needs the codec and resolver jars of the same package set.
            for jar in NETTY_TLS_JARS {
                anyhow::ensure!(
                    Path::new(jar).exists(),
                    "{jar} is missing: a TLS ZooKeeper needs Netty's codec (apt-get install libnetty-java)"
                );
                classpath.push(':');
                classpath.push_str(jar);
            }
        }
        let flat: Vec<u16> = node_ports
            .iter()
            .flat_map(|p| [p.client, p.peer, p.election])
            .collect();
        ports::check_all_free(&flat)?;
        let standalone = node_ports.len() == 1;
        let servers: String = node_ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("server.{}=127.0.0.1:{}:{}\n", i + 1, p.peer, p.election))
            .collect();
        let mut nodes = Vec::with_capacity(node_ports.len());
        for (i, p) in node_ports.iter().enumerate() {
            let id = i + 1;
            let node_dir = dir.join(format!("zk-{id}"));
            let data_dir = node_dir.join("data");
            fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            fs::write(data_dir.join("myid"), format!("{id}\n"))
                .with_context(|| format!("writing myid in {}", data_dir.display()))?;
            let config = node_dir.join("zoo.cfg");
            let client = match &tls {
                Some(tls) => tls.config(p.client),
                None => format!("clientPort={}\nclientPortAddress=127.0.0.1\n", p.client),
            };
            let mut text = format!(
                "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={}\n{client}\
                 admin.enableServer=false\n4lw.commands.whitelist=*\nextendedTypesEnabled=true\n\
                 minSessionTimeout=1000\nmaxSessionTimeout=60000\nmaxClientCnxns=0\nautopurge.purgeInterval=0\n",
                data_dir.display(),
            );
            if !standalone {
                text.push_str(&servers);
            }
            fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
            nodes.push(Node {
                id,
                ports: *p,
                dir: node_dir.clone(),
                config,
                log: node_dir.join("zookeeper.log"),
                child: None,
            });
        }
        let mut ensemble = ZkEnsemble {
            nodes,
            java,
            classpath,
            jit,
            tls,
        };
        for i in 0..ensemble.nodes.len() {
            ensemble.spawn(i)?;
        }
        ensemble.wait_serving(Duration::from_secs(60))?;
        Ok(ensemble)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self
            .nodes
            .get_mut(i)
            .with_context(|| format!("no ZooKeeper node {i}"))?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(&node.log)
            .with_context(|| format!("opening {}", node.log.display()))?;
        let log_err = log
            .try_clone()
            .with_context(|| format!("duplicating {}", node.log.display()))?;
        let mut command = Command::new(&self.java);
        crate::process::die_with_parent(&mut command);
        command.args(["-Xmx256m", "-Xss512k", "-XX:+UseSerialGC"]);
        if self.jit == Jit::QuickStart {
            command.arg("-XX:TieredStopAtLevel=1");
        }
        let child = command
            .args([
                "-Djava.net.preferIPv4Stack=true",
                "-Dzookeeper.admin.enableServer=false",
                "-Dorg.slf4j.simpleLogger.showDateTime=true",
                "-Dorg.slf4j.simpleLogger.defaultLogLevel=info",
                "-cp",
                &self.classpath,
                "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            ])
            .arg(&node.config)
            .current_dir(&node.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting ZooKeeper node {} ({})", node.id, self.java))?;
        node.child = Some(child);
        Ok(())
    }

    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// `127.0.0.1:p1,127.0.0.1:p2,...`
    pub fn connect_string(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.ports.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn ports(&self, i: usize) -> Option<NodePorts> {
        self.nodes.get(i).map(|n| n.ports)
    }

    pub fn client_port(&self, i: usize) -> Option<u16> {
        self.nodes.get(i).map(|n| n.ports.client)
    }

    pub fn log_path(&self, i: usize) -> Option<&Path> {
        self.nodes.get(i).map(|n| n.log.as_path())
    }

    pub fn log_paths(&self) -> Vec<PathBuf> {
        self.nodes.iter().map(|n| n.log.clone()).collect()
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        match self.nodes.get_mut(i).and_then(|n| n.child.as_mut()) {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends a four-letter-word command to node `i` and returns the answer.
    pub fn four_letter(&self, i: usize, command: &str) -> anyhow::Result<String> {
        let node = self
            .nodes
            .get(i)
            .with_context(|| format!("no ZooKeeper node {i}"))?;
        four_letter(node.ports.client, command)
    }

    /// `srvr`'s `Mode:` (leader, follower, standalone), or `None` while not serving.
    pub fn mode(&self, i: usize) -> Option<String> {
        let answer = self.four_letter(i, "srvr").ok()?;
        answer
            .lines()
            .find_map(|l| l.strip_prefix("Mode: "))
            .map(|m| m.trim().to_string())
    }

    /// Index of the current leader (the standalone node of a 1-node ensemble).
    pub fn leader_index(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|i| {
            matches!(
                self.mode(*i).as_deref(),
                Some("leader") | Some("standalone")
            )
        })
    }

    /// `mntr` of node `i` as key -> value (`zk_packets_received` -> `1234`, ...).
    pub fn mntr(&self, i: usize) -> anyhow::Result<HashMap<String, String>> {
        let text = self.four_letter(i, "mntr")?;
        let map = parse_mntr(&text);
        anyhow::ensure!(
            !map.is_empty(),
            "ZooKeeper node {} answered `mntr` with no fields: {text:?}",
            i + 1
        );
        Ok(map)
    }

    /// Sum of a numeric `mntr` field over the nodes that answer.
    pub fn mntr_sum(&self, key: &str) -> u64 {
        (0..self.nodes.len())
            .filter_map(|i| self.mntr(i).ok())
            .filter_map(|m| m.get(key).and_then(|v| v.parse::<u64>().ok()))
            .sum()
    }

    /// Waits until every running node reports a serving mode and there is one leader.
    pub fn wait_serving(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let mut modes = Vec::new();
            for i in 0..self.nodes.len() {
                if self.nodes[i].child.is_none() {
                    modes.push(None);
                    continue;
                }
                if !self.is_running(i) {
                    let log = &self.nodes[i].log;
                    anyhow::bail!(
                        "ZooKeeper node {} exited during start; its log {} ends with:\n{}",
                        i + 1,
                        log.display(),
                        crate::tail(log, 30)
                    );
                }
                modes.push(match self.tls {
                    Some(_) => self
                        .secure_port_open(i)
                        .then(|| "secure port open".to_string()),
                    None => self.mode(i),
                });
            }
            if self.tls.is_some()
                && modes
                    .iter()
                    .enumerate()
                    .all(|(i, m)| self.nodes[i].child.is_none() || m.is_some())
            {
                return Ok(());
            }
            let running: Vec<&Option<String>> = modes
                .iter()
                .enumerate()
                .filter(|(i, _)| self.nodes[*i].child.is_some())
                .map(|(_, m)| m)
                .collect();
            let leaders = running
                .iter()
                .filter(|m| matches!(m.as_deref(), Some("leader") | Some("standalone")))
                .count();
            if leaders == 1 && running.iter().all(|m| m.is_some()) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                anyhow::bail!(
                    "ZooKeeper ensemble did not form within {}s; modes: {modes:?}; logs under {}",
                    timeout.as_secs(),
                    self.nodes
                        .first()
                        .and_then(|n| n.dir.parent())
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A TLS-only node has no plain port for four-letter words: a bound secure port is
    /// taken as serving (a client retries until the node has joined a quorum).
    fn secure_port_open(&self, i: usize) -> bool {
        let port = self.nodes[i].ports.client;
        TcpStream::connect_timeout(
            &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into(),
            Duration::from_millis(200),
        )
        .is_ok()
    }

    /// SIGKILLs node `i` and reaps it.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self
            .nodes
            .get_mut(i)
            .with_context(|| format!("no ZooKeeper node {i}"))?;
        if let Some(mut child) = node.child.take() {
            child
                .kill()
                .with_context(|| format!("SIGKILL ZooKeeper node {}", node.id))?;
            child
                .wait()
                .with_context(|| format!("reaping ZooKeeper node {}", node.id))?;
        }
        Ok(())
    }

    /// Starts node `i` again with its data directory and waits until it serves.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i)?;
        self.spawn(i)?;
        self.wait_serving(Duration::from_secs(60))
    }

    /// SIGKILLs every node (the ensemble is down until `start_stopped`).
    pub fn kill_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.kill(i)?;
        }
        Ok(())
    }

    /// Starts every node that is not running (keeping its data directory) and waits until
    /// the ensemble serves with one leader.
    pub fn start_stopped(&mut self, timeout: Duration) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            if !self.is_running(i) {
                if let Some(mut child) = self.nodes[i].child.take() {
                    let _ = child.wait();
                }
                self.spawn(i)?;
            }
        }
        self.wait_serving(timeout)
    }

    /// Whether node `i` has a process (running or not yet reaped).
    pub fn is_started(&self, i: usize) -> bool {
        self.nodes.get(i).is_some_and(|n| n.child.is_some())
    }

    /// Stops every node with SIGTERM (SIGKILL after a grace period).
    pub fn shutdown(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = crate::process::terminate(&mut child, Duration::from_secs(5));
            }
        }
    }
}

impl Drop for ZkEnsemble {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Sends a four-letter word to 127.0.0.1:`port` and reads the answer to EOF.
pub fn four_letter(port: u16, command: &str) -> anyhow::Result<String> {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .with_context(|| format!("connecting to ZooKeeper at 127.0.0.1:{port}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .context("setting a read timeout")?;
    stream
        .write_all(command.as_bytes())
        .with_context(|| format!("sending `{command}` to 127.0.0.1:{port}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("reading the answer to `{command}` from 127.0.0.1:{port}"))?;
    Ok(answer)
}

/// Parses `mntr` output: one `key<TAB>value` per line.
pub fn parse_mntr(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mntr_lines_parse() {
        let text = "zk_version\t3.8.0-1, built on 2022\nzk_server_state\tleader\nzk_packets_received\t42\n";
        let m = parse_mntr(text);
        assert_eq!(m.get("zk_server_state").map(String::as_str), Some("leader"));
        assert_eq!(m.get("zk_packets_received").map(String::as_str), Some("42"));
        assert_eq!(m.len(), 3);
    }
}
