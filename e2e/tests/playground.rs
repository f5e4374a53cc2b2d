//! Smoke test of `rtable-e2e playground --once`: the README's main command brings up a
//! ZooKeeper ensemble and three replicas, inserts sample rows and prints the table as
//! `kubectl get rt -o wide` would, each replica, and the operator's conditions.

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
    assert!(stdout.contains("curl -s -X POST"), "{stdout}");
    let text = std::fs::read_to_string(rtable_e2e::example_manifest()).expect("manifest");
    let rt: rtable_operator::crd::ReplicatedTable = serde_yaml::from_str(&text).expect("parses");
    let table = rtable_operator::validate::validate(&rt).expect("valid");
    let lines: Vec<&str> = stdout.lines().collect();
    let after = |header: &str| -> Vec<&str> {
        let at = lines
            .iter()
            .position(|l| l.starts_with(header))
            .unwrap_or_else(|| panic!("no `{header}` table:\n{stdout}"));
        lines[at + 1..]
            .iter()
            .take_while(|l| !l.is_empty())
            .copied()
            .collect()
    };

    // `kubectl get rt -o wide`: the CRD's printer columns, every priority.
    let wide = after("$ kubectl get rt -o wide");
    assert_eq!(wide.len(), 2, "{stdout}");
    let header: Vec<&str> = wide[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "REPLICAS", "ACTIVE", "READY", "MAX", "DELAY", "AGE", "QUORUM", "STATUS",
            "PATH"
        ],
        "{stdout}"
    );
    let row: Vec<&str> = wide[1].split_whitespace().collect();
    assert_eq!(row.len(), 9, "{stdout}");
    let quorum = rt.spec.quorum().to_string();
    assert_eq!(
        [
            row[0], row[1], row[2], row[3], row[4], row[6], row[7], row[8]
        ],
        [
            "events",
            "3",
            "3",
            "3",
            "0",
            quorum.as_str(),
            "AllReplicasReady",
            table.table_path.as_str()
        ],
        "name, replicas, active, ready, max delay, quorum, status, path: {stdout}"
    );
    let age = row[5].strip_suffix('s').and_then(|s| s.parse::<u64>().ok());
    assert!(age.is_some_and(|a| a < 119), "age in seconds: {}", row[5]);

    // One line per replica: active (the sidecar's replica_is_active), not lost, the same
    // log pointer, empty queue, no delay, every row.
    let replicas = after("REPLICA ");
    assert_eq!(replicas.len(), 3, "{stdout}");
    let mut pointers = Vec::new();
    for (i, line) in replicas.iter().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 9, "no REASON on a healthy replica: {line}");
        assert_eq!(f[0], format!("events-{i}"), "{line}");
        assert_eq!((f[1], f[2]), ("true", "false"), "active, not lost: {line}");
        let pointer: u64 = f[3].parse().expect("a log pointer");
        assert!(pointer >= 3, "pulled the 3 inserts' log entries: {line}");
        pointers.push(pointer);
        assert_eq!(
            (f[4], f[5], f[6]),
            ("0", "0", "0s"),
            "queue, inserts, delay: {line}"
        );
        let parts: u32 = f[7].parse().expect("a part count");
        // 3 inserts into 2 monthly partitions: at most 6 parts, fewer once merges ran.
        assert!((2..=6).contains(&parts), "parts: {line}");
        assert_eq!(f[8], "30", "all rows on every replica: {line}");
    }
    assert!(pointers.windows(2).all(|w| w[0] == w[1]), "{pointers:?}");

    // The conditions, computed by the operator's status code.
    let conditions: Vec<Vec<&str>> = after("CONDITION ")
        .iter()
        .map(|l| {
            // Three one-word columns, then the message (which has spaces).
            let mut f: Vec<&str> = l.split_whitespace().take(3).collect();
            let rest = f.iter().fold(*l, |rest, w| {
                rest.trim_start().strip_prefix(w).unwrap_or(rest)
            });
            f.push(rest.trim());
            f
        })
        .collect();
    assert_eq!(
        conditions,
        [
            vec![
                "Ready",
                "True",
                "AllReplicasReady",
                "3 of 3 replicas active and in sync"
            ],
            vec![
                "Available",
                "True",
                "QuorumActive",
                &format!("3 of 3 replicas active, insert quorum {quorum}")
            ],
            vec![
                "Progressing",
                "False",
                "Stable",
                "the StatefulSet matches the spec"
            ],
            vec!["Degraded", "False", "AsExpected", "no problem found"],
        ],
        "{stdout}"
    );
    // Each process ran the operator's rendered pod command: same flags in the same order,
    // values equal except the substituted mount paths and addresses.
    assert!(
        stdout.contains("through the operator's builders"),
        "{stdout}"
    );
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
