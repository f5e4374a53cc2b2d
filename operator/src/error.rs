//! The reconcile's errors, with a short label per kind for metrics and logs.

use kube::runtime::finalizer;
use rtable_protocol::tree::TreeError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API {action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot render the table manifest: {0}")]
    Render(#[from] serde_yaml::Error),
    #[error("ZooKeeper: {0}")]
    ZooKeeper(#[from] TreeError),
    #[error("ReplicatedTable has no namespace")]
    NoNamespace,
    #[error("waiting for {0} pods to terminate before removing the ZooKeeper tree")]
    PodsStillRunning(usize),
    /// A Secret `spec.zookeeper.auth` or `spec.zookeeper.tls` names is missing or unusable;
    /// the message names the field.
    #[error("{0}")]
    Auth(String),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    /// Objects the API server refused; each is in the table's status too.
    #[error("the API server refused: {0}")]
    Refused(String),
}

impl Error {
    /// Short label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kubernetes",
            Error::Render(_) => "render",
            Error::ZooKeeper(_) => "zookeeper",
            Error::NoNamespace => "no_namespace",
            Error::PodsStillRunning(_) => "cleanup_waiting",
            Error::Auth(_) => "zookeeper_auth",
            Error::Finalizer(_) => "finalizer",
            Error::Refused(_) => "refused",
        }
    }
}

pub fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}
