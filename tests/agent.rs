//! The agent as a process: configuration errors exit 64 naming the field; the API answers on
//! its unix socket; a second agent on the same data dir is refused; SIGTERM removes the socket.
//! None of this needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{lossy, run_ok, shoal};
use shoal::api::client::Host;
use shoal::api::{NodeInfo, VersionInfo};

const ADDR: &str = "198.18.255.1";

fn check_config(dir: &Path, toml: &str, extra: &[&str]) -> (i32, String, String) {
    let file = dir.join("agent.toml");
    std::fs::write(&file, toml).unwrap();
    let out = shoal()
        .args(["agent", "--check-config", "--advertise-addr", ADDR, "--config"])
        .arg(&file)
        .args(extra)
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), lossy(&out.stdout), lossy(&out.stderr))
}

#[test]
fn check_config_accepts_a_good_file_and_names_bad_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, _) =
        check_config(dir.path(), "node_name = \"alpha\"\ngossip_port = 8946\n", &[]);
    assert_eq!(code, 0);
    assert!(out.contains("node_name = \"alpha\"") && out.contains("gossip_port = 8946"), "{out}");

    let (code, _, err) = check_config(dir.path(), "node_name = \"a\"\nbogus_key = 1\n", &[]);
    assert_eq!(code, 64);
    assert!(err.contains("bogus_key"), "{err}");

    let (code, _, err) = check_config(dir.path(), "data_path_port = \"fast\"\n", &[]);
    assert_eq!(code, 64);
    assert!(err.contains("data_path_port"), "{err}");

    let (code, _, err) = check_config(dir.path(), "wireguard_port = 7946\n", &[]);
    assert_eq!(code, 64);
    assert!(err.contains("`gossip_port`"), "{err}");

    // Flags win over the file, and a bad flag value is a config error too.
    let (code, out, _) =
        check_config(dir.path(), "gossip_port = 8946\n", &["--gossip-port", "9946"]);
    assert_eq!(code, 0);
    assert!(out.contains("gossip_port = 9946"), "{out}");
    let (code, _, err) = check_config(dir.path(), "", &["--gossip-port", "99999"]);
    assert_eq!(code, 64);
    assert!(err.contains("gossip-port"), "{err}");

    // Environment sits between the file and the flags.
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "control_port = 3377\n").unwrap();
    let out = shoal()
        .args(["agent", "--check-config", "--advertise-addr", ADDR, "--config"])
        .arg(&file)
        .env("SHOAL_CONTROL_PORT", "4377")
        .output()
        .unwrap();
    assert!(lossy(&out.stdout).contains("control_port = 4377"), "{}", lossy(&out.stdout));

    let out = shoal()
        .args(["agent", "--check-config", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

struct Agent {
    child: Child,
    socket: std::path::PathBuf,
}

impl Agent {
    fn start(dir: &Path, name: &str) -> Agent {
        let socket = dir.join("api.sock");
        let child = shoal()
            .args(["agent", "--node-name", name, "--advertise-addr", ADDR, "--log-format", "json"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "agent did not create its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Agent { child, socket }
    }

    fn host(&self) -> Host {
        Host { socket: self.socket.clone() }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn api_over_the_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), "api-node");
    let mode = std::fs::metadata(&agent.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "root alone unless api_group is set");

    let v: VersionInfo = agent.host().get_json("/version").await.unwrap();
    assert_eq!(v, VersionInfo::current());
    let info: NodeInfo = agent.host().get_json("/info").await.unwrap();
    assert_eq!(info.node_name, "api-node");
    assert_eq!(info.advertise_addr.map(|a| a.to_string()).as_deref(), Some(ADDR));
    assert_eq!(
        (info.ports.control, info.ports.gossip, info.ports.data_path, info.ports.wireguard),
        (2377, 7946, 4789, 51820)
    );
    assert_eq!(info.pid, agent.child.id());
    let metrics = String::from_utf8(agent.host().get("/metrics").await.unwrap().to_vec()).unwrap();
    assert!(metrics.contains("shoal_build_info{"), "{metrics}");
    assert!(
        metrics.contains("shoal_api_requests_total{path=\"/info\",code=\"200\"} 1"),
        "{metrics}"
    );
    let err = agent.host().get("/nope").await.unwrap_err().to_string();
    assert!(err.contains("no such endpoint: GET /nope"), "{err}");
}

/// `curl` against the socket as another user (uid/gid 65534 with the given extra groups):
/// the HTTP status, or 0 when it could not connect at all.
fn curl_as_nobody(socket: &Path, groups: &str) -> (u32, String) {
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534"])
        .arg(if groups.is_empty() {
            "--clear-groups".to_owned()
        } else {
            format!("--groups={groups}")
        })
        .args(["curl", "-s", "-o", "-", "-w", "\\n%{http_code}", "--unix-socket"])
        .arg(socket)
        .arg("http://agent/version")
        .output()
        .unwrap();
    let text = lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn the_api_socket_is_for_root_and_the_configured_group() {
    if !shoal_netns::testing::require_root("the_api_socket_is_for_root_and_the_configured_group") {
        return;
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // Root alone: 0600, and a data dir only root can enter.
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), "sock-root");
    assert_eq!(mode(&agent.socket), 0o600);
    assert_eq!(mode(&dir.path().join("data")), 0o700);
    assert_eq!(curl_as_nobody(&agent.socket, "").0, 0, "the file mode keeps others out");
    // Loosened by hand, the socket still refuses them: the kernel says who connects.
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, body) = curl_as_nobody(&agent.socket, "");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("permission denied") && body.contains("uid 65534"), "{body}");
    drop(agent);

    // With api_group: 0660 owned by the group; its members get in, others do not.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let mut child = shoal()
        .args(["agent", "--node-name", "sock-group", "--advertise-addr", ADDR])
        .args(["--api-group", "adm", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--socket")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let meta = std::fs::metadata(&socket).unwrap();
    let adm = nix::unistd::Group::from_name("adm").unwrap().unwrap().gid.as_raw();
    assert_eq!((mode(&socket), std::os::unix::fs::MetadataExt::gid(&meta)), (0o660, adm));
    let (code, body) = curl_as_nobody(&socket, "adm");
    assert_eq!(code, 200, "a member of the group: {body}");
    assert_eq!(curl_as_nobody(&socket, "").0, 0, "not a member");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(curl_as_nobody(&socket, "").0, 403, "not a member, socket loosened by hand");
    let _ = child.kill();
    let _ = child.wait();

    // A group that does not exist is a configuration error naming the field.
    let out = shoal()
        .args(["agent", "--check-config", "--advertise-addr", ADDR, "--api-group", "no-such-grp"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(lossy(&out.stderr).contains("api_group"), "{}", lossy(&out.stderr));
}

#[test]
fn cli_reaches_the_agent_by_host_flag_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), "cli-node");
    let url = format!("unix://{}", agent.socket.display());
    let out = run_ok(shoal().args(["-H", &url, "info"]));
    assert!(out.contains("Node:            cli-node"), "{out}");
    assert!(out.contains(&format!("Advertise addr:  {ADDR}")), "{out}");
    let out = run_ok(shoal().env("SHOAL_HOST", &url).arg("version"));
    assert_eq!(out.matches("API version:  1").count(), 2, "{out}");

    let out = shoal().args(["-H", "unix:///nonexistent/shoal.sock", "info"]).output().unwrap();
    assert!(!out.status.success());
    assert!(lossy(&out.stderr).contains("Is the agent running?"), "{}", lossy(&out.stderr));
    let out = shoal().args(["-H", "tcp://127.0.0.1:2375", "info"]).output().unwrap();
    assert!(lossy(&out.stderr).contains("unsupported host"), "{}", lossy(&out.stderr));
}

#[test]
fn second_agent_on_the_same_data_dir_is_refused_and_sigterm_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Agent::start(dir.path(), "first");
    let other_sock = dir.path().join("other.sock");
    let out = shoal()
        .args(["agent", "--advertise-addr", ADDR])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--socket")
        .arg(&other_sock)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = lossy(&out.stderr);
    assert!(
        err.contains("holds the data dir") && err.contains(&first.child.id().to_string()),
        "{err}"
    );
    assert!(!other_sock.exists(), "a refused agent must not leave a socket");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = first.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "agent ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(!first.socket.exists(), "socket must be removed on SIGTERM");
    // The lock went with the process: a new agent starts on the same data dir.
    let _again = Agent::start(dir.path(), "again");
}

#[test]
fn the_shipped_example_config_is_valid_and_documents_every_key() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/agent.toml");
    let text = std::fs::read_to_string(example).unwrap();
    // Exactly the unit's check, on the file as shipped.
    let out = shoal().args(["agent", "--check-config", "--config", example]).output().unwrap();
    assert!(out.status.success(), "{}", lossy(&out.stderr));
    // Every key the agent prints with --check-config appears in the example, set or, where its
    // default comes from the host or is "off", commented out.
    for line in lossy(&out.stdout).lines().filter(|l| l.contains(" = ")) {
        let key = line.split(" = ").next().unwrap();
        assert!(
            text.lines().any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} = "))),
            "example lacks {key}"
        );
    }
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    if std::process::Command::new("systemd-analyze").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "systemd-analyze is needed in CI");
        eprintln!("*** SKIPPED unit check: systemd-analyze missing ***");
        return;
    }
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/shoal.service");
    let text = std::fs::read_to_string(unit).unwrap();
    assert!(text.contains("ExecStart=/usr/local/bin/shoal agent"), "{text}");
    // The configuration file is optional: the unit must start without one.
    for line in text.lines().filter(|l| l.starts_with("Exec")) {
        assert!(!line.contains("--config"), "{line}");
    }
    // verify checks that the binary exists: point it at the one under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("shoal.service");
    std::fs::write(&copy, text.replace("/usr/local/bin/shoal", env!("CARGO_BIN_EXE_shoal")))
        .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", lossy(&out.stderr));
    assert!(lossy(&out.stderr).trim().is_empty(), "warnings: {}", lossy(&out.stderr));
}

#[test]
fn completion_scripts_name_the_verbs() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run_ok(shoal().args(["completion", shell]));
        for verb in ["agent", "info", "lab", "version", "service", "network", "run"] {
            assert!(out.contains(verb), "{shell} completion lacks {verb}");
        }
    }
    let out = shoal().args(["completion", "tcsh"]).output().unwrap();
    assert!(!out.status.success());
}

/// `shoal … | head -1`: a reader that goes away ends the CLI quietly with SIGPIPE's status, not a
/// panic message.
#[test]
fn closed_stdout_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = shoal()
        .args(["completion", "bash"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code().or(out.status.signal().map(|s| 128 + s)), Some(141));
    assert!(lossy(&out.stderr).trim().is_empty(), "stderr: {}", lossy(&out.stderr));
}

/// A request body over the API's limit is refused with a message naming the limit, before it is
/// read whole, and counted on `/metrics`.
#[test]
fn an_oversized_api_body_is_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), "limit-node");
    let body = dir.path().join("big.json");
    let pad = "a".repeat(shoal::api::API_BODY_LIMIT + 1);
    std::fs::write(&body, format!("{{\"name\":\"big\",\"pad\":\"{pad}\"}}")).unwrap();
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\\n%{http_code}", "--unix-socket"])
            .arg(&agent.socket)
            .args(args)
            .output()
            .expect("curl");
        lossy(&out.stdout)
    };
    let data = format!("@{}", body.display());
    let out = curl(&[
        "-H",
        "content-type: application/json",
        "--data-binary",
        &data,
        "http://agent/networks",
    ]);
    assert!(out.ends_with("\n413"), "{}", &out[out.len().saturating_sub(300)..]);
    let limit = format!("larger than the API's limit of {} bytes", shoal::api::API_BODY_LIMIT);
    assert!(out.contains(&limit), "{out}");
    let metrics = curl(&["http://agent/metrics"]);
    assert!(metrics.contains("shoal_api_refused_total{reason=\"body_too_large\"} 1"), "{metrics}");
}
