//! `kubectl` and `helm` as a user runs them, against the control plane's kubeconfig: the
//! scenarios assert what these commands print, since that is what a user reads.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context as _;

/// What a command printed and how it ended.
#[derive(Debug, Clone)]
pub struct Output {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The output if the command succeeded, else an error with everything it said.
    pub fn ok(self, what: &str) -> anyhow::Result<Output> {
        anyhow::ensure!(
            self.success,
            "{what} failed:\n{}\n{}",
            self.stdout,
            self.stderr
        );
        Ok(self)
    }
}

/// Runs a Kubernetes CLI (`kubectl` or `helm`) with `KUBECONFIG` set.
#[derive(Debug, Clone)]
pub struct Cli {
    program: PathBuf,
    kubeconfig: PathBuf,
}

impl Cli {
    pub fn new(program: &Path, kubeconfig: &Path) -> Cli {
        Cli {
            program: program.to_path_buf(),
            kubeconfig: kubeconfig.to_path_buf(),
        }
    }

    /// Runs with `args`, feeding `stdin` if given; a failure to start is an error, a
    /// non-zero exit is an `Output` with `success: false`.
    pub async fn run(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Output> {
        let (program, kubeconfig) = (self.program.clone(), self.kubeconfig.clone());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let stdin = stdin.map(str::to_string);
        tokio::task::spawn_blocking(move || run(&program, &kubeconfig, &args, stdin.as_deref()))
            .await
            .context("a CLI call panicked")?
    }
}

fn run(
    program: &Path,
    kubeconfig: &Path,
    args: &[String],
    stdin: Option<&str>,
) -> anyhow::Result<Output> {
    let shown = format!("{} {}", program.display(), args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        // helm keeps its caches and repositories here; never the user's home.
        .env("HELM_CACHE_HOME", kubeconfig.with_file_name("helm-cache"))
        .env("HELM_CONFIG_HOME", kubeconfig.with_file_name("helm-config"))
        .env("HELM_DATA_HOME", kubeconfig.with_file_name("helm-data"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("writing to {shown}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {shown}"))?;
    Ok(Output {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
