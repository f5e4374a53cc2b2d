//! A ZooKeeper ensemble that serves clients over TLS only (Netty, `secureClientPort`, PEM
//! stores, client certificates required): sidecars reach it with a CA and a client
//! certificate and replicate end to end; a plain-TCP client and a TLS client without a
//! certificate get no session.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{CONVERGE, rows};
use rtable_e2e::kube::pki::Pki;
use rtable_e2e::poll::{Check, poll_until};
use rtable_e2e::zk_ensemble::{Jit, ServerTls};
use rtable_e2e::{SidecarConfig, SidecarProc, ZkEnsemble, serial};
use rtable_protocol::manifest::ValidatedTable;
use rtable_protocol::tree;
use rtable_protocol::zk_access::{ZkAccess, ZkTls};
use rtable_protocol::zk_acl::{DigestCredentials, TreeAcl};

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_replicate_through_a_tls_only_ensemble() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let pki = Pki::create(&root.join("pki"), &["127.0.0.1".parse().expect("ip")]).expect("pki");
    let client_cert = pki
        .client("rtable-sidecar", &[])
        .expect("client certificate");
    // ZooKeeper's PEM key store is one file: the private key and the certificate chain.
    let key_store = root.join("zookeeper-server.pem");
    std::fs::write(
        &key_store,
        format!("{}{}", read(&pki.serving.key), read(&pki.serving.cert)),
    )
    .expect("write the key store");
    let zk = ZkEnsemble::start_tls(
        1,
        &root.join("zookeeper"),
        Jit::QuickStart,
        ServerTls {
            key_store,
            trust_store: pki.ca_cert.clone(),
            need_client_certificate: true,
        },
    )
    .expect("TLS-only ZooKeeper");
    let connect = zk.connect_string();

    let credentials = "events:pw-of-events";
    let auth = root.join("events-auth");
    std::fs::write(&auth, credentials).expect("write the auth file");
    let env = vec![
        (
            "RTABLE_ZOOKEEPER_TLS_CA_FILE",
            pki.ca_cert.display().to_string(),
        ),
        (
            "RTABLE_ZOOKEEPER_TLS_CERT_FILE",
            client_cert.cert.display().to_string(),
        ),
        (
            "RTABLE_ZOOKEEPER_TLS_KEY_FILE",
            client_cert.key.display().to_string(),
        ),
        ("RTABLE_ZOOKEEPER_AUTH_FILE", auth.display().to_string()),
    ];
    let env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let ports = rtable_e2e::ports::free_ports(2).expect("ports");
    let mut replicas = Vec::new();
    for (i, port) in ports.into_iter().enumerate() {
        let name = format!("events-{i}");
        replicas.push(
            SidecarProc::spawn(SidecarConfig {
                table: rtable_e2e::example_manifest(),
                data_dir: root.join("replicas").join(&name),
                log: root.join(format!("{name}.log")),
                replica: name,
                port,
                zookeeper: connect.clone(),
                session_timeout_ms: 10_000,
                interserver_secret_file: None,
                max_body_bytes: None,
                env: env.clone(),
            })
            .expect("spawn a replica"),
        );
    }
    for r in &mut replicas {
        if let Err(e) = r.wait_ready(Duration::from_secs(60)).await {
            let log = zk.log_path(0).map(|p| rtable_e2e::tail(p, 40));
            panic!("not ready over TLS: {e:#}\nZooKeeper log:\n{log:?}");
        }
    }
    for k in 0..4u64 {
        replicas[(k % 2) as usize]
            .client()
            .insert_json(&rows(k * 10, 10))
            .await
            .expect("insert");
    }
    let lines = poll_until(
        "both replicas hold the 40 rows",
        CONVERGE,
        Duration::from_millis(200),
        || async {
            let a = replicas[0].client().select_sorted_lines().await?;
            let b = replicas[1].client().select_sorted_lines().await?;
            Ok(match a.len() == 40 && a == b {
                true => Check::Done(a),
                false => Check::Wait(format!("{} and {} rows", a.len(), b.len())),
            })
        },
    )
    .await
    .expect("replicated over a TLS-only ensemble");
    assert_eq!(lines.len(), 40);

    // The tree went through TLS with the table's ACL.
    let tls = ZkTls {
        ca_pem: read(&pki.ca_cert),
        client: Some((read(&client_cert.cert), read(&client_cert.key))),
    };
    let owner = ZkAccess {
        credentials: Some(DigestCredentials::parse(credentials).expect("valid")),
        tls: Some(tls.clone()),
        ..ZkAccess::default()
    }
    .connect(&connect, Duration::from_secs(10), Duration::from_secs(5))
    .await
    .expect("a TLS session with a client certificate");
    let table = ValidatedTable::from_file(&rtable_e2e::example_manifest()).expect("manifest");
    let root_acl = owner.get_acl(&table.table_path).await.map(|(acl, _)| acl);
    let expected = TreeAcl::private(
        &DigestCredentials::parse(credentials).expect("valid"),
        false,
    );
    assert!(
        matches!(&root_acl, Ok(acl) if expected.matches(acl)),
        "{root_acl:?}"
    );

    // Plain TCP and TLS without a client certificate get no session.
    let plain = tree::connect(&connect, Duration::from_secs(4), Duration::from_secs(2)).await;
    assert!(plain.is_err(), "a plain-TCP session on a TLS-only port");
    let anonymous = ZkAccess {
        tls: Some(ZkTls {
            client: None,
            ..tls
        }),
        ..ZkAccess::default()
    }
    .connect(&connect, Duration::from_secs(4), Duration::from_secs(2))
    .await;
    assert!(
        anonymous.is_err(),
        "a TLS session without a client certificate"
    );
}
