//! The cluster's DNS: an authoritative server for the cluster domain on the bridge
//! address (UDP and TCP port 53), answering from Services and EndpointSlices the way
//! CoreDNS's `kubernetes` plugin does:
//! - `<service>.<ns>.svc.<domain>`: the ready endpoints of a headless Service (all of them
//!   with `publishNotReadyAddresses`, which the EndpointSlice controller marks ready);
//! - `<hostname>.<service>.<ns>.svc.<domain>`: the endpoint with that hostname (a
//!   StatefulSet pod with `hostname` and `subdomain`);
//! - `<a>-<b>-<c>-<d>.<ns>.pod.<domain>`: that address;
//! - `kubernetes.default.svc.<domain>`: the API server's real address.
//!
//! Differences, on purpose: there is no kube-proxy, so a ClusterIP Service's name answers
//! with its ready endpoints' addresses instead of the unroutable ClusterIP (clients reach
//! the target port directly; a Service whose `port` differs from its `targetPort` is not
//! reachable by name); no SRV records; no forwarding (pods have no outside network, so
//! every name outside the cluster domain is NXDOMAIN).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use futures::StreamExt as _;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("binding the DNS server to {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What a name is in the cluster's zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Addresses(Vec<Ipv4Addr>),
    /// The name exists but has no address (a Service without ready endpoints, a zone
    /// apex): NOERROR with no records, so resolvers do not try other names.
    NoData,
    NxDomain,
}

/// The records' sources.
pub trait Directory {
    fn service(&self, namespace: &str, name: &str) -> Option<Arc<Service>>;
    fn endpoint_slices(&self, namespace: &str, service: &str) -> Vec<Arc<EndpointSlice>>;
}

/// Reflector stores of every Service and EndpointSlice.
#[derive(Clone)]
pub struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
}

impl Directory for Stores {
    fn service(&self, namespace: &str, name: &str) -> Option<Arc<Service>> {
        self.services.get(&ObjectRef::new(name).within(namespace))
    }

    fn endpoint_slices(&self, namespace: &str, service: &str) -> Vec<Arc<EndpointSlice>> {
        self.slices.state_filter(|s| {
            s.metadata.namespace.as_deref() == Some(namespace)
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    .map(String::as_str)
                    == Some(service)
        })
    }
}

impl Stores {
    /// Starts watching Services and EndpointSlices (cluster-wide) and waits for the first
    /// lists, so the server never answers NXDOMAIN for lack of data.
    pub async fn start(client: &kube::Client, stop: CancellationToken) -> Stores {
        let (services, services_writer) = reflector::store();
        let (slices, slices_writer) = reflector::store();
        let service_stream = reflector::reflector(
            services_writer,
            watcher(
                Api::<Service>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff();
        let slice_stream = reflector::reflector(
            slices_writer,
            watcher(
                Api::<EndpointSlice>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff();
        tokio::spawn(async move {
            let drive = futures::future::join(
                service_stream.for_each(|e| async move {
                    if let Err(e) = e {
                        warn!(error = %e, "the Service watch failed; retrying");
                    }
                }),
                slice_stream.for_each(|e| async move {
                    if let Err(e) = e {
                        warn!(error = %e, "the EndpointSlice watch failed; retrying");
                    }
                }),
            );
            tokio::select! {
                _ = drive => {}
                () = stop.cancelled() => {}
            }
        });
        let _ = services.wait_until_ready().await;
        let _ = slices.wait_until_ready().await;
        Stores { services, slices }
    }
}

/// The addresses of a Service's endpoints: only ready ones (an unknown readiness counts
/// as ready, as the API defines), filtered by hostname if given.
fn endpoint_addresses(slices: &[Arc<EndpointSlice>], hostname: Option<&str>) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        for endpoint in &slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            let name_matches = hostname.is_none_or(|h| endpoint.hostname.as_deref() == Some(h));
            if !(ready && name_matches) {
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<Ipv4Addr>()
                    && !out.contains(&ip)
                {
                    out.push(ip);
                }
            }
        }
    }
    out.sort();
    out
}

/// Looks `name` up in the cluster zone `domain`.
pub fn resolve(name: &str, domain: &str, api: Option<Ipv4Addr>, dir: &dyn Directory) -> Answer {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let Some(rest) = name.strip_suffix(&domain) else {
        return Answer::NxDomain;
    };
    if !(rest.is_empty() || rest.ends_with('.')) {
        return Answer::NxDomain;
    }
    let labels: Vec<&str> = rest
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
        .collect();
    match labels.as_slice() {
        [] | ["svc"] | ["pod"] | [_, "svc"] | [_, "pod"] => Answer::NoData,
        ["kubernetes", "default", "svc"] if api.is_some() => {
            Answer::Addresses(api.into_iter().collect())
        }
        [service, namespace, "svc"] => match dir.service(namespace, service) {
            None => Answer::NxDomain,
            Some(_) => {
                let addresses = endpoint_addresses(&dir.endpoint_slices(namespace, service), None);
                if addresses.is_empty() {
                    Answer::NoData
                } else {
                    Answer::Addresses(addresses)
                }
            }
        },
        [host, service, namespace, "svc"] => {
            if dir.service(namespace, service).is_none() {
                return Answer::NxDomain;
            }
            let addresses =
                endpoint_addresses(&dir.endpoint_slices(namespace, service), Some(host));
            if addresses.is_empty() {
                Answer::NxDomain
            } else {
                Answer::Addresses(addresses)
            }
        }
        [dashed, _namespace, "pod"] => match dashed.replace('-', ".").parse::<Ipv4Addr>() {
            Ok(ip) => Answer::Addresses(vec![ip]),
            Err(_) => Answer::NxDomain,
        },
        _ => Answer::NxDomain,
    }
}

/// The server's settings.
#[derive(Clone)]
pub struct Zone {
    pub domain: String,
    pub api: Option<Ipv4Addr>,
    pub ttl: u32,
    pub directory: Arc<dyn Directory + Send + Sync>,
}

/// The answer to one request, `None` for a message that is not a query (dropped).
pub fn respond(request: &[u8], zone: &Zone, max_len: usize) -> Option<Vec<u8>> {
    let request = Message::from_vec(request).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.authoritative = true;
    if request.edns.is_some() {
        response.set_edns(Edns::new());
    }
    if request.metadata.op_code != OpCode::Query || request.queries.len() != 1 {
        response.metadata.response_code = ResponseCode::NotImp;
        return response.to_vec().ok();
    }
    let query = request.queries[0].clone();
    let answer = resolve(
        &query.name.to_ascii(),
        &zone.domain,
        zone.api,
        zone.directory.as_ref(),
    );
    debug!(name = %query.name, kind = ?query.query_type, ?answer, "dns query");
    response.add_query(query.clone());
    match answer {
        Answer::NxDomain => response.metadata.response_code = ResponseCode::NXDomain,
        Answer::NoData => {}
        Answer::Addresses(addresses) => {
            if matches!(query.query_type, RecordType::A | RecordType::ANY) {
                for ip in addresses {
                    response.add_answer(Record::from_rdata(
                        query.name.clone(),
                        zone.ttl,
                        RData::A(A(ip)),
                    ));
                }
            }
        }
    }
    let bytes = response.to_vec().ok()?;
    if bytes.len() > max_len {
        return response.truncate().to_vec().ok();
    }
    Some(bytes)
}

/// Serves `zone` on `address` port 53 until `stop`.
pub async fn serve(address: Ipv4Addr, zone: Zone, stop: CancellationToken) -> Result<(), DnsError> {
    let socket_address = SocketAddr::from((address, 53));
    let udp = UdpSocket::bind(socket_address)
        .await
        .map_err(|source| DnsError::Bind {
            address: socket_address,
            source,
        })?;
    let tcp = TcpListener::bind(socket_address)
        .await
        .map_err(|source| DnsError::Bind {
            address: socket_address,
            source,
        })?;
    let udp_zone = zone.clone();
    let udp_task = async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            // 512 bytes without EDNS; with it, answers here stay far below 1232.
            if let Some(answer) = respond(&buf[..n], &udp_zone, 1232)
                && let Err(e) = udp.send_to(&answer, peer).await
            {
                debug!(%peer, error = %e, "dns answer not sent");
            }
        }
    };
    let tcp_task = async move {
        loop {
            let Ok((mut stream, _)) = tcp.accept().await else {
                continue;
            };
            let zone = zone.clone();
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 2];
                    if stream.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if stream.read_exact(&mut message).await.is_err() {
                        return;
                    }
                    let Some(answer) = respond(&message, &zone, usize::from(u16::MAX)) else {
                        return;
                    };
                    let Ok(n) = u16::try_from(answer.len()) else {
                        return;
                    };
                    let sent = async {
                        stream.write_all(&n.to_be_bytes()).await?;
                        stream.write_all(&answer).await
                    };
                    if sent.await.is_err() {
                        return;
                    }
                }
            });
        }
    };
    tokio::select! {
        () = udp_task => {}
        () = tcp_task => {}
        () = stop.cancelled() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    struct Fixed {
        services: Vec<Arc<Service>>,
        slices: Vec<Arc<EndpointSlice>>,
    }

    impl Directory for Fixed {
        fn service(&self, namespace: &str, name: &str) -> Option<Arc<Service>> {
            self.services
                .iter()
                .find(|s| {
                    s.metadata.namespace.as_deref() == Some(namespace)
                        && s.metadata.name.as_deref() == Some(name)
                })
                .cloned()
        }

        fn endpoint_slices(&self, namespace: &str, service: &str) -> Vec<Arc<EndpointSlice>> {
            self.slices
                .iter()
                .filter(|s| {
                    s.metadata.namespace.as_deref() == Some(namespace)
                        && s.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get("kubernetes.io/service-name"))
                            .map(String::as_str)
                            == Some(service)
                })
                .cloned()
                .collect()
        }
    }

    fn endpoint(ip: &str, host: &str, ready: bool) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            hostname: Some(host.into()),
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                ..EndpointConditions::default()
            }),
            ..Endpoint::default()
        }
    }

    fn directory() -> Fixed {
        let service = Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some("web-abc".into()),
                namespace: Some("shop".into()),
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/service-name".into(),
                    "web".into(),
                )])),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: vec![
                endpoint("10.244.0.3", "web-1", true),
                endpoint("10.244.0.2", "web-0", true),
                endpoint("10.244.0.4", "web-2", false),
            ],
            ports: None,
        };
        Fixed {
            services: vec![Arc::new(service)],
            slices: vec![Arc::new(slice)],
        }
    }

    #[test]
    fn names_resolve_like_coredns() {
        let d = directory();
        let api = Some(Ipv4Addr::new(10, 244, 0, 1));
        let r = |n: &str| resolve(n, "cluster.local", api, &d);
        let ip = |s: &str| s.parse::<Ipv4Addr>().expect("ip");
        assert_eq!(
            r("web-0.web.shop.svc.cluster.local."),
            Answer::Addresses(vec![ip("10.244.0.2")])
        );
        assert_eq!(
            r("WEB-1.web.shop.svc.cluster.local"),
            Answer::Addresses(vec![ip("10.244.0.3")])
        );
        assert_eq!(
            r("web.shop.svc.cluster.local"),
            Answer::Addresses(vec![ip("10.244.0.2"), ip("10.244.0.3")]),
            "only ready endpoints"
        );
        assert_eq!(
            r("web-2.web.shop.svc.cluster.local"),
            Answer::NxDomain,
            "not ready"
        );
        assert_eq!(r("web.other.svc.cluster.local"), Answer::NxDomain);
        assert_eq!(
            r("kubernetes.default.svc.cluster.local"),
            Answer::Addresses(vec![ip("10.244.0.1")])
        );
        assert_eq!(
            r("10-244-0-9.shop.pod.cluster.local"),
            Answer::Addresses(vec![ip("10.244.0.9")])
        );
        assert_eq!(r("shop.svc.cluster.local"), Answer::NoData);
        assert_eq!(r("web-0.web.cluster.local"), Answer::NxDomain);
        assert_eq!(r("example.com"), Answer::NxDomain);
        assert_eq!(r("xcluster.local"), Answer::NxDomain);
    }

    #[test]
    fn wire_answers() {
        let zone = Zone {
            domain: "cluster.local".into(),
            api: None,
            ttl: 5,
            directory: Arc::new(directory()),
        };
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::from_ascii("web-0.web.shop.svc.cluster.local.").expect("name"),
            RecordType::A,
        ));
        let bytes = respond(&query.to_vec().expect("encode"), &zone, 512).expect("answer");
        let answer = Message::from_vec(&bytes).expect("decode");
        assert_eq!(answer.metadata.id, query.metadata.id);
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(answer.metadata.authoritative);
        assert_eq!(answer.answers.len(), 1);
        assert_eq!(
            answer.answers[0].data,
            RData::A(A(Ipv4Addr::new(10, 244, 0, 2)))
        );

        let mut aaaa = Message::query();
        aaaa.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::from_ascii("web-0.web.shop.svc.cluster.local.").expect("name"),
            RecordType::AAAA,
        ));
        let answer = Message::from_vec(
            &respond(&aaaa.to_vec().expect("encode"), &zone, 512).expect("answer"),
        )
        .expect("decode");
        assert_eq!(
            answer.metadata.response_code,
            ResponseCode::NoError,
            "NODATA, not NXDOMAIN"
        );
        assert!(answer.answers.is_empty());

        let mut missing = Message::query();
        missing.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::from_ascii("nope.shop.svc.cluster.local.").expect("name"),
            RecordType::A,
        ));
        let answer = Message::from_vec(
            &respond(&missing.to_vec().expect("encode"), &zone, 512).expect("answer"),
        )
        .expect("decode");
        assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    }
}
