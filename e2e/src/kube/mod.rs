//! A real Kubernetes control plane for the operator's scenarios: binaries built from their
//! Go module sources, certificates of its own, the processes, and the CLIs a user runs.

pub mod binaries;
pub mod control_plane;
pub mod daemon;
pub mod kubectl;
pub mod node_cluster;
pub mod pki;
pub mod playground;
pub mod shared;
pub mod shared_node;

pub use control_plane::{ControlPlane, ControlPlaneOptions};
pub use kubectl::Cli;
pub use shared::Shared;
