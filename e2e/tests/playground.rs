//! Smoke test of `rtable-e2e playground --once`: the README's main command brings up a
//! ZooKeeper ensemble and three replicas, inserts sample rows and prints each replica.

use std::process::Command;

use rtable_e2e::{ports, serial};

#[test]
fn playground_once_prints_every_replica_converged() {
    let _serial = serial();
    if let Err(e) = rtable_e2e::sidecar_proc::sidecar_binary() {
        panic!("{e:#}");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let base = ports::free_block(40).expect("a free port block");
    let out = Command::new(env!("CARGO_BIN_EXE_rtable-e2e"))
        .args(["playground", "--once", "--base-port", &base.to_string()])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .expect("run rtable-e2e playground");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "playground failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("inserted 30 sample rows"), "{stdout}");
    assert!(stdout.contains("3/3 replicas active"), "{stdout}");
    assert!(stdout.contains("curl -s -X POST"), "{stdout}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("events-"))
        .collect();
    assert_eq!(rows.len(), 3, "{stdout}");
    for (i, line) in rows.iter().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[0], format!("events-{i}"), "{line}");
        assert_eq!(fields[1], "true", "active: {line}");
        assert_eq!(fields[4], "0", "queue empty: {line}");
        assert_eq!(fields[7], "30", "all rows on every replica: {line}");
    }
    // Each process ran the operator's rendered pod command: same flags in the same order,
    // values equal except the substituted mount paths and addresses.
    assert!(
        stdout.contains("through the operator's builders"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(rtable_e2e::example_manifest()).expect("manifest");
    let rt: rtable_operator::crd::ReplicatedTable = serde_yaml::from_str(&text).expect("parses");
    let sts = rtable_operator::build::stateful_set(&rt, &Default::default());
    for i in 0..3u32 {
        let (pod_argv, _) = rtable_operator::build::sidecar_command(&sts, i).expect("rendered");
        let ran = std::fs::read_to_string(dir.path().join(format!("events-{i}.cmdline")))
            .expect("cmdline written");
        let ran: Vec<&str> = ran.lines().collect();
        let pod: Vec<&str> = pod_argv.iter().skip(1).map(String::as_str).collect();
        assert_eq!(ran.len(), pod.len(), "{ran:?} vs {pod:?}");
        let substituted = [
            "--table",
            "--data-dir",
            "--listen",
            "--advertise",
            "--interserver-secret-file",
        ];
        for (k, (r, p)) in ran.iter().zip(&pod).enumerate() {
            let flag = if k > 0 { pod[k - 1] } else { "" };
            if !substituted.contains(&flag) {
                assert_eq!(r, p, "argument {k} of events-{i}");
            }
        }
        assert!(ran.contains(&"--replica") && ran.contains(&format!("events-{i}").as_str()));
    }
    // The ZooKeeper and sidecar logs were written where asked, and nothing is left running.
    assert!(dir.path().join("events-0.log").exists());
    assert!(
        dir.path()
            .join("zookeeper")
            .join("zk-1")
            .join("zookeeper.log")
            .exists()
    );
    assert!(
        ports::check_free(base).is_ok(),
        "replica port {base} was released"
    );
}

#[test]
fn playground_names_a_busy_port() {
    let _serial = serial();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = listener.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_rtable-e2e"))
        .args(["playground", "--once", "--base-port", &busy.to_string()])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .expect("run rtable-e2e playground");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("port {busy}")), "{stderr}");
    assert!(stderr.contains("--base-port"), "{stderr}");
}
