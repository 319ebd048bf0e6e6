//! Restarting a node's agent keeps its workloads (Docker's live-restore): a clean stop, a
//! `kill -9` and an upgrade to a binary at another path. Through all three, requests through
//! the other nodes' published ports never fail, the node's tasks keep their ids and processes,
//! its own published port answers within 2 s of its agent starting, and DNS answers inside its
//! task. Root only (a 3-node lab).

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Lab, Load, curl, eventually, lossy, ps, require_root, shoal_at, task_netns};
use shoal_netns::NetNs;

const PORT: u16 = 8300;

/// One request to nodeN's published port; whether the task answered.
fn get(lab: &Lab, node: u8, timeout_s: u32) -> bool {
    curl(&format!("http://{}:{PORT}/visitor", lab.addr(node)), timeout_s).contains("Hello World")
}

/// The running tasks of `web` as (id, node).
fn running(lab: &Lab) -> BTreeSet<(String, String)> {
    ps(lab, "web")
        .into_iter()
        .filter(|t| !t.history && t.desired == "Running" && t.state == "Running")
        .map(|t| (t.id, t.node))
        .collect()
}

/// Removes the upgrade's copy of the binary, also when the test fails.
struct DirGuard(std::path::PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The task's processes in its network namespace (the web server; commands the agent runs
/// there, such as `nft` for VIP rules, come and go beside it and are not counted).
fn pids_in(netns: &str) -> Vec<i32> {
    let mut p = NetNs::open(netns).map(|ns| ns.pids()).unwrap_or_default();
    p.retain(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| lossy(&c).contains("visitor"))
    });
    p.sort();
    p
}

/// The nftables ruleset inside a namespace (the task's VIP rules).
/// The namespace's nftables ruleset, one entry per table, sorted: what the rules say, whatever
/// order the kernel lists the tables in.
fn nft_rules(netns: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "exec", netns, "nft", "list", "ruleset"]).output();
    let text = out.map(|o| lossy(&o.stdout)).unwrap_or_default();
    let mut tables: Vec<String> =
        text.split("table ").filter(|t| !t.trim().is_empty()).map(str::to_owned).collect();
    tables.sort();
    tables
}

#[test]
fn restarting_an_agent_keeps_its_tasks_and_traffic() {
    if !require_root("restarting_an_agent_keeps_its_tasks_and_traffic") {
        return;
    }
    for tool in ["curl", "dig", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{tool} is required in CI");
            eprintln!("*** SKIPPED restarting_an_agent_keeps_its_tasks_and_traffic: no {tool}");
            return;
        }
    }
    let lab = Lab::up(3);
    lab.swarm(3);
    lab.on("node1", &["network", "create", "appnet"]);
    let shoal = env!("CARGO_BIN_EXE_shoal");
    lab.create_visitor("web", PORT, &["-d", "--mode", "global", "--network", "appnet"]);
    let tasks = eventually("a web task running on every node", Duration::from_secs(60), || {
        let r = running(&lab);
        (r.len() == 3).then_some(r)
    });
    for n in 1..=3 {
        eventually("every node's published port answers", Duration::from_secs(30), || {
            get(&lab, n, 5).then_some(())
        });
    }
    let (on2, _) = tasks.iter().find(|(_, node)| node == "node2").expect("a task on node2");
    let ns2 = task_netns(&lab, "node2", on2);
    let pids = pids_in(&ns2);
    assert!(!pids.is_empty(), "node2's task runs in {ns2}");
    let vip = eventually("DNS inside node2's task", Duration::from_secs(30), || {
        let a = common::dig(&ns2, "web");
        (!a.is_empty()).then_some(a)
    });
    // The VIP balances over the three tasks, one per node.
    let rules = eventually("the VIP's rules in node2's task", Duration::from_secs(30), || {
        let r = nft_rules(&ns2);
        let all = r.concat();
        (all.contains(&vip) && all.contains("mod 3")).then_some(r)
    });

    // Requests through node1 and node3, a few a second, for the whole test.
    let addrs = [lab.addr(1), lab.addr(3)];
    let traffic = Load::start(1, Duration::from_millis(150), move |i| {
        let url = format!("http://{}:{PORT}/visitor", addrs[i as usize % 2]);
        if curl(&url, 10).contains("Hello World") {
            Ok(())
        } else {
            eprintln!("request {i} to {url} failed");
            Err(format!("request {i} to {url} failed"))
        }
    });

    let upgrade_dir = std::env::temp_dir().join(format!("{}-upgrade", lab.name));
    std::fs::create_dir_all(&upgrade_dir).unwrap();
    let _upgrade_dir = DirGuard(upgrade_dir.clone());
    let next = upgrade_dir.join("shoal-next");
    std::fs::copy(shoal, &next).unwrap();
    let mut figures = Vec::new();
    for how in ["clean stop", "kill -9", "upgrade"] {
        std::thread::sleep(Duration::from_secs(2));
        let stop_args: &[&str] = match how {
            "kill -9" => &["lab", "stop", "node2", "--kill"],
            _ => &["lab", "stop", "node2"],
        };
        assert!(lab.shoal(stop_args).status.success(), "{how}: lab stop");
        assert_eq!(pids_in(&ns2), pids, "{how}: the task runs on while its agent is down");
        assert_eq!(nft_rules(&ns2), rules, "{how}: the VIP rules stay while the agent is down");
        std::thread::sleep(Duration::from_secs(1));

        // `lab start` spawns the agent and returns once it answers: the clock starts before.
        let binary = if how == "upgrade" { next.as_path() } else { std::path::Path::new(shoal) };
        let t0 = Instant::now();
        let out = shoal_at(binary).args(["--lab", &lab.name, "lab", "start", "node2"]).output();
        let out = out.expect("lab start");
        assert!(out.status.success(), "{how}: lab start: {}", lossy(&out.stderr));
        while !get(&lab, 2, 1) {
            assert!(t0.elapsed() < Duration::from_secs(30), "{how}: node2's port never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        let answered = t0.elapsed();
        eprintln!("{how}: node2's published port answered {answered:?} after its agent started");
        figures.push((how, answered));
        if how == "upgrade" {
            let state = shoal::lab::LabState::load(&lab.name).unwrap();
            let pid = state.node("node2").unwrap().pid.unwrap();
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
            assert_eq!(exe, next, "the upgraded agent runs the new binary");
        }

        assert_eq!(pids_in(&ns2), pids, "{how}: the same processes");
        assert_eq!(nft_rules(&ns2), rules, "{how}: the same VIP rules");
        eventually("DNS inside node2's task", Duration::from_secs(10), || {
            (!common::dig(&ns2, "web").is_empty()).then_some(())
        });
        // The store settles (node2 reports again); the tasks are the same ones, still running.
        std::thread::sleep(Duration::from_secs(1));
        let table = lab.on("node1", &["service", "ps", "web"]);
        assert_eq!(running(&lab), tasks, "{how}: the same running tasks:\n{table}");
        assert!(!table.contains("Shutdown"), "{how}: nothing was shut down:\n{table}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let errors = traffic.errors();
    let (sent, failed) = traffic.finish();
    eprintln!(
        "through node1 and node3: {sent} requests, {failed} failed; port figures {figures:?}"
    );
    assert!(sent > 50, "the request loop ran ({sent})");
    assert_eq!(failed, 0, "requests through the other nodes failed during restarts: {errors:?}");
    for (how, t) in &figures {
        assert!(*t <= Duration::from_secs(2), "{how}: node2's port took {t:?} (> 2 s)");
    }

    // The tasks on node1 and node3, which `lab down` must stop.
    let others: Vec<i32> = tasks
        .iter()
        .filter(|(_, node)| node != "node2")
        .flat_map(|(id, node)| pids_in(&task_netns(&lab, node, id)))
        .collect();
    assert_eq!(others.len(), 2, "the other nodes' tasks run");

    // Leaving the swarm still stops the node's tasks.
    lab.on("node2", &["swarm", "leave"]);
    eventually("node2's task stopped by swarm leave", Duration::from_secs(30), || {
        (pids_in(&ns2).is_empty() && !NetNs::exists(&ns2)).then_some(())
    });

    // `lab down` removes the tasks too, although no agent stops them any more, also those
    // whose agent was killed.
    assert!(lab.shoal(&["lab", "stop", "node3", "--kill"]).status.success());
    let name = lab.name.clone();
    drop(lab);
    for pid in &others {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "task {pid} left");
    }
    assert!(!NetNs::list().iter().any(|n| n.starts_with(&name)), "namespaces left");
}
