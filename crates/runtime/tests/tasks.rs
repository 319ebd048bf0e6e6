//! Root-only tests of real tasks: processes in their own network, mount and UTS namespaces.
//! Every test uses its own prefix and checks at the end that nothing carrying it is left
//! (namespaces, mounts, task directories).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use shoal_netns::NetNs;
use shoal_netns::testing::require_root;
use shoal_runtime::{Error, EventKind, Health, HealthCheck, Stream, TaskState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_server_reachable_over_veth_into_task_netns() {
    if !require_root("http_server_reachable_over_veth_into_task_netns") {
        return;
    }
    let mut lab = Lab::new("rh");
    let p = lab.prefix.clone();
    let www = lab.state_dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("marker.txt"), format!("served-by-{p}\n")).unwrap();
    let mut spec = lab.spec("web", &["python3", "-m", "http.server", "8000", "--bind", "0.0.0.0"]);
    spec.workdir = Some(www.clone());
    let id = spec.id.clone();
    let ready = lab.create(spec).await;
    assert_eq!(ready.state, TaskState::Ready);

    // The hook between "namespace ready" and "process started": attach a veth from a client
    // namespace into the task's namespace, as the overlay driver will.
    let client = format!("{p}-c");
    lab.guard.netns(&client).unwrap();
    let task_ns = lab.rt.netns(&id).unwrap();
    assert_eq!(task_ns.name(), ready.netns);
    let octet = u8::from_str_radix(&p[p.len() - 2..], 16).unwrap();
    let (cip, tip) = (format!("10.213.{octet}.1"), format!("10.213.{octet}.2"));
    sh(&format!(
        "ip link add {p}a type veth peer name {p}b && ip link set {p}a netns {client} && \
         ip link set {p}b netns {tns} && ip -n {client} addr add {cip}/24 dev {p}a && \
         ip -n {client} link set {p}a up && ip -n {tns} addr add {tip}/24 dev {p}b && \
         ip -n {tns} link set {p}b up",
        tns = ready.netns
    ));
    lab.rt.set_addresses(&id, vec![tip.parse().unwrap()]).unwrap();
    let running = lab.rt.start(&id).await.unwrap();
    assert_eq!(running.state, TaskState::Running);
    assert!(running.pid.is_some());
    assert!(
        task_ns.pids().contains(&(running.pid.unwrap() as i32)),
        "process runs in the task netns"
    );

    let url = format!("http://{tip}:8000/marker.txt");
    let body =
        eventually(Duration::from_secs(20), "http server answers", || {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &client, "curl", "-sf", "-m", "2", &url])
                .output()
                .unwrap();
            async move {
                out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            }
        })
        .await;
    assert_eq!(body, format!("served-by-{p}\n"));
    // Not reachable from the host's namespace: the task has no address there.
    let host = std::process::Command::new("curl").args(["-sf", "-m", "1", &url]).output().unwrap();
    assert!(!host.status.success());
    // http.server logs requests on stderr.
    let logs = lab.rt.logs(&id).unwrap();
    let req = eventually(Duration::from_secs(5), "request logged", || {
        let hit = logs.lines().into_iter().find(|l| l.line.contains("GET /marker.txt"));
        async move { hit }
    })
    .await;
    assert_eq!(req.stream, Stream::Stderr);

    let stopped = lab.rt.stop(&id, None).await.unwrap();
    assert_eq!(stopped.state, TaskState::Shutdown);
    assert_eq!(stopped.exit_code, Some(128 + 15), "killed by SIGTERM");
    drop(task_ns);
    lab.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_resolv_conf_hosts_and_hostname() {
    if !require_root("private_resolv_conf_hosts_and_hostname") {
        return;
    }
    let host_resolv = std::fs::read("/etc/resolv.conf").unwrap();
    let host_hosts = std::fs::read("/etc/hosts").unwrap();
    let host_name = nix::unistd::gethostname().unwrap();
    let mut lab = Lab::new("rr");
    let p = lab.prefix.clone();
    // A shared mount on the host: without `--make-rprivate` in the task, it would stay a peer
    // of the task's copy and mounts would propagate between them.
    let shared = SharedMount::new(&lab.state_dir.join("shared"));
    let mut spec = lab.spec(
        "dns",
        &[
            "sh",
            "-c",
            "cat /etc/resolv.conf; echo ---; cat /etc/hosts; echo ---; hostname; echo done; exec sleep 60",
        ],
    );
    spec.hostname = format!("svc-{p}");
    spec.extra_hosts = vec![("10.0.9.9".parse().unwrap(), vec!["myredis".into()])];
    let id = spec.id.clone();
    lab.create(spec).await;
    lab.rt.set_addresses(&id, vec!["10.0.9.7".parse().unwrap()]).unwrap();
    let st = lab.rt.start(&id).await.unwrap();
    wait_line(&lab.rt, &id, "done").await;
    let lines = text(&lab.rt, &id);
    assert_eq!(lines[..2], ["nameserver 127.0.0.11", "options ndots:0"]);
    assert!(lines.contains(&format!("10.0.9.7\tsvc-{p}")), "{lines:?}");
    assert!(lines.contains(&"10.0.9.9\tmyredis".to_string()), "{lines:?}");
    assert!(lines.contains(&"127.0.0.1\tlocalhost".to_string()));
    let hostname_line = lines.iter().position(|l| l == "done").unwrap() - 1;
    assert_eq!(lines[hostname_line], format!("svc-{p}"));

    // While it runs: the host's files, hostname and mount table are untouched, and the task's
    // own mount table has the bind mounts of its state files.
    assert_eq!(std::fs::read("/etc/resolv.conf").unwrap(), host_resolv);
    assert_eq!(std::fs::read("/etc/hosts").unwrap(), host_hosts);
    assert_eq!(nix::unistd::gethostname().unwrap(), host_name);
    assert!(
        leftovers(&format!("shoal-rt-test-{p}/tasks")).is_empty(),
        "a task mount leaked to the host"
    );
    let pid = st.pid.unwrap();
    let task_mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let binds: Vec<&str> = task_mounts
        .lines()
        .filter(|l| l.contains(" /etc/resolv.conf ") || l.contains(" /etc/hosts "))
        .collect();
    assert_eq!(binds.len(), 2, "{binds:?}");
    // Inherited nsfs mounts were detached, so the task pins no other namespace.
    assert!(!task_mounts.lines().any(|l| l.contains(" - nsfs ")), "task holds nsfs mounts");
    // Propagation is private: the task's copy of the shared mount has no peer group, and a
    // mount the host makes under it now does not reach the task.
    let mp = shared.0.to_str().unwrap();
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let host_line = host_mount_line(&host_mounts, mp);
    assert!(host_line.unwrap().contains("shared:"), "test setup: host mount is shared");
    let task_line = host_mount_line(&task_mounts, mp).expect("task has the mount");
    assert!(!task_line.contains("shared:") && !task_line.contains("master:"), "{task_line}");
    let sub = shared.0.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let sub_mount = SharedMount::new(&sub);
    let task_mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert!(
        host_mount_line(&task_mounts, sub.to_str().unwrap()).is_none(),
        "host mount propagated in"
    );
    drop(sub_mount);
    drop(shared);
    // `exec` sees what the task sees (and only `lo` plus nothing else in its netns).
    let argv: Vec<String> =
        ["sh", "-c", "hostname; head -1 /etc/resolv.conf; grep -c : /proc/net/dev; exit 7"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let out = lab.rt.exec(&id, &argv, Duration::from_secs(10)).await.unwrap();
    assert_eq!(out.exit_code, 7);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("svc-{p}\nnameserver 127.0.0.11\n1\n")
    );
    let slow = ["sleep".to_string(), "30".to_string()];
    let t0 = Instant::now();
    let err = lab.rt.exec(&id, &slow, Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(err, Error::ExecTimeout { .. }), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));

    lab.finish().await;
    assert_eq!(std::fs::read("/etc/resolv.conf").unwrap(), host_resolv);
    assert_eq!(std::fs::read("/etc/hosts").unwrap(), host_hosts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_resolv_conf_and_env() {
    if !require_root("custom_resolv_conf_and_env") {
        return;
    }
    let mut lab = Lab::new("re");
    let mut spec =
        lab.spec("env", &["sh", "-c", "cat /etc/resolv.conf; echo \"$GREETING $HOSTNAME\"; pwd"]);
    spec.resolv_conf = Some("nameserver 10.0.0.2\nsearch example\n".into());
    spec.env = vec![("GREETING".into(), "hi".into())];
    spec.hostname = "h1".into();
    spec.workdir = Some("/tmp".into());
    let id = lab.run(spec).await;
    let st = wait_done(&lab.rt, &id).await;
    assert_state(&st, TaskState::Complete, Some(0));
    assert_eq!(text(&lab.rt, &id), ["nameserver 10.0.0.2", "search example", "hi h1", "/tmp"]);
    lab.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_capped_and_followable() {
    if !require_root("logs_are_capped_and_followable") {
        return;
    }
    let mut lab = Lab::new("rl");
    // Capped: 3000 lines into an 8 KiB log keep only the newest.
    let mut spec = lab.spec(
        "flood",
        &["sh", "-c", "i=0; while [ $i -lt 3000 ]; do echo line-$i; i=$((i+1)); done; echo oops"],
    );
    spec.log_cap = 8192;
    let flood = lab.run(spec).await;
    assert_state(&wait_done(&lab.rt, &flood).await, TaskState::Complete, Some(0));
    let logs = lab.rt.logs(&flood).unwrap();
    assert!(logs.is_closed());
    let lines = logs.lines();
    assert!(logs.bytes() <= 8192, "{} bytes kept", logs.bytes());
    assert!(lines.len() > 100 && lines.len() < 3000, "{} lines kept", lines.len());
    assert!(lines.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    assert_eq!(lines.last().unwrap().seq, 3000, "3001 lines were written");
    let out: Vec<&str> =
        lines.iter().filter(|l| l.stream == Stream::Stdout).map(|l| l.line.as_str()).collect();
    assert_eq!(out[out.len() - 2..], ["line-2999", "oops"]);
    assert!(!out.contains(&"line-0"));

    // Followable: a follower made before start sees each line while the task runs, then ends.
    let spec = lab.spec(
        "tick",
        &["sh", "-c", "for i in 1 2 3 4 5; do echo tick$i; sleep 0.3; done; echo bye >&2"],
    );
    let id = spec.id.clone();
    lab.create(spec).await;
    let mut follower = lab.rt.logs(&id).unwrap().follow();
    lab.rt.start(&id).await.unwrap();
    let first =
        tokio::time::timeout(Duration::from_secs(10), follower.next()).await.unwrap().unwrap();
    assert_eq!(first.line, "tick1");
    assert_eq!(lab.rt.inspect(&id).unwrap().state, TaskState::Running, "line seen live");
    let mut rest = Vec::new();
    while let Some(l) =
        tokio::time::timeout(Duration::from_secs(10), follower.next()).await.unwrap()
    {
        rest.push((l.line, l.stream));
    }
    let out = |s: &str| (s.to_string(), Stream::Stdout);
    let bye = ("bye".to_string(), Stream::Stderr);
    assert_eq!(rest, [out("tick2"), out("tick3"), out("tick4"), out("tick5"), bye]);
    // The follower ends once the output is complete; the terminal state comes right after.
    assert_state(&wait_done(&lab.rt, &id).await, TaskState::Complete, Some(0));
    lab.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_starting_healthy_unhealthy() {
    if !require_root("health_starting_healthy_unhealthy") {
        return;
    }
    let mut lab = Lab::new("rk");
    let flag = lab.state_dir.join("healthy-flag");
    let mut spec = lab.spec("hc", &["sleep", "120"]);
    spec.hostname = "hc-host".into();
    // Passes only with the flag, inside the task's mount ns (its resolv.conf), net ns (only
    // `lo`) and UTS ns (its hostname).
    let mut check = HealthCheck::shell(&format!(
        "test -e {} && grep -q 127.0.0.11 /etc/resolv.conf && [ $(grep -c : /proc/net/dev) -eq 1 ] && \
         [ $(hostname) = hc-host ] && echo ok",
        flag.display()
    ));
    check.interval = Duration::from_millis(200);
    check.start_interval = Duration::from_millis(100);
    check.timeout = Duration::from_secs(5);
    check.retries = 2;
    check.start_period = Duration::from_secs(10);
    spec.health = Some(check);
    let id = spec.id.clone();
    let mut events = lab.rt.subscribe();
    lab.create(spec).await;
    let st = lab.rt.start(&id).await.unwrap();
    assert_eq!(st.health, Some(Health::Starting));
    assert!(!st.is_serving());

    // Failing probes inside the start period are not counted.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = lab.rt.inspect(&id).unwrap();
    assert_eq!((st.health, st.failing_streak), (Some(Health::Starting), 0), "{st:#?}");
    assert!(st.last_probe_output.is_some(), "probes ran");

    std::fs::write(&flag, "").unwrap();
    let healthy = eventually(Duration::from_secs(10), "healthy", || {
        let st = lab.rt.inspect(&id).unwrap();
        async move { (st.health == Some(Health::Healthy)).then_some(st) }
    })
    .await;
    assert!(healthy.is_serving());
    assert_eq!(healthy.last_probe_output.as_deref(), Some("ok\n"));

    std::fs::remove_file(&flag).unwrap();
    let unhealthy = eventually(Duration::from_secs(10), "unhealthy", || {
        let st = lab.rt.inspect(&id).unwrap();
        async move { (st.health == Some(Health::Unhealthy)).then_some(st) }
    })
    .await;
    assert!(unhealthy.failing_streak >= 2);
    assert!(!unhealthy.is_serving());
    assert_eq!(unhealthy.state, TaskState::Running, "the runtime reports; the agent decides");

    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if ev.status.id == id && ev.kind == EventKind::Health {
            seen.push(ev.status.health.unwrap());
        }
    }
    assert_eq!(seen, [Health::Healthy, Health::Unhealthy]);
    lab.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probe_timeout_counts_as_failure() {
    if !require_root("health_probe_timeout_counts_as_failure") {
        return;
    }
    let mut lab = Lab::new("rt");
    let mut spec = lab.spec("slow", &["sleep", "120"]);
    let mut check = HealthCheck::new(vec!["sleep".into(), "30".into()]);
    check.interval = Duration::from_millis(100);
    check.timeout = Duration::from_millis(300);
    check.retries = 1;
    spec.health = Some(check);
    let id = lab.run(spec).await;
    let st = eventually(Duration::from_secs(10), "unhealthy", || {
        let st = lab.rt.inspect(&id).unwrap();
        async move { (st.health == Some(Health::Unhealthy)).then_some(st) }
    })
    .await;
    assert!(st.last_probe_output.unwrap().contains("exceeded timeout"));
    // The timed-out probe was killed: only the task's own process is left in its namespace.
    let ns = lab.rt.netns(&id).unwrap();
    let pid = st.pid.unwrap() as i32;
    eventually(Duration::from_secs(5), "probe killed", || {
        let pids = ns.pids();
        async move { (pids == [pid]).then_some(()) }
    })
    .await;
    drop(ns);
    lab.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sends_sigterm_then_sigkill_after_grace() {
    if !require_root("stop_sends_sigterm_then_sigkill_after_grace") {
        return;
    }
    let mut lab = Lab::new("rs");
    // Cooperative: exits on SIGTERM, well inside its grace period.
    let mut spec = lab.spec(
        "term",
        &["sh", "-c", "trap 'echo got-term; exit 0' TERM; echo ready; while :; do sleep 0.1; done"],
    );
    spec.stop_grace = Duration::from_secs(20);
    let term = lab.run(spec).await;
    wait_line(&lab.rt, &term, "ready").await;
    // A running task's namespace is not released.
    assert!(matches!(lab.rt.release_netns(&term).await, Err(Error::InvalidState { .. })));
    assert!(lab.rt.netns(&term).is_ok());
    let t0 = Instant::now();
    let st = lab.rt.stop(&term, None).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    assert_state(&st, TaskState::Shutdown, Some(0));
    assert!(text(&lab.rt, &term).contains(&"got-term".to_string()));

    // Stubborn: ignores SIGTERM (and so do its children); a daemon escaped into its own
    // session. SIGKILL after the 1 s grace; the daemon dies with the task's namespace.
    let spec = lab.spec(
        "kill",
        &["sh", "-c", "trap '' TERM; setsid sleep 300 & echo ready; while :; do sleep 0.1; done"],
    );
    let kill = lab.run(spec).await;
    wait_line(&lab.rt, &kill, "ready").await;
    let ns = lab.rt.netns(&kill).unwrap();
    assert!(ns.pids().len() >= 2, "task and daemon run");
    let t0 = Instant::now();
    let st = lab.rt.stop(&kill, Some(Duration::from_secs(1))).await.unwrap();
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(8), "took {took:?}");
    assert_state(&st, TaskState::Shutdown, Some(128 + 9));
    assert!(ns.pids().is_empty(), "left in the namespace: {:?}", ns.pids());
    drop(ns);
    lab.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_map_to_complete_and_failed() {
    if !require_root("exit_codes_map_to_complete_and_failed") {
        return;
    }
    let mut lab = Lab::new("rx");
    let mut events = lab.rt.subscribe();
    let ok = lab.run(lab.spec("ok", &["true"])).await;
    let three = lab.run(lab.spec("three", &["sh", "-c", "exit 3"])).await;
    let killed = lab.run(lab.spec("sig", &["sh", "-c", "kill -9 $$"])).await;
    let st = wait_done(&lab.rt, &ok).await;
    assert_state(&st, TaskState::Complete, Some(0));
    assert_eq!(st.error, None);
    assert!(st.finished_at.is_some() && st.pid.is_none());
    let st = wait_done(&lab.rt, &three).await;
    assert_state(&st, TaskState::Failed, Some(3));
    assert_eq!(st.error.as_deref(), Some("task: non-zero exit (3)"));
    assert_state(&wait_done(&lab.rt, &killed).await, TaskState::Failed, Some(137));
    // An ended task's namespace is released (nothing is left of it in `ip netns`), twice
    // is no error, and its status and logs stay until it is removed.
    for id in [&ok, &three, &killed] {
        let netns = lab.rt.netns_name_for(id);
        assert!(NetNs::exists(&netns));
        lab.rt.release_netns(id).await.unwrap();
        lab.rt.release_netns(id).await.unwrap();
        assert!(!NetNs::exists(&netns), "{netns} outlived its release");
        assert!(lab.rt.netns(id).is_err());
        assert!(lab.rt.logs(id).is_ok() && lab.rt.inspect(id).is_ok());
    }
    // Docker's sequence of states, in order, for one task.
    let mut states = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if ev.status.id == ok && ev.kind == EventKind::State {
            states.push(ev.status.state);
        }
    }
    use TaskState::*;
    assert_eq!(states, [New, Preparing, Ready, Starting, Running, Complete]);
    // Starting a finished task is refused and changes nothing.
    assert!(matches!(lab.rt.start(&ok).await, Err(Error::InvalidState { .. })));
    lab.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_binary_fails_cleanly() {
    if !require_root("missing_binary_fails_cleanly") {
        return;
    }
    let mut lab = Lab::new("rm");
    for (name, prog, msg) in [
        ("abs", "/nonexistent/prog", "no such file or directory"),
        ("path", "no-such-program-xyz", "executable file not found in $PATH"),
    ] {
        let spec = lab.spec(name, &[prog, "arg"]);
        let id = spec.id.clone();
        let netns = lab.rt.netns_name_for(&id);
        lab.guard.adopt_netns(&netns);
        let err = lab.rt.create(spec).await.unwrap_err();
        assert!(matches!(err, Error::Executable { .. }), "{err:?}");
        assert!(err.to_string().contains(msg), "{err}");
        let st = lab.rt.inspect(&id).unwrap();
        assert_eq!(st.state, TaskState::Failed);
        assert!(st.error.unwrap().contains(msg));
        assert!(!NetNs::exists(&netns), "no namespace for a task that cannot run");
        assert!(!lab.state_dir.join("tasks").join(&id).exists());
    }
    // A failure in the child (here: the working directory is missing) fails `start`.
    let mut spec = lab.spec("wd", &["true"]);
    spec.workdir = Some("/nonexistent-dir".into());
    let id = spec.id.clone();
    lab.create(spec).await;
    let err = lab.rt.start(&id).await.unwrap_err();
    assert!(matches!(err, Error::Spawn { .. }), "{err:?}");
    let st = lab.rt.inspect(&id).unwrap();
    assert_eq!(st.state, TaskState::Failed);
    assert!(st.error.unwrap().contains("No such file"));
    // Duplicate ids are refused.
    let dup = lab.spec("wd", &["true"]);
    assert!(matches!(lab.rt.create(dup).await, Err(Error::Exists(_))));
    lab.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_cleans_stale_task_namespaces() {
    if !require_root("restart_cleans_stale_task_namespaces") {
        return;
    }
    let mut lab = Lab::new("rc");
    let p = lab.prefix.clone();
    // What a crashed agent leaves: a task namespace with a process in it, and its directory.
    let stale = format!("{p}-t-deadbeef0001");
    lab.guard.netns(&stale).unwrap();
    let mut orphan = std::process::Command::new("ip")
        .args(["netns", "exec", &stale, "sleep", "300"])
        .spawn()
        .unwrap();
    let stale_dir = lab.state_dir.join("tasks").join("deadbeef0001");
    std::fs::create_dir_all(&stale_dir).unwrap();
    // Another node's namespace (prefix `{p}-t`, so `{p}-t-t-…`) and a live task: not touched.
    let other = format!("{p}-t-t-abc");
    lab.guard.netns(&other).unwrap();
    let live = lab.run(lab.spec("live", &["sleep", "60"])).await;
    eventually(Duration::from_secs(5), "orphan in namespace", || {
        let n = NetNs::open(&stale).unwrap().pids().len();
        async move { (n == 1).then_some(()) }
    })
    .await;

    let removed = lab.rt.clean_stale().await.unwrap();
    assert_eq!(removed, std::slice::from_ref(&stale));
    assert!(!NetNs::exists(&stale));
    assert!(!stale_dir.exists());
    let t0 = Instant::now();
    while orphan.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(5), "orphan still alive");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(NetNs::exists(&other));
    assert_eq!(lab.rt.inspect(&live).unwrap().state, TaskState::Running);
    NetNs::delete(&other).unwrap();
    lab.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_latency() {
    if !require_root("lifecycle_latency") {
        return;
    }
    let mut lab = Lab::new("rp");
    let (mut create, mut start_to_exit, mut remove) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    const N: u32 = 10;
    for i in 0..N {
        let spec = lab.spec(&format!("l{i}"), &["true"]);
        let id = spec.id.clone();
        let t0 = Instant::now();
        lab.create(spec).await;
        let t1 = Instant::now();
        lab.rt.start(&id).await.unwrap();
        assert_state(&wait_done(&lab.rt, &id).await, TaskState::Complete, Some(0));
        let t2 = Instant::now();
        lab.rt.remove(&id).await.unwrap();
        let t3 = Instant::now();
        assert!(!NetNs::exists(&lab.rt.netns_name_for(&id)));
        (create, start_to_exit, remove) =
            (create + (t1 - t0), start_to_exit + (t2 - t1), remove + (t3 - t2));
    }
    eprintln!(
        "lifecycle of `true`, mean of {N}: create {:?}, start→complete {:?}, remove {:?}",
        create / N,
        start_to_exit / N,
        remove / N
    );
    assert!((create + start_to_exit + remove) / N < Duration::from_secs(5));
    lab.finish().await;
}

/// A tmpfs mounted at a path and made shared; unmounted on drop.
struct SharedMount(std::path::PathBuf);

impl SharedMount {
    fn new(path: &std::path::Path) -> SharedMount {
        use nix::mount::{MsFlags, mount};
        std::fs::create_dir_all(path).unwrap();
        mount(Some("tmpfs"), path, Some("tmpfs"), MsFlags::empty(), None::<&str>).unwrap();
        let guard = SharedMount(path.to_owned());
        mount(None::<&str>, path, None::<&str>, MsFlags::MS_SHARED, None::<&str>).unwrap();
        guard
    }
}

impl Drop for SharedMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The mountinfo line whose mount point is `mount_point`.
fn host_mount_line<'a>(mountinfo: &'a str, mount_point: &str) -> Option<&'a str> {
    mountinfo.lines().find(|l| l.split(' ').nth(4) == Some(mount_point))
}
