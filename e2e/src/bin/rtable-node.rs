//! `rtable-node`: a node agent that runs a Kubernetes node's pods as local processes (see
//! `rtable_e2e::node`).
//!
//! - `rtable-node run --node-name N --kubeconfig K --addons-kubeconfig A --state-dir D
//!   --image-map M [...]`: the agent;
//! - `rtable-node cleanup --state-dir D [--bridge B]`: removes what an agent that is gone
//!   left behind;
//! - `rtable-node init SPEC` and `rtable-node exec --pid P --spec S -- CMD`: the container
//!   init shim and the exec entry the agent itself runs (not for people).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rtable_e2e::node::{NodeConfig, agent, cleanup, init};

#[derive(Debug, Parser)]
#[command(
    name = "rtable-node",
    version,
    about = "Runs a Kubernetes node's pods as local processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Registers the node and runs the pods bound to it.
    Run(Box<NodeConfig>),
    /// Removes the network namespaces, mounts and (optionally) the bridge an agent left.
    Cleanup {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        bridge: Option<String>,
    },
    /// Container init shim (run by the agent).
    #[command(hide = true)]
    Init { spec: PathBuf },
    /// Runs a command inside a running container (run by the agent for exec probes).
    #[command(hide = true)]
    Exec {
        #[arg(long)]
        pid: i32,
        #[arg(long)]
        spec: PathBuf,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        // The shim and exec entry must stay single-threaded: no runtime, no logging setup.
        Command::Init { spec } => init::run_init(&spec),
        Command::Exec { pid, spec, command } => init::run_exec(pid, &spec, &command),
        Command::Cleanup { state_dir, bridge } => {
            match cleanup::clean_state(&state_dir, bridge.as_deref()) {
                Ok(report) => {
                    println!(
                        "removed {} network namespaces, {} mounts{}",
                        report.namespaces,
                        report.mounts,
                        if report.bridge { ", the bridge" } else { "" }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("rtable-node cleanup: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(config) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("rtable-node: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(agent::run(*config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("rtable-node: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
