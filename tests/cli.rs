//! Docker's verbs as a user types them, on real agents in the lab: `run` without `-d` shows the
//! task's output and returns its exit code (Ctrl-C stops it, `--rm` removes it), `ps -a`, verbs
//! that take several names, `-q` on every list, and Docker's error wording.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{Lab, Reaper, eventually, lossy, require_root};

/// `shoal --node node1 ARGS` with its output, whether it succeeded or not.
fn on1(lab: &Lab, args: &[&str]) -> Output {
    lab.shoal(&[&["--node", "node1"], args].concat())
}

/// The exit code, stdout and stderr of an invocation.
fn parts(o: &Output) -> (Option<i32>, String, String) {
    (o.status.code(), lossy(&o.stdout), lossy(&o.stderr))
}

/// The `ps -a` row of a standalone task, if listed.
fn ps_row(lab: &Lab, flags: &[&str], name: &str) -> Option<String> {
    let out = lab.on("node1", &[&["ps"], flags].concat());
    out.lines().skip(1).find(|l| l.split_whitespace().nth(1) == Some(name)).map(str::to_owned)
}

/// Waits until the `ps -a` row of `name` contains `want`; fails showing the last row.
fn until_row(lab: &Lab, name: &str, want: &str) {
    let t0 = Instant::now();
    loop {
        let row = ps_row(lab, &["-a"], name);
        if row.as_deref().is_some_and(|r| r.contains(want)) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{name}: want {want:?}, have {row:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Ids the way `-q` prints them: one a line, lowercase letters and digits (25 for tasks,
/// services and networks, 13 for nodes).
/// The DESIRED STATE and CURRENT STATE columns of a `ps` row, as `ps` lays them out.
fn states(desired: &str, current: &str) -> String {
    format!("{desired:<14} {current}")
}

fn ids(out: &str) -> Vec<String> {
    let ids: Vec<String> = out.lines().map(str::to_owned).collect();
    for id in &ids {
        assert!(
            id.len() >= 12 && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "not an id: {id:?} in {out:?}"
        );
    }
    ids
}

#[test]
fn docker_verbs_behave_as_in_docker() {
    if !require_root("docker_verbs_behave_as_in_docker") {
        return;
    }
    let lab = Lab::up(2);
    lab.swarm(2);
    lab.on("node1", &["network", "create", "--attachable", "n"]);

    // Attached: both streams where they belong, and the task's exit code.
    let o = on1(
        &lab,
        &[
            "run",
            "--name",
            "t1",
            "--network",
            "n",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
    );
    assert_eq!(parts(&o), (Some(3), "out\n".into(), "err\n".into()), "{o:?}");
    // A task that ends at once is no error; its output is all there.
    let o = on1(&lab, &["run", "--name", "quick", "--network", "n", "--", "true"]);
    assert_eq!(parts(&o), (Some(0), String::new(), String::new()), "{o:?}");
    let lines = "seq 1 2000";
    let o = on1(&lab, &["run", "--name", "many", "--network", "n", "--", "sh", "-c", lines]);
    let want: String = (1..=2000).map(|i| format!("{i}\n")).collect();
    assert_eq!(parts(&o), (Some(0), want, String::new()), "2000 lines, none lost");
    // A program that does not exist: 127 and Docker's reason, as a shell would.
    let o = on1(&lab, &["run", "--name", "missing", "--network", "n", "--", "no-such-program"]);
    let (code, out, err) = parts(&o);
    assert_eq!((code, out.as_str()), (Some(127), ""), "{o:?}");
    assert!(err.contains("Error response from daemon:") && err.contains("not found"), "{err}");

    // --rm: the output and exit code, then nothing left behind.
    let o = on1(
        &lab,
        &["run", "--rm", "--name", "gone", "--network", "n", "--", "sh", "-c", "echo bye; exit 4"],
    );
    assert_eq!(parts(&o), (Some(4), "bye\n".into(), String::new()), "{o:?}");
    assert_eq!(ps_row(&lab, &["-a"], "gone"), None);
    let o = on1(&lab, &["logs", "gone"]);
    assert_eq!(lossy(&o.stderr).trim(), "Error: No such container: gone", "{o:?}");

    // A name on the network resolves from an attached task: `dig` prints the service's VIP.
    lab.on(
        "node1",
        &["service", "create", "--name", "web", "--network", "n", "--", "sleep", "100000"],
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&lab.on("node1", &["service", "inspect", "web"])).unwrap();
    let vip = inspect[0]["vips"]["n"].as_str().expect("web's VIP on n").to_owned();
    let o = on1(
        &lab,
        &["run", "--rm", "--name", "q", "--network", "n", "--", "dig", "+short", "+time=2", "web"],
    );
    assert_eq!(parts(&o), (Some(0), format!("{vip}\n"), String::new()), "{o:?}");

    // Ctrl-C stops the task: SIGINT to `run`, the task ends (SIGTERM: 143), `run` exits with it.
    let mut child = Reaper(
        common::shoal()
            .args([
                "--lab",
                &lab.name,
                "--node",
                "node1",
                "run",
                "--name",
                "long",
                "--network",
                "n",
            ])
            .args(["--", "sh", "-c", "echo up; exec sleep 100000"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    BufReader::new(child.0.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert_eq!(first, "up\n", "the task's output reaches `run` while it runs");
    assert!(ps_row(&lab, &[], "long").is_some(), "a running task is listed without -a");
    let pid = nix::unistd::Pid::from_raw(child.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "`run` did not exit after SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(143), "the stopped task's exit code");
    until_row(&lab, "long", &states("Shutdown", "Shutdown"));

    // ps lists what runs; -a also what ended; -q ids only.
    let out =
        lab.on("node1", &["run", "-d", "--name", "bg", "--network", "n", "--", "sleep", "100000"]);
    let bg = ids(&out).pop().unwrap();
    until_row(&lab, "bg", &states("Running", "Running"));
    // logs -f: what was printed so far, then the rest as it comes, until the task ends.
    lab.on(
        "node1",
        &[
            "run",
            "-d",
            "--name",
            "count",
            "--network",
            "n",
            "--",
            "sh",
            "-c",
            "for i in 1 2 3; do echo $i; sleep 0.5; done",
        ],
    );
    let o = on1(&lab, &["logs", "-f", "count"]);
    assert_eq!(parts(&o), (Some(0), "1\n2\n3\n".into(), String::new()), "{o:?}");
    // The store hears of an end a moment after the output ends.
    let ended = [
        ("t1", "Failed"),
        ("quick", "Complete"),
        ("many", "Complete"),
        ("missing", "Failed"),
        ("long", "Shutdown"),
        ("count", "Complete"),
    ];
    for (name, state) in ended {
        until_row(&lab, name, &format!("   {state} "));
    }
    for (ended, _) in ended {
        assert_eq!(ps_row(&lab, &[], ended), None, "{ended} ended: only with -a");
        assert!(ps_row(&lab, &["-a"], ended).is_some(), "{ended} with -a");
    }
    assert_eq!(ids(&lab.on("node1", &["ps", "-q"])), vec![bg.clone()]);
    let all = ids(&lab.on("node1", &["ps", "-a", "-q"]));
    assert_eq!(all.len(), 7, "t1 quick many missing long bg count: {all:?}");

    // ps is per node, as `docker ps` is per engine: node2's task is listed on node2 only.
    lab.on("node2", &["run", "-d", "--name", "there", "--network", "n", "--", "sleep", "100000"]);
    let there = ids(&lab.on("node2", &["ps", "-q"]));
    assert_eq!(there.len(), 1, "{there:?}");
    assert!(!lab.on("node1", &["ps", "-a", "-q"]).contains(&there[0]));
    let o = lab.shoal(&["--node", "node1", "stop", "there"]);
    assert_eq!(lossy(&o.stderr), "Error: No such container: there\n");

    // Several names: each acted on, each failure on stderr, exit 1 if any failed.
    lab.on("node1", &["service", "create", "-d", "--name", "a", "--", "sleep", "100000"]);
    lab.on("node1", &["service", "create", "-d", "--name", "b", "--", "sleep", "100000"]);
    // `-d` returns before the tasks are scheduled: one table with both services' tasks, soon.
    eventually("a.1 and b.1 in one table", Duration::from_secs(30), || {
        let ps = lab.on("node1", &["service", "ps", "a", "b"]);
        (ps.contains(" a.1 ") && ps.contains(" b.1 ")).then_some(())
    });
    let o = on1(&lab, &["service", "ps", "a", "nope"]);
    let (code, out, err) = parts(&o);
    assert_eq!((code, err.as_str()), (Some(1), "Error: No such service: nope\n"), "{o:?}");
    assert!(out.contains(" a.1 "), "{out}");
    let o = on1(&lab, &["service", "inspect", "a", "nope", "b"]);
    let (code, out, err) = parts(&o);
    assert_eq!((code, err.as_str()), (Some(1), "Error: No such service: nope\n"));
    let found: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = found.iter().map(|s| s["service"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b"]);
    let o = on1(&lab, &["service", "scale", "-d", "a=2", "nope=2", "b=0"]);
    assert_eq!(
        parts(&o),
        (Some(1), "a scaled to 2\nb scaled to 0\n".into(), "Error: No such service: nope\n".into())
    );
    let o = on1(&lab, &["service", "rm", "a", "nope", "b"]);
    assert_eq!(parts(&o), (Some(1), "a\nb\n".into(), "Error: No such service: nope\n".into()));
    let ls = lab.on("node1", &["service", "ls"]);
    assert!(!ls.contains(" a ") && !ls.contains(" b "), "{ls}");

    let o = on1(&lab, &["stop", "bg", "nope"]);
    assert_eq!(parts(&o), (Some(1), "bg\n".into(), "Error: No such container: nope\n".into()));
    until_row(&lab, "bg", &states("Shutdown", "Shutdown"));
    let o = on1(&lab, &["rm", "t1", "nope", "quick"]);
    assert_eq!(
        parts(&o),
        (Some(1), "t1\nquick\n".into(), "Error: No such container: nope\n".into())
    );
    assert_eq!(ps_row(&lab, &["-a"], "t1"), None);

    lab.on("node1", &["network", "create", "n2"]);
    lab.on("node1", &["network", "create", "n3"]);
    let o = on1(&lab, &["network", "inspect", "n2", "nope", "n3"]);
    let (code, out, err) = parts(&o);
    assert_eq!((code, err.as_str()), (Some(1), "Error: No such network: nope\n"));
    assert_eq!(serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap().len(), 2);
    let o = on1(&lab, &["network", "rm", "n2", "nope", "n3"]);
    assert_eq!(parts(&o), (Some(1), "n2\nn3\n".into(), "Error: No such network: nope\n".into()));

    let o = on1(&lab, &["node", "inspect", "node1", "nope", "node2"]);
    let (code, out, err) = parts(&o);
    assert_eq!((code, err.as_str()), (Some(1), "Error: No such node: nope\n"));
    assert_eq!(serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap().len(), 2);
    let o = on1(&lab, &["node", "promote", "node2", "nope"]);
    let (code, out, err) = parts(&o);
    assert_eq!((code, out.as_str()), (Some(1), "Node node2 promoted to a manager in the swarm.\n"));
    assert!(err.ends_with("Error: No such node: nope\n"), "{err}");
    let o = on1(&lab, &["node", "demote", "nope", "node2"]);
    let (code, out, err) = parts(&o);
    assert_eq!((code, out.as_str()), (Some(1), "Manager node2 demoted in the swarm.\n"));
    assert!(err.starts_with("Error: No such node: nope\n"), "{err}");
    let o = on1(&lab, &["node", "rm", "nope"]);
    assert_eq!(parts(&o), (Some(1), String::new(), "Error: No such node: nope\n".into()));

    // -q on every list: ids only, the ones the tables show.
    let svc = ids(&lab.on("node1", &["service", "ls", "-q"]));
    assert_eq!(svc, vec![inspect[0]["service"]["id"].as_str().unwrap().to_owned()]);
    let tasks = ids(&lab.on("node1", &["service", "ps", "-q", "web"]));
    let table = lab.on("node1", &["service", "ps", "web"]);
    assert!(!tasks.is_empty() && tasks.iter().all(|t| table.contains(t.as_str())), "{table}");
    let nodes = ids(&lab.on("node1", &["node", "ls", "-q"]));
    assert_eq!(nodes.len(), 2);
    let table = lab.on("node1", &["node", "ls"]);
    assert!(nodes.iter().all(|n| table.contains(n.as_str())), "{table}");
    let nets = ids(&lab.on("node1", &["network", "ls", "-q"]));
    let table = lab.on("node1", &["network", "ls"]);
    assert_eq!(nets.len(), table.lines().count() - 1, "{table}");
    assert!(nets.iter().all(|n| table.contains(n.as_str())), "{table}");

    // Docker's words for other refusals, and nothing changed by them.
    let o = on1(&lab, &["network", "create", "n"]);
    assert_eq!(
        parts(&o),
        (
            Some(1),
            String::new(),
            "Error response from daemon: network with name n already exists\n".into()
        )
    );
    // `run` exits 125 when the task could not be made, as `docker run` does.
    let o = on1(&lab, &["run", "--name", "web", "--network", "n", "--", "true"]);
    let (code, _, err) = parts(&o);
    assert_eq!(code, Some(125));
    assert!(err.starts_with("Error response from daemon: Conflict."), "{err}");
    let o = on1(&lab, &["run", "--name", "x", "--network", "nope", "--", "true"]);
    assert_eq!(parts(&o), (Some(125), String::new(), "Error: No such network: nope\n".into()));
    assert_eq!(ps_row(&lab, &["-a"], "x"), None);
}
