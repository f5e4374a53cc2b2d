//! The rtable operator: the `ReplicatedTable` CRD, pure builders of the Kubernetes objects
//! a table needs, the status maths, and the reconcile loop that applies them.

pub mod crd;
