//! Root-only: a real task namespace gets a listener at 127.0.0.11:53, `dig` inside it resolves
//! services, tasks and standalone names, removals show within 2 s, and external names are
//! forwarded to a dnsmasq in another namespace reached over a veth.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::*;
use shoal_dns::{DnsConfig, DnsService, ForwardConfig, Metrics, Scope};
use shoal_netns::testing::{Cleanup, require_root, unique_prefix};

fn sh(args: &[&str]) -> Result<String> {
    run(args[0], &args[1..])
}

/// `dig` inside namespace `ns` against 127.0.0.11; returns the `+short` lines (empty on no
/// answer) or an error when dig got no reply at all.
async fn dig(ns: &str, name: &str) -> Result<Vec<String>> {
    let ns = ns.to_owned();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "dig",
            "@127.0.0.11",
            "+short",
            "+time=1",
            "+tries=1",
            &name,
        ])
        .map(|out| out.lines().map(str::to_owned).collect())
    })
    .await?
}

struct RmFile(PathBuf);
impl Drop for RmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_namespace_resolves_services_and_forwards_upstream() -> Result<()> {
    if !require_root("task_namespace_resolves_services_and_forwards_upstream") {
        return Ok(());
    }
    let mut c = Cleanup::new();
    let p = unique_prefix("dn");
    let task_ns = format!("{p}t");
    let up_ns = format!("{p}u");
    let task = c.netns(&task_ns)?;
    c.netns(&up_ns)?;
    let (host_if, peer_if) = (format!("{p}h"), format!("{p}p"));
    // A /24 in 198.19.0.0/16 derived from the prefix.
    let x = u16::from_str_radix(&p[2..], 16).unwrap_or(0) % 200 + 30;
    let (host_ip, up_ip) = (format!("198.19.{x}.1"), format!("198.19.{x}.2"));

    sh(&["ip", "-n", &task_ns, "link", "set", "lo", "up"])?;
    sh(&["ip", "-n", &up_ns, "link", "set", "lo", "up"])?;
    sh(&[
        "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if, "netns", &up_ns,
    ])?;
    c.host_link(&host_if);
    sh(&["ip", "addr", "add", &format!("{host_ip}/24"), "dev", &host_if])?;
    sh(&["ip", "link", "set", &host_if, "up"])?;
    sh(&["ip", "-n", &up_ns, "addr", "add", &format!("{up_ip}/24"), "dev", &peer_if])?;
    sh(&["ip", "-n", &up_ns, "link", "set", &peer_if, "up"])?;

    let pid_file = std::env::temp_dir().join(format!("{p}-dnsmasq.pid"));
    let _rm_pid = RmFile(pid_file.clone());
    sh(&[
        "ip",
        "netns",
        "exec",
        &up_ns,
        "dnsmasq",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        &format!("--listen-address={up_ip}"),
        "--port=53",
        "--address=/ext.shoal.test/192.0.2.7",
        &format!("--pid-file={}", pid_file.display()),
        "--user=root",
    ])?;

    let conf = std::env::temp_dir().join(format!("{p}-resolv.conf"));
    let _rm_conf = RmFile(conf.clone());
    std::fs::write(&conf, format!("nameserver {up_ip}\n"))?;

    let config = DnsConfig {
        forward: ForwardConfig { resolv_conf: conf, ..ForwardConfig::default() },
        ..DnsConfig::default()
    };
    let dns = DnsService::start(config, Metrics::new())?;
    dns.update(snapshot(3, 0));
    dns.attach_netns("task1", &task, Scope::new([NET])).await?;

    assert_eq!(dig(&task_ns, "myredis").await?, vec!["10.0.1.250"]);
    assert_eq!(dig(&task_ns, "web").await?, vec!["10.0.1.2"]);
    let mut tasks = dig(&task_ns, "tasks.web").await?;
    tasks.sort();
    assert_eq!(tasks, vec!["10.0.1.10", "10.0.1.11", "10.0.1.12"]);

    // Forwarded to dnsmasq in the other namespace, from the host namespace.
    assert_eq!(dig(&task_ns, "ext.shoal.test").await?, vec!["192.0.2.7"]);

    // A task removed from the tables is gone from answers within 2 s.
    let removed_at = Instant::now();
    dns.update(snapshot(2, 0));
    loop {
        let now = dig(&task_ns, "tasks.web").await?;
        if !now.iter().any(|a| a == "10.0.1.12") {
            assert_eq!(now.len(), 2, "{now:?}");
            break;
        }
        assert!(
            removed_at.elapsed() < Duration::from_secs(2),
            "removed task still answered after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("removed task gone after {:?}", removed_at.elapsed());

    // After detach, nothing listens in the task namespace any more.
    dns.detach("task1").await?;
    assert!(dig(&task_ns, "web").await.is_err(), "a detached namespace still answers");
    // And a second attach of the same namespace works (sockets were really closed).
    dns.attach_netns("task1", &task, Scope::new([NET])).await.context("re-attach")?;
    assert_eq!(dig(&task_ns, "web").await?, vec!["10.0.1.2"]);
    dns.shutdown().await;
    drop(c);
    Ok(())
}

/// Two task namespaces, same 127.0.0.11:53, different networks: each sees only its own names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_namespace_sees_its_own_networks() -> Result<()> {
    if !require_root("each_namespace_sees_its_own_networks") {
        return Ok(());
    }
    let mut c = Cleanup::new();
    let p = unique_prefix("ds");
    let (a_name, b_name) = (format!("{p}a"), format!("{p}b"));
    let a = c.netns(&a_name)?;
    let b = c.netns(&b_name)?;
    let config = DnsConfig {
        forward: ForwardConfig {
            resolv_conf: std::env::temp_dir().join(format!("{p}-none")),
            ..ForwardConfig::default()
        },
        ..DnsConfig::default()
    };
    let dns = DnsService::start(config, Metrics::new())?;
    dns.update(snapshot(2, 0));
    sh(&["ip", "-n", &a_name, "link", "set", "lo", "up"])?;
    sh(&["ip", "-n", &b_name, "link", "set", "lo", "up"])?;
    dns.attach_netns("a", &a, Scope::new([NET])).await?;
    dns.attach_netns("b", &b, Scope::new(["elsewhere"])).await?;
    assert!(matches!(
        dns.attach_netns("a", &a, Scope::new([NET])).await,
        Err(shoal_dns::DnsError::AlreadyAttached(_))
    ));
    assert_eq!(dig(&a_name, "web").await?, vec!["10.0.1.2"]);
    // B answers (it has a listener) but the name is not on its networks.
    assert!(dig(&b_name, "web").await?.is_empty());
    let full = tokio::task::spawn_blocking(move || {
        sh(&["ip", "netns", "exec", &b_name, "dig", "@127.0.0.11", "+time=1", "+tries=1", "web"])
    })
    .await??;
    assert!(full.contains("status: NXDOMAIN"), "{full}");
    assert_eq!(dns.listeners().await, vec!["a", "b"]);
    dns.shutdown().await;
    assert!(dns.listeners().await.is_empty());
    Ok(())
}
