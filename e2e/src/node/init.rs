//! The container init shim: the agent's own binary run as `rtable-node init SPEC`. It turns
//! itself into the container's main process: it joins the pod's network namespace,
//! unshares UTS, IPC and mount namespaces, sets the pod's hostname, builds and enters the
//! root filesystem (`rootfs`), takes the container's user and groups, and execs the
//! command. A failure before the exec is written to the spec's error file and ends the
//! shim with status 128, which the agent reports as a `StartError`, as container runtimes
//! do.
//!
//! `rtable-node exec --pid PID --spec SPEC -- CMD...` enters a running container's
//! namespaces (and so its root) the same way, for exec probes and `preStop` hooks.
//!
//! Both run before any thread exists: `unshare(CLONE_NEWNS)` and `setns` into a mount
//! namespace require a single-threaded process.

use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Pid, Uid};
use serde::{Deserialize, Serialize};

use super::images::DEFAULT_PATH;
use super::rootfs::{self, MountSpec, RootfsSpec};

/// Exit status of a shim that failed before exec.
pub const START_ERROR_EXIT: i32 = 128;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub no_new_privs: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InitSpec {
    /// `<namespace>/<pod>/<container>`, for messages.
    pub name: String,
    /// The agent: the shim exits if it is gone, and dies with it.
    pub parent_pid: i32,
    /// The pod's network namespace (`None`: the host's, for `hostNetwork` pods).
    pub netns: Option<PathBuf>,
    pub hostname: String,
    pub rootfs: RootfsSpec,
    pub mounts: Vec<MountSpec>,
    pub process: ProcessSpec,
    /// Where a failure before exec is described.
    pub error_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("reading the container spec {path}: {source}")]
    ReadSpec {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing the container spec {path}: {source}")]
    ParseSpec {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{step}: {source}")]
    Sys {
        step: String,
        #[source]
        source: nix::Error,
    },
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("building the root filesystem: {0}")]
    Rootfs(#[from] rootfs::RootfsError),
    #[error("no command specified")]
    NoCommand,
    #[error("`{0}` contains a NUL byte")]
    Nul(String),
    #[error("exec: \"{name}\": executable file not found in $PATH ({path})")]
    NotFound { name: String, path: String },
    #[error("exec {path}: {source}")]
    Exec {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("the node agent (pid {0}) is gone")]
    Orphaned(i32),
}

fn sys<T>(step: impl Into<String>, r: nix::Result<T>) -> Result<T, InitError> {
    r.map_err(|source| InitError::Sys {
        step: step.into(),
        source,
    })
}

fn read_spec(path: &Path) -> Result<InitSpec, InitError> {
    let bytes = std::fs::read(path).map_err(|source| InitError::ReadSpec {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| InitError::ParseSpec {
        path: path.to_path_buf(),
        source,
    })
}

/// Dies with the agent. Set again after changing credentials, which clears it.
fn die_with(parent: i32) -> Result<(), InitError> {
    sys(
        "setting the parent-death signal",
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL),
    )?;
    if nix::unistd::getppid() != Pid::from_raw(parent) {
        return Err(InitError::Orphaned(parent));
    }
    Ok(())
}

fn set_credentials(p: &ProcessSpec) -> Result<(), InitError> {
    let groups: Vec<Gid> = p.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    sys("setgroups", nix::unistd::setgroups(&groups))?;
    sys(
        format!("setgid {}", p.gid),
        nix::unistd::setgid(Gid::from_raw(p.gid)),
    )?;
    sys(
        format!("setuid {}", p.uid),
        nix::unistd::setuid(Uid::from_raw(p.uid)),
    )?;
    if p.no_new_privs {
        sys("setting no_new_privs", nix::sys::prctl::set_no_new_privs())?;
    }
    Ok(())
}

fn cstring(s: &str) -> Result<CString, InitError> {
    CString::new(s).map_err(|_| InitError::Nul(s.to_string()))
}

/// `argv[0]` as a path: as written if it has a `/`, else the first executable file of
/// that name on the container's PATH (looked up in the container's root, after the pivot).
fn lookup(argv0: &str, env: &[(String, String)]) -> Result<String, InitError> {
    if argv0.contains('/') {
        return Ok(argv0.to_string());
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = format!("{dir}/{argv0}");
        let is_file = std::fs::metadata(&candidate).is_ok_and(|m| m.is_file());
        if is_file
            && nix::unistd::access(candidate.as_str(), nix::unistd::AccessFlags::X_OK).is_ok()
        {
            return Ok(candidate);
        }
    }
    Err(InitError::NotFound {
        name: argv0.to_string(),
        path: path.to_string(),
    })
}

fn exec(p: &ProcessSpec) -> Result<Infallible, InitError> {
    let argv0 = p.argv.first().ok_or(InitError::NoCommand)?;
    let program = lookup(argv0, &p.env)?;
    let argv = p
        .argv
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<Vec<_>, _>>()?;
    let env = p
        .env
        .iter()
        .map(|(k, v)| cstring(&format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let path = cstring(&program)?;
    nix::unistd::execve(&path, &argv, &env).map_err(|source| InitError::Exec {
        path: program,
        source,
    })
}

fn init(spec: &InitSpec) -> Result<Infallible, InitError> {
    die_with(spec.parent_pid)?;
    // Its own session and process group: the agent signals the whole group.
    sys("setsid", nix::unistd::setsid())?;
    if let Some(netns) = &spec.netns {
        let fd = open(netns)?;
        sys(
            format!("joining the network namespace {}", netns.display()),
            nix::sched::setns(fd, CloneFlags::CLONE_NEWNET),
        )?;
    }
    sys(
        "unsharing the mount, UTS and IPC namespaces",
        nix::sched::unshare(
            CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC,
        ),
    )?;
    sys(
        format!("setting the hostname {}", spec.hostname),
        nix::unistd::sethostname(&spec.hostname),
    )?;
    rootfs::enter(&spec.rootfs, &spec.mounts, &spec.process.cwd)?;
    sys(
        format!("entering the working directory {}", spec.process.cwd),
        nix::unistd::chdir(spec.process.cwd.as_str()),
    )?;
    set_credentials(&spec.process)?;
    die_with(spec.parent_pid)?;
    exec(&spec.process)
}

fn open(path: &Path) -> Result<OwnedFd, InitError> {
    std::fs::File::open(path)
        .map(OwnedFd::from)
        .map_err(|source| InitError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// `rtable-node init SPEC`: never returns; on failure the reason goes to stderr (the
/// container's log) and the spec's error file, and the exit status is 128.
pub fn run_init(spec_path: &Path) -> ! {
    let spec = match read_spec(spec_path) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("rtable-node init: {e}");
            std::process::exit(START_ERROR_EXIT);
        }
    };
    // Opened before anything changes the root: after the pivot its path is not visible.
    // It closes on exec (the descriptor is close-on-exec), empty.
    let error_file = std::fs::File::create(&spec.error_file);
    let Err(e) = init(&spec);
    let message = e.to_string();
    eprintln!("rtable-node init ({}): {message}", spec.name);
    if let Ok(mut file) = error_file {
        use std::io::Write as _;
        let _ = file.write_all(message.as_bytes());
    }
    std::process::exit(START_ERROR_EXIT)
}

fn enter_running(pid: i32, spec: &InitSpec, argv: &[String]) -> Result<Infallible, InitError> {
    die_with(spec.parent_pid)?;
    // Open every namespace before entering any: after the mount namespace, /proc is the
    // container's.
    let namespaces = [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ];
    let mut fds = Vec::new();
    for (name, flag) in namespaces {
        fds.push((
            name,
            flag,
            open(&PathBuf::from(format!("/proc/{pid}/ns/{name}")))?,
        ));
    }
    for (name, flag, fd) in fds {
        sys(
            format!("joining the {name} namespace of pid {pid}"),
            nix::sched::setns(fd, flag),
        )?;
    }
    let cwd = if nix::unistd::chdir(spec.process.cwd.as_str()).is_ok() {
        spec.process.cwd.clone()
    } else {
        "/".to_string()
    };
    sys(
        "entering the working directory",
        nix::unistd::chdir(cwd.as_str()),
    )?;
    set_credentials(&spec.process)?;
    die_with(spec.parent_pid)?;
    let process = ProcessSpec {
        argv: argv.to_vec(),
        ..spec.process.clone()
    };
    exec(&process)
}

/// `rtable-node exec --pid PID --spec SPEC -- CMD...`: runs CMD in the container whose
/// main process is PID, with the container's environment and user. Never returns.
pub fn run_exec(pid: i32, spec_path: &Path, argv: &[String]) -> ! {
    let result = read_spec(spec_path).and_then(|spec| enter_running(pid, &spec, argv));
    let Err(e) = result;
    eprintln!("rtable-node exec: {e}");
    std::process::exit(126)
}
