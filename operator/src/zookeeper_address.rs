//! How the operator names a table's ZooKeeper ensemble.
//!
//! `spec.zookeeper.nodes` is written from the table's pods' point of view: a short name such
//! as `zk-0.zk:2181` (pod `zk-0` of the headless Service `zk`) or `zk:2181` resolves through
//! the pods' DNS search path, whose first entry is `<table namespace>.svc.<cluster domain>`.
//! The operator runs in its own namespace, where the same short name resolves against *its*
//! namespace, so it cannot find the ensemble. Before connecting itself, the operator therefore
//! tries the name the pods try first, `<host>.<table namespace>.svc.<cluster domain>`, and
//! uses it when it exists; otherwise the name is used as written, which also covers the
//! documented `<service>.<namespace>` form (`zk.infra:2181`), resolved by the operator's own
//! search path exactly as by the pods'. The sidecars keep the names as written.
//!
//! Pure: the DNS answer is passed in, so every form is a unit test.

use std::collections::HashSet;
use std::net::IpAddr;

use crate::crd::ZooKeeperConfig;

/// The namespace-qualified name of `host` as a pod of `namespace` resolves it first, when
/// `host` is a short name that the search path would qualify: one or two DNS labels
/// (`zk`, `zk-0.zk`), not an IP address, not `localhost`, not absolute (`zk.`) and not
/// already under `svc` or the cluster domain. `None` means: use `host` as written.
pub fn namespaced_candidate(host: &str, namespace: &str, cluster_domain: &str) -> Option<String> {
    let domain = cluster_domain.trim_matches('.');
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty()
        || host.contains(':')
        || bare.parse::<IpAddr>().is_ok()
        || host.eq_ignore_ascii_case("localhost")
        || host.ends_with('.')
        || host.split('.').any(|label| label == "svc")
        || (!domain.is_empty() && (host == domain || host.ends_with(&format!(".{domain}"))))
        || host.split('.').count() > 2
    {
        return None;
    }
    let mut name = format!("{host}.{namespace}.svc");
    if !domain.is_empty() {
        name.push('.');
        name.push_str(domain);
    }
    Some(name)
}

/// `host:port` split at the last colon (IPv6 literals come bracketed).
fn split_host_port(node: &str) -> (&str, Option<&str>) {
    match node.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => (h, Some(p)),
        _ => (node, None),
    }
}

/// Every `(candidate, port)` whose existence decides how a node is named: ask DNS about
/// these, then hand the ones that exist to [`connect_string`].
pub fn candidates(
    zookeeper: &ZooKeeperConfig,
    namespace: &str,
    cluster_domain: &str,
) -> Vec<(String, u16)> {
    zookeeper
        .nodes
        .iter()
        .filter_map(|node| {
            let (host, port) = split_host_port(node);
            let port = port.and_then(|p| p.parse::<u16>().ok()).unwrap_or(2181);
            namespaced_candidate(host, namespace, cluster_domain).map(|c| (c, port))
        })
        .collect()
}

/// The connect string the operator uses: every node whose namespaced candidate exists
/// (`resolved`) is replaced by it, the others are kept as written; the chroot follows.
pub fn connect_string(
    zookeeper: &ZooKeeperConfig,
    namespace: &str,
    cluster_domain: &str,
    resolved: &HashSet<String>,
) -> String {
    let mut s = zookeeper
        .nodes
        .iter()
        .map(|node| {
            let (host, port) = split_host_port(node);
            match namespaced_candidate(host, namespace, cluster_domain) {
                Some(c) if resolved.contains(&c) => match port {
                    Some(p) => format!("{c}:{p}"),
                    None => c,
                },
                _ => node.clone(),
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    if let Some(root) = &zookeeper.root {
        s.push_str(root);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zk(nodes: &[&str], root: Option<&str>) -> ZooKeeperConfig {
        ZooKeeperConfig {
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            root: root.map(str::to_string),
            session_timeout_seconds: 30,
            auth: None,
            tls: None,
        }
    }

    #[test]
    fn short_names_are_qualified_with_the_table_namespace() {
        let c = |h: &str| namespaced_candidate(h, "analytics", "cluster.local");
        assert_eq!(
            c("zk-0.zk").as_deref(),
            Some("zk-0.zk.analytics.svc.cluster.local")
        );
        assert_eq!(c("zk").as_deref(), Some("zk.analytics.svc.cluster.local"));
        // `<service>.<namespace>` has two labels too: a candidate, kept if it does not exist.
        assert_eq!(
            c("zk.infra").as_deref(),
            Some("zk.infra.analytics.svc.cluster.local")
        );
        // A custom cluster domain, and none at all.
        assert_eq!(
            namespaced_candidate("zk-0.zk", "ns", "k8s.example.").as_deref(),
            Some("zk-0.zk.ns.svc.k8s.example")
        );
        assert_eq!(
            namespaced_candidate("zk-0.zk", "ns", "").as_deref(),
            Some("zk-0.zk.ns.svc")
        );
    }

    #[test]
    fn qualified_addresses_and_literals_are_kept() {
        for host in [
            "zk-0.zk.default.svc",
            "zk-0.zk.default.svc.cluster.local",
            "zk.infra.svc",
            "zk.cluster.local",
            "zk-0.zk.zookeeper",
            "zookeeper.example.com",
            "zk-0.zk.",
            "127.0.0.1",
            "[::1]",
            "::1",
            "localhost",
            "LOCALHOST",
            "",
        ] {
            assert_eq!(
                namespaced_candidate(host, "analytics", "cluster.local"),
                None,
                "{host}"
            );
        }
    }

    #[test]
    fn the_connect_string_uses_the_candidates_that_exist() {
        let spec = zk(
            &[
                "zk-0.zk:2181",
                "zk.infra:2182",
                "10.0.0.7:2181",
                "zk-2.zk.default.svc:2181",
            ],
            Some("/rtable"),
        );
        assert_eq!(
            candidates(&spec, "analytics", "cluster.local"),
            vec![
                ("zk-0.zk.analytics.svc.cluster.local".to_string(), 2181),
                ("zk.infra.analytics.svc.cluster.local".to_string(), 2182),
            ]
        );
        let resolved = HashSet::from(["zk-0.zk.analytics.svc.cluster.local".to_string()]);
        assert_eq!(
            connect_string(&spec, "analytics", "cluster.local", &resolved),
            "zk-0.zk.analytics.svc.cluster.local:2181,zk.infra:2182,10.0.0.7:2181,zk-2.zk.default.svc:2181/rtable"
        );
        // Nothing resolves (the operator runs outside the cluster): the names as written.
        assert_eq!(
            connect_string(&spec, "analytics", "cluster.local", &HashSet::new()),
            "zk-0.zk:2181,zk.infra:2182,10.0.0.7:2181,zk-2.zk.default.svc:2181/rtable"
        );
    }

    /// The example a newcomer applies names its ensemble so that the operator, in another
    /// namespace, reaches it without relying on the qualification above.
    #[test]
    fn the_example_names_its_ensemble_from_any_namespace() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/events.yaml");
        let text = std::fs::read_to_string(path).expect("readable");
        let rt: crate::crd::ReplicatedTable = serde_yaml::from_str(&text).expect("parses");
        for node in &rt.spec.zookeeper.nodes {
            let (host, _) = split_host_port(node);
            assert!(
                host.split('.').any(|l| l == "svc")
                    && namespaced_candidate(host, "rtable-system", "cluster.local").is_none(),
                "{node} only resolves in the table's namespace"
            );
        }
    }

    #[test]
    fn ipv6_literals_with_ports_are_kept() {
        let spec = zk(&["[fd00::1]:2181"], None);
        assert!(candidates(&spec, "ns", "cluster.local").is_empty());
        assert_eq!(
            connect_string(&spec, "ns", "cluster.local", &HashSet::new()),
            "[fd00::1]:2181"
        );
    }
}
