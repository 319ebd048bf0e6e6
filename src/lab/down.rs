//! Taking a lab down, whole or one agent at a time, from its state file or from names alone.

use std::fs;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::TryStreamExt;
use rtnetlink::packet_route::link::LinkAttribute;
use shoal_netns::NetNs;

use super::*;

/// A node's namespace (`LAB-nodeN`) or one its agent made (`LAB-nodeN-…`: tasks, sandboxes).
pub(super) fn is_lab_netns(lab: &str, ns: &str) -> bool {
    ns.strip_prefix(lab).and_then(|r| r.strip_prefix("-node")).is_some_and(|r| {
        let n = r.split_once('-').map_or(r, |(n, _)| n);
        !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
    })
}

pub(super) fn is_lab_link(lab: &str, link: &str) -> bool {
    link == format!("{lab}-br")
        || link == format!("{lab}-bd")
        || link
            .strip_prefix(lab)
            .and_then(|r| r.strip_prefix("-n").or_else(|| r.strip_prefix("-d")))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// What `down` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub processes: usize,
    pub namespaces: Vec<String>,
    pub links: Vec<String>,
    pub dir: bool,
}

/// Tears a lab down: agents (SIGTERM, then SIGKILL after 5 s), every process left in its
/// namespaces, the namespaces, the bridge and host veths, and its directory. Works from the
/// names alone when `lab.json` is missing or the agents are already dead.
pub async fn down(name: &str) -> anyhow::Result<Removed> {
    validate_name(name)?;
    let mut removed = Removed::default();
    let state = LabState::load(name).ok();
    let mut namespaces: Vec<String> =
        NetNs::list().into_iter().filter(|n| is_lab_netns(name, n)).collect();
    // A namespace file that lost its mount still has to go.
    if let Some(s) = &state {
        for n in &s.nodes {
            if !namespaces.contains(&n.netns) && shoal_netns::path_of(&n.netns).exists() {
                namespaces.push(n.netns.clone());
            }
        }
    }

    let mut pids: Vec<i32> = Vec::new();
    for ns in namespaces.iter().filter_map(|n| NetNs::open(n).ok()) {
        pids.extend(ns.pids());
    }
    if let Some(s) = &state {
        // An agent that somehow left its namespace is still ours if it is a shoal agent.
        for pid in s.nodes.iter().filter_map(|n| n.pid) {
            let pid = pid as i32;
            let is_agent = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).nth(1) == Some(b"agent".as_slice()))
                .unwrap_or(false);
            if is_agent && !pids.contains(&pid) {
                pids.push(pid);
            }
        }
    }
    removed.processes = pids.len();
    stop_processes(&pids, Duration::from_secs(5)).await;
    // An agent still starting up when it was stopped may have made namespaces (and started
    // tasks in them) after the list above, and a stopped agent leaves its sandboxes for the
    // next run to adopt: take those too.
    for _ in 0..3 {
        let late: Vec<String> = NetNs::list()
            .into_iter()
            .filter(|n| is_lab_netns(name, n) && !namespaces.contains(n))
            .collect();
        if late.is_empty() {
            break;
        }
        let pids: Vec<i32> =
            late.iter().filter_map(|n| NetNs::open(n).ok()).flat_map(|ns| ns.pids()).collect();
        removed.processes += pids.len();
        stop_processes(&pids, Duration::from_secs(5)).await;
        namespaces.extend(late);
    }

    for ns in &namespaces {
        NetNs::delete(ns)?;
        removed.namespaces.push(ns.clone());
    }

    let (conn, host, _) = rtnetlink::new_connection().context("netlink socket")?;
    tokio::spawn(conn);
    let mut links = host.link().get().execute();
    let mut doomed = Vec::new();
    while let Some(msg) = links.try_next().await? {
        for attr in &msg.attributes {
            if let LinkAttribute::IfName(n) = attr
                && is_lab_link(name, n)
            {
                doomed.push((msg.header.index, n.clone()));
            }
        }
    }
    for (idx, n) in doomed {
        match host.link().del(idx).execute().await {
            Ok(()) => removed.links.push(n),
            // A veth disappears with its peer's namespace; that is fine.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
            Err(e) => return Err(e).with_context(|| format!("deleting link {n}")),
        }
    }

    demo::remove_made_dirs(name).await;
    let dir = lab_dir(name);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        removed.dir = true;
    }
    if let Err(e) = neigh::restore_if_last(list_labs().len()) {
        tracing::warn!(error = %e, "restoring the host's neighbour thresholds");
    }
    Ok(removed)
}

async fn stop_processes(pids: &[i32], grace: Duration) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let alive = |pid: i32| kill(Pid::from_raw(pid), None).is_ok() && !is_zombie(pid);
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for &pid in pids.iter().filter(|&&p| alive(p)) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub(super) fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

/// Stops one node's agent: SIGTERM (or SIGKILL with `kill`, to simulate a crash), then waits
/// for it to exit. The node's namespace and links stay.
pub async fn stop_node(lab: &str, node: &str, kill: bool) -> anyhow::Result<()> {
    let state = LabState::load(lab)?;
    let n = state.node(node)?;
    let pid = n
        .pid
        .filter(|p| !is_zombie(*p as i32))
        .with_context(|| format!("the agent of {node} is not running"))?;
    use nix::sys::signal::{Signal, kill as send};
    send(
        nix::unistd::Pid::from_raw(pid as i32),
        if kill { Signal::SIGKILL } else { Signal::SIGTERM },
    )?;
    stop_processes(&[pid as i32], Duration::from_secs(10)).await;
    Ok(())
}
