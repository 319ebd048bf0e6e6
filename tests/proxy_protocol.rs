//! PROXY protocol per published port, end to end on real agents in the lab: `--publish
//! published=…,target=…,proxy-protocol=v1|v2` makes the mesh send the header, and real peers
//! running as tasks parse it: nginx (`listen … proxy_protocol`, logging `$proxy_protocol_addr`)
//! behind a v1 port and HAProxy (`accept-proxy`) behind a v2 port. Both name the real client.
//! A bad value is refused and creates nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Lab, curl, eventually, lossy, require_root, running_per_node};

/// nginx: one server that needs the header, logs its address and answers with it.
fn nginx_conf(dir: &std::path::Path) -> String {
    let d = dir.display();
    format!(
        "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    log_format pp 'pp=$proxy_protocol_addr:$proxy_protocol_port peer=$remote_addr';
    access_log {d}/nginx-access.log pp;
    server {{
        listen 8000 proxy_protocol;
        location / {{ default_type text/plain; return 200 'pp=$proxy_protocol_addr:$proxy_protocol_port\\n'; }}
    }}
}}
"
    )
}

/// HAProxy: an HTTP frontend that needs the header and answers with the source it gave.
fn haproxy_conf(dir: &std::path::Path) -> String {
    format!(
        "global
    pidfile {}/haproxy.pid
defaults
    mode http
    timeout client 10s
    timeout server 10s
    timeout connect 5s
frontend fe
    bind :8000 accept-proxy
    http-request return status 200 content-type text/plain lf-string \"src=%[src]:%[src_port]\\n\"
",
        dir.display()
    )
}

/// The first answer of `url` that starts with `prefix`, within 90 s; on failure, what the
/// mesh and nginx said.
fn answer_within(lab: &Lab, url: &str, prefix: &str, dir: &std::path::Path) -> String {
    let t0 = std::time::Instant::now();
    let mut last = String::new();
    while t0.elapsed() < Duration::from_secs(90) {
        last = curl(url, 10);
        if last.starts_with(prefix) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let errors = std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default();
    panic!(
        "{url} gave {last:?}\nnginx errors: {errors}\nnode2 metrics:\n{}",
        lab.metrics("node2").lines().filter(|l| l.contains("mesh")).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn proxy_protocol_headers_reach_nginx_and_haproxy_with_the_client_address() {
    if !require_root("proxy_protocol_headers_reach_nginx_and_haproxy_with_the_client_address") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = dir.path().join("nginx.conf");
    std::fs::write(&nginx, nginx_conf(dir.path())).expect("nginx.conf");
    let haproxy = dir.path().join("haproxy.cfg");
    std::fs::write(&haproxy, haproxy_conf(dir.path())).expect("haproxy.cfg");

    let lab = Lab::up(2);
    lab.swarm(2);
    // A bad version is refused and nothing is made.
    let out = lab.shoal(&[
        "--node",
        "node1",
        "service",
        "create",
        "--name",
        "bad",
        "-p",
        "published=8300,target=80,proxy-protocol=v3",
        "--",
        "sleep",
        "1000",
    ]);
    assert!(!out.status.success(), "proxy-protocol=v3 was accepted");
    assert!(lossy(&out.stderr).contains("v1 or v2"), "{}", lossy(&out.stderr));
    assert!(!lab.on("node1", &["service", "ls"]).contains("bad"));

    let nginx_path = nginx.display().to_string();
    let haproxy_path = haproxy.display().to_string();
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "ppnginx",
            "--constraint",
            "node.hostname==node1",
            "-p",
            "published=8200,target=8000,protocol=tcp,mode=ingress,proxy-protocol=v1",
            "--",
            "nginx",
            "-c",
            &nginx_path,
        ],
    );
    lab.on(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "pphaproxy",
            "--constraint",
            "node.hostname==node1",
            "-p",
            "published=8201,target=8000,proxy-protocol=v2",
            "--",
            "haproxy",
            "-db",
            "-f",
            &haproxy_path,
        ],
    );
    for s in ["ppnginx", "pphaproxy"] {
        eventually(&format!("{s} running"), Duration::from_secs(120), || {
            (running_per_node(&lab, s).values().sum::<usize>() == 1).then_some(())
        });
    }
    let inspect = lab.on("node1", &["service", "inspect", "ppnginx"]);
    assert!(inspect.contains("\"proxy_protocol\": \"v1\""), "{inspect}");

    // Through node2, whose mesh forwards to the tasks on node1: the header names this host.
    let host = std::net::Ipv4Addr::from(u32::from(lab.subnet.network()) + 254).to_string();
    let via = lab.addr(2);
    let answer = answer_within(&lab, &format!("http://{via}:8200/"), "pp=", dir.path());
    assert!(answer.starts_with(&format!("pp={host}:")), "nginx parsed {answer:?}");
    let log = std::fs::read_to_string(dir.path().join("nginx-access.log")).unwrap_or_default();
    assert!(log.contains(&format!("pp={host}:")), "nginx logged {log:?}");

    let answer = answer_within(&lab, &format!("http://{via}:8201/"), "src=", dir.path());
    assert!(answer.starts_with(&format!("src={host}:")), "HAProxy parsed {answer:?}");

    for s in ["ppnginx", "pphaproxy"] {
        lab.on("node1", &["service", "rm", s]);
    }
}
