//! `rtable-node`: a node agent that does a kubelet's job with local processes instead of a
//! container runtime, so the operator and the sidecar run on a real control plane without
//! knowing that no kubelet is there.
//!
//! What a pod gets, and how:
//! - **Identity.** The agent registers its Node and renews `kube-node-lease/<node>` with the
//!   node's own client certificate (`system:node:<node>`), so the Node authorizer and the
//!   NodeRestriction admission plugin limit it exactly as they limit a kubelet
//!   ([`registration`]).
//! - **Network.** Every pod has a network namespace of its own (`ip netns`, named
//!   `rtable-<pod uid>`) joined to a Linux bridge by a veth pair, with an address from the
//!   node's pod CIDR; the bridge's address is the node's InternalIP and the pods' gateway
//!   ([`network`]). There is no kube-proxy: Service ClusterIPs do not route (see [`dns`]).
//! - **Names.** A small authoritative DNS server of the agent listens on the bridge address
//!   and answers the cluster domain from Services and EndpointSlices, the way CoreDNS's
//!   `kubernetes` plugin does; each pod's `/etc/resolv.conf` points at it with the usual
//!   search list and `ndots:5` ([`dns`]). A DNS server rather than per-pod hosts files
//!   because the search list, `ndots`, readiness-dependent answers and names of pods that
//!   appear later all behave as on a real cluster only with a resolver, and every program
//!   (glibc, Go, Java, Rust's own resolvers) reads `resolv.conf`.
//! - **Containers.** Each container is a process started through a small init shim, the
//!   agent's own binary run as `rtable-node init SPEC` ([`init`]): it joins the pod's
//!   network namespace, unshares UTS, IPC and mount namespaces, sets the pod's hostname,
//!   builds a root filesystem and `pivot_root`s into it ([`rootfs`]), drops to the
//!   container's user and execs the command. Doing this in a separate process (rather than
//!   in a `pre_exec` hook between fork and exec) keeps it ordinary, testable Rust with
//!   proper errors, and it is how runc and crun work. The shim execs in place, so the
//!   process the agent supervises is the container's main process ([`container`]).
//! - **Images.** An image is not pulled: a mapping file names, per image-name prefix, the
//!   entrypoint, default arguments, environment and host directories that stand in for the
//!   image's files ([`images`]). The root filesystem is the host's operating-system
//!   directories (`/usr`, `/etc`, `/var`, `/opt`) behind per-container overlays whose upper
//!   layers live in a tmpfs of the container's mount namespace, so a container can write
//!   anywhere (or nowhere, with `readOnlyRootFilesystem`) and never changes the host.
//! - **Volumes.** ConfigMap, Secret, downwardAPI and projected volumes (service-account
//!   tokens from the TokenRequest API, bound to the pod, refreshed before they expire) are
//!   written by an atomic writer with the same `..data` symlink layout a kubelet uses;
//!   emptyDir is a directory (or a tmpfs); a PersistentVolumeClaim resolves to its bound
//!   PersistentVolume's local path ([`volumes`]). The agent also provisions those
//!   PersistentVolumes: loop-mounted ext4 images of the claimed size ([`provisioner`]).
//! - **Status, probes, restarts.** Startup, liveness and readiness probes ([`probes`]),
//!   restarts in place with CrashLoopBackOff ([`container`]), graceful deletion, and the
//!   status fields a kubelet writes ([`status`]), all driven by one worker per pod
//!   ([`pod_worker`]) that the pod watch feeds ([`sync`]).
//!
//! Differences from a kubelet, on purpose: no cgroups (resources are reported, not
//! enforced), no PID namespace (container processes are visible on the host, which lets a
//! test signal them), no image pulls, seccomp and capabilities other than
//! `allowPrivilegeEscalation: false` not applied, a kubelet API that serves only container
//! logs (`kubectl logs` works, `kubectl exec` does not; see [`kubelet_api`]), containers die
//! with the agent.

pub mod agent;
pub mod cleanup;
pub mod config;
pub mod container;
pub mod dns;
pub mod env;
pub mod events;
pub mod images;
pub mod init;
pub mod kubelet_api;
pub mod launch;
pub mod network;
pub mod pod_faults;
pub mod pod_worker;
pub mod probes;
pub mod process;
pub mod provisioner;
pub mod quantity;
pub mod registration;
pub mod rootfs;
pub mod status;
pub mod sync;
pub mod volumes;

pub use config::NodeConfig;

/// The Kubernetes version whose kubelet behaviour the agent follows; reported as the node's
/// kubelet version.
pub const KUBELET_VERSION: &str = "v1.35.4";

/// The runtime reported in `nodeInfo.containerRuntimeVersion` and as the scheme of
/// container IDs.
pub const RUNTIME_NAME: &str = "rtable-node";
