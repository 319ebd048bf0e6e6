//! `shoal cni` with a real runtime: podman (CNI backend, runc) runs a busybox container built
//! here on a lab node's encrypted attachable overlay, and the container is a cluster citizen:
//! it reaches a service on another node by name and through its VIP, a task on a third node
//! reaches it by its name and alias, `network inspect` lists it, and `podman rm` withdraws its
//! name from every node. Then the plugin's answers to bad input, driven as a runtime would
//! (environment and stdin), and ADD's idempotence, CHECK, DEL and a crash of the agent.
//!
//! Root, podman, runc and busybox-static (scripts/install-test-deps.sh) are needed: the test
//! skips loudly without them, and fails under CI=true.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A podman of its own: storage, run state, configuration and CNI directories under one
/// temporary directory, removed with every container and mount in `Drop`.
struct Podman {
    dir: PathBuf,
}

impl Podman {
    /// Sets podman up to run containers on the shoal network `network` through the agent at
    /// `socket`, and imports the busybox image.
    fn new(network: &str, socket: &Path) -> Podman {
        let dir = std::env::temp_dir().join(shoal_netns::testing::unique_prefix("shoal-cni-"));
        let p = Podman { dir };
        for d in ["bin", "cni", "root", "run", "tmp", "image/bin", "image/www"] {
            std::fs::create_dir_all(p.dir.join(d)).expect("podman dirs");
        }
        // The plugin directory holds `shoal`, as `shoal cni install` makes it.
        run_ok(shoal().args(["cni", "install", "--bin-dir"]).arg(p.dir.join("bin")));
        let conf = format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
            p.dir.join("bin").display(),
            p.dir.join("cni").display(),
        );
        std::fs::write(p.dir.join("containers.conf"), conf).expect("containers.conf");
        // The example the packaging ships, pointed at this network and this node's agent.
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/cni/shoal.conflist");
        let mut list: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(example).expect("example")).unwrap();
        list["name"] = network.into();
        list["plugins"][0]["network"] = network.into();
        list["plugins"][0]["socket"] = socket.display().to_string().into();
        std::fs::write(p.dir.join("cni").join(format!("{network}.conflist")), list.to_string())
            .expect("conflist");
        // The image: a static busybox, its applets as links, and a page for its httpd.
        let image = p.dir.join("image");
        std::fs::copy("/bin/busybox", image.join("bin/busybox")).expect("copying busybox");
        for applet in ["sh", "wget", "nslookup", "sleep", "httpd", "ip", "cat"] {
            std::os::unix::fs::symlink("busybox", image.join("bin").join(applet)).expect("link");
        }
        std::fs::write(image.join("www/index.html"), "hello from podman\n").expect("page");
        let tarball = p.dir.join("image.tar");
        run_ok(Command::new("tar").arg("-C").arg(&image).arg("-cf").arg(&tarball).arg("."));
        run_ok(p.cmd().arg("import").arg(&tarball).arg("localhost/shoal-busybox"));
        p
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args(["--storage-driver", "vfs"]);
        c
    }

    /// `podman run -d` with the limits this machine lets runc set: the shell's open files,
    /// and podman's own process limit (it lowers its own to the kernel's pid_max).
    fn run_detached(&self, args: &[&str]) -> Output {
        let nofile = hard_limit("Max open files");
        let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(32768);
        let nproc = hard_limit("Max processes").min(pid_max);
        self.cmd()
            .args(["run", "-d", "--ulimit", &format!("nofile={nofile}:{nofile}")])
            .args(["--ulimit", &format!("nproc={nproc}:{nproc}")])
            .args(args)
            .output()
            .expect("podman run")
    }

    fn exec(&self, container: &str, argv: &[&str]) -> Output {
        self.cmd().args(["exec", container]).args(argv).output().expect("podman exec")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd().args(["rm", "-af", "-t", "0"]).output();
        // Whatever podman left mounted under its directories goes before they do.
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            let dir = self.dir.display().to_string();
            let mut mounts: Vec<&str> = info
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|m| m.starts_with(&dir))
                .collect();
            mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in mounts {
                let _ = Command::new("umount").args(["-l", m]).output();
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("removing {}: {e}", self.dir.display());
        }
    }
}

/// The hard limit of this process named `what` in /proc/self/limits.
fn hard_limit(what: &str) -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("limits");
    let line = limits.lines().find(|l| l.starts_with(what)).expect("limit line");
    line[what.len()..].split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(1024)
}

/// Whether the programs this test drives are installed; without them the test skips loudly
/// (fails under CI=true, where scripts/install-test-deps.sh installs them).
fn have_tools(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    let missing: Vec<&str> = [("podman", "podman"), ("runc", "runc"), ("/bin/busybox", "busybox")]
        .into_iter()
        .filter(|(p, _)| {
            Command::new("sh")
                .args(["-c", &format!("command -v {p}")])
                .output()
                .map_or(true, |o| !o.status.success())
        })
        .map(|(_, n)| n)
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!("`{test}` needs {missing:?} (scripts/install-test-deps.sh installs them)");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
    eprintln!("\n*** SKIPPED {msg} ***\n");
    false
}

/// The namespace of the standalone task `name` on `node`.
fn standalone_netns(lab: &Lab, node: &str, name: &str) -> String {
    let ps = lab.on(node, &["ps", "-a"]);
    let id = ps
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no task {name} on {node}: {ps}"));
    task_netns(lab, node, id)
}

#[test]
fn a_podman_container_is_a_cluster_citizen() {
    if !have_tools("a_podman_container_is_a_cluster_citizen") {
        return;
    }
    let lab = Lab::up(3);
    lab.swarm(3);
    lab.on(
        "node1",
        &["network", "create", "-d", "overlay", "--opt", "encrypted", "--attachable", "cnet"],
    );
    let socket = shoal::lab::node_socket(&lab.name, "node1");
    let podman = Podman::new("cnet", &socket);
    // The service's page lives in podman's directory, which goes with it.
    let www = podman.dir.join("web");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from web\n").unwrap();
    let www_dir = www.display().to_string();
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "web",
            "--network",
            "cnet",
            "-p",
            "8100:8000",
            "--constraint",
            "node.hostname==node2",
            "--",
            "busybox",
            "httpd",
            "-f",
            "-p",
            "8000",
            "-h",
            &www_dir,
        ],
    );
    let out = podman.run_detached(&[
        "--name",
        "c1",
        "--network",
        "cnet",
        "--network-alias",
        "c1alias",
        "localhost/shoal-busybox",
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    ]);
    assert!(out.status.success(), "podman run: {}", lossy(&out.stderr));

    // The container on node1 reaches the service on node2 by name, over the encrypted overlay.
    let page = eventually("the container reaching web by name", Duration::from_secs(60), || {
        let o = podman.exec("c1", &["wget", "-qO-", "http://web:8000/"]);
        Some(lossy(&o.stdout)).filter(|p| p.contains("hello from web"))
    });
    eprintln!("c1 -> web:8000: {}", page.trim());
    // `web` is the service's VIP on cnet, and the VIP answers from inside the container.
    let inspect: serde_json::Value =
        serde_json::from_str(&lab.on("node1", &["network", "inspect", "cnet"])).unwrap();
    let net = if inspect.is_array() { inspect[0].clone() } else { inspect };
    let vip = net["vips"]["web"].as_str().expect("web's VIP").to_owned();
    let look = lossy(&podman.exec("c1", &["nslookup", "web", "127.0.0.11"]).stdout);
    assert!(look.contains(&vip), "web resolves to its VIP {vip}: {look}");
    let page = lossy(&podman.exec("c1", &["wget", "-qO-", &format!("http://{vip}:8000/")]).stdout);
    assert!(page.contains("hello from web"), "through the VIP {vip}: {page}");
    // `network inspect` lists the container next to the tasks, with its address.
    let c1 = &net["containers"]["node1"][0];
    assert_eq!(c1[0], "c1", "network inspect: {net}");
    let c1_ip = c1[1].as_str().unwrap().to_owned();
    assert!(net["tasks"]["node1"].as_array().is_none_or(|t| t.iter().all(|t| t[0] != "c1")));

    // A task on node3 reaches the container by its name and by its alias.
    for name in ["c1", "c1alias"] {
        let url = format!("http://{name}:8080/");
        let mut attempt = 0;
        let page = eventually(
            &format!("a task on node3 reaching {name}"),
            Duration::from_secs(60),
            || {
                attempt += 1;
                let probe = format!("probe{attempt}{name}");
                let o = lab.shoal(&[
                    "--node",
                    "node3",
                    "run",
                    "--rm",
                    "--name",
                    &probe,
                    "--network",
                    "cnet",
                    "--",
                    "curl",
                    "-s",
                    "-m",
                    "5",
                    &url,
                ]);
                Some(lossy(&o.stdout)).filter(|p| p.contains("hello from podman"))
            },
        );
        eprintln!("node3 task -> {url}: {}", page.trim());
    }

    // A task on every node, to ask each node's DNS for the container's name.
    let mut netns = Vec::new();
    for n in 1..=3 {
        let (node, name) = (format!("node{n}"), format!("ask{n}"));
        lab.on(
            &node,
            &["run", "-d", "--name", &name, "--network", "cnet", "--", "sleep", "100000"],
        );
        netns.push(eventually("the asking task", Duration::from_secs(60), || {
            let ns = standalone_netns(&lab, &node, &name);
            Some(ns).filter(|ns| dig(ns, "c1") == c1_ip)
        }));
    }
    let t0 = Instant::now();
    let out = podman.cmd().args(["rm", "-f", "-t", "0", "c1"]).output().unwrap();
    assert!(out.status.success(), "podman rm: {}", lossy(&out.stderr));
    let rm_took = t0.elapsed();
    let t1 = Instant::now();
    for ns in &netns {
        while !dig(ns, "c1").is_empty() {
            assert!(
                t1.elapsed() < Duration::from_secs(2),
                "c1 still resolves in {ns} 2 s after podman rm"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!(
        "podman rm took {rm_took:?}; c1 gone from all three nodes' DNS {:?} after it returned",
        t1.elapsed()
    );
    // Nothing of it is left: no record, no endpoint in node1's view of the network.
    let ps = lab.on("node1", &["ps", "-a"]);
    assert!(!ps.contains(" c1 "), "{ps}");
    let net = lab.on("node1", &["network", "inspect", "cnet"]);
    assert!(!net.contains("\"c1\""), "{net}");
    drop(podman);
}

/// One call of the plugin as a runtime makes it.
fn cni(
    command: &str,
    container: &str,
    netns: &str,
    args: &str,
    conf: &str,
) -> (bool, serde_json::Value) {
    let mut child = shoal()
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("shoal as a CNI plugin");
    child.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = lossy(&out.stdout);
    let v = if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("plugin output {text:?}: {e}"))
    };
    (out.status.success(), v)
}

fn conf(network: &str, socket: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0", "name": network, "type": "shoal", "socket": socket,
        "aliases": ["extra"],
    })
    .to_string()
}

/// Asserts an error result with `code`, whose message holds `says`.
fn refused(r: (bool, serde_json::Value), code: u64, says: &str) {
    let (ok, v) = r;
    assert!(!ok, "expected error {code}, got success: {v}");
    assert_eq!(v["code"], code, "{v}");
    assert!(v["msg"].as_str().unwrap_or_default().contains(says), "{v}");
}

#[test]
fn the_plugin_answers_bad_input_with_cni_errors_and_del_always_cleans() {
    if !require_root("the_plugin_answers_bad_input_with_cni_errors_and_del_always_cleans") {
        return;
    }
    let lab = Lab::up(1);
    lab.swarm(1);
    lab.on("node1", &["network", "create", "--attachable", "att"]);
    lab.on("node1", &["network", "create", "closed"]);
    let socket = shoal::lab::node_socket(&lab.name, "node1");
    let mut cleanup = shoal_netns::testing::Cleanup::new();
    let ns_name = shoal_netns::testing::unique_prefix("cni");
    cleanup.netns(&ns_name).expect("a container namespace");
    let ns = shoal_netns::path_of(&ns_name).display().to_string();
    let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=box1;K8S_POD_NAME=box1";
    let good = conf("att", &socket);

    refused(cni("ADD", "c1", &ns, args, "{not json"), 6, "not valid");
    refused(cni("ADD", "c1", &ns, args, &good.replace("1.0.0", "9.9.9")), 1, "not supported");
    refused(cni("ADD", "c1", &ns, args, &conf("nosuch", &socket)), 7, "network nosuch not found");
    refused(cni("ADD", "c1", &ns, args, &conf("closed", &socket)), 7, "not attachable");
    refused(cni("ADD", "c1", "/run/netns/shoal-no-such-ns", args, &good), 3, "does not exist");
    refused(cni("ADD", "", &ns, args, &good), 4, "CNI_CONTAINERID");
    refused(
        cni("ADD", "c1", &ns, args, &conf("att", Path::new("/nonexistent/shoal.sock"))),
        11,
        "does not answer",
    );
    // None of them left a record behind.
    assert_eq!(lab.on("node1", &["ps", "-a"]).lines().count(), 1, "no container records");

    // ADD attaches; again with the same container id it answers the same.
    let (ok, first) = cni("ADD", "c1", &ns, args, &good);
    assert!(ok, "ADD: {first}");
    assert_eq!(first["cniVersion"], "1.0.0");
    let ip = first["ips"][0]["address"].as_str().unwrap().to_owned();
    assert_eq!(first["interfaces"][0]["sandbox"], ns.as_str());
    let (ok, again) = cni("ADD", "c1", &ns, args, &good);
    assert!(ok && again["ips"][0]["address"] == ip.as_str(), "{again}");
    let addrs =
        lossy(&Command::new("ip").args(["-n", &ns_name, "-br", "addr"]).output().unwrap().stdout);
    assert!(addrs.contains(&ip), "{addrs}");
    // Its name and alias answer in its own namespace's DNS, served by the agent.
    let bare = ip.split('/').next().unwrap();
    assert_eq!(
        eventually("box1 in DNS", Duration::from_secs(30), || Some(dig(&ns_name, "box1"))
            .filter(|a| a == bare)),
        bare
    );
    assert_eq!(dig(&ns_name, "extra"), bare);
    // A second container may not take its name.
    refused(cni("ADD", "c2", &ns, args, &good), 7, "already in use");
    let (ok, v) = cni("CHECK", "c1", &ns, args, &good);
    assert!(ok, "CHECK: {v}");

    // An agent killed and started again attaches what the store still holds: CHECK still
    // passes, and after the interface is taken away CHECK says so.
    lab.shoal(&["lab", "stop", "--kill", "node1"]);
    lab.shoal(&["lab", "start", "node1"]);
    eventually("CHECK after the agent's restart", Duration::from_secs(60), || {
        cni("CHECK", "c1", &ns, args, &good).0.then_some(())
    });
    run_ok(Command::new("ip").args(["-n", &ns_name, "link", "del", "eth0"]));
    refused(cni("CHECK", "c1", &ns, args, &good), 100, "eth0");

    // DEL cleans, and succeeds again when nothing is left.
    let (ok, v) = cni("DEL", "c1", &ns, args, &good);
    assert!(ok, "DEL: {v}");
    let (ok, v) = cni("DEL", "c1", &ns, args, &good);
    assert!(ok, "DEL again: {v}");
    assert_eq!(lab.on("node1", &["ps", "-a"]).lines().count(), 1, "no container records");
    let left = dig(&ns_name, "box1");
    assert!(!left.contains(bare), "box1 still answers in its namespace after DEL: {left}");

    // The same container id in a new namespace (restarted without a DEL): the old attachment
    // goes, the new namespace gets the interface.
    let ns2_name = shoal_netns::testing::unique_prefix("cni");
    cleanup.netns(&ns2_name).expect("a second namespace");
    let ns2 = shoal_netns::path_of(&ns2_name).display().to_string();
    assert!(cni("ADD", "c4", &ns, args, &good).0);
    let (ok, v) = cni("ADD", "c4", &ns2, args, &good);
    assert!(ok, "ADD in a new namespace: {v}");
    let links = |n: &str| {
        lossy(&Command::new("ip").args(["-n", n, "-br", "link"]).output().unwrap().stdout)
    };
    assert!(!links(&ns_name).contains("eth0"), "{}", links(&ns_name));
    assert!(links(&ns2_name).contains("eth0"), "{}", links(&ns2_name));
    assert!(cni("DEL", "c4", &ns2, args, &good).0);
    assert!(!links(&ns2_name).contains("eth0"), "{}", links(&ns2_name));

    // A container that went while the agent was down (no DEL ever came): the agent drops its
    // record once it finds the namespace gone.
    let (ok, v) = cni("ADD", "c3", &ns, "K8S_POD_NAME=box3", &good);
    assert!(ok, "ADD: {v}");
    let listed = || lab.on("node1", &["network", "inspect", "att"]).contains("box3");
    eventually("box3 in network inspect", Duration::from_secs(30), || listed().then_some(()));
    lab.shoal(&["lab", "stop", "--kill", "node1"]);
    drop(cleanup);
    lab.shoal(&["lab", "start", "node1"]);
    eventually("the orphan's record dropped", Duration::from_secs(60), || {
        (!listed()).then_some(())
    });
}
