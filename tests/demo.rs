//! The built-in visitor demo against a real redis-server: it counts, and says so when Redis is
//! unreachable instead of hanging.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::shoal;

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn get(port: u16, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{port}{path}"))
            .output()
            .unwrap();
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "demo never answered: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn visitor_counts_in_real_redis_and_reports_a_missing_one() {
    if !have("redis-server") || !have("curl") {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "redis-server and curl are required under CI"
        );
        eprintln!(
            "*** SKIPPED visitor demo test: redis-server or curl missing (scripts/install-test-deps.sh) ***"
        );
        return;
    }
    let rport = free_port();
    let dir = tempfile::tempdir().unwrap();
    let redis = Killed(
        Command::new("redis-server")
            .args([
                "--port",
                &rport.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let port = free_port();
    let logs = tempfile::tempdir().unwrap();
    let log_dir = logs.path().join("made/by/the/demo");
    let _demo = Killed(
        shoal()
            .args([
                "demo",
                "visitor",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--redis",
                &format!("localhost:{rport}"),
                "--log-dir",
                log_dir.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Redis may still be starting: wait for the first count.
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        let body = get(port, "/visitor");
        if body.contains("visitor number") || Instant::now() > deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let n: u64 = first.split("number ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    let page = |n: u64| format!("Hello World, you are visitor number {n} (from 127.0.0.1)\n");
    assert_eq!(get(port, "/visitor"), page(n + 1));
    assert_eq!(get(port, "/visitor"), page(n + 2));

    drop(redis);
    let t = Instant::now();
    assert_eq!(get(port, "/visitor"), "Hello World, connection to redis error\n");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the error must come quickly, took {:?}",
        t.elapsed()
    );
    assert!(get(port, "/").starts_with("Hello World from "));

    // One line of info.log per request answered, in the directory it was given (made).
    let log = std::fs::read_to_string(log_dir.join("info.log")).unwrap();
    assert!(log.lines().count() >= 5, "{log}");
    let last: Vec<&str> = log.lines().rev().take(3).collect();
    assert!(last[0].contains(" GET /: Hello World from "), "{log}");
    assert!(last[1].ends_with("GET /visitor: Hello World, connection to redis error"), "{log}");
    assert!(last[2].ends_with(&format!("visitor number {} (from 127.0.0.1)", n + 2)), "{log}");
}
