//! The rtable operator: the `ReplicatedTable` CRD, pure builders of the Kubernetes objects
//! a table needs, the status maths, and the reconcile loop that applies them.

pub mod apply;
pub mod backend;
pub mod build;
pub mod crd;
pub mod error;
pub mod events;
pub mod guard;
pub mod install;
pub mod leader;
pub mod metrics;
#[cfg(test)]
pub(crate) mod mock;
pub mod reconcile;
pub mod retry;
pub mod scale_down;
pub mod status;
pub mod validate;
pub mod watch;
pub mod zk_secrets;
pub mod zookeeper_address;

/// The Kubernetes types the status is made of (`Condition`, `Time`), re-exported so a
/// caller of [`status::compute`] (the e2e playground) names the very same version.
pub use k8s_openapi;
