//! Services beyond the tutorial, on real agents in the lab: global mode, constraints, pending
//! tasks, restart policy `none`, health checks gating the routing mesh, names outside the cluster
//! forwarded to a real resolver (dnsmasq in a lab node), and a removed task leaving DNS quickly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Lab, Reaper, dig, eventually, lossy, ps, require_root, running_per_node, task_netns, visit,
};

#[test]
fn services_beyond_the_tutorial() {
    if !require_root("services_beyond_the_tutorial") {
        return;
    }
    for bin in ["dig", "curl", "dnsmasq"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            assert!(std::env::var_os("CI").is_none(), "{bin} is needed in CI");
            eprintln!("*** SKIPPED services test: {bin} missing ***");
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
    let lab = Lab::up_with(3, &["--dns-resolv-conf", resolv.to_str().unwrap()]);
    let shoal = env!("CARGO_BIN_EXE_shoal");
    lab.swarm(3);

    // Global: one task on every node.
    lab.on(
        "node1",
        &["service", "create", "--mode", "global", "--name", "g", "--", "sleep", "100000"],
    );
    let g = running_per_node(&lab, "g");
    assert_eq!(g.len(), 3, "{g:?}");
    assert!(g.values().all(|n| *n == 1), "{g:?}");

    // Constraints: only node2 qualifies; a constraint no node meets leaves the task pending.
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "c",
            "--replicas",
            "2",
            "--constraint",
            "node.hostname==node2",
            "--",
            "sleep",
            "100000",
        ],
    );
    assert_eq!(running_per_node(&lab, "c"), BTreeMap::from([("node2".to_owned(), 2)]));
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "-d",
            "--name",
            "nowhere",
            "--constraint",
            "node.labels.zone==mars",
            "--",
            "sleep",
            "1",
        ],
    );
    eventually("a pending task", Duration::from_secs(20), || {
        ps(&lab, "nowhere").iter().any(|t| t.state == "Pending").then_some(())
    });
    // ... which runs once a node gets the label.
    lab.on("node1", &["node", "update", "--label-add", "zone=mars", "node3"]);
    eventually("the pending task placed on node3", Duration::from_secs(20), || {
        ps(&lab, "nowhere").iter().any(|t| t.node == "node3").then_some(())
    });

    // Restart policy none: a task that completes stays complete and is not replaced.
    lab.on(
        "node1",
        &["service", "create", "-d", "--name", "once", "--restart-condition", "none", "--", "true"],
    );
    eventually("the task complete", Duration::from_secs(20), || {
        ps(&lab, "once").iter().any(|t| t.state == "Complete").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let all = lab.on("node1", &["service", "ps", "once"]);
    assert_eq!(all.lines().count(), 2, "one task, never restarted: {all}");

    // Health gating: running but not yet healthy tasks take no traffic through the mesh.
    let ok = dir.path().join("healthy");
    let health = format!("test -e {}", ok.display());
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "-d",
            "--name",
            "web",
            "--replicas",
            "2",
            "-p",
            "8200:8200",
            "--health-cmd",
            &health,
            "--health-interval",
            "500ms",
            "--health-retries",
            "1",
            "--",
            shoal,
            "demo",
            "visitor",
            "--listen",
            "0.0.0.0:8200",
            "--log-dir",
            dir.path().to_str().unwrap(),
        ],
    );
    eventually("web's tasks running", Duration::from_secs(30), || {
        (running_per_node(&lab, "web").values().sum::<usize>() == 2).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    for n in 1..=3 {
        let page = visit(&lab, n, 8200);
        assert!(!page.contains("Hello World"), "node{n} sent traffic to an unhealthy task: {page}");
    }
    std::fs::write(&ok, "").unwrap();
    for n in 1..=3 {
        eventually("web healthy behind the mesh", Duration::from_secs(30), || {
            visit(&lab, n, 8200).contains("Hello World").then_some(())
        });
    }

    // Names outside the cluster go to the configured resolver: dnsmasq on node3.
    let addr3 = lab.addr(3).to_string();
    let dnsmasq = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}-node3", lab.name),
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
        ])
        .args([format!("--listen-address={addr3}"), "--bind-interfaces".into(), "--port=53".into()])
        .args(["--address=/outside.example/198.18.99.99", "--pid-file=", "--user=root"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq");
    let _dnsmasq = Reaper(dnsmasq);
    std::fs::write(&resolv, format!("nameserver {addr3}\n")).unwrap();
    lab.on("node1", &["network", "create", "backend"]);
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "d",
            "--network",
            "backend",
            "--constraint",
            "node.hostname==node1",
            "--",
            "sleep",
            "100000",
        ],
    );
    let id = ps(&lab, "d").into_iter().next().unwrap().id;
    let d_ns = task_netns(&lab, "node1", &id);
    eventually("outside.example forwarded to dnsmasq", Duration::from_secs(30), || {
        (dig(&d_ns, "outside.example") == "198.18.99.99").then_some(())
    });

    // A removed task leaves the answers at once (gossip carries the withdrawal).
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "d2",
            "--replicas",
            "3",
            "--network",
            "backend",
            "--",
            "sleep",
            "100000",
        ],
    );
    eventually("three tasks.d2", Duration::from_secs(20), || {
        (dig(&d_ns, "tasks.d2").lines().count() == 3).then_some(())
    });
    let t0 = Instant::now();
    lab.on("node1", &["service", "scale", "-d", "d2=2"]);
    eventually("two tasks.d2", Duration::from_secs(10), || {
        (dig(&d_ns, "tasks.d2").lines().count() == 2).then_some(())
    });
    let took = t0.elapsed();
    eprintln!("a removed task left the DNS answers in {took:?}");
    assert!(took < Duration::from_secs(2), "a removed task stayed in DNS for {took:?}");

    // The service's VIP on the network is what its name answers; inspect shows it.
    let inspect: serde_json::Value =
        serde_json::from_str(&lab.on("node1", &["service", "inspect", "d2"])).unwrap();
    let vip = inspect[0]["vips"]["backend"].as_str().expect("a VIP on backend").to_owned();
    assert_eq!(dig(&d_ns, "d2"), vip);
    let ls = lab.on("node1", &["network", "ls"]);
    assert!(ls.lines().any(|l| l.contains("backend") && l.contains("overlay")), "{ls}");

    // A network in use is not removed; once its services are gone it is.
    let busy = lab.shoal(&["--node", "node1", "network", "rm", "backend"]);
    assert!(!busy.status.success());
    assert!(lossy(&busy.stderr).contains("in use"), "{busy:?}");
    lab.on("node1", &["service", "rm", "d", "d2"]);
    eventually("backend removable", Duration::from_secs(30), || {
        lab.shoal(&["--node", "node1", "network", "rm", "backend"]).status.success().then_some(())
    });
    assert!(!lab.on("node1", &["network", "ls"]).contains("backend"));
}
