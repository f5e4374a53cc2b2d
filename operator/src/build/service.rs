//! The two Services: a headless one that gives every pod the stable DNS name written into
//! its `host` node, and a client one that spreads inserts and selects over ready replicas.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::{Names, SIDECAR_PORT, SIDECAR_PORT_NAME, owned_meta};
use crate::crd::{ReplicatedTable, selector_labels};

fn port() -> ServicePort {
    ServicePort {
        name: Some(SIDECAR_PORT_NAME.to_string()),
        port: SIDECAR_PORT,
        target_port: Some(IntOrString::String(SIDECAR_PORT_NAME.to_string())),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    }
}

pub fn headless_service(rt: &ReplicatedTable) -> Service {
    Service {
        metadata: owned_meta(rt, &Names::of(rt).headless_service),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            // A replica that is still cloning (not ready) must be resolvable: peers fetch
            // from it and ZooKeeper already lists it under its DNS name.
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&rt.name_any())),
            ports: Some(vec![port()]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

pub fn client_service(rt: &ReplicatedTable) -> Service {
    Service {
        metadata: owned_meta(rt, &Names::of(rt).client_service),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_string()),
            selector: Some(selector_labels(&rt.name_any())),
            ports: Some(vec![port()]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures;

    #[test]
    fn services_match_fixtures() {
        let rt = fixtures::table("table.yaml");
        fixtures::assert_golden("service-headless.yaml", &headless_service(&rt));
        fixtures::assert_golden("service-client.yaml", &client_service(&rt));
    }
}
