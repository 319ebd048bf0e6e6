//! Named volumes and `--mount` on real agents in the lab: the tutorial's deploy lines give every
//! node that runs a task an `info.log` in that node's volume, growing by one line per request
//! served there and kept across task replacement (update, drain, scale); `volume rm` is refused
//! while a task uses the volume; bind mounts read-only and read-write; bad input gets Docker's
//! words and changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Lab, eventually, lossy, ps, require_root, running_per_node};

/// A scratch directory under /tmp (bind sources, mount targets), removed when the test ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Requests served so far, per serving task (its hostname: the first 12 of its id).
type Served = BTreeMap<String, usize>;

/// `GET /visitor` on nodeN through the mesh; the task that answered, if one did.
fn visit(lab: &Lab, node: u8) -> Option<String> {
    let url = format!("http://{}:8100/visitor", lab.addr(node));
    let out = Command::new("curl").args(["-s", "-i", "-m", "10", &url]).output().expect("curl");
    let text = lossy(&out.stdout);
    let by = text.lines().find_map(|l| l.strip_prefix("x-served-by: "))?.trim().to_owned();
    assert!(text.contains("Hello World"), "{text}");
    Some(by)
}

/// Visits every node `rounds` times, counting who answered.
fn visit_all(lab: &Lab, rounds: usize, served: &mut Served) {
    for _ in 0..rounds {
        for node in 1..=3 {
            let by =
                eventually("an answer on port 8100", Duration::from_secs(60), || visit(lab, node));
            *served.entry(by).or_default() += 1;
        }
    }
}

/// Lines of each task in a node's `info.log`.
fn log_lines(path: &Path) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let by = line.split_whitespace().nth(1).expect("a log line names its task");
        assert!(line.contains("GET /visitor: Hello World"), "{line}");
        *m.entry(by.to_owned()).or_default() += 1;
    }
    m
}

/// Every request is one line in the log of the node whose task served it, whatever task
/// (current or replaced) that was. Returns each node's tasks that wrote to its log.
fn check_logs(
    lab: &Lab,
    state: &shoal::lab::LabState,
    served: &Served,
) -> BTreeMap<String, BTreeSet<String>> {
    let node_of: BTreeMap<String, String> =
        ps(lab, "myhelloworld").into_iter().map(|t| (t.id[..12].to_owned(), t.node)).collect();
    let mut writers = BTreeMap::new();
    let mut total = 0;
    for i in 0..3 {
        let node = &state.nodes[i].name;
        let lines = log_lines(&shoal::lab::demo::info_log(state, i));
        for (task, n) in &lines {
            assert_eq!(node_of.get(task), Some(node), "{task} wrote to {node}'s log");
            assert_eq!(served.get(task), Some(n), "lines of {task} on {node}: {lines:?}");
            total += n;
        }
        writers.insert(node.clone(), lines.into_keys().collect());
    }
    assert_eq!(total, served.values().sum::<usize>(), "every request is one line");
    writers
}

/// `shoal --node NODE ARGS` that must fail; returns its stderr.
fn refused(lab: &Lab, node: &str, args: &[&str]) -> String {
    let out = lab.shoal(&[&["--node", node], args].concat());
    assert!(!out.status.success(), "{args:?} should fail: {}", lossy(&out.stdout));
    lossy(&out.stderr)
}

/// Whether any process on this machine has a mount at `target`.
fn mounted_anywhere(target: &Path) -> bool {
    let needle = format!(" {} ", target.display());
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read_to_string(e.path().join("mountinfo")).is_ok_and(|m| m.contains(&needle))
    })
}

#[test]
fn volumes_and_mounts() {
    if !require_root("volumes_and_mounts") {
        return;
    }
    if Command::new("curl").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "curl is needed in CI");
        eprintln!("*** SKIPPED volumes test: curl missing ***");
        return;
    }
    let scratch =
        Scratch(std::env::temp_dir().join(shoal_netns::testing::unique_prefix("shoal-vol")));
    let dir = scratch.0.clone();
    let lab = Lab::up(3);
    lab.swarm(3);
    let state = shoal::lab::LabState::load(&lab.name).unwrap();
    let shoal = env!("CARGO_BIN_EXE_shoal");

    // The volume verbs, on one node.
    assert_eq!(
        lab.on("node1", &["volume", "create", "--label", "app=hello", "myhelloworld"]),
        "myhelloworld\n"
    );
    let ls = lab.on("node1", &["volume", "ls"]);
    assert!(ls.lines().any(|l| l.split_whitespace().eq(["local", "myhelloworld"])), "{ls}");
    assert_eq!(lab.on("node1", &["volume", "ls", "-q"]), "myhelloworld\n");
    assert_eq!(lab.on("node2", &["volume", "ls", "-q"]), "", "volumes are per node");
    let note = lossy(&lab.shoal(&["--node", "node1", "volume", "ls"]).stderr);
    assert!(note.contains("volumes of node node1: volumes are per node"), "{note}");
    let v: serde_json::Value =
        serde_json::from_str(&lab.on("node1", &["volume", "inspect", "myhelloworld"])).unwrap();
    let mountpoint = state.nodes[0].data_dir.join("volumes/myhelloworld/_data");
    assert_eq!(v[0]["mountpoint"], mountpoint.display().to_string());
    assert_eq!(v[0]["labels"]["app"], "hello");
    assert!(mountpoint.is_dir());

    // The tutorial's deploy lines; the app writes its log where the volume is mounted.
    let logs = dir.join("helloworld/logs");
    let mount = format!("type=volume,src=myhelloworld,dst={}", logs.display());
    let logs = logs.display().to_string();
    lab.on(
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
            "--redis",
            "127.0.0.1:1",
            "--redis-timeout-ms",
            "300",
            "--log-dir",
            &logs,
        ],
    );
    let v: serde_json::Value = serde_json::from_str::<serde_json::Value>(
        &lab.on("node1", &["service", "inspect", "myhelloworld"]),
    )
    .unwrap()[0]
        .clone();
    let mounts = &v["service"]["mounts"];
    assert_eq!(mounts[0]["type"], "volume");
    assert_eq!(mounts[0]["source"], "myhelloworld");
    assert_eq!(mounts[0]["target"], logs.as_str());
    assert_eq!(running_per_node(&lab, "myhelloworld").len(), 3);
    let mut served = Served::new();
    visit_all(&lab, 10, &mut served);
    let writers = check_logs(&lab, &state, &served);
    assert!(writers.values().all(|w| w.len() == 1), "one task per node wrote: {writers:?}");
    for i in 1..3 {
        let made = state.nodes[i].data_dir.join("volumes/myhelloworld/_data");
        assert!(made.is_dir(), "the task made the volume on {}", state.nodes[i].name);
    }
    assert!(!Path::new(&logs).join("info.log").exists(), "the host's own view is untouched");

    // Update (a mount added): every task is replaced and the new one appends to its node's log.
    let bind = dir.join("bind");
    std::fs::create_dir_all(&bind).unwrap();
    std::fs::write(bind.join("seed"), "seed-content\n").unwrap();
    let extra = dir.join("extra");
    let add = format!("type=bind,src={},dst={},readonly", bind.display(), extra.display());
    lab.on("node1", &["service", "update", "--mount-add", &add, "myhelloworld"]);
    let v: serde_json::Value = serde_json::from_str::<serde_json::Value>(
        &lab.on("node1", &["service", "inspect", "myhelloworld"]),
    )
    .unwrap()[0]
        .clone();
    assert_eq!(v["service"]["mounts"][1]["type"], "bind");
    assert_eq!(v["service"]["mounts"][1]["readonly"], true);
    let version = v["service"]["version"].clone();
    visit_all(&lab, 10, &mut served);
    let writers = check_logs(&lab, &state, &served);
    for (node, w) in &writers {
        assert!(w.len() >= 2, "{node}: the old and the new task share the log: {w:?}");
    }
    lab.on(
        "node1",
        &["service", "update", "--mount-rm", &extra.display().to_string(), "myhelloworld"],
    );
    let v: serde_json::Value = serde_json::from_str::<serde_json::Value>(
        &lab.on("node1", &["service", "inspect", "myhelloworld"]),
    )
    .unwrap()[0]
        .clone();
    assert_eq!(v["service"]["mounts"].as_array().unwrap().len(), 1);
    assert_ne!(v["service"]["version"], version);

    // Drain node2: its task moves; node2's log stays as it was, the others keep growing.
    let node2_log = shoal::lab::demo::info_log(&state, 1);
    let before = std::fs::read_to_string(&node2_log).unwrap();
    lab.on("node1", &["node", "update", "--availability", "drain", "node2"]);
    eventually("node2 drained", Duration::from_secs(90), || {
        let r = running_per_node(&lab, "myhelloworld");
        (!r.contains_key("node2") && r.values().sum::<usize>() == 3).then_some(())
    });
    visit_all(&lab, 6, &mut served);
    check_logs(&lab, &state, &served);
    assert_eq!(std::fs::read_to_string(&node2_log).unwrap(), before);

    // Scale up with node2 active again: its new task appends to node2's log.
    lab.on("node1", &["node", "update", "--availability", "active", "node2"]);
    lab.on("node1", &["service", "scale", "myhelloworld=4"]);
    eventually("a task on node2 again", Duration::from_secs(90), || {
        running_per_node(&lab, "myhelloworld").contains_key("node2").then_some(())
    });
    eventually("node2's new task serving", Duration::from_secs(120), || {
        visit_all(&lab, 2, &mut served);
        let writers = check_logs(&lab, &state, &served);
        (writers["node2"].len() >= 3).then_some(())
    });
    eprintln!(
        "requests per task: {served:?}\ntasks per node's log: {:?}",
        check_logs(&lab, &state, &served)
    );
    let grown = std::fs::read_to_string(&node2_log).unwrap();
    assert!(grown.starts_with(&before) && grown.len() > before.len(), "node2's log grew");

    // volume rm: refused while a task of the node mounts it, done once none does.
    let e = refused(&lab, "node1", &["volume", "rm", "myhelloworld"]);
    assert!(e.contains("remove myhelloworld: volume is in use - [myhelloworld."), "{e}");
    assert!(mountpoint.join("info.log").is_file());
    lab.on("node1", &["service", "rm", "myhelloworld"]);
    eventually("volume rm once the tasks are gone", Duration::from_secs(60), || {
        lab.shoal(&["--node", "node1", "volume", "rm", "myhelloworld"])
            .status
            .success()
            .then_some(())
    });
    assert!(!mountpoint.exists());
    assert_eq!(lab.on("node1", &["volume", "ls", "-q"]), "");
    let e = refused(&lab, "node1", &["volume", "rm", "myhelloworld"]);
    assert!(e.contains("get myhelloworld: no such volume"), "{e}");
    lab.on("node1", &["volume", "rm", "-f", "myhelloworld"]);
    let e = refused(&lab, "node1", &["volume", "rm", "nosuch1", "nosuch2"]);
    assert!(e.contains("get nosuch1: no such volume") && e.contains("get nosuch2"), "{e}");

    // Bind mounts on `run`: read-only (a write fails inside) and read-write.
    lab.on("node1", &["network", "create", "--attachable", "nb"]);
    let inside = dir.join("inside");
    let ro = format!("type=bind,source={},target={},ro=true", bind.display(), inside.display());
    let script = format!(
        "cat {0}/seed; if echo x > {0}/w; then echo WROTE; else echo REFUSED; fi; exec sleep 100000",
        inside.display()
    );
    lab.on(
        "node1",
        &[
            "run",
            "-d",
            "--name",
            "ro",
            "--network",
            "nb",
            "--mount",
            &ro,
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let out = eventually("the read-only task's output", Duration::from_secs(60), || {
        // Not there until the node has made the task.
        let out = lossy(&lab.shoal(&["--node", "node1", "logs", "ro"]).stdout);
        out.contains("REFUSED").then_some(out)
    });
    assert!(out.contains("seed-content"), "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(!bind.join("w").exists());
    assert!(mounted_anywhere(&inside), "mounted in the task's namespace");
    let own = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!own.contains(&format!(" {} ", inside.display())), "not on the host");
    lab.on("node1", &["rm", "-f", "ro"]);
    eventually("the mount gone with the task", Duration::from_secs(60), || {
        (!mounted_anywhere(&inside)).then_some(())
    });
    let rw = format!("type=bind,src={},dst={}", bind.display(), inside.display());
    let script = format!("echo written > {}/w; exec sleep 100000", inside.display());
    lab.on(
        "node1",
        &[
            "run",
            "-d",
            "--name",
            "rw",
            "--network",
            "nb",
            "--mount",
            &rw,
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    eventually("the read-write task's file on the host", Duration::from_secs(60), || {
        (std::fs::read_to_string(bind.join("w")).ok()? == "written\n").then_some(())
    });
    lab.on("node1", &["rm", "-f", "rw"]);

    // Bad input: Docker's words, and nothing changes.
    let services = lab.on("node1", &["service", "ls", "-q"]);
    let missing = dir.join("no-such-dir");
    let cases = [
        (
            format!("type=bind,src={},dst=/data", missing.display()),
            format!(
                "invalid mount config for type \"bind\": bind source path does not exist: {}",
                missing.display()
            ),
        ),
        ("type=volume,src=v1,dst=data".into(), "invalid mount target, must be an absolute path: data".into()),
        ("type=volume,src=v1,dst=/data,foo=bar".into(), "unexpected key 'foo' in 'foo=bar'".into()),
        (
            "type=volume,src=v1,dst=/".into(),
            "invalid mount config for type \"volume\": invalid specification: destination can't be '/'".into(),
        ),
        (
            format!("type=bind,src={},dst=/proc/sys", bind.display()),
            "invalid mount config for type \"bind\": \"/proc/sys\" cannot be mounted because it is inside /proc".into(),
        ),
        (
            "type=volume,src=../../etc,dst=/data".into(),
            "\"../../etc\" includes invalid characters for a local volume name".into(),
        ),
    ];
    for (spec, want) in &cases {
        let e = refused(
            &lab,
            "node1",
            &["service", "create", "--name", "bad", "--mount", spec, "--", "sleep", "1000"],
        );
        assert!(e.contains(want.as_str()), "{spec}: {e}");
        let e = refused(
            &lab,
            "node1",
            &[
                "run",
                "-d",
                "--name",
                "bad",
                "--network",
                "nb",
                "--mount",
                spec,
                "--",
                "sleep",
                "1000",
            ],
        );
        assert!(e.contains(want.as_str()), "run {spec}: {e}");
    }
    // The API checks what a client other than the CLI sends, too.
    let body = format!(
        r#"{{"name":"bad","argv":["sleep","1000"],"mounts":[{{"type":"bind","source":"{}","target":"/data"}}]}}"#,
        missing.display()
    );
    let out = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&state.nodes[0].socket)
        .args(["-H", "content-type: application/json", "-d", &body, "http://agent/services"])
        .output()
        .unwrap();
    assert!(
        lossy(&out.stdout).contains("bind source path does not exist"),
        "{}",
        lossy(&out.stdout)
    );
    lab.on("node1", &["service", "create", "--name", "ok", "--", "sleep", "100000"]);
    let spec_of = || {
        let v: serde_json::Value = serde_json::from_str::<serde_json::Value>(
            &lab.on("node1", &["service", "inspect", "ok"]),
        )
        .unwrap()[0]
            .clone();
        v["service"].clone()
    };
    let v = spec_of();
    let e =
        refused(&lab, "node1", &["service", "update", "--mount-add", "src=v1,dst=/sys/x", "ok"]);
    assert!(e.contains("cannot be mounted because it is inside /sys"), "{e}");
    let e = refused(&lab, "node1", &["service", "update", "--mount-rm", "/nowhere", "ok"]);
    assert!(e.contains("no mount at /nowhere"), "{e}");
    assert_eq!(spec_of(), v, "a refused update changes nothing");
    for bad in ["a", "../x", "a/b"] {
        let e = refused(&lab, "node1", &["volume", "create", bad]);
        assert!(e.contains("volume name"), "{bad}: {e}");
    }
    assert_eq!(
        lab.on("node1", &["service", "ls", "-q"]).lines().count(),
        services.lines().count() + 1
    );
    assert!(!lab.on("node1", &["ps"]).contains("bad"));
    for node in ["node1", "node2", "node3"] {
        let ls = lab.on(node, &["volume", "ls", "-q"]);
        assert!(!ls.lines().any(|v| v == "v1" || v == "x"), "{node}: no volume was made: {ls}");
    }
    drop(lab);
    drop(scratch);
}
