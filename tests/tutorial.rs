//! The Swarm tutorial end to end on real agents in the lab, with a real redis-server and curl:
//! a replicated service behind the routing mesh, an encrypted attachable overlay, a standalone
//! task reached by name, scaling, draining, a task restarted by policy, redis moved into a
//! service, a promotion, and `service rm` withdrawing everything it published.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    Lab, TaskRow, dig, eventually, lossy, ps, require_root, running_per_node, task_netns,
    visit as visit_on,
};

/// The N of "visitor number N (from ADDRESS)".
fn count(page: &str) -> Option<u64> {
    page.split("visitor number ").nth(1)?.split(' ').next()?.parse().ok()
}

/// The redis-server flags of the tutorial: no persistence, reachable from other tasks.
const REDIS_FLAGS: [&str; 6] = ["--save", "", "--appendonly", "no", "--protected-mode", "no"];

#[test]
fn the_tutorial_runs_end_to_end() {
    if !require_root("the_tutorial_runs_end_to_end") {
        return;
    }
    let redis = which("redis-server");
    let (Some(redis), true, true) = (redis, which("curl").is_some(), which("dig").is_some()) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server, curl and dig are needed in CI (scripts/install-test-deps.sh)"
        );
        eprintln!("*** SKIPPED tutorial: redis-server, curl or dig missing ***");
        return;
    };
    let lab = Lab::up(3);
    let visit = |lab: &Lab, node: u8| visit_on(lab, node, 8100);
    let shoal = env!("CARGO_BIN_EXE_shoal");

    // init + 2 joins.
    lab.swarm(3);

    // A replicated service on 8100: three running tasks on three nodes, each writing its log
    // into its node's `myhelloworld` volume (mounted on a scratch path, not the seed's /opt, so
    // the test leaves no mountpoint behind).
    let scratch = tempfile::tempdir().unwrap();
    let log_dir = scratch.path().display().to_string();
    assert_eq!(lab.on("node1", &["volume", "create", "myhelloworld"]), "myhelloworld\n");
    let mount = format!("type=volume,src=myhelloworld,dst={log_dir}");
    let out = lab.on(
        "node1",
        &[
            "service",
            "create",
            "--replicas",
            "3",
            "--name",
            "myhelloworld",
            "--mount",
            &mount,
            "-p",
            "8100:8100",
            "--",
            shoal,
            "demo",
            "visitor",
            "--log-dir",
            &log_dir,
        ],
    );
    assert!(out.contains("converged"), "service create did not wait for its tasks: {out}");
    let per_node = running_per_node(&lab, "myhelloworld");
    assert_eq!(per_node.len(), 3, "three tasks on three nodes: {per_node:?}");
    assert!(per_node.values().all(|n| *n == 1), "{per_node:?}");
    let ls = lab.on("node1", &["service", "ls"]);
    assert!(ls.contains("3/3") && ls.contains("*:8100->8100/tcp"), "{ls}");

    // Every node answers on 8100; no redis yet.
    for n in 1..=3 {
        let page = eventually("the mesh on every node", Duration::from_secs(30), || {
            Some(visit(&lab, n)).filter(|p| p.contains("Hello World"))
        });
        assert!(page.contains("connection to redis error"), "node{n}: {page}");
    }

    // The service's output, gathered from all three nodes by the manager. Each agent reads its
    // tasks' output from the files their shims write, a poll (100 ms) behind the task.
    let logs = eventually("the visits in `service logs`", Duration::from_secs(10), || {
        let logs = lab.on("node1", &["service", "logs", "myhelloworld"]);
        logs.contains("GET /visitor: Hello World, connection to redis error").then_some(logs)
    });
    for n in 1..=3 {
        assert!(
            logs.lines()
                .any(|l| l.contains(&format!("@node{n}")) && l.contains("visitor demo listening")),
            "no start line from node{n} in `service logs`:\n{logs}"
        );
    }
    assert!(logs.contains("GET /visitor: Hello World, connection to redis error"), "{logs}");
    // ... and in the app's info.log, in the volume of the node that served each visit.
    let state = shoal::lab::LabState::load(&lab.name).unwrap();
    let mut app_logs = String::new();
    for i in 0..3 {
        app_logs += &std::fs::read_to_string(shoal::lab::demo::info_log(&state, i)).unwrap();
    }
    let lines = app_logs.lines();
    assert_eq!(lines.filter(|l| l.contains("GET /visitor: Hello World")).count(), 3, "{app_logs}");

    // Errors name what is wrong and change nothing.
    let bad = lab.shoal(&[
        "--node", "node1", "service", "create", "--name", "other", "-p", "8100:80", "--", "true",
    ]);
    assert!(!bad.status.success());
    assert!(lossy(&bad.stderr).contains("already in use by service 'myhelloworld'"), "{bad:?}");
    let bad = lab.shoal(&[
        "--node",
        "node1",
        "service",
        "create",
        "--name",
        "x",
        "--network",
        "nope",
        "--",
        "true",
    ]);
    assert!(lossy(&bad.stderr).contains("Error: No such network: nope"), "{bad:?}");

    // The encrypted attachable overlay, the service on it, redis on node3 by name.
    lab.on(
        "node1",
        &["network", "create", "-d", "overlay", "--opt", "encrypted", "--attachable", "my-overlay"],
    );
    lab.on("node1", &["service", "update", "--network-add", "my-overlay", "myhelloworld"]);
    let bad = lab.shoal(&[
        "--node",
        "node3",
        "run",
        "-d",
        "--name",
        "r2",
        "--network",
        "ingress",
        "--",
        "true",
    ]);
    assert!(lossy(&bad.stderr).contains("not manually attachable"), "{bad:?}");
    let redis = redis.display().to_string();
    let run = ["run", "-d", "--name", "myredis", "--network", "my-overlay", "--", &redis];
    lab.on("node3", &[&run[..], &REDIS_FLAGS[..]].concat());
    // The name reaches the other nodes by gossip a moment after `run` returns; once every
    // replica has counted, none of them can answer the error again.
    every_task_counts(&lab, "myhelloworld");
    let first = eventually("a visitor count on every node", Duration::from_secs(60), || {
        let counts: Vec<Option<u64>> = (1..=3).map(|n| count(&visit(&lab, n))).collect();
        counts.iter().all(Option::is_some).then(|| counts[2].unwrap())
    });
    // Then every request counts once, whichever node takes it.
    let mut expect = first;
    for round in 0..2 {
        for n in 1..=3 {
            expect += 1;
            let page = visit(&lab, n);
            assert_eq!(
                count(&page),
                Some(expect),
                "round {round}, node{n}: {page}\n{}\n{}",
                lab.on("node1", &["service", "logs", "myhelloworld"]),
                agent_warnings(&lab)
            );
        }
    }
    // By name from any task: `myredis` on node1 is the standalone task on node3, and
    // `tasks.myhelloworld` lists the three replicas' addresses on the shared network.
    let ps3 = lab.on("node3", &["ps"]);
    let redis_ip = ps3
        .lines()
        .find(|l| l.contains("myredis"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("my-overlay=")))
        .unwrap_or_else(|| panic!("myredis's address in `ps`: {ps3}"))
        .to_owned();
    let web1 = task_netns(&lab, "node1", &task_on(&lab, "myhelloworld", "node1"));
    assert_eq!(dig(&web1, "myredis"), redis_ip);
    assert_eq!(dig(&web1, "tasks.myhelloworld").lines().count(), 3);
    // The overlay really is encrypted between the nodes: WireGuard sessions are up.
    let inspect: serde_json::Value =
        serde_json::from_str(&lab.on("node1", &["network", "inspect", "my-overlay"])).unwrap();
    let inspect = &inspect[0];
    assert_eq!(inspect["network"]["encrypted"], true);
    let peers = inspect["local"]["encrypted_peers"].as_array().expect("peers");
    assert!(peers.iter().any(|p| p["established"] == true), "{inspect}");

    // What an operator sees: /metrics of node1 has the WireGuard peers, the mesh's backends,
    // the tasks and the DNS answers; the visualizer on the manager shows a task on every node.
    let metrics = lab.metrics("node1");
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(value("shoal_overlay_peer_established{") >= 1.0, "{metrics}");
    // The mesh carried the tutorial's requests on the path its port took: the kernel's flows
    // (the default), or the proxy's connections.
    let kernel_flows =
        "shoal_mesh_client_addr_kept_total{service=\"myhelloworld\",path=\"kernel\"}";
    let proxied = "shoal_mesh_backend_connections_total{service=\"myhelloworld\"";
    assert!(value(kernel_flows) + value(proxied) >= 1.0, "{metrics}");
    assert!(value("shoal_tasks{state=\"running\"}") >= 1.0, "{metrics}");
    assert!(metrics.contains("shoal_dns_"), "{metrics}");
    // It is valid OpenMetrics text, and has every family an operator needs.
    let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&metrics)
        .unwrap_or_else(|e| panic!("/metrics does not parse as OpenMetrics: {e:?}\n{metrics}"));
    for family in [
        "shoal_gossip_members",
        "shoal_overlay_peer_established",
        "shoal_overlay_peer_tx_bytes",
        "shoal_dns_queries",
        "shoal_mesh_backend_connections",
        "shoal_mesh_backend_up",
        "shoal_raft_term",
        "shoal_raft_apply_lag",
        "shoal_tasks",
        "shoal_task_starts",
    ] {
        assert!(
            parsed.families.contains_key(family),
            "family {family} missing; have {:?}",
            parsed.families.keys().collect::<Vec<_>>()
        );
    }
    let ui = format!("http://{}:8089/view", lab.addr(1));
    // The page refreshes its view once a second.
    let view = eventually("3 replicas and myredis in the view", Duration::from_secs(20), || {
        let out = Command::new("curl").args(["-s", "-m", "5", &ui]).output().unwrap();
        let view: serde_json::Value = serde_json::from_str(&lossy(&out.stdout)).ok()?;
        let cards = view["nodes"]
            .as_array()?
            .iter()
            .filter_map(|n| n["tasks"].as_array())
            .flatten()
            .filter(|t| t["state"] == "running")
            .count();
        (cards == 4).then_some(view)
    });
    assert_eq!(view["services"][0]["published"][0], "8100:8100/tcp", "{view}");

    // Diagnostics, asked of node3 itself through the manager: its gossip view, WireGuard peers,
    // the forwarding entries it programmed and the names its tasks resolve.
    let pretty = lab.on("node1", &["node", "inspect", "--pretty", "node3"]);
    for want in [
        "Gossip (3 members",
        "WireGuard peers (2)",
        "established",
        "my-overlay (VNI",
        "encrypted",
        "02:42:0a:00:01:",
        "myhelloworld",
        "myredis",
        "Tasks on this node",
    ] {
        assert!(pretty.contains(want), "node inspect --pretty lacks {want:?}:\n{pretty}");
    }

    // Scale to 5: spread 2/2/1.
    lab.on("node1", &["service", "scale", "myhelloworld=5"]);
    let mut spread: Vec<usize> = running_per_node(&lab, "myhelloworld").into_values().collect();
    spread.sort();
    assert_eq!(spread, vec![1, 2, 2]);

    // Drain node1: its tasks move, five still run, node1:8100 still answers.
    lab.on("node1", &["node", "update", "--availability", "drain", "node1"]);
    let moved = eventually("tasks off node1", Duration::from_secs(60), || {
        let m = running_per_node(&lab, "myhelloworld");
        (!m.contains_key("node1") && m.values().sum::<usize>() == 5).then_some(m)
    });
    assert_eq!(moved.values().sum::<usize>(), 5);
    let page = eventually("node1:8100 after the drain", Duration::from_secs(30), || {
        Some(visit(&lab, 1)).filter(|p| count(p).is_some())
    });
    assert!(page.contains("visitor number"), "{page}");
    // The task saw this host's address on the lab bridge, not a node's.
    let host = std::net::Ipv4Addr::from(u32::from(lab.subnet.network()) + 254);
    assert!(page.contains(&format!("(from {host})")), "{page}");
    lab.on("node1", &["node", "update", "--availability", "active", "node1"]);

    // A task that exits is restarted by policy (after the 5 s delay), its slot kept.
    let victim = task_on(&lab, "myhelloworld", "node2");
    let ns = task_netns(&lab, "node2", &victim);
    let pids = lossy(&Command::new("ip").args(["netns", "pids", &ns]).output().unwrap().stdout);
    for pid in pids.split_whitespace() {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
    eventually("the killed task replaced", Duration::from_secs(60), || {
        let out = lab.on("node1", &["service", "ps", "myhelloworld"]);
        let failed = out.lines().any(|l| l.contains(&victim) && l.contains("Failed"));
        let running = running_per_node(&lab, "myhelloworld").values().sum::<usize>();
        (failed && running == 5).then_some(())
    });
    // The ended task's namespace went with it; `service ps` still lists it as Failed.
    eventually("the killed task's namespace deleted", Duration::from_secs(30), || {
        (!std::path::Path::new("/run/netns").join(&ns).exists()).then_some(())
    });

    // Stop the standalone redis and run it as a service instead: counting resumes.
    lab.on("node3", &["stop", "myredis"]);
    eventually("the page to lose redis", Duration::from_secs(30), || {
        Some(()).filter(|_| visit(&lab, 1).contains("connection to redis error"))
    });
    let create =
        ["service", "create", "--name", "myredis", "--network", "my-overlay", "--", &redis];
    lab.on("node1", &[&create[..], &REDIS_FLAGS[..]].concat());
    every_task_counts(&lab, "myhelloworld");
    let c1 = eventually("counting again", Duration::from_secs(60), || count(&visit(&lab, 2)));
    assert_eq!(count(&visit(&lab, 3)), Some(c1 + 1));

    // Promote node2: Reachable.
    lab.on("node1", &["node", "promote", "node2"]);
    eventually("node2 Reachable", Duration::from_secs(60), || {
        lab.on("node1", &["node", "ls"])
            .lines()
            .any(|l| l.contains("node2") && l.contains("Reachable"))
            .then_some(())
    });

    // service rm withdraws its VIP, DNS names, FDB entries and mesh backends everywhere.
    let redis_task = task_on_any(&lab, "myredis");
    let redis_ns = task_netns(&lab, &redis_task.1, &redis_task.0);
    let before = dig(&redis_ns, "tasks.myhelloworld");
    assert_eq!(before.lines().count(), 5, "tasks.myhelloworld: {before}");
    let vip = dig(&redis_ns, "myhelloworld");
    assert!(!vip.is_empty());
    let macs: Vec<String> = before.lines().map(mac_of).collect();
    let t0 = Instant::now();
    lab.on("node1", &["service", "rm", "myhelloworld"]);
    let mut last = String::new();
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_secs(10) {
        let dns = (dig(&redis_ns, "myhelloworld"), dig(&redis_ns, "tasks.myhelloworld"));
        let mesh: Vec<String> = (1..=3).map(|n| visit(&lab, n)).collect();
        let fdb: Vec<String> = (1..=3)
            .flat_map(|n| {
                let fdb = fdb_of(&lab, &format!("node{n}"));
                macs.iter()
                    .filter(|m| fdb.contains(m.as_str()))
                    .map(move |m| format!("node{n}:{m}"))
                    .collect::<Vec<_>>()
            })
            .collect();
        if dns.0.is_empty()
            && dns.1.is_empty()
            && mesh.iter().all(String::is_empty)
            && fdb.is_empty()
        {
            last.clear();
            break;
        }
        last = format!("dns {dns:?}, mesh {mesh:?}, fdb {fdb:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(last.is_empty(), "service rm not withdrawn after 10 s: {last}");
    eprintln!("service rm withdrawn everywhere in {:?}", t0.elapsed());
}

/// The warnings and errors the lab's agents logged, for a failure message.
fn agent_warnings(lab: &Lab) -> String {
    (1..=3)
        .map(|n| {
            let log = format!("/run/shoal/lab/{}/node{n}/agent.log", lab.name);
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let bad: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("\"WARN\"") || l.contains("\"ERROR\""))
                .collect();
            format!("node{n}: {}", bad.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(bin)).find(|p| p.is_file()))
}

/// The id of a running task of `service` on `node`.
fn task_on(lab: &Lab, service: &str, node: &str) -> String {
    let rows = ps(lab, service);
    rows.iter()
        .find(|t| t.node == node && t.desired == "Running" && t.state == "Running")
        .map(|t| t.id.clone())
        .unwrap_or_else(|| panic!("no running {service} task on {node}: {rows:?}"))
}

/// Waits until every running task of `service` counts a visit of its own (asked inside the
/// task's namespace, not through the mesh, which may pick the same task every time).
fn every_task_counts(lab: &Lab, service: &str) {
    let tasks: Vec<TaskRow> = ps(lab, service)
        .into_iter()
        .filter(|t| !t.history && t.desired == "Running" && t.state == "Running")
        .collect();
    assert!(!tasks.is_empty(), "no running {service} task");
    for t in tasks {
        let ns = task_netns(lab, &t.node, &t.id);
        eventually(&format!("{} on {} to count", t.name, t.node), Duration::from_secs(60), || {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "curl", "-s", "-m", "5"])
                .arg("http://127.0.0.1:8100/visitor")
                .output()
                .expect("curl");
            count(&lossy(&out.stdout))
        });
    }
}

/// (task id, node) of a running task of `service`.
fn task_on_any(lab: &Lab, service: &str) -> (String, String) {
    eventually("a running task", Duration::from_secs(30), || {
        ps(lab, service)
            .into_iter()
            .find(|t| t.desired == "Running" && t.state == "Running")
            .map(|t| (t.id, t.node))
    })
}

/// The overlay MAC of an address (02:42 + the IPv4 bytes).
fn mac_of(ip: &str) -> String {
    let ip: std::net::Ipv4Addr = ip.trim().parse().expect("an IPv4 address");
    let o = ip.octets();
    format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// The VXLAN forwarding entries (MAC → remote VTEP) the agent programmed in a node's overlay
/// sandboxes. (Entries the bridge learnt from traffic age out by themselves.)
fn fdb_of(lab: &Lab, node: &str) -> String {
    let list = lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout);
    let prefix = format!("{}-{node}-ov-", lab.name);
    let mut all = String::new();
    for ns in
        list.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with(&prefix))
    {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "bridge", "fdb", "show"])
            .output()
            .unwrap();
        for line in lossy(&out.stdout).lines().filter(|l| l.contains(" dst ")) {
            all.push_str(line);
            all.push('\n');
        }
    }
    all
}
