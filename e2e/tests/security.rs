//! The HTTP security of real sidecars on a real ZooKeeper: users and roles on the client
//! listener, the interserver listener apart from it with its secret, TLS on both with
//! mutual TLS for peers, and a certificate rotated on disk while serving.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{CONVERGE, january_rows as rows};
use rtable_e2e::client::Credentials;
use rtable_e2e::poll::{Check, poll_until};
use rtable_e2e::security::{ClusterSecurity, TestCa, TestUser, client_config, served_certificate};
use rtable_e2e::{Cluster, ClusterOptions, ReplicaClient, serial};
use rtable_protocol::host::HostInfo;

const SECRET: &str = "peer-secret-7f3a";

fn basic(u: &TestUser) -> Option<Credentials> {
    Some(Credentials::Basic {
        user: u.name.clone(),
        password: u.password.clone(),
    })
}

async fn host_of(c: &Cluster, replica: &str) -> HostInfo {
    let zk = c.zk_client().await.expect("zookeeper");
    let (data, _) = zk
        .get_data(&c.paths().replica(replica).host())
        .await
        .expect("host node");
    HostInfo::parse(std::str::from_utf8(&data).expect("utf-8")).expect("host node parses")
}

/// `r` is a refusal with `status` whose message says `message`.
fn refused(r: &rtable_e2e::Response, status: u16, message: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert!(r.text().contains(message), "{}", r.text());
}

/// The log entries of the table, as text.
async fn log_entries(c: &Cluster) -> Vec<String> {
    let zk = c.zk_client().await.expect("zookeeper");
    let log = c.paths().log();
    let mut names = zk.list_children(&log).await.expect("log");
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let (data, _) = zk.get_data(&format!("{log}/{n}")).await.expect("entry");
        out.push(String::from_utf8_lossy(&data).into_owned());
    }
    out
}

#[tokio::test]
async fn a_reader_cannot_insert_a_writer_cannot_drop_and_refused_requests_commit_nothing() {
    let _serial = serial();
    let reader = TestUser::new("reader", "reader");
    let writer = TestUser::new("writer", "writer").with_token();
    let admin = TestUser::new("admin", "admin");
    let security = ClusterSecurity {
        users: vec![reader.clone(), writer.clone(), admin.clone()],
        split_listeners: true,
        ..ClusterSecurity::default()
    };
    let mut c = Cluster::start(ClusterOptions {
        replicas: 2,
        interserver_secret: Some(SECRET.to_string()),
        security: Some(security),
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let base = c.client(0).clone();
    let anonymous = base.as_user(None);
    let body = rtable_e2e::client::json_lines(&rows(0, 3));

    // Nobody: 401 with the challenges and what is needed.
    let r = anonymous
        .insert_raw("JSONEachRow", body.clone(), None)
        .await
        .expect("answer");
    refused(
        &r,
        401,
        "POST /insert needs a user with role writer or above",
    );
    let challenges = anonymous.challenges("/select").await.expect("answer");
    assert!(
        challenges
            .iter()
            .any(|c| c.starts_with("Basic realm=\"rtable\"")),
        "{challenges:?}"
    );
    assert!(
        challenges.iter().any(|c| c.starts_with("Bearer")),
        "{challenges:?}"
    );
    // A wrong password: 401, without saying whether the user exists.
    let wrong = base.as_user(Some(Credentials::Basic {
        user: "writer".into(),
        password: "guess".into(),
    }));
    let r = wrong
        .insert_raw("JSONEachRow", body.clone(), None)
        .await
        .expect("answer");
    refused(&r, 401, "credentials were not accepted");
    // A reader: 403 naming both roles.
    let as_reader = base.as_user(basic(&reader));
    let r = as_reader
        .insert_raw("JSONEachRow", body.clone(), None)
        .await
        .expect("answer");
    refused(
        &r,
        403,
        "POST /insert needs role writer or above; user `reader` has role reader",
    );
    // A writer inserts, with its password and with its token.
    let as_writer = base.as_user(basic(&writer));
    as_writer
        .insert("JSONEachRow", body.clone(), None)
        .await
        .expect("writer inserts");
    let with_token = base.as_user(Some(Credentials::Bearer(
        writer.token.clone().expect("token"),
    )));
    with_token
        .insert_json(&rows(3, 2))
        .await
        .expect("writer inserts with its token");
    // ...but cannot drop a partition.
    let r = as_writer
        .post("/drop_partition?partition=202501")
        .await
        .expect("answer");
    refused(
        &r,
        403,
        "POST /drop_partition needs role admin or above; user `writer` has role writer",
    );
    // Reads need a reader; the probes and /metrics stay open.
    assert_eq!(anonymous.get("/select").await.expect("answer").status, 401);
    assert_eq!(anonymous.get("/status").await.expect("answer").status, 401);
    assert_eq!(as_reader.get("/select").await.expect("answer").status, 200);
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            anonymous.get(open).await.expect("answer").status,
            200,
            "{open}"
        );
    }

    // Exactly the two accepted inserts (one partition each) reached the log: nothing
    // refused was committed.
    let lines = c.wait_converged(CONVERGE).await.expect("converged");
    assert_eq!(lines.len(), 5, "{lines:?}");
    let entries = log_entries(&c).await;
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(entries.iter().all(|e| e.contains("\nget\n")), "{entries:?}");

    // The host node names the interserver listener; clients are told the client port.
    let host = host_of(&c, "events-0").await;
    let client_port = c.replicas[0].cfg.port;
    assert_ne!(host.port, client_port);
    assert_eq!(host.tcp_port, client_port);
    assert_eq!(host.scheme, "http");
    // Each listener serves only its own endpoints.
    let part = as_writer
        .insert_json(&rows(100, 1))
        .await
        .expect("insert")
        .parts
        .remove(0);
    let interserver = base.at(&format!("http://127.0.0.1:{}", host.port));
    assert_eq!(
        base.get_part(&part, Some(SECRET))
            .await
            .expect("answer")
            .status,
        404
    );
    assert_eq!(
        interserver.get("/select").await.expect("answer").status,
        404
    );
    let r = interserver
        .insert_raw("JSONEachRow", body.clone(), None)
        .await
        .expect("answer");
    assert_eq!(r.status, 404, "{}", r.text());
    // A peer with the wrong secret fetches nothing; the right one fetches the part.
    let r = interserver
        .get_part(&part, Some("not-the-secret"))
        .await
        .expect("answer");
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.body.len() < 300, "a refusal carries no part data");
    let r = interserver
        .get_part(&part, Some(SECRET))
        .await
        .expect("answer");
    assert_eq!(r.status, 200, "{}", r.text());

    // The admin may drop the partition.
    let as_admin = base.as_user(basic(&admin));
    let r = as_admin
        .post("/drop_partition?partition=202501")
        .await
        .expect("answer");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The HTTPS base URL of a local port.
fn https(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

#[tokio::test]
async fn replication_runs_over_tls_and_untrusted_peers_fetch_nothing() {
    let _serial = serial();
    let ca = Arc::new(TestCa::new("rtable test CA").expect("CA"));
    let foreign = Arc::new(TestCa::new("someone else's CA").expect("CA"));
    let admin = TestUser::new("admin", "admin");
    let security = ClusterSecurity {
        users: vec![admin.clone()],
        split_listeners: true,
        tls: Some(ca.clone()),
        interserver_mtls: true,
        foreign: Some((foreign.clone(), vec![2])),
        ..ClusterSecurity::default()
    };
    let c = Cluster::start(ClusterOptions {
        replicas: 3,
        interserver_secret: Some(SECRET.to_string()),
        security: Some(security),
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");

    // Replication end to end over TLS.
    let answer = c
        .client(0)
        .insert_json(&rows(0, 4))
        .await
        .expect("insert over https");
    let part = answer.parts[0].clone();
    let replica1 = c.client(1).clone();
    poll_until(
        "replica 1 to fetch the rows over TLS",
        CONVERGE,
        Duration::from_millis(200),
        || {
            let client = replica1.clone();
            async move {
                let lines = client.select_sorted_lines().await?;
                Ok(if lines.len() == 4 {
                    Check::Done(())
                } else {
                    Check::Wait(format!("{} rows", lines.len()))
                })
            }
        },
    )
    .await
    .expect("replicated over TLS");
    let host = host_of(&c, "events-0").await;
    assert_eq!(host.scheme, "https");

    // Plain HTTP gets no answer on a TLS listener.
    let plain = ReplicaClient::new(&format!("http://127.0.0.1:{}", c.replicas[0].cfg.port))
        .expect("client");
    if let Ok(r) = plain.get("/healthz").await {
        assert_ne!(r.status, 200, "plain HTTP was served: {}", r.text());
    }

    // The replica with a foreign CA fetches nothing: it trusts no peer and no peer trusts it.
    let stranger = c.client(2).clone();
    poll_until(
        "the stranger's fetch to fail",
        CONVERGE,
        Duration::from_millis(200),
        || {
            let client = stranger.clone();
            async move {
                let queue = client.queue().await?;
                Ok(match queue.iter().find(|e| e.num_tries > 0) {
                    Some(e) => Check::Done(e.clone()),
                    None => Check::Wait(format!("{queue:?}")),
                })
            }
        },
    )
    .await
    .expect("the stranger tried");
    assert!(
        stranger
            .select_sorted_lines()
            .await
            .expect("select")
            .is_empty()
    );

    // Against replica 0's interserver listener directly (mutual TLS on).
    let interserver = https(host.port);
    let mine = ca.leaf("peer", 7).expect("leaf");
    let peer = |trust: &TestCa, identity| {
        ReplicaClient::with_tls(
            &interserver,
            Some(client_config(&trust.cert_pem, identity).expect("tls")),
        )
        .expect("client")
    };
    let r = peer(&ca, Some(&mine))
        .get_part(&part, Some(SECRET))
        .await
        .expect("a trusted peer is answered");
    assert_eq!(r.status, 200, "{}", r.text());
    // Without a client certificate: no handshake, no part.
    let refused = peer(&ca, None).get_part(&part, Some(SECRET)).await;
    assert!(
        refused.is_err() || refused.as_ref().is_ok_and(|r| r.status != 200),
        "{refused:?}"
    );
    // The wrong secret with a good certificate: 401.
    let r = peer(&ca, Some(&mine))
        .get_part(&part, Some("wrong"))
        .await
        .expect("answer");
    assert_eq!(r.status, 401, "{}", r.text());
    // A peer of another CA: no handshake either way.
    let theirs = foreign.leaf("intruder", 9).expect("leaf");
    let refused = peer(&foreign, Some(&theirs))
        .get_part(&part, Some(SECRET))
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let refused = peer(&ca, Some(&theirs)).get_part(&part, Some(SECRET)).await;
    assert!(
        refused.is_err() || refused.as_ref().is_ok_and(|r| r.status != 200),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let _serial = serial();
    let ca = Arc::new(TestCa::new("rtable test CA").expect("CA"));
    let admin = TestUser::new("admin", "admin");
    let mut c = Cluster::start(ClusterOptions {
        replicas: 1,
        security: Some(ClusterSecurity {
            users: vec![admin],
            tls: Some(ca.clone()),
            reload_ms: Some(200),
            ..ClusterSecurity::default()
        }),
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let address = format!("127.0.0.1:{}", c.replicas[0].cfg.port);
    let pid = c.replicas[0].pid();
    let first = served_certificate(&address, &ca.cert_pem)
        .await
        .expect("served");

    let rotated = ca.leaf("events-0", 4242).expect("leaf");
    assert_ne!(first, rotated.cert_der);
    ca.write_tls_dir(&c.dir().join("tls").join("events-0"), &rotated)
        .expect("rotate");
    let ca_pem = ca.cert_pem.clone();
    let expected = rotated.cert_der.clone();
    poll_until(
        "the rotated certificate to be served",
        CONVERGE,
        Duration::from_millis(100),
        || {
            let (address, ca_pem, expected) = (address.clone(), ca_pem.clone(), expected.clone());
            async move {
                let served = served_certificate(&address, &ca_pem).await?;
                Ok(if served == expected {
                    Check::Done(())
                } else {
                    Check::Wait("the old certificate".into())
                })
            }
        },
    )
    .await
    .expect("rotated certificate served");
    assert_eq!(c.replicas[0].pid(), pid, "the same process serves it");
    assert!(c.replicas[0].is_running());
    c.client(0)
        .insert_json(&rows(0, 2))
        .await
        .expect("insert after the rotation");
}
