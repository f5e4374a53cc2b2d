//! The playground's pods, rendered by the operator's own builders: the StatefulSet's
//! sidecar command and environment, the ConfigMap's table file, with only what cannot
//! exist on one machine replaced (cluster DNS, mount paths, the ensemble address). The
//! substitutions are listed, so the difference between a pod and a local process is
//! exactly what they say.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use rtable_operator::build::{
    self, BuildConfig, CONFIG_DIR, DATA_DIR, INTERSERVER_KEY, TABLE_KEY, config_map,
    sidecar_command, stateful_set,
};
use rtable_operator::crd::ReplicatedTable;

/// One pod as a local process.
#[derive(Debug, Clone)]
pub struct RenderedPod {
    pub name: String,
    pub port: u16,
    pub data_dir: PathBuf,
    /// Arguments after the binary, as the pod runs them but for the substitutions.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// What the rendering replaced, for the playground to print.
#[derive(Debug, Default)]
pub struct Rendering {
    pub pods: Vec<RenderedPod>,
    pub substitutions: Vec<String>,
}

/// Renders `replicas` pods of the manifest at `manifest` into local processes under `dir`
/// listening on `ports[i]`, talking to the ensemble at `zookeeper`.
pub fn render(
    manifest: &Path,
    replicas: u32,
    ports: &[u16],
    zookeeper: &str,
    dir: &Path,
) -> anyhow::Result<Rendering> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("reading {}", manifest.display()))?;
    let mut rt: ReplicatedTable = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not a ReplicatedTable", manifest.display()))?;
    if rt.metadata.namespace.is_none() {
        rt.metadata.namespace = Some("default".to_string());
    }
    rt.spec.replicas = i32::try_from(replicas).context("too many replicas")?;
    let table_manifest = rtable_operator::validate::manifest(&rt)
        .map_err(|e| anyhow::anyhow!("{}: {e}", manifest.display()))?;
    // The file the pod reads is the ConfigMap's, not the user's manifest.
    let cm = config_map(&rt, &table_manifest).context("rendering the ConfigMap")?;
    let table_text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(TABLE_KEY))
        .context("the ConfigMap has no table file")?;
    let table_file = dir.join(format!("configmap-{TABLE_KEY}"));
    std::fs::write(&table_file, table_text)
        .with_context(|| format!("writing {}", table_file.display()))?;
    let secret_file = dir.join("interserver-secret");
    std::fs::write(&secret_file, build::new_interserver_secret())
        .with_context(|| format!("writing {}", secret_file.display()))?;

    let sts = stateful_set(&rt, &BuildConfig::default());
    let pod_table = format!("{CONFIG_DIR}/{TABLE_KEY}");
    let pod_secret = format!("{CONFIG_DIR}/secret/{INTERSERVER_KEY}");
    let mut rendering = Rendering::default();
    rendering.substitutions.push(format!(
        "--table {pod_table} (ConfigMap) -> {}",
        table_file.display()
    ));
    rendering.substitutions.push(format!(
        "--interserver-secret-file {pod_secret} (Secret) -> {} (a fresh secret)",
        secret_file.display()
    ));
    rendering.substitutions.push(format!(
        "--data-dir {DATA_DIR} (PVC) -> {}/replicas/<pod>",
        dir.display()
    ));
    rendering.substitutions.push(
        "--listen 0.0.0.0:9009 and --advertise <pod>.<headless service> -> 127.0.0.1:<port>".into(),
    );
    rendering.substitutions.push(format!(
        "ZooKeeper {} -> RTABLE_ZOOKEEPER={zookeeper}",
        rt.spec.connect_string()
    ));
    for ordinal in 0..replicas {
        let port = *ports
            .get(ordinal as usize)
            .with_context(|| format!("no port for replica {ordinal}"))?;
        let (argv, mut env) = sidecar_command(&sts, ordinal)
            .map_err(|e| anyhow::anyhow!("rendering pod {ordinal}: {e}"))?;
        let name = env
            .iter()
            .find(|(k, _)| k == "POD_NAME")
            .map(|(_, v)| v.clone())
            .context("the sidecar has no POD_NAME")?;
        let data_dir = dir.join("replicas").join(&name);
        let local = format!("127.0.0.1:{port}");
        let mut args: Vec<String> = argv.into_iter().skip(1).collect();
        let mut i = 0;
        while i + 1 < args.len() {
            let replacement = match args[i].as_str() {
                "--table" if args[i + 1] == pod_table => Some(table_file.display().to_string()),
                "--interserver-secret-file" if args[i + 1] == pod_secret => {
                    Some(secret_file.display().to_string())
                }
                "--data-dir" if args[i + 1] == DATA_DIR => Some(data_dir.display().to_string()),
                "--listen" | "--advertise" => Some(local.clone()),
                _ => None,
            };
            if let Some(value) = replacement {
                args[i + 1] = value;
                i += 2;
            } else {
                i += 1;
            }
        }
        env.retain(|(k, _)| k != "RTABLE_ZOOKEEPER");
        env.push(("RTABLE_ZOOKEEPER".to_string(), zookeeper.to_string()));
        rendering.pods.push(RenderedPod {
            name,
            port,
            data_dir,
            args,
            env,
        });
    }
    Ok(rendering)
}
